"""The edge bridge's OpenFlow 1.3 pipeline, built as plain data (pure: no switch, no os-ken).

Every new connection is balanced in the switch, as OVN's load balancers do: a select
group per service port with one bucket per healthy node, whose bucket commits the
connection to Open vSwitch's connection tracker with DNAT to nodeIP:nodePort. Later
packets (both ways) follow the tracker's entry, so a connection keeps its node whatever
happens to the group, and nothing of a connection goes through the controller.

Tables (higher priority wins)::

  0 classify
    300  ARP request for an external IP: answered in the switch (vMAC 02:00:<IP>)
    250  client -> extIP:port [from a loadBalancerSourceRange]: ct(zone, nat) -> table 1
    200  from the gw port, TCP/UDP from a nodePort: ct(zone, nat) -> table 3
    100  anything else to an external IP (a client outside the ranges, other ports): drop
      0  everything else: NORMAL (client <-> gw routing, ARP between them)
  1 forward, after the tracker
    200  +trk+new-dnat, to extIP:port: group (pick a node, commit, DNAT) -> table 2
    100  +trk+dnat (an established connection, or a retransmitted SYN): table 2
      0  anything else (+inv, ...): drop
  2 to the gateway
      0  set the gw's MAC, out the gw port
  3 reply, after the tracker
    200  +trk+rpl from extIP (the tracker undid the DNAT): vMAC, out the port the
         connection came in on (the bucket stored it in ct_mark)
      0  NORMAL (a reply of a connection we never saw: straight to a NodePort)

Group ids: (external IP & 0x3FFF) << 17 | UDP << 16 | port (see group_id). The zone is
the cluster's own (conntrack zones are shared by every bridge of ovs-vswitchd).
Cookies: kind << 56 | MARK << 32 | external IP (0.0.0.0 for the fixed rules), so all
rules of one external IP go with one delete and a restarted app reads what each rule
is for.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from testbed.cloud.lb_table import LoadBalancer, Port, Table

BASE, ARP, FORWARD, REPLY, GUARD = 1, 2, 3, 4, 5
MARK = 0x5CB0
IP_MASK = 0xFFFFFFFF
OURS_MASK = 0xFFFF << 32  # the marker: any rule of ours
FULL_MASK = 0xFFFFFFFFFFFFFFFF

T_CLASSIFY, T_FORWARD, T_TO_GW, T_REPLY = 0, 1, 2, 3
PRIO_ARP, PRIO_LB, PRIO_REPLY, PRIO_GUARD, PRIO_CT, PRIO_DEFAULT = 300, 250, 200, 100, 100, 0
ETH_IP, ETH_ARP = 0x0800, 0x0806

# ct_state bits (ovs-fields(7))
CT_NEW, CT_EST, CT_REL, CT_RPL, CT_INV, CT_TRK, CT_SNAT, CT_DNAT = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
CT_FIRST = (CT_TRK | CT_NEW, CT_TRK | CT_NEW | CT_DNAT)  # +trk+new-dnat: nobody picked a node yet
CT_NATTED = (CT_TRK | CT_DNAT, CT_TRK | CT_DNAT)  # +trk+dnat
CT_REPLY = (CT_TRK | CT_RPL, CT_TRK | CT_RPL)  # +trk+rpl

# Actions, as tuples:
#   ("output", port) ("in_port",) ("normal",) ("set", field, value) ("move", src, dst, bits)
#   ("ct", zone, table)                      ct(zone=Z, nat, table=T): look up, apply the entry's NAT
#   ("ct_dnat", zone, table, ip, port)       ct(commit, zone=Z, nat(dst=ip:port),
#                                               exec(move in_port -> ct_mark[0..15]), table=T)
#   ("group", id) ("output_ct_mark",)        output:ct_mark[0..15]
#   ("goto", table)                          the goto_table instruction (last)
Action = tuple


@dataclass(frozen=True)
class Rule:
    table: int
    priority: int
    match: dict
    actions: tuple[Action, ...]
    cookie: int = 0

    @property
    def key(self) -> tuple:
        """What makes a rule itself in the switch (OpenFlow: table, priority, match)."""
        return self.table, self.priority, tuple(sorted(self.match.items()))


@dataclass(frozen=True)
class Delete:
    """Delete rules of all tables by cookie (under cookie_mask), or, with table set, exactly one rule (strict)."""

    cookie: int
    cookie_mask: int
    table: int | None = None
    priority: int = 0
    match: tuple = ()  # Rule.key's sorted match items


@dataclass(frozen=True)
class Group:
    """A select group: one bucket (a tuple of actions) per healthy node; no bucket drops."""

    group_id: int
    buckets: tuple[tuple[Action, ...], ...]


@dataclass(frozen=True)
class GroupMod:
    command: str  # "add", "modify" or "delete"
    group: Group


@dataclass(frozen=True)
class DataPath:
    """What the pipeline needs to know about the bridge: the gw's port and MAC, the cluster's zone."""

    gw_port: int
    gw_mac: str
    zone: int


Change = Rule | Delete | GroupMod


def ip_int(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def cookie(kind: int, external_ip: str = "0.0.0.0") -> int:
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


def group_id(external_ip: str, port: Port) -> int:
    """One group per service port: low 14 bits of the IP, UDP or not, the port (pools hold <= 16,384 IPs)."""
    return (ip_int(external_ip) & 0x3FFF) << 17 | (port.ip_proto == 17) << 16 | port.port


def source_match(cidr: str) -> dict:
    net = ipaddress.IPv4Network(cidr, strict=False)
    if net.prefixlen == 0:
        return {}
    if net.prefixlen == 32:
        return {"ipv4_src": str(net.network_address)}
    return {"ipv4_src": (str(net.network_address), str(net.netmask))}


def base_rules(dp: DataPath) -> list[Rule]:
    """The fixed rules, whatever the table holds."""
    c = cookie(BASE)
    return [
        Rule(T_CLASSIFY, PRIO_DEFAULT, {}, (("normal",),), c),
        Rule(T_FORWARD, PRIO_CT, {"eth_type": ETH_IP, "ct_state": CT_NATTED}, (("goto", T_TO_GW),), c),
        Rule(T_FORWARD, PRIO_DEFAULT, {}, (), c),
        Rule(T_TO_GW, PRIO_DEFAULT, {}, (("set", "eth_dst", dp.gw_mac), ("output", dp.gw_port)), c),
        Rule(T_REPLY, PRIO_DEFAULT, {}, (("normal",),), c),
    ]


def arp_rule(ip: str) -> Rule:
    vmac = virtual_mac(ip)
    return Rule(
        T_CLASSIFY, PRIO_ARP, {"eth_type": ETH_ARP, "arp_op": 1, "arp_tpa": ip},
        (("move", "eth_src", "eth_dst", 48), ("set", "eth_src", vmac), ("set", "arp_op", 2),
         ("move", "arp_sha", "arp_tha", 48), ("move", "arp_spa", "arp_tpa", 32),
         ("set", "arp_sha", vmac), ("set", "arp_spa", ip), ("in_port",)),
        cookie(ARP, ip),
    )


def port_rules(lb: LoadBalancer, port: Port, dp: DataPath) -> list[Rule]:
    """Both directions of one service port: into the tracker, the group, and the replies back into the tracker."""
    t = l4(port.ip_proto)
    to_lb = {"eth_type": ETH_IP, "ip_proto": port.ip_proto, "ipv4_dst": lb.ip, f"{t}_dst": port.port}
    fwd, rpl = cookie(FORWARD, lb.ip), cookie(REPLY, lb.ip)
    sources = [source_match(r) for r in lb.source_ranges] or [{}]
    rules = [Rule(T_CLASSIFY, PRIO_LB, {**to_lb, **src}, (("ct", dp.zone, T_FORWARD),), fwd) for src in sources]
    rules.append(Rule(T_FORWARD, PRIO_LB, {**to_lb, "ct_state": CT_FIRST}, (("group", group_id(lb.ip, port)),), fwd))
    rules.append(Rule(T_CLASSIFY, PRIO_REPLY, {"in_port": dp.gw_port, "eth_type": ETH_IP, "ip_proto": port.ip_proto,
                                               f"{t}_src": port.node_port}, (("ct", dp.zone, T_REPLY),), rpl))
    return rules


def lb_rules(lb: LoadBalancer, dp: DataPath) -> list[Rule]:
    """Every rule of one external IP."""
    rules = [arp_rule(lb.ip)]
    for port in lb.ports:
        rules += port_rules(lb, port, dp)
    rules.append(Rule(T_REPLY, PRIO_REPLY, {"eth_type": ETH_IP, "ipv4_src": lb.ip, "ct_state": CT_REPLY},
                      (("set", "eth_src", virtual_mac(lb.ip)), ("output_ct_mark",)), cookie(REPLY, lb.ip)))
    rules.append(Rule(T_CLASSIFY, PRIO_GUARD, {"eth_type": ETH_IP, "ipv4_dst": lb.ip}, (), cookie(GUARD, lb.ip)))
    return rules


def bucket(dp: DataPath, node: str, node_port: int) -> tuple[Action, ...]:
    return (("ct_dnat", dp.zone, T_TO_GW, node, node_port),)


def lb_groups(lb: LoadBalancer, dp: DataPath) -> list[Group]:
    return [Group(group_id(lb.ip, port), tuple(bucket(dp, node, port.node_port) for node in lb.backends))
            for port in lb.ports]


def pipeline(table: Table, dp: DataPath) -> tuple[dict[tuple, Rule], dict[int, Group]]:
    """The whole desired state of the bridge for one table: rules by key, groups by id."""
    rules = {r.key: r for r in base_rules(dp)}
    groups: dict[int, Group] = {}
    for lb in table.lbs:
        rules.update((r.key, r) for r in lb_rules(lb, dp))
        for group in lb_groups(lb, dp):
            if group.group_id in groups:
                raise ValueError(f"group id {group.group_id:#x} of {lb.ip} is taken: pool too large for group_id()")
            groups[group.group_id] = group
    return rules, groups


def delete_rule(rule: Rule) -> Delete:
    return Delete(rule.cookie, FULL_MASK, rule.table, rule.priority, rule.key[2])


def delete_lb(external_ip: str) -> Delete:
    """Every rule of one external IP in every table: ARP answers, tracker rules, group rules, guard."""
    return Delete(MARK << 32 | ip_int(external_ip), OURS_MASK | IP_MASK)


def backends_of(group: Group) -> list[tuple[str, int]]:
    """(node IP, nodePort) of each bucket: what the switch balances over."""
    return [(a[3], a[4]) for b in group.buckets for a in b if a[0] == "ct_dnat"]
