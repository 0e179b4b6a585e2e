"""Which node gets a new connection, and which rules change when the table or the switch does.

Pure: no os-ken, no sockets. The app feeds it events and sends the rules it returns.
"""

from __future__ import annotations

import logging

from controller import flows
from controller.flows import Connection, Delete, Rule
from testbed.cloud.lb_table import LoadBalancer, Table

log = logging.getLogger("svclab.lb")

Change = Rule | Delete


class Balancer:
    def __init__(self, gw_port: int, gw_mac: str, idle_timeout: int = 60, deny_timeout: int = 10) -> None:
        self.gw_port = gw_port
        self.gw_mac = gw_mac
        self.idle_timeout = idle_timeout
        self.deny_timeout = deny_timeout
        self.table: Table | None = None
        self.connections: dict[tuple, Connection] = {}
        self._next: dict[str, int] = {}  # external IP -> round-robin position

    # ---- the table (from the cloud-controller) ---------------------------------------------
    def set_table(self, new: Table) -> list[Change]:
        """Rules to go from the current table to `new` (the switch is assumed to hold the current one)."""
        old = self.table.by_ip() if self.table is not None else {}
        self.table = new
        changes: list[Change] = []
        wanted = new.by_ip()
        for ip in old.keys() - wanted.keys():
            changes.append(flows.delete_lb(ip))
            self._forget(lambda c, ip=ip: c.external_ip == ip)
        for ip, lb in wanted.items():
            before = old.get(ip)
            if before is None:
                changes += flows.lb_rules(lb)
                continue
            if (before.ports, before.source_ranges) != (lb.ports, lb.source_ranges):
                changes += flows.delete_standing(ip) + flows.lb_rules(lb)
            changes += self._drop_connections(lb)
        return changes

    def _drop_connections(self, lb: LoadBalancer) -> list[Change]:
        """Connections to nodes no longer healthy, or to ports no longer served: gone, so clients retry at once."""
        changes: list[Change] = []
        for key, conn in list(self.connections.items()):
            if conn.external_ip != lb.ip:
                continue
            port = lb.port_for(conn.ip_proto, conn.port)
            if conn.node not in lb.backends or port is None or port.node_port != conn.node_port:
                changes += flows.delete_connection(conn, self.gw_port)
                del self.connections[key]
        return changes

    def _forget(self, predicate) -> None:
        for key in [k for k, c in self.connections.items() if predicate(c)]:
            del self.connections[key]

    # ---- the switch ------------------------------------------------------------------------
    def switch_connected(self, installed: list[tuple[int, dict, tuple]]) -> list[Change]:
        """After (re)connecting to the switch: re-learn connections from its rules, repair the rest.

        installed: (cookie, match, actions) of every rule the switch holds.
        """
        wanted = self.table.by_ip() if self.table is not None else {}
        changes: list[Change] = list(flows.base_rules())
        stale: set[str] = set()
        self.connections.clear()
        for value, match, actions in installed:
            parsed = flows.parse_cookie(value)
            if parsed is None:
                continue
            kind, ip = parsed
            if self.table is not None and ip not in wanted:
                stale.add(ip)
            elif kind == flows.FORWARD:
                conn = flows.connection_from_rule(match, actions, ip)
                if conn is not None:
                    self.connections[conn.key] = conn
        changes += [flows.delete_lb(ip) for ip in sorted(stale)]
        for lb in wanted.values():
            changes += flows.lb_rules(lb)  # ADD of an existing rule only refreshes it
            changes += self._drop_connections(lb)
        log.info("switch connected: %d connections re-learned, %d stale external IPs removed",
                 len(self.connections), len(stale))
        return changes

    def new_packet(self, in_port: int, ip_proto: int, client: str, client_port: int, dst: str,
                   dst_port: int) -> tuple[list[Change], Connection | None]:
        """A packet the switch had no connection rule for: pick a node (or refuse). Returns rules, connection."""
        lb = self.table.by_ip().get(dst) if self.table is not None else None
        port = lb.port_for(ip_proto, dst_port) if lb is not None else None
        if lb is None or port is None:
            return [], None
        if not lb.allows(client):
            return [flows.deny_rule(ip_proto, client, dst, dst_port, self.deny_timeout)], None
        key = (ip_proto, client, client_port, dst, dst_port)
        conn = self.connections.get(key)
        if conn is None or conn.node not in lb.backends:
            if not lb.backends:
                return [], None
            i = self._next.get(dst, 0)
            self._next[dst] = i + 1
            node = lb.backends[i % len(lb.backends)]
            conn = Connection(in_port, ip_proto, client, client_port, dst, dst_port, node, port.node_port)
            self.connections[key] = conn
        return flows.connection_rules(conn, self.gw_port, self.gw_mac, self.idle_timeout), conn

    def flow_removed(self, value: int, match: dict) -> None:
        """A connection's forward rule idled out."""
        parsed = flows.parse_cookie(value)
        if parsed is None or parsed[0] != flows.FORWARD:
            return
        key = flows.connection_key(match, parsed[1])
        if key is not None:
            self.connections.pop(key, None)

    def counts(self) -> dict[str, int]:
        """Open connections per node."""
        out: dict[str, int] = {}
        for conn in self.connections.values():
            out[conn.node] = out.get(conn.node, 0) + 1
        return out
