"""OpenFlow 1.3 rules of the edge bridge, built as plain data (pure: no switch, no os-ken).

Layout of table 0 (higher priority wins)::

    500  one connection, both directions: client->extIP:port rewritten to gwMAC,
         nodeIP:nodePort (out the gw port); nodeIP:nodePort->client rewritten back
         to vMAC, extIP:port (out the client's port). Idle timeout; cookie FORWARD/REPLY.
    400  a client outside loadBalancerSourceRanges: dropped (cookie DENY, idle timeout)
    300  ARP request for an external IP: answered in the switch (cookie ARP), so
         ARP keeps working while the controller restarts
    200  first packet of a new connection to extIP:port -> controller (cookie PUNT)
    100  anything else to an external IP: dropped (cookie GUARD)
      0  everything else: NORMAL (client <-> gw routing, ARP between them)

Cookies: kind << 56 | MARK << 32 | external IP, so all rules of one external IP go with
one delete (cookie mask on the low 32 bits), and a restarted controller reads what a
rule is for from its cookie and its match.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from testbed.cloud.lb_table import LoadBalancer

ARP, PUNT, GUARD, FORWARD, REPLY, DENY = 1, 2, 3, 4, 5, 6
MARK = 0x5CB0
IP_MASK = 0xFFFFFFFF
OURS_MASK = 0xFFFF << 32  # the marker: any rule of ours

PRIO_CONN, PRIO_DENY, PRIO_ARP, PRIO_PUNT, PRIO_GUARD, PRIO_NORMAL = 500, 400, 300, 200, 100, 0
ETH_IP, ETH_ARP = 0x0800, 0x0806

Action = tuple  # ("output", port) | ("set", field, value) | ("move", src, dst, bits) | ("normal",) | ("controller",) | ("in_port",)


@dataclass(frozen=True)
class Rule:
    priority: int
    match: dict
    actions: tuple[Action, ...]
    cookie: int = 0
    idle_timeout: int = 0
    notify_removed: bool = False


@dataclass(frozen=True)
class Delete:
    """Delete rules: by cookie (under cookie_mask) and, if given, a match (strict: exact priority too)."""

    cookie: int
    cookie_mask: int
    match: dict = field(default_factory=dict)
    priority: int | None = None  # set: strict delete of exactly this rule


def ip_int(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def cookie(kind: int, external_ip: str) -> int:
    return kind << 56 | MARK << 32 | ip_int(external_ip)


def parse_cookie(value: int) -> tuple[int, str] | None:
    """(kind, external IP) of one of our rules, None for anyone else's."""
    if (value >> 32) & 0xFFFF != MARK:
        return None
    return value >> 56, str(ipaddress.IPv4Address(value & IP_MASK))


def virtual_mac(external_ip: str) -> str:
    """The MAC the external IP answers ARP with: locally administered, 02:00 + the IPv4 address."""
    return "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(external_ip).packed)


def l4(ip_proto: int) -> str:
    return "tcp" if ip_proto == 6 else "udp"


def base_rules() -> list[Rule]:
    return [Rule(PRIO_NORMAL, {}, (("normal",),))]


def lb_rules(lb: LoadBalancer) -> list[Rule]:
    """The standing rules of one external IP: ARP answers, new connections to the controller, a guard."""
    vmac = virtual_mac(lb.ip)
    rules = [Rule(
        PRIO_ARP, {"eth_type": ETH_ARP, "arp_op": 1, "arp_tpa": lb.ip},
        (("move", "eth_src", "eth_dst", 48), ("set", "eth_src", vmac), ("set", "arp_op", 2),
         ("move", "arp_sha", "arp_tha", 48), ("move", "arp_spa", "arp_tpa", 32),
         ("set", "arp_sha", vmac), ("set", "arp_spa", lb.ip), ("in_port",)),
        cookie(ARP, lb.ip),
    )]
    for port in lb.ports:
        rules.append(Rule(
            PRIO_PUNT, {"eth_type": ETH_IP, "ip_proto": port.ip_proto, "ipv4_dst": lb.ip,
                        f"{l4(port.ip_proto)}_dst": port.port},
            (("controller",),), cookie(PUNT, lb.ip),
        ))
    rules.append(Rule(PRIO_GUARD, {"eth_type": ETH_IP, "ipv4_dst": lb.ip}, (), cookie(GUARD, lb.ip)))
    return rules


