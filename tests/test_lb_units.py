"""The load balancer's pure parts: pool allocation, OpenFlow rules (serialized by real os-ken), the balancer.

IP plan as in the e2e test: pool 203.0.113.100-.104, nodes 172.18.0.2-4, client 203.0.113.2, gw port 1,
conntrack zone 1234.
"""

from __future__ import annotations

import pytest

from controller import flows, osken_messages
from controller.balancer import Balancer
from controller.flows import DataPath, Delete, Group, GroupMod, Rule
from testbed.api.v1 import api_pb2 as pb
from testbed.cloud.cloud_controller import lb_relevant
from testbed.cloud.lb_table import LoadBalancer, Port, Table
from testbed.cloud.ipam import Pool
from testbed.cluster.config import ClusterConfig, ConfigError
from testbed.cluster.topo import Names

pytestmark = pytest.mark.unit

NODES = ("172.18.0.2", "172.18.0.3", "172.18.0.4")
GW_MAC = "32:b3:fd:5c:dd:16"
DP = DataPath(1, GW_MAC, 1234)


def lb(ip="203.0.113.100", backends=NODES, ranges=(), ports=(Port("TCP", 80, 30080),)) -> LoadBalancer:
    return LoadBalancer(ip, "default/web", tuple(ports), tuple(backends), tuple(ranges))


def lb2() -> LoadBalancer:
    """A second Service: its own IP and, as always in Kubernetes, its own nodePort."""
    return lb("203.0.113.101", ports=(Port("TCP", 80, 30081),))


# ---------------------------------------------------------------- pool

def test_pool_gives_lowest_free_honours_requests_and_says_why_not():
    pool = Pool("203.0.113.100-203.0.113.102")
    assert pool.allocate(("default", "a")) == ("203.0.113.100", "")
    assert pool.allocate(("default", "a")) == ("203.0.113.100", "")  # stable
    assert pool.allocate(("default", "b"), "203.0.113.102") == ("203.0.113.102", "")
    assert pool.allocate(("default", "c"), "203.0.113.102") == (None, "loadBalancerIP 203.0.113.102 is in use by default/b")
    assert pool.allocate(("default", "c"), "203.0.113.50") == (
        None, "loadBalancerIP 203.0.113.50 is not in the pool 203.0.113.100-203.0.113.102")
    assert pool.allocate(("default", "c")) == ("203.0.113.101", "")
    assert pool.allocate(("default", "d")) == (None, "no free IP in the pool 203.0.113.100-203.0.113.102 (all 3 in use)")
    assert pool.release(("default", "a")) == "203.0.113.100"
    assert pool.allocate(("default", "d")) == ("203.0.113.100", "")
    # a Service asking for another address moves to it
    assert pool.allocate(("default", "c"), "203.0.113.101") == ("203.0.113.101", "")


def test_pool_adopts_what_status_shows_after_a_restart():
    pool = Pool("203.0.113.100-203.0.113.104")
    assert pool.adopt(("default", "a"), "203.0.113.103")
    assert not pool.adopt(("default", "b"), "203.0.113.103")  # taken
    assert not pool.adopt(("default", "b"), "198.51.100.1")  # not ours
    assert pool.allocate(("default", "a")) == ("203.0.113.103", "")


@pytest.mark.parametrize("pool, error", [
    ("203.0.113.1-203.0.113.10", "contains the router's address 203.0.113.1"),
    ("203.0.113.2-203.0.113.10", "contains the client's address 203.0.113.2"),
    ("198.51.100.1-198.51.100.9", "inside the external subnet"),
])
def test_config_refuses_a_pool_that_is_not_usable(pool, error):
    with pytest.raises(ConfigError, match=error):
        ClusterConfig(load_balancer_pool=pool)


def test_config_load_balancer_section():
    config = ClusterConfig.from_dict({"loadBalancer": {"healthCheckInterval": "1s", "healthCheckTimeout": "200ms",
                                                       "unhealthyThreshold": 3}})
    assert (config.lb_health_interval, config.lb_health_timeout, config.lb_unhealthy_threshold) == (1.0, 0.2, 3)
    # connections live in the switch's connection tracker now: the old per-connection rule timeout is refused
    with pytest.raises(ConfigError, match="loadBalancer.idleTimeout: no longer a setting: connections live in"):
        ClusterConfig.from_dict({"loadBalancer": {"idleTimeout": "30s"}})
    with pytest.raises(ConfigError, match="more than 16384 addresses"):
        ClusterConfig(external_subnet="10.200.0.0/16", load_balancer_pool="10.200.0.10-10.200.64.10")
    with pytest.raises(ConfigError, match="loadBalancer.healthCheckTimeout"):
        ClusterConfig.from_dict({"loadBalancer": {"healthCheckInterval": "100ms", "healthCheckTimeout": "1s"}})
    with pytest.raises(ConfigError, match="loadBalancer.probe: unknown setting"):
        ClusterConfig.from_dict({"loadBalancer": {"probe": 1}})


