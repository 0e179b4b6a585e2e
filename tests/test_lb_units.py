"""The load balancer's pure parts: pool allocation, OpenFlow rules (serialized by real os-ken), the balancer.

IP plan as in the e2e test: pool 203.0.113.100-.104, nodes 172.18.0.2-4, client 203.0.113.2, gw port 1.
"""

from __future__ import annotations

import pytest

from controller import flows, osken_messages
from controller.balancer import Balancer
from controller.flows import Connection, Delete, Rule
from testbed.cloud.lb_table import LoadBalancer, Port, Table
from testbed.cloud.ipam import Pool
from testbed.cluster.config import ClusterConfig, ConfigError

pytestmark = pytest.mark.unit

NODES = ("172.18.0.2", "172.18.0.3", "172.18.0.4")
GW_MAC = "32:b3:fd:5c:dd:16"


def lb(ip="203.0.113.100", backends=NODES, ranges=(), ports=(Port("TCP", 80, 30080),)) -> LoadBalancer:
    return LoadBalancer(ip, "default/web", tuple(ports), tuple(backends), tuple(ranges))


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
                                                       "unhealthyThreshold": 3, "idleTimeout": "30s"}})
    assert (config.lb_health_interval, config.lb_health_timeout, config.lb_unhealthy_threshold,
            config.lb_idle_timeout) == (1.0, 0.2, 3, 30.0)
    with pytest.raises(ConfigError, match="loadBalancer.healthCheckTimeout"):
        ClusterConfig.from_dict({"loadBalancer": {"healthCheckInterval": "100ms", "healthCheckTimeout": "1s"}})
    with pytest.raises(ConfigError, match="loadBalancer.probe: unknown setting"):
        ClusterConfig.from_dict({"loadBalancer": {"probe": 1}})


# ---------------------------------------------------------------- rules

def serialize(item):
    """Through os-ken's real OpenFlow 1.3 encoder."""
    from os_ken.ofproto import ofproto_protocol, ofproto_v1_3
    dp = ofproto_protocol.ProtocolDesc(ofproto_v1_3.OFP_VERSION)
    msg = osken_messages.message(dp, item)
    msg.serialize()
    return msg


def test_standing_rules_answer_arp_in_the_switch_and_punt_new_connections():
    rules = flows.lb_rules(lb(ports=(Port("TCP", 80, 30080), Port("UDP", 53, 30053))))
    arp, tcp, udp, guard = rules
    assert arp.match == {"eth_type": 0x0806, "arp_op": 1, "arp_tpa": "203.0.113.100"}
    assert ("set", "arp_sha", "02:00:cb:00:71:64") in arp.actions and arp.actions[-1] == ("in_port",)
    assert tcp.match["tcp_dst"] == 80 and udp.match["udp_dst"] == 53 and tcp.actions == (("controller",),)
    assert guard.actions == () and guard.priority < tcp.priority < arp.priority
    assert {flows.parse_cookie(r.cookie) for r in rules} == {
        (flows.ARP, "203.0.113.100"), (flows.PUNT, "203.0.113.100"), (flows.GUARD, "203.0.113.100")}
    for rule in rules + flows.base_rules():
        serialize(rule)


def test_connection_rules_rewrite_to_the_node_port_and_back():
    conn = Connection(2, 6, "203.0.113.2", 40000, "203.0.113.100", 80, "172.18.0.3", 30080)
    forward, reply = flows.connection_rules(conn, 1, GW_MAC, 60)
    assert forward.match["in_port"] == 2 and forward.match["tcp_src"] == 40000
    assert forward.actions == (("set", "eth_dst", GW_MAC), ("set", "ipv4_dst", "172.18.0.3"),
                               ("set", "tcp_dst", 30080), ("output", 1))
    assert reply.match == {"in_port": 1, "eth_type": 0x0800, "ip_proto": 6, "ipv4_src": "172.18.0.3",
                           "ipv4_dst": "203.0.113.2", "tcp_src": 30080, "tcp_dst": 40000}
    assert reply.actions[-1] == ("output", 2) and ("set", "ipv4_src", "203.0.113.100") in reply.actions
    msg = serialize(forward)
    assert msg.idle_timeout == 60 and msg.cookie >> 56 == flows.FORWARD
    # what a restarted controller reads back from the switch gives the same connection
    read_back = flows.connection_from_rule(osken_messages.match_dict(msg.match), osken_messages.actions_of(msg.instructions),
                                           "203.0.113.100")
    assert read_back == conn
    for d in flows.delete_connection(conn, 1) + [flows.delete_lb("203.0.113.100")]:
        serialize(d)