@dataclass(frozen=True)
class Connection:
    """One client connection (or UDP flow) to an external IP, and the node it was given."""

    in_port: int
    ip_proto: int
    client: str
    client_port: int
    external_ip: str
    port: int
    node: str
    node_port: int

    @property
    def key(self) -> tuple:
        return (self.ip_proto, self.client, self.client_port, self.external_ip, self.port)


def connection_rules(conn: Connection, gw_port: int, gw_mac: str, idle_timeout: int) -> list[Rule]:
    t = l4(conn.ip_proto)
    forward = Rule(
        PRIO_CONN, forward_match(conn),
        (("set", "eth_dst", gw_mac), ("set", "ipv4_dst", conn.node), ("set", f"{t}_dst", conn.node_port),
         ("output", gw_port)),
        cookie(FORWARD, conn.external_ip), idle_timeout, notify_removed=True,
    )
    reply = Rule(
        PRIO_CONN, reply_match(conn, gw_port),
        (("set", "eth_src", virtual_mac(conn.external_ip)), ("set", "ipv4_src", conn.external_ip),
         ("set", f"{t}_src", conn.port), ("output", conn.in_port)),
        cookie(REPLY, conn.external_ip), idle_timeout,
    )
    return [forward, reply]


def forward_match(conn: Connection) -> dict:
    t = l4(conn.ip_proto)
    return {"in_port": conn.in_port, "eth_type": ETH_IP, "ip_proto": conn.ip_proto, "ipv4_src": conn.client,
            "ipv4_dst": conn.external_ip, f"{t}_src": conn.client_port, f"{t}_dst": conn.port}


def reply_match(conn: Connection, gw_port: int) -> dict:
    t = l4(conn.ip_proto)
    return {"in_port": gw_port, "eth_type": ETH_IP, "ip_proto": conn.ip_proto, "ipv4_src": conn.node,
            "ipv4_dst": conn.client, f"{t}_src": conn.node_port, f"{t}_dst": conn.client_port}


def delete_connection(conn: Connection, gw_port: int) -> list[Delete]:
    return [Delete(cookie(FORWARD, conn.external_ip), ~0 & 0xFFFFFFFFFFFFFFFF, forward_match(conn), PRIO_CONN),
            Delete(cookie(REPLY, conn.external_ip), ~0 & 0xFFFFFFFFFFFFFFFF, reply_match(conn, gw_port), PRIO_CONN)]


def deny_rule(ip_proto: int, client: str, external_ip: str, port: int, idle_timeout: int) -> Rule:
    return Rule(PRIO_DENY, {"eth_type": ETH_IP, "ip_proto": ip_proto, "ipv4_src": client, "ipv4_dst": external_ip,
                            f"{l4(ip_proto)}_dst": port}, (), cookie(DENY, external_ip), idle_timeout)


def delete_lb(external_ip: str) -> Delete:
    """Every rule of one external IP: ARP answers, punts, guard, connections, denies."""
    return Delete(MARK << 32 | ip_int(external_ip), OURS_MASK | IP_MASK)


def delete_standing(external_ip: str) -> list[Delete]:
    """The standing rules of one external IP (before rewriting them for a changed Service)."""
    full = 0xFFFFFFFFFFFFFFFF
    return [Delete(cookie(kind, external_ip), full) for kind in (ARP, PUNT, GUARD)]


def connection_key(match: dict, external_ip: str) -> tuple | None:
    """The connection a FORWARD rule's match belongs to (Connection.key)."""
    proto = match.get("ip_proto")
    if proto not in (6, 17) or "ipv4_src" not in match:
        return None
    t = l4(proto)
    return (proto, match["ipv4_src"], match.get(f"{t}_src"), external_ip, match.get(f"{t}_dst"))


def connection_from_rule(match: dict, actions: tuple[Action, ...], external_ip: str) -> Connection | None:
    """Rebuild a Connection from a FORWARD rule read back from the switch (controller restart)."""
    sets = {a[1]: a[2] for a in actions if a[0] == "set"}
    proto = match.get("ip_proto")
    if proto not in (6, 17):
        return None
    t = l4(proto)
    try:
        return Connection(match["in_port"], proto, match["ipv4_src"], match[f"{t}_src"], external_ip,
                          match[f"{t}_dst"], sets["ipv4_dst"], sets[f"{t}_dst"])
    except KeyError:
        return None
