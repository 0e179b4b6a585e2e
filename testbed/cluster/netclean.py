"""Finding and removing what one cluster's network left on the machine, by name.

``clean(name, state_dir)`` removes everything of one cluster after its creator died
(``kill -9``), from the state record and, in any case, by the naming scheme (topo.Names):
OVS bridges by exact name (``ovs-vsctl --if-exists del-br``), Mininet shells by recorded
pid only while their argv still is that shell's, any other process still inside the
cluster's namespaces, the netns mounts, then root-namespace interfaces by exact name. It
is idempotent, touches nothing of another cluster, and never uses Mininet's own cleanup.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed import naming
from testbed.cluster import procfs
from testbed.cluster.mininet_glue import is_mininet_shell, mininet_shells
from testbed.cluster.ovs import ovs_bridges, root_interfaces, run
from testbed.cluster.topo import Names
from testbed.naming import check_cluster_name

log = logging.getLogger(__name__)

LOCK_DIR = Path("/run/lock")


def lock_path(cluster: str) -> Path:
    """Machine-wide lock of one cluster name, held (flock) while its network exists."""
    return LOCK_DIR / f"svclab-net-{cluster}.lock"


def try_lock(cluster: str) -> int | None:
    """Take the cluster name's lock without waiting: an fd, or None if someone holds it."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(cluster), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release_lock(cluster: str, fd: int) -> None:
    try:
        lock_path(cluster).unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


def record_path(state_dir: Path, cluster: str) -> Path:
    return Path(state_dir) / f"network-{cluster}.json"


@dataclass
class Leftovers:
    """What of one cluster exists on the machine right now (found by name)."""

    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)  # root namespace
    netns: list[str] = field(default_factory=list)  # names under /run/netns
    shells: dict[str, int] = field(default_factory=dict)  # Mininet node name -> pid

    def __bool__(self) -> bool:
        return bool(self.bridges or self.interfaces or self.netns or self.shells)


def find_leftovers(cluster: str) -> Leftovers:
    """Everything of the cluster found by the naming scheme (no record needed)."""
    check_cluster_name(cluster)
    bridges = [b for b in (ovs_bridges() or []) if Names.bridge_re(cluster).match(b)]
    ifre = Names.root_ifname_re(cluster)
    interfaces = sorted(n for n in root_interfaces() if ifre.match(n))
    nsre = Names.netns_re(cluster)
    try:
        netns = sorted(n for n in os.listdir(naming.NETNS_DIR) if nsre.match(n))
    except FileNotFoundError:
        netns = []
    return Leftovers(sorted(bridges), interfaces, netns, mininet_shells(cluster))


@dataclass
class CleanResult:
    killed: list[int] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    record_removed: bool = False
    bridges_left: dict[str, str] = field(default_factory=dict)  # bridge -> why it could not be deleted


def load_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable network record %s (%s): cleaning by name only", path, exc)
        return None


@dataclass
class _Doomed:
    """What teardown removes: the record's names (those that fit the scheme) plus what naming finds."""

    bridges: list[str]
    interfaces: list[str]
    netns: list[str]
    shells: dict[int, str]  # pid -> Mininet node name

    @classmethod
    def of(cls, cluster: str, record: dict[str, Any]) -> "_Doomed":
        found = find_leftovers(cluster)
        ifre, brre, nsre = Names.root_ifname_re(cluster), Names.bridge_re(cluster), Names.netns_re(cluster)
        bridges = sorted({b for b in record.get("bridges", []) if brre.match(b)} | set(found.bridges))
        interfaces = sorted({i for i in record.get("root_interfaces", []) if ifre.match(i)} | set(found.interfaces))
        netns = sorted({n for n in record.get("netns", {}).values() if nsre.match(n)} | set(found.netns))
        shells = _recorded_shells(cluster, record)
        for name, pid in found.shells.items():
            shells.setdefault(pid, name)
        return cls(bridges, interfaces, netns, shells)


def _recorded_shells(cluster: str, record: dict[str, Any]) -> dict[int, str]:
    """Recorded Mininet shells that still are those shells (pids get reused)."""
    shre = Names.shell_name_re(cluster)
    shells: dict[int, str] = {}
    for name, info in record.get("pids", {}).items():
        pid = info.get("pid") if isinstance(info, dict) else None
        if not isinstance(pid, int) or not shre.match(name) or not is_mininet_shell(pid, name):
            continue
        started = info.get("starttime")
        if started is not None and procfs.starttime(pid) != started:
            continue
        shells[pid] = name
    return shells


def _delete_bridges(bridges: list[str], result: CleanResult) -> None:
    if not bridges:
        return
    argv = ["ovs-vsctl", "-t", "10"]
    for b in bridges:
        argv += ["--", "--if-exists", "del-br", b]
    try:
        res = run(argv)
    except (OSError, subprocess.TimeoutExpired) as exc:
        result.bridges_left = {b: str(exc) for b in bridges}
        return
    if res.returncode != 0:
        result.bridges_left = {b: res.stderr.strip() for b in bridges}
    else:
        result.bridges = bridges


