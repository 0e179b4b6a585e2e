"""IPVS mode's kernel tools: the scratch-namespace check and the dump (ipvsadm, ipset, iptables-save).

Both are rare (kube-proxy's bisection of refused Services; `svclab rules`), so one process
each is fine here; syncs use netlink (kernel.py).
"""

from __future__ import annotations

import subprocess
from typing import Iterable

from testbed.proxy import kernel
from testbed.proxy.ipvs import names
from testbed.proxy.ipvs.desired import VirtualService

_SERVICE_FLAG = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}


def ipvsadm_restore(services: Iterable[VirtualService]) -> str:
    """The virtual services as `ipvsadm -R` input (masquerading real servers, weight 1)."""
    lines = []
    for v in services:
        flag, target = _SERVICE_FLAG[v.key.protocol], f"{v.key.address}:{v.key.port}"
        persistence = f" -p {v.persistence}" if v.persistence else ""
        lines.append(f"-A {flag} {target} -s {v.scheduler}{persistence}")
        lines += [f"-a {flag} {target} -r {addr} -m -w 1" for addr in v.dests]
    return "\n".join(lines) + "\n"


def check_in_scratch(services: list[VirtualService]) -> None:
    """Raise kernel.RulesFailed if the kernel refuses these virtual services, loaded into a
    brand-new namespace (lo up: real servers need a routable address) that dies with the command.
    `ipvsadm -R` goes on after a refused line and exits with the last line's status (ipvsadm.c's
    restore_table): any line it reports on stderr is the kernel's refusal."""
    argv = ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && ipvsadm -R"]
    done = subprocess.run(argv, input=ipvsadm_restore(services), capture_output=True, text=True)
    if done.returncode != 0 or done.stderr.strip():
        raise kernel.RulesFailed(["ipvsadm", "-R"], done.returncode or 1, done.stderr or done.stdout)


def dump_all() -> str:
    """Virtual servers (`ipvsadm -Ln`), our ipsets, our iptables rules: what this node holds."""
    out = ["# ipvsadm -Ln", kernel.run(["ipvsadm", "-Ln"]).rstrip(), "", "# ipset list (KUBE-*)"]
    for spec in names.SETS:
        try:
            out.append(kernel.run(["ipset", "list", spec.name]).rstrip())
        except kernel.RulesFailed:
            continue
    out += ["", "# iptables-save (KUBE-*)"]
    for table in ("filter", "nat"):
        saved = kernel.run(["iptables-save", "-t", table])
        out += [line for line in saved.splitlines() if line.startswith(("*", "COMMIT")) or "KUBE-" in line]
    return "\n".join(out) + "\n"