# ---------------------------------------------------------------- rules and groups

def serialize(item):
    """Through os-ken's real OpenFlow 1.3 encoder."""
    from os_ken.ofproto import ofproto_protocol, ofproto_v1_3
    dp = ofproto_protocol.ProtocolDesc(ofproto_v1_3.OFP_VERSION)
    msg = osken_messages.message(dp, item)
    msg.serialize()
    return msg


def read_back(item: Rule | Group) -> Rule | Group:
    """Encode with os-ken, decode the bytes with os-ken's parsers, as a restarted app reads the switch."""
    from os_ken.ofproto import ofproto_v1_3_parser as parser
    if isinstance(item, Group):
        buf, offset, buckets = bytes(serialize(GroupMod("add", item)).buf), 16, []
        while offset < len(buf):
            buckets.append(parser.OFPBucket.parser(buf, offset))
            offset += buckets[-1].len
        return osken_messages.group_of(parser.OFPGroupDescStats(group_id=item.group_id, buckets=buckets))
    buf = bytes(serialize(item).buf)
    match = parser.OFPMatch.parser(buf, 48)
    offset, instructions = 48 + (match.length + 7) // 8 * 8, []
    while offset < len(buf):
        instructions.append(parser.OFPInstruction.parser(buf, offset))
        offset += instructions[-1].len
    return Rule(item.table, item.priority, osken_messages.match_dict(match),
                osken_messages.actions_of(instructions), item.cookie)


def rules_of(lb_: LoadBalancer) -> dict[tuple[int, int], list[Rule]]:
    out: dict[tuple[int, int], list[Rule]] = {}
    for rule in flows.lb_rules(lb_, DP):
        out.setdefault((rule.table, rule.priority), []).append(rule)
    return out


def test_new_connections_go_through_the_tracker_to_a_select_group_and_replies_back():
    web = lb(ports=(Port("TCP", 80, 30080), Port("UDP", 53, 30053)))
    r = rules_of(web)
    tcp_in, udp_in = r[(0, flows.PRIO_LB)]
    assert tcp_in.match == {"eth_type": 0x0800, "ip_proto": 6, "ipv4_dst": "203.0.113.100", "tcp_dst": 80}
    assert tcp_in.actions == (("ct", 1234, flows.T_FORWARD),) and udp_in.match["udp_dst"] == 53
    tcp_pick, udp_pick = r[(flows.T_FORWARD, flows.PRIO_LB)]
    assert tcp_pick.match["ct_state"] == (0x21, 0xA1)  # +trk+new-dnat: nobody picked a node yet
    assert tcp_pick.actions == (("group", flows.group_id("203.0.113.100", web.ports[0])),)
    tcp_reply, udp_reply = r[(0, flows.PRIO_REPLY)]
    assert tcp_reply.match == {"in_port": 1, "eth_type": 0x0800, "ip_proto": 6, "tcp_src": 30080}
    assert tcp_reply.actions == (("ct", 1234, flows.T_REPLY),) and udp_reply.match["udp_src"] == 30053
    (back,) = r[(flows.T_REPLY, flows.PRIO_REPLY)]
    assert back.match == {"eth_type": 0x0800, "ipv4_src": "203.0.113.100", "ct_state": (0x28, 0x28)}
    assert back.actions == (("set", "eth_src", "02:00:cb:00:71:64"), ("output_ct_mark",))
    (arp,) = r[(0, flows.PRIO_ARP)]
    assert arp.match == {"eth_type": 0x0806, "arp_op": 1, "arp_tpa": "203.0.113.100"}
    assert ("set", "arp_sha", "02:00:cb:00:71:64") in arp.actions and arp.actions[-1] == ("in_port",)
    (guard,) = r[(0, flows.PRIO_GUARD)]
    assert guard.actions == () and flows.PRIO_GUARD < flows.PRIO_REPLY < flows.PRIO_LB < flows.PRIO_ARP
    assert not any(a[0] == "controller" for rule in flows.lb_rules(web, DP) + flows.base_rules(DP)
                   for a in rule.actions)  # nothing of a connection reaches the app
    tcp_group, udp_group = flows.lb_groups(web, DP)
    assert tcp_group.buckets == tuple((("ct_dnat", 1234, flows.T_TO_GW, node, 30080),) for node in NODES)
    assert flows.backends_of(udp_group) == [(node, 30053) for node in NODES]
    assert tcp_group.group_id != udp_group.group_id != flows.group_id("203.0.113.101", web.ports[0])


