"""Pod cgroups: the resources.limits of `command:` containers, through cgroup v1 or v2.

Each pod with a command gets `svclab-<cluster>/<pod uid>` in every hierarchy it uses, as the
kubelet's pod cgroups:

- cgroup v1 (this machine: cpu, memory and pids mounted apart under /sys/fs/cgroup): the
  group sits under the kubelet's own cgroup of each controller, so whatever confines svclab
  (a session's memory cgroup) confines its pods too. cpu limit -> cpu.cfs_quota_us over a
  100 ms cpu.cfs_period_us; cpu request -> cpu.shares (1024 per cpu, at least 2); memory
  limit -> memory.limit_in_bytes and memory.memsw.limit_in_bytes (no swap to escape to);
  pids.max always (DEFAULT_PIDS_LIMIT unless given). OOM kills: memory.oom_control's oom_kill.
- cgroup v2 (/sys/fs/cgroup is cgroup2): the group sits beside the kubelet's own cgroup, in
  its parent, which must have cpu, memory and pids in cgroup.subtree_control (v2 puts no
  processes in inner groups); cpu.max, cpu.weight, memory.max, memory.swap.max = 0, pids.max;
  OOM kills: memory.events' oom_kill. This machine is v1; the v2 path ran in a VM (stock
  kernel, the kubelet in the root cgroup: docs/usage.md).

Without a writable hierarchy (`detect()` finds none) pods run without cgroups and the kubelet
says so once. Every function raises OSError naming the file it could not write.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from testbed import naming

log = logging.getLogger("svclab.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory", "pids")
DEFAULT_PIDS_LIMIT = 1024  # a fork bomb in one pod cannot take the machine
CPU_PERIOD_US = 100_000  # the kubelet's CFS period
MIN_QUOTA_US = 1_000  # the kernel's (and kubelet's) smallest quota
MIN_SHARES = 2
EMPTY_TIMEOUT = 2.0  # seconds for killed processes to leave a cgroup before rmdir


@dataclass(frozen=True)
class Limits:
    cpu_limit_millicores: int | None = None
    cpu_request_millicores: int | None = None
    memory_limit_bytes: int | None = None
    pids: int = DEFAULT_PIDS_LIMIT


@dataclass(frozen=True)
class Hierarchies:
    """Where the cluster groups go: one base directory per controller (v1) or one (v2)."""

    version: int  # 1 or 2
    bases: dict[str, Path]  # controller -> the directory that holds svclab-<cluster>

    def cluster_dirs(self, cluster: str) -> dict[str, Path]:
        return {c: base / naming.cgroup_name(cluster) for c, base in self.bases.items()}


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _cgroup_mounts(mountinfo: str) -> dict[str, Path]:
    """controller (or "" for the cgroup2 tree) -> its mount point, from /proc/self/mountinfo."""
    mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options, point = fields[sep + 1], fields[sep + 3], Path(fields[4])
        if fstype == "cgroup":
            for option in options.split(","):
                if option in CONTROLLERS:
                    mounts[option] = point
        elif fstype == "cgroup2" and point == CGROUP_ROOT:
            mounts[""] = point
    return mounts


def detect() -> Hierarchies | None:
    """The hierarchies pods can be limited in, or None (no cgroup file system to write)."""
    own = _own_paths(Path("/proc/self/cgroup").read_text())
    mounts = _cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    if "" in mounts and not any(c in mounts for c in CONTROLLERS):
        return _detect_v2(mounts[""], own.get("", "/"))
    bases = {c: mounts[c] / own[c].lstrip("/") for c in CONTROLLERS if c in mounts and c in own}
    bases = {c: base for c, base in bases.items() if os.access(base, os.W_OK)}
    return Hierarchies(1, bases) if bases else None


def _detect_v2(root: Path, own: str) -> Hierarchies | None:
    base = root / own.lstrip("/")
    if base != root:
        base = base.parent
    try:
        enabled = set((base / "cgroup.subtree_control").read_text().split())
    except OSError:
        return None
    if base == root:
        available = set((root / "cgroup.controllers").read_text().split())
        for controller in sorted(set(CONTROLLERS) & available - enabled):
            _write(base / "cgroup.subtree_control", f"+{controller}")
            enabled.add(controller)
    usable = [c for c in CONTROLLERS if c in enabled]
    return Hierarchies(2, {c: base for c in usable}) if usable else None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {value!r} to {path}: {exc.strerror}") from None


class PodCgroup:
    """One pod's cgroup in every hierarchy: created with its limits, joined by a pid, read, removed."""

    def __init__(self, hierarchies: Hierarchies, cluster: str, pod_uid: str) -> None:
        self.hierarchies = hierarchies
        self.dirs = {c: d / pod_uid for c, d in hierarchies.cluster_dirs(cluster).items()}

    @property
    def paths(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def create(self, limits: Limits) -> None:
        """Make the groups (killing what a killed kubelet left in them) and write the limits."""
        if self.hierarchies.version == 2:
            parent = next(iter(self.dirs.values())).parent
            parent.mkdir(exist_ok=True)
            for controller in self.dirs:
                _write(parent / "cgroup.subtree_control", f"+{controller}")
        for path in self.paths:
            if path.exists():
                kill_all(path)
            path.mkdir(parents=True, exist_ok=True)
        if self.hierarchies.version == 1:
            self._write_v1(limits)
        else:
            self._write_v2(limits)

    def _write_v1(self, limits: Limits) -> None:
        cpu, memory, pids = self.dirs.get("cpu"), self.dirs.get("memory"), self.dirs.get("pids")
        if cpu is not None:
            if limits.cpu_limit_millicores is not None:
                _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu_limit_millicores)))
            if limits.cpu_request_millicores is not None:
                _write(cpu / "cpu.shares", str(cpu_shares(limits.cpu_request_millicores)))
        if memory is not None and limits.memory_limit_bytes is not None:
            _write(memory / "memory.limit_in_bytes", str(limits.memory_limit_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_limit_bytes))
        if pids is not None:
            _write(pids / "pids.max", str(limits.pids))

    def _write_v2(self, limits: Limits) -> None:
        path = self.paths[0]
        if "cpu" in self.dirs:
            if limits.cpu_limit_millicores is not None:
                _write(path / "cpu.max", f"{cpu_quota_us(limits.cpu_limit_millicores)} {CPU_PERIOD_US}")
            if limits.cpu_request_millicores is not None:
                shares = cpu_shares(limits.cpu_request_millicores)
                _write(path / "cpu.weight", str(1 + ((shares - 2) * 9999) // 262142))
        if "memory" in self.dirs and limits.memory_limit_bytes is not None:
            _write(path / "memory.max", str(limits.memory_limit_bytes))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
        if "pids" in self.dirs:
            _write(path / "pids.max", str(limits.pids))

    def add(self, pid: int) -> None:
        for path in self.paths:
            _write(path / "cgroup.procs", str(pid))

    def oom_kills(self) -> int:
        """How often the kernel's OOM killer killed a process of this pod."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        name = "memory.oom_control" if self.hierarchies.version == 1 else "memory.events"
        try:
            text = (memory / name).read_text()
        except OSError:
            return 0
        match = re.search(r"^oom_kill (\d+)$", text, re.M)
        return int(match.group(1)) if match else 0

    def remove(self) -> None:
        for path in self.paths:
            remove_group(path)


def join_cgroups_of(pid: int) -> None:
    """Move this process into the cgroups of `pid` (its children follow): `svclab exec` into a
    pod runs inside the pod's limits, as `kubectl exec` does."""
    own = _own_paths(Path(f"/proc/{pid}/cgroup").read_text())
    mounts = _cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    for controller, point in mounts.items():
        if controller in own:
            _write(point / own[controller].lstrip("/") / "cgroup.procs", str(os.getpid()))


def cpu_quota_us(millicores: int) -> int:
    """The kubelet's MilliCPUToQuota."""
    return max(MIN_QUOTA_US, millicores * CPU_PERIOD_US // 1000)


def cpu_shares(millicores: int) -> int:
    """The kubelet's MilliCPUToShares."""
    return max(MIN_SHARES, millicores * 1024 // 1000)


def processes(path: Path) -> list[int]:
    try:
        return [int(line) for line in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_all(path: Path, timeout: float = EMPTY_TIMEOUT) -> list[int]:
    """SIGKILL every process in the group and wait until it is empty; returns the pids."""
    killed = processes(path)
    deadline = time.monotonic() + timeout
    pending = killed
    while pending and time.monotonic() < deadline:
        for pid in pending:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
        pending = processes(path)
    return killed


def remove_group(path: Path) -> list[int]:
    """Kill what is left in a group (children first) and remove it; returns the killed pids."""
    if not path.is_dir():
        return []
    killed: list[int] = []
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        killed += remove_group(child)
    killed += kill_all(path)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove cgroup %s: %s", path, exc)
    return killed


def find_cluster_groups(cluster: str, max_depth: int = 4) -> list[Path]:
    """Every svclab-<cluster> group on the machine, whichever process made it (for clean)."""
    name = naming.cgroup_name(cluster)
    found: list[Path] = []

    def walk(directory: Path, depth: int) -> None:
        try:
            children = [p for p in directory.iterdir() if p.is_dir()]
        except OSError:
            return
        for child in children:
            if child.name == name:
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    mounts = _cgroup_mounts(Path("/proc/self/mountinfo").read_text())
    for point in sorted(set(mounts.values())):
        walk(point, 0)
    return sorted(found)


def remove_cluster(cluster: str) -> list[str]:
    """Remove the cluster's groups and kill anything still in them; what was removed."""
    removed = []
    for group in find_cluster_groups(cluster):
        killed = remove_group(group)
        removed += [f"process {pid}" for pid in killed] + [f"cgroup {group}"]
    return removed
