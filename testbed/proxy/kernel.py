"""Running the kernel's rule tools; every failure raises with the command and its output."""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("svclab.kube-proxy")
ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"


class RulesFailed(RuntimeError):
    def __init__(self, argv: list[str], returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} failed ({returncode}): {output.strip()}")
        self.argv, self.returncode, self.output = argv, returncode, output


def run(argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RulesFailed(argv, result.returncode, result.stderr or result.stdout)
    return result.stdout


def succeeds(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True).returncode == 0


def check_in_scratch_netns(argv: list[str], stdin: str) -> None:
    """Load rules into a brand-new, empty network namespace that dies with the command: the
    kernel's own verdict on them, with no effect on the caller's namespace."""
    run(["unshare", "--net", "--", *argv], stdin)


def in_node_netns() -> bool:
    """Whether this thread is in a named network namespace (`ip netns`: every testbed node's)
    other than the machine's own (PID 1's, where it can be read)."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    try:
        if here == os.stat("/proc/1/ns/net").st_ino:
            return False
    except OSError:  # a sandbox may hide PID 1: the named-namespace test below still holds
        pass
    try:
        named = {os.stat(entry.path).st_ino for entry in os.scandir("/run/netns")}
    except OSError:
        return False
    return here in named


def enable_route_localnet() -> None:
    """route_localnet=1 in this thread's network namespace (the node's), so that packets DNATed
    away from 127.0.0.0/8 may be routed (localhost NodePorts, upstream's issue 90259). Only in a
    node's namespace, never the machine's own: elsewhere it is logged and left alone."""
    if not in_node_netns():
        log.error("not setting route_localnet outside a node's network namespace: localhost NodePorts "
                  "will not answer (run kube-proxy in a node's namespace)")
        return
    with open(ROUTE_LOCALNET, "w") as sysctl:  # /proc/sys/net is the opening thread's namespace
        sysctl.write("1\n")