def test_fixed_rules_send_tracked_connections_to_the_gateway_and_drop_the_rest():
    rules = {(r.table, r.priority): r for r in flows.base_rules(DP)}
    assert rules[(0, 0)].actions == (("normal",),) and rules[(flows.T_REPLY, 0)].actions == (("normal",),)
    assert rules[(flows.T_FORWARD, flows.PRIO_CT)].match == {"eth_type": 0x0800, "ct_state": (0xA0, 0xA0)}
    assert rules[(flows.T_FORWARD, flows.PRIO_CT)].actions == (("goto", flows.T_TO_GW),)
    assert rules[(flows.T_FORWARD, 0)].actions == ()  # +inv and anything else untracked
    assert rules[(flows.T_TO_GW, 0)].actions == (("set", "eth_dst", GW_MAC), ("output", 1))


def test_every_rule_and_group_reads_back_from_os_kens_encoding_as_it_was():
    web = lb(ranges=("203.0.113.0/30", "203.0.113.9/32"), ports=(Port("TCP", 80, 30080), Port("UDP", 53, 30053)))
    rules, groups = flows.pipeline(Table((web, lb2())), DP)
    for item in list(rules.values()) + list(groups.values()):
        assert read_back(item) == item
    msg = serialize(GroupMod("modify", groups[flows.group_id(web.ip, web.ports[0])]))
    assert msg.command == 1 and msg.type == 1 and len(msg.buckets) == 3  # OFPGC_MODIFY, OFPGT_SELECT
    for delete in (flows.delete_lb(web.ip), flows.delete_rule(rules[next(iter(rules))])):
        serialize(delete)
    serialize(GroupMod("delete", groups[flows.group_id(web.ip, web.ports[0])]))


def test_source_ranges_let_only_their_clients_into_the_tracker():
    r = rules_of(lb(ranges=("203.0.113.0/30", "203.0.113.9/32")))
    assert [rule.match["ipv4_src"] for rule in r[(0, flows.PRIO_LB)]] == [("203.0.113.0", "255.255.255.252"),
                                                                         "203.0.113.9"]
    assert all("ipv4_src" not in rule.match for rule in rules_of(lb(ranges=("0.0.0.0/0",)))[(0, flows.PRIO_LB)])
    # anyone else falls through to the guard, which drops in the switch
    assert r[(0, flows.PRIO_GUARD)][0].match == {"eth_type": 0x0800, "ipv4_dst": "203.0.113.100"}


# ---------------------------------------------------------------- balancer

def group_of(b: Balancer, ip="203.0.113.100", port=Port("TCP", 80, 30080)) -> Group:
    return b.groups[flows.group_id(ip, port)]


def test_an_unhealthy_node_leaves_the_groups_buckets_and_nothing_else_changes():
    b = Balancer(DP)
    first = b.set_table(Table((lb(),)))
    assert first[0] == GroupMod("add", group_of(b)) and len([c for c in first if isinstance(c, Rule)]) == 5 + 6
    changes = b.set_table(Table((lb(backends=NODES[:2]),)))
    assert changes == [GroupMod("modify", Group(group_of(b).group_id, tuple(
        (("ct_dnat", 1234, flows.T_TO_GW, node, 30080),) for node in NODES[:2])))]
    assert b.set_table(Table((lb(backends=NODES[:2]),))) == []  # the same table again: nothing to do
    # no healthy node: a group without buckets drops new connections; the rules stay
    assert b.set_table(Table((lb(backends=()),))) == [GroupMod("modify", Group(group_of(b).group_id, ()))]
    assert b.set_table(Table((lb(),)))[0].group.buckets == group_of(b).buckets and len(group_of(b).buckets) == 3


def test_deleted_service_goes_with_all_its_rules_and_groups_and_a_changed_port_is_rewritten():
    b = Balancer(DP)
    b.set_table(Table((lb(), lb2())))
    old_group = group_of(b)
    changes = b.set_table(Table((lb(ports=(Port("TCP", 8080, 30081),)),)))
    new_group = group_of(b, port=Port("TCP", 8080, 30081))
    kinds = [(type(c).__name__, getattr(c, "command", None)) for c in changes]
    # groups first (a rule may only point at a group that exists), groups no rule needs last
    assert changes[0] == GroupMod("add", new_group) and kinds[-2:] == [("GroupMod", "delete")] * 2
    assert {c.group.group_id for c in changes[-2:]} == {old_group.group_id,
                                                       flows.group_id("203.0.113.101", Port("TCP", 80, 30080))}
    assert flows.delete_lb("203.0.113.101") in changes
    deleted = {(c.table, c.priority, c.match) for c in changes if isinstance(c, Delete) and c.table is not None}
    assert (0, flows.PRIO_LB, tuple(sorted({"eth_type": 0x0800, "ip_proto": 6, "ipv4_dst": "203.0.113.100",
                                             "tcp_dst": 80}.items()))) in deleted
    assert any(isinstance(c, Rule) and c.match.get("tcp_dst") == 8080 for c in changes)
    assert not any(isinstance(c, Rule) and c.match.get("arp_tpa") for c in changes)  # ARP answers never blink


