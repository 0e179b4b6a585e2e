"""host-gw routing: a route to every other node's pod CIDR via that node's address.

Few and rare (one per node joining or leaving), so `ip route` is fine here;
every failure raises with the command and its output.
"""

from __future__ import annotations

import subprocess


class CommandFailed(RuntimeError):
    pass


def run_checked(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


class NodeRoutes:
    """The pod-CIDR routes of the namespace the calling process runs in."""

    def __init__(self) -> None:
        self._routes: dict[str, str] = {}

    def ensure(self, pod_cidr: str, via: str) -> None:
        if self._routes.get(pod_cidr) == via:
            return
        run_checked(["ip", "route", "replace", pod_cidr, "via", via])
        self._routes[pod_cidr] = via

    def remove(self, pod_cidr: str) -> None:
        if self._routes.pop(pod_cidr, None) is not None:
            subprocess.run(["ip", "route", "del", pod_cidr], capture_output=True)

    def close(self) -> None:
        self._routes.clear()