# ---------------------------------------------------------------- balancer

def new(b: Balancer, port: int, client="203.0.113.2", dst="203.0.113.100"):
    return b.new_packet(2, 6, client, port, dst, 80)


def test_round_robin_over_healthy_nodes_and_one_connection_stays_on_one_node():
    b = Balancer(1, GW_MAC)
    b.set_table(Table((lb(),)))
    nodes = [new(b, 40000 + i)[1].node for i in range(9)]
    assert sorted(nodes) == sorted(NODES * 3)
    again = new(b, 40000)[1]  # a retransmitted SYN of a known connection
    assert again.node == nodes[0]


def test_unhealthy_node_gets_no_new_connections_and_its_connections_are_removed():
    b = Balancer(1, GW_MAC)
    b.set_table(Table((lb(),)))
    conns = [new(b, 40000 + i)[1] for i in range(3)]
    changes = b.set_table(Table((lb(backends=NODES[:2]),)))
    dead = [c for c in conns if c.node == NODES[2]]
    assert len(dead) == 1
    assert [d.match for d in changes if isinstance(d, Delete)] == [
        flows.forward_match(dead[0]), flows.reply_match(dead[0], 1)]
    assert {new(b, 41000 + i)[1].node for i in range(6)} == set(NODES[:2])
    # no healthy node at all: nothing is installed, the client's retry asks again
    b.set_table(Table((lb(backends=()),)))
    assert new(b, 42000) == ([], None)


def test_source_ranges_deny_clients_outside():
    b = Balancer(1, GW_MAC)
    b.set_table(Table((lb(ranges=("203.0.113.2/32",)),)))
    assert new(b, 40000)[1] is not None
    rules, conn = new(b, 40000, client="203.0.113.3")
    assert conn is None and rules[0].actions == () and rules[0].match["ipv4_src"] == "203.0.113.3"


def test_deleted_service_removes_all_its_rules_and_changed_ports_rewrite_the_standing_ones():
    b = Balancer(1, GW_MAC)
    b.set_table(Table((lb(), lb("203.0.113.101"))))
    new(b, 40000)
    changes = b.set_table(Table((lb(ports=(Port("TCP", 8080, 30080),)),)))
    assert flows.delete_lb("203.0.113.101") in changes
    assert Delete(flows.cookie(flows.PUNT, "203.0.113.100"), 0xFFFFFFFFFFFFFFFF) in changes
    assert any(isinstance(r, Rule) and r.match.get("tcp_dst") == 8080 for r in changes)
    assert not b.connections  # port 80 is gone, so is its connection


def test_restarted_controller_relearns_connections_and_drops_stale_ips():
    first = Balancer(1, GW_MAC)
    first.set_table(Table((lb(),)))
    conn = new(first, 40000)[1]
    installed = []
    for item in flows.lb_rules(lb()) + flows.lb_rules(lb("203.0.113.101")) + flows.connection_rules(conn, 1, GW_MAC, 60):
        msg = serialize(item)
        installed.append((msg.cookie, osken_messages.match_dict(msg.match), osken_messages.actions_of(msg.instructions)))
    second = Balancer(1, GW_MAC)
    second.table = Table((lb(),))
    changes = second.switch_connected(installed)
    assert second.connections == {conn.key: conn}
    assert flows.delete_lb("203.0.113.101") in changes
    assert new(second, 40000)[1].node == conn.node


def test_idled_out_connection_is_forgotten():
    b = Balancer(1, GW_MAC)
    b.set_table(Table((lb(),)))
    conn = new(b, 40000)[1]
    forward = serialize(flows.connection_rules(conn, 1, GW_MAC, 60)[0])
    b.flow_removed(forward.cookie, osken_messages.match_dict(forward.match))
    assert not b.connections