def test_restarted_app_relearns_the_switch_and_changes_only_what_the_table_no_longer_wants():
    first = Balancer(DP)
    table = Table((lb(), lb2()))
    first.set_table(table)
    held_rules = [read_back(r) for r in first.rules.values()]
    held_groups = [read_back(g) for g in first.groups.values()]
    second = Balancer(DP)
    second.table = table
    assert second.switch_connected(held_rules, held_groups) == []
    assert (second.last_sync.rules_kept, second.last_sync.groups_kept) == (len(held_rules), 2)
    # one node went while the app was away, one Service was deleted, a stranger's rule is left alone
    third = Balancer(DP)
    third.table = Table((lb(backends=NODES[1:]),))
    stranger = Rule(0, 1, {"eth_type": 0x0806}, (), cookie=0x42)
    changes = third.switch_connected(held_rules + [stranger], held_groups)
    assert changes[0] == GroupMod("modify", group_of(third)) and flows.backends_of(changes[0].group) == [
        (n, 30080) for n in NODES[1:]]
    assert flows.delete_lb("203.0.113.101") in changes and changes[-1].command == "delete"
    assert not any(isinstance(c, Rule) for c in changes)
    assert all(c.cookie != 0x42 for c in changes if isinstance(c, Delete))


# ---------------------------------------------------------------- cloud-controller: what touches the table

def service(name: str, kind: str = "ClusterIP", headless: bool = False) -> pb.Service:
    svc = pb.Service()
    svc.metadata.name, svc.metadata.namespace, svc.spec.type = name, "default", kind
    if headless:
        svc.spec.cluster_ip = "None"
    svc.spec.ports.add(protocol="TCP", port=80, node_port=30080 if kind != "ClusterIP" else 0)
    return svc


def test_only_load_balancer_services_concern_the_table():
    headless, lb_svc = service("h", headless=True), service("web", "LoadBalancer")
    assert not lb_relevant(None, headless) and not lb_relevant(headless, None)
    assert not lb_relevant(None, service("np", "NodePort"))
    assert lb_relevant(None, lb_svc) and lb_relevant(lb_svc, None)
    assert lb_relevant(lb_svc, service("web", "NodePort"))  # stops being one: its IP must go
    marked = service("old", "NodePort")
    marked.status.conditions.add(type="IPAllocated", status="True")
    assert lb_relevant(None, marked)  # a leftover of an earlier life as a LoadBalancer


def test_unrelated_services_and_node_heartbeats_neither_queue_work_nor_republish():
    from testbed.cloud.cloud_controller import CloudController
    from testbed.cloud.health import HealthSettings

    class Feed:
        def __init__(self):
            self.published: list[Table] = []

        def publish(self, table: Table) -> None:
            self.published.append(table)

    feed = Feed()
    cc = CloudController(None, Pool("203.0.113.100-203.0.113.104"), feed, HealthSettings())
    for i in range(1000):
        cc._service_event("ADDED", None, service(f"u{i}", headless=True))
        cc._service_event("DELETED", service(f"u{i}", headless=True), None)
    assert cc.queue._queue.empty() and not cc.lbs and not feed.published
    node = pb.Node()
    node.metadata.name = "node1"
    node.status.addresses.add(type="InternalIP", address="172.18.0.2")
    cc._node_event("ADDED", None, node)
    assert len(feed.published) == 1
    beat = pb.Node()
    beat.CopyFrom(node)
    beat.metadata.resource_version = "7"  # a heartbeat: same address
    cc._node_event("MODIFIED", node, beat)
    assert len(feed.published) == 1
    cc._service_event("ADDED", None, service("web", "LoadBalancer"))
    assert cc.queue._queue.qsize() == 1 and list(cc.lbs) == [("default", "web")]


def test_each_cluster_has_a_conntrack_zone_of_its_own():
    zones = {Names(f"c{i}", 3).ct_zone for i in range(200)}
    assert len(zones) == 200 and all(1 <= z <= 65535 for z in zones)
    assert Names("lab", 3).ct_zone == Names("lab", 7).ct_zone  # the name alone decides