def _flush_conntrack(cluster: str) -> None:
    """Drop the load balancer's connections (its conntrack zone) from ovs-vswitchd's tracker.

    The tracker outlives the bridge; a new cluster of the same name (same zone) must not
    inherit its connections. Best effort: no userspace datapath, no tracker to clean.
    """
    zone = Names(cluster, 0).ct_zone
    try:
        res = run(["ovs-appctl", "-T", "5", "dpctl/flush-conntrack", f"zone={zone}"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("flush-conntrack: %s", exc)
        return
    if res.returncode != 0:
        log.debug("flush-conntrack zone=%d: %s", zone, res.stderr.strip())


def _kill_processes(cluster: str, doomed: _Doomed, terminate: Callable[[], None] | None,
                    result: CleanResult) -> None:
    """The caller's graceful terminate() first, then verified Mininet shells and anything else
    still inside the cluster's namespaces."""
    root_ino = procfs.ns_inode("/proc/self/ns/net")
    inodes = {ino for ino in (procfs.ns_inode(naming.netns_path(n)) for n in doomed.netns) if ino is not None}
    for pid in doomed.shells:  # host shells' namespaces are ours even without a mount
        ino = procfs.ns_inode(f"/proc/{pid}/ns/net")
        if ino is not None:
            inodes.add(ino)
    inodes.discard(root_ino)  # switch shells run in the root namespace: never sweep that
    if terminate is not None:
        try:
            terminate()
        except Exception as exc:  # best effort: the sweep below catches what is left
            log.warning("terminating Mininet nodes of %s: %s", cluster, exc)
    for pid, name in doomed.shells.items():
        # check again: terminate() may have ended (and reaped) it, and pids get reused
        if is_mininet_shell(pid, name) and procfs.kill(pid, group=True):
            result.killed.append(pid)
    for pid in procfs.processes_in_netns(inodes) if inodes else []:
        if procfs.kill(pid):
            result.killed.append(pid)
    procfs.wait_gone(result.killed)


def _delete_interfaces(interfaces: list[str], waited_for_netns: bool) -> None:
    """The kernel removes veth pairs with their namespace (batched, fast): wait a little for
    that, then delete what is left by exact name."""
    present = root_interfaces()
    doomed = [i for i in interfaces if i in present]
    deadline = time.monotonic() + (2.0 if waited_for_netns else 0.0)
    while doomed and time.monotonic() < deadline:
        time.sleep(0.01)
        present = root_interfaces()
        doomed = [i for i in doomed if i in present]
    if not doomed:
        return
    res = run(["ip", "-force", "-batch", "-"], input="".join(f"link del dev {i}\n" for i in doomed))
    if res.returncode != 0:
        log.debug("ip link del: %s", res.stderr.strip())
    present = root_interfaces()
    for i in doomed:
        if i in present:
            log.warning("could not delete interface %s", i)


def teardown(cluster: str, record: dict[str, Any] | None, state_file: Path | None,
             terminate: Callable[[], None] | None = None) -> CleanResult:
    """Remove every trace of the cluster: what the record names, plus what the naming finds.

    Order: bridges (OVS lets go of the ports) and the load balancer's conntrack zone, processes, netns mounts (the namespaces die
    and the kernel removes their veth pairs in one batch), then whatever root-namespace
    interface is still there, by name; the record last.
    """
    result = CleanResult()
    rec = record or {}
    if rec and rec.get("cluster") != cluster:
        log.warning("record %s belongs to cluster %r, not %r: ignored", state_file, rec.get("cluster"), cluster)
        rec = {}
    doomed = _Doomed.of(cluster, rec)
    existed = [i for i in doomed.interfaces if i in root_interfaces()]
    _delete_bridges(doomed.bridges, result)
    if doomed.bridges:
        _flush_conntrack(cluster)
    _kill_processes(cluster, doomed, terminate, result)
    for n in doomed.netns:
        if procfs.umount_and_remove(naming.NETNS_DIR / n):
            result.netns.append(n)
    _delete_interfaces(doomed.interfaces, bool(result.netns))
    present = root_interfaces()
    result.interfaces = [i for i in existed if i not in present]
    if state_file is not None:
        try:
            state_file.unlink()
            result.record_removed = True
        except FileNotFoundError:
            pass
    return result


def clean(cluster_name: str, state_dir: Path) -> CleanResult:
    """Remove everything the cluster's network left behind (after kill -9, or any time).

    Uses the record in state_dir when there is one and, in any case, finds leftovers by
    the cluster's naming scheme. Touches nothing of another cluster. Idempotent.
    """
    check_cluster_name(cluster_name)
    state_file = record_path(Path(state_dir), cluster_name)
    fd = try_lock(cluster_name)
    if fd is None:
        log.warning("cluster %s: its creating process still holds %s (hung?); cleaning anyway",
                    cluster_name, lock_path(cluster_name))
    try:
        result = teardown(cluster_name, load_record(state_file), state_file)
    finally:
        if fd is not None:
            release_lock(cluster_name, fd)
    if result.killed or result.bridges or result.interfaces or result.netns:
        log.info(
            "cleaned cluster %s: killed %s, bridges %s, interfaces %s, netns %s",
            cluster_name, result.killed, result.bridges, result.interfaces, result.netns,
        )
    return result
