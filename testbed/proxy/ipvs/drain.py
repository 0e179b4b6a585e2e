"""Graceful termination of real servers, as upstream's graceful_termination.go.

A real server whose endpoint went away is not deleted at once: its weight goes to 0, so the
scheduler sends it no new connection while the established ones carry on; it is deleted when
it has no connection left (active and inactive), or after `timeout` seconds whatever it still
has. UDP and SCTP ones are deleted at once, as upstream (expire_nodest_conn ends their flows).
If the endpoint comes back before that, it gets its weight back. `process()` runs at every
sync and on kube-proxy's one-second monitor tick (backend.needs_full_sync).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from testbed.proxy.ipvs.desired import VirtualServer
from testbed.proxy.ipvs.kernel import Netlink

log = logging.getLogger("svclab.kube-proxy")


class Drainer:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self.pending: dict[tuple[VirtualServer, str], float] = {}  # (virtual server, "ip:port") -> deadline

    def drain(self, nl: Netlink, vs: VirtualServer, addr: str, weight: int = 1) -> None:
        """Stop sending new connections to a real server; delete it once idle."""
        if vs.protocol != "TCP":
            nl.delete_dest(vs, addr)
            self.pending.pop((vs, addr), None)
            return
        if weight:
            nl.put_dest(vs, addr, 0, exists=True)
        self.pending.setdefault((vs, addr), self.clock() + self.timeout)

    def revive(self, vs: VirtualServer, addr: str) -> bool:
        """The endpoint is back: True if it was draining (the caller restores its weight)."""
        return self.pending.pop((vs, addr), None) is not None

    def forget(self, vs: VirtualServer) -> None:
        """The virtual service was deleted, with its real servers."""
        for key in [k for k in self.pending if k[0] == vs]:
            del self.pending[key]

    def process(self, nl: Netlink) -> int:
        """Delete the draining real servers that are idle or past their deadline; how many."""
        if not self.pending:
            return 0
        now, deleted = self.clock(), 0
        by_service: dict[VirtualServer, list[str]] = {}
        for vs, addr in self.pending:
            by_service.setdefault(vs, []).append(addr)
        for vs, addrs in by_service.items():
            present = nl.real_servers(vs) if nl.has_service(vs) else {}
            for addr in addrs:
                rs = present.get(addr)
                if rs is None or rs.weight:  # gone, or given back its weight by someone
                    del self.pending[(vs, addr)]
                    continue
                if rs.active + rs.inactive == 0 or now >= self.pending[(vs, addr)]:
                    nl.delete_dest(vs, addr)
                    del self.pending[(vs, addr)]
                    deleted += 1
                    log.info("ipvs: deleted drained real server %s of %s (%d connections left)",
                             addr, vs, rs.active + rs.inactive)
        return deleted
