"""What the processes of a cluster cost: finding them (recorded pids and their descendants),
and their memory (PSS/RSS from smaps_rollup) and CPU time from /proc, per component group."""

from __future__ import annotations

import json
import os

from testbed.paths import StateDir


def read_proc(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cluster_pids(state: StateDir, name: str) -> dict[str, list[int]]:
    """Component -> pids: the recorded processes, the Mininet shells, and every descendant of them."""
    groups: dict[str, list[int]] = {}
    try:
        table = json.loads((state.path / "processes.json").read_text())
    except (OSError, ValueError):
        table = {}
    for proc_name, rec in table.items():
        group = ("kubelets" if proc_name.startswith("kubelet-")
                 else "kube-proxies" if proc_name.startswith("kube-proxy-") else proc_name)
        groups.setdefault(group, []).append(rec["pid"])
    try:
        net = json.loads((state.path / f"network-{name}.json").read_text())
        groups["mininet shells"] = [rec["pid"] for rec in net.get("pids", {}).values()]
    except (OSError, ValueError):
        pass
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_proc(f"/proc/{entry}/stat")
            if stat:
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    owner = {pid: g for g, pids in groups.items() for pid in pids}
    for pid in sorted(parent):
        chain, p = [], pid
        while p in parent and p not in owner and p > 1:
            chain.append(p)
            p = parent[p]
        if p in owner:
            for c in chain:
                owner[c] = owner[p]
    out: dict[str, list[int]] = {}
    for pid, g in owner.items():
        if pid in parent:  # still alive
            out.setdefault(g, []).append(pid)
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB from smaps_rollup."""
    pss = rss = 0
    for line in read_proc(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
    return pss, rss


def mem_available_kib() -> int:
    for line in read_proc("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    stat = read_proc(f"/proc/{pid}/stat")
    if not stat:
        return 0.0, 0.0
    fields = stat.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def memory_by_group(groups: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    out = {}
    for g, pids in groups.items():
        pss = rss = 0
        for pid in pids:
            p, r = memory_kib(pid)
            pss += p
            rss += r
        out[g] = {"processes": len(pids), "pss_mib": pss / 1024, "rss_mib": rss / 1024}
    return out


def cpu_by_group(groups: dict[str, list[int]]) -> dict[str, float]:
    return {g: sum(cpu_seconds(p) for p in pids) for g, pids in groups.items()}


def cpu_split_by_group(groups: dict[str, list[int]]) -> dict[str, tuple[float, float]]:
    out = {}
    for g, pids in groups.items():
        splits = [cpu_split(p) for p in pids]
        out[g] = (sum(u for u, _ in splits), sum(k for _, k in splits))
    return out


def other_load() -> str:
    """What else runs on the machine (the benchmark shares 2 cores with it)."""
    load = read_proc("/proc/loadavg").split()[:3]
    others = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = read_proc(f"/proc/{entry}/cmdline").replace("\0", " ")
            if "-m testbed" in cmd and "--name bn" not in cmd and "/bn" not in cmd:
                others += 1
    return f"loadavg {' '.join(load)}; {others} other svclab processes running"
