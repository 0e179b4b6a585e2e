"""svclab's kube-proxy in nftables mode (testbed.proxy.nftables and its backend): the rendered
script as pure functions first, then loaded into a real kernel and crossed by real packets.

IP plan (the testbed's own ranges, see environment.md):
  pods      10.244.0.0/16 (the cluster CIDR); node-a's pods in 10.244.1.0/24 and 10.244.4.0/24,
            node-b's in 10.244.2.0/24, a client pod in 10.244.3.0/24
  services  10.96.0.0/12: 10.96.0.1x in the golden set, 10.96.0.2x in the packet test
  nodes     172.18.0.2 node-a (this node), 172.18.0.3 node-b
  external  203.0.113.0/24: LoadBalancer IP 203.0.113.10, external IP 203.0.113.9, outside
            clients 203.0.113.2 (inside the source range 203.0.113.0/25) and 203.0.113.130 (not)
  upstream  its basic test's 172.30.0.41 / 10.180.0.1 / 10.0.0.0/8, to compare chain names

Kernel tests run only inside network namespaces named nft<pid><random>-*, made by the `netns`
fixture and deleted at teardown, pass or fail, together with every process started in them; the
backend runs in the test's thread after it entered the node namespace (its nft processes are
forked from there). Nothing touches the root namespace's firewall, routes or sysctls.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from fractions import Fraction

import pytest

from testbed.proxy import nftables as nft
from testbed.proxy.model import Endpoint, ProxyState, ServicePort, ServicePortName
from testbed.proxy.nfnetlink import chain_rule_count, table_handle
from testbed.proxy.backends import NodeSettings
from testbed.proxy.nftables.backend import NftablesBackend
from tests.builders import obj
from tests.netns import ask, inside, link, netns_fixture, run, serve
from tests.proxy_fixtures import CLUSTER_CIDR, NODE, NODE_IP, eps, golden_objects, spn, svc, tracked

pytestmark = pytest.mark.unit

CONFIG = nft.Config(cluster_cidr=CLUSTER_CIDR, node_ips=(NODE_IP,))


# ------------------------------------------------------------------ objects, as manifests






# ------------------------------------------------------------------ reading a script back


_BLOCK = re.compile(r"^add chain ip kube-proxy (\S+) \{\n(.*?)^\}$", re.M | re.S)
_CONTAINER = re.compile(r"^add (?:set|map) ip kube-proxy (\S+) \{ [^\n]*elements = \{\n(.*?)\n\} ; \}$", re.M | re.S)


def chains(script: str) -> dict[str, list[str]]:
    """Chain -> the rules the script's `add chain NAME { … }` blocks give it (all blocks, in order)."""
    out: dict[str, list[str]] = {}
    for name, body in _BLOCK.findall(script):
        out.setdefault(name, []).extend(line.strip() for line in body.splitlines() if line.strip())
    return out


def declared(script: str) -> set[str]:
    """Every chain the script adds, with or without rules."""
    return {line.split()[4] for line in script.splitlines() if line.startswith("add chain ip kube-proxy ")}


def elements(script: str) -> dict[str, dict[str, str]]:
    """Container -> {key (with its comment): value} the script adds."""
    out: dict[str, dict[str, str]] = {}
    for name, body in _CONTAINER.findall(script):
        for line in body.split(",\n"):
            key, _, value = line.strip().partition(" : ")
            out.setdefault(name, {})[key] = value
    return out


def names(ns: str) -> nft.ServiceNames:
    return nft.service_names(spn(ns, ns.replace("ns", "svc")))


def dnat(ip: str, port: int = 8080, proto: str = "tcp") -> str:
    """The rule part that sends a connection to one endpoint."""
    return f"meta l4proto {proto} dnat to {ip}:{port}"


def aff(ns: str, ip: str, port: int = 8080) -> str:
    return nft.affinity_set_name(spn(ns, ns.replace("ns", "svc")), ip, port)


# ------------------------------------------------------------------ names


def test_chain_names_match_upstream():
    """Upstream's proxier_test.go spells these for ns1/svc1:p80 and its endpoint 10.180.0.1:80."""
    n = nft.service_names(spn("ns1", "svc1"))
    assert n.cluster == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert (n.local, n.external, n.firewall) == ("local-ULMVA6XW-ns1/svc1/tcp/p80", "external-ULMVA6XW-ns1/svc1/tcp/p80",
                                                 "firewall-ULMVA6XW-ns1/svc1/tcp/p80")
    assert nft.affinity_set_name(spn("ns1", "svc1"), "10.180.0.1", 80) == \
        "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"  # upstream's endpoint chain name, "affinity-" for "endpoint-"
    assert nft.service_names(spn("ns2", "svc2")).base == "42NFTM6N-ns2/svc2/tcp/p80"
    assert nft.service_names(ServicePortName("ns", "s", "", "UDP")).base.endswith("-ns/s/udp/")  # unnamed port
    longest = "n" * 63 + "/" + "s" * 63 + "/sctp/" + "p" * 63 + "__10.244.255.255/65535"
    assert nft.hash_and_truncate(longest).endswith(longest)  # IPv4 names are never cut (as upstream says)
    cut = nft.hash_and_truncate("x" * 300)
    assert len("affinity-" + cut) <= nft.NAME_LENGTH_MAX and cut.endswith("...")
    assert nft.is_service_chain(n.cluster) and not nft.is_service_chain(nft.SERVICES)


# ------------------------------------------------------------------ rendering: golden


def test_golden_script_of_upstreams_basic_case():
    """Upstream's basic case (one ClusterIP, one endpoint) as the whole first-sync transaction."""
    state = ProxyState.from_objects(
        [svc("ns1", "svc1", "172.30.0.41", ports=[{"name": "p80", "port": 80}])],
        [obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
              "metadata": {"namespace": "ns1", "name": "svc1-x", "labels": {"kubernetes.io/service-name": "svc1"}},
              "addressType": "IPv4", "ports": [{"name": "p80", "port": 80}],
              "endpoints": [{"addresses": ["10.180.0.1"], "nodeName": "node1"}]})], "node1")
    result = nft.render(state, config=nft.Config(cluster_cidr="10.0.0.0/8"))
    assert result.script == GOLDEN_BASIC
    assert result.full and not result.deleted_chains
    assert result.counts == {"kube-proxy": 25, "kube-proxy elements": 3}


GOLDEN_BASIC = """\
add table ip kube-proxy
delete table ip kube-proxy
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy services
add chain ip kube-proxy masquerading
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy firewall-check
add chain ip kube-proxy service-endpoints-check
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add set ip kube-proxy hairpin-endpoints { type ipv4_addr . ipv4_addr ; comment "local endpoints as (source . destination): a pod reaching itself through a Service" ; }
add chain ip kube-proxy filter-prerouting-pre-dnat {
\tct state new jump firewall-check
}
add chain ip kube-proxy filter-output-pre-dnat {
\tct state new jump firewall-check
}
add chain ip kube-proxy filter-forward {
\tct state new jump service-endpoints-check
\tct state new jump cluster-ips-check
}
add chain ip kube-proxy filter-input {
\tct state new jump nodeport-endpoints-check
\tct state new jump service-endpoints-check
}
add chain ip kube-proxy filter-output {
\tct state new jump service-endpoints-check
\tct state new jump cluster-ips-check
}
add chain ip kube-proxy nat-prerouting {
\tjump services
}
add chain ip kube-proxy nat-output {
\tjump services
}
add chain ip kube-proxy nat-postrouting {
\tjump masquerading
}
add chain ip kube-proxy services {
\tip daddr . meta l4proto . th dport vmap @service-ips
\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
}
add chain ip kube-proxy masquerading {
\tct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade
\tmark and 0x4000 == 0 return
\tmark set mark xor 0x4000
\tmasquerade fully-random
}
add chain ip kube-proxy mark-for-masquerade {
\tmark set mark or 0x4000
}
add chain ip kube-proxy reject-chain {
\treject
}
add chain ip kube-proxy firewall-check {
\tip daddr . meta l4proto . th dport vmap @firewall-ips
}
add chain ip kube-proxy service-endpoints-check {
\tip daddr . meta l4proto . th dport vmap @no-endpoint-services
}
add chain ip kube-proxy nodeport-endpoints-check {
\tip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
}
add chain ip kube-proxy cluster-ips-check {
\tip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
}
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 {
\tip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
\tmeta l4proto tcp dnat to 10.180.0.1:80
}
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; elements = {
\t172.30.0.41
} ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; elements = {
\t172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80
} ; }
add set ip kube-proxy hairpin-endpoints { type ipv4_addr . ipv4_addr ; comment "local endpoints as (source . destination): a pod reaching itself through a Service" ; elements = {
\t10.180.0.1 . 10.180.0.1
} ; }
"""


@pytest.fixture
def golden():
    state = ProxyState.from_objects(*golden_objects(), NODE)
    return state, nft.render(state, config=CONFIG)


def test_golden_clusterip_with_two_endpoints(golden):
    script = golden[1].script
    c = names("ns1")
    assert chains(script)[c.cluster] == [
        f"ip daddr 10.96.0.11 ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        f"numgen random mod 2 == 0 {dnat('10.244.1.2')}",
        dnat("10.244.2.2"),
    ]
    # hairpin: the local endpoint may reach itself (masqueraded after DNAT), the remote one is not ours
    assert "10.244.1.2 . 10.244.1.2" in elements(script)["hairpin-endpoints"]
    assert "10.244.2.2 . 10.244.2.2" not in elements(script)["hairpin-endpoints"]
    assert not any(chain.startswith("endpoint-") for chain in declared(script))
    assert elements(script)["service-ips"]["10.96.0.11 . tcp . 80"] == f"goto {c.cluster}"
    assert "10.96.0.11" in elements(script)["cluster-ips"]
    assert c.external not in declared(script) and c.local not in declared(script)


def test_golden_nodeport(golden):
    script = golden[1].script
    c = names("ns2")
    assert elements(script)["service-nodeports"]["tcp . 30082"] == f"goto {c.external}"
    assert chains(script)[c.external] == ["jump mark-for-masquerade", f"goto {c.cluster}"]
    assert chains(script)[nft.SERVICES][-1] == \
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"


def test_golden_local_policy_with_a_local_and_a_remote_endpoint(golden):
    script = golden[1].script
    c, local, remote = names("ns3"), dnat("10.244.1.4"), dnat("10.244.2.4")
    assert chains(script)[c.external] == [
        f'ip saddr {CLUSTER_CIDR} goto {c.cluster} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto {c.cluster} comment "short-circuit local traffic"',
        f"goto {c.local}",  # everyone else: local endpoints only, source kept
    ]
    assert chains(script)[c.local] == [local]
    assert chains(script)[c.cluster][1:] == [f"numgen random mod 2 == 0 {local}", remote]
    assert not any("ns3/svc3" in key for m in elements(script).values() for key in m)  # nothing dropped


def test_golden_no_endpoints_rejects_and_local_without_local_endpoints_drops(golden):
    script = golden[1].script
    no_ep = elements(script)["no-endpoint-services"]
    assert no_ep == {
        '10.96.0.14 . tcp . 80 comment "ns4/svc4:p80"': "goto reject-chain",  # none at all: refused at once
        '10.96.0.18 . tcp . 80 comment "ns8/svc8:p80"': "drop",  # internalTrafficPolicy Local, none here
    }
    assert chains(script)[nft.REJECT_CHAIN] == ["reject"]
    assert not any(chain.endswith(names("ns4").base) for chain in declared(script))  # no chain at all
    assert "10.96.0.14" in elements(script)["cluster-ips"]
    # svc7: externalTrafficPolicy Local, its only endpoint elsewhere: NodePort traffic dropped...
    assert elements(script)["no-endpoint-nodeports"] == {'tcp . 30087 comment "ns7/svc7:p80"': "drop"}
    # ...except from pods and the node itself, short-circuited to the cluster-wide endpoints
    c = names("ns7")
    assert [r.split(" comment")[0].rsplit(" ", 1)[1] for r in chains(script)[c.external]] == \
        [c.cluster, "mark-for-masquerade", c.cluster]
    assert c.local not in declared(script)
    assert elements(script)["service-nodeports"]["tcp . 30087"] == f"goto {c.external}"


def test_golden_client_ip_affinity(golden):
    script = golden[1].script
    c = names("ns5")
    a, b = dnat("10.244.1.6"), dnat("10.244.2.6")
    sa, sb = aff("ns5", "10.244.1.6"), aff("ns5", "10.244.2.6")
    assert f"add set ip kube-proxy {sa} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 600s ; }}" in script
    # a known client goes back to its endpoint; the endpoint taken (re)members the client
    ua, ub = f"update @{sa} {{ ip saddr }}", f"update @{sb} {{ ip saddr }}"
    assert chains(script)[c.cluster][1:] == [f"ip saddr @{sa} {ua} {a}", f"ip saddr @{sb} {ub} {b}",
                                             f"numgen random mod 2 == 0 {ua} {a}", f"{ub} {b}"]


def test_golden_load_balancer_with_source_ranges(golden):
    script = golden[1].script
    c = names("ns6")
    assert elements(script)["firewall-ips"] == {"203.0.113.10 . tcp . 80": f"goto {c.firewall}"}
    # the node's own IP is in a range: the node reaching its LB IP comes from that IP
    assert chains(script)[c.firewall] == ["ip saddr != { 203.0.113.0/25, 172.18.0.0/16, 203.0.113.10 } drop"]
    assert chains(script)[nft.FIREWALL_CHECK] == ["ip daddr . meta l4proto . th dport vmap @firewall-ips"]
    assert elements(script)["service-ips"]["203.0.113.10 . tcp . 80"] == f"goto {c.external}"
    assert elements(script)["service-nodeports"]["tcp . 30086"] == f"goto {c.external}"  # NodePorts bypass ranges


def test_golden_external_ip_and_headless(golden):
    state, result = golden
    c = names("ns9")
    assert elements(result.script)["service-ips"]["203.0.113.9 . tcp . 80"] == f"goto {c.external}"
    assert "headless" not in result.script
    assert set(result.programmed.services) == set(state.services)


def test_cascade_picks_each_endpoint_with_equal_probability():
    """The chance each rule of a policy chain sends a new connection to its endpoint, computed
    exactly from the rules: 1/n for every endpoint, as upstream's numgen vmap."""
    renderer = nft._ServiceRenderer(nft.Config())
    for n in range(1, 9):
        endpoints = tuple(Endpoint(f"10.244.1.{i}", 80) for i in range(1, n + 1))
        remaining, chance = Fraction(1), {}
        for rule in renderer._balance(ServicePort(spn("ns1", "svc1"), "10.96.0.11", 80, "TCP"), endpoints):
            m = re.fullmatch(r"(?:numgen random mod (\d+) == 0 )?meta l4proto tcp dnat to (\S+)", rule)
            p = Fraction(1, int(m[1])) if m[1] else Fraction(1)
            chance[m[2]] = remaining * p
            remaining -= remaining * p
        assert remaining == 0 and set(chance.values()) == {Fraction(1, n)}, chance
    big = tuple(Endpoint(f"10.244.1.{i}", 80) for i in range(1, 5))
    sp = ServicePort(spn("ns1", "svc1"), "10.96.0.11", 80, "TCP")
    rules = nft._ServiceRenderer(nft.Config(cascade_max=3))._balance(sp, big)
    assert rules == ["meta l4proto tcp dnat to numgen random mod 4 map { 0 : 10.244.1.1 . 80, 1 : 10.244.1.2 . 80, "
                     "2 : 10.244.1.3 . 80, 3 : 10.244.1.4 . 80 }"]
    # with ClientIP affinity each endpoint needs its own rule (to update its set): always the cascade
    sticky = nft._ServiceRenderer(nft.Config(cascade_max=3))._balance(
        dataclasses.replace(sp, session_affinity_timeout=60), big)
    assert len(sticky) == 8 and "map" not in " ".join(sticky)


def test_udp_and_sctp_ports():
    dns = svc("kube-system", "dns", "10.96.0.10", ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                         {"name": "sig", "port": 3868, "protocol": "SCTP"}])
    slice_ = obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                  "metadata": {"namespace": "kube-system", "name": "dns-x",
                               "labels": {"kubernetes.io/service-name": "dns"}},
                  "addressType": "IPv4", "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"},
                                                   {"name": "sig", "port": 3868, "protocol": "SCTP"}],
                  "endpoints": [{"addresses": ["10.244.1.53"], "nodeName": NODE}]})
    script = nft.render(ProxyState.from_objects([dns], [slice_], NODE), config=CONFIG).script
    udp = nft.service_names(ServicePortName("kube-system", "dns", "dns", "UDP"))
    sctp = nft.service_names(ServicePortName("kube-system", "dns", "sig", "SCTP"))
    assert udp.cluster.endswith("-kube-system/dns/udp/dns")
    assert chains(script)[udp.cluster][-1] == "meta l4proto udp dnat to 10.244.1.53:5353"
    assert chains(script)[sctp.cluster][-1] == "meta l4proto sctp dnat to 10.244.1.53:3868"
    assert elements(script)["service-ips"] == {
        "10.96.0.10 . udp . 53": f"goto {udp.cluster}",
        "10.96.0.10 . sctp . 3868": f"goto {nft.service_names(ServicePortName('kube-system', 'dns', 'sig', 'SCTP')).cluster}",
    }
    assert elements(script)["cluster-ips"] == {"10.96.0.10": ""}  # one element for both ports


def test_config_variants(golden):
    state, _ = golden
    script = nft.render(state, config=nft.Config(nodeport_addresses=("172.18.0.2",), service_cidrs=("10.96.0.0/12",),
                                                 masquerade_all=True)).script
    assert chains(script)[nft.SERVICES][1] == "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    assert chains(script)[nft.NODEPORT_ENDPOINTS_CHECK] == [
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"]
    assert elements(script)["nodeport-ips"] == {"172.18.0.2": ""}
    assert chains(script)[nft.CLUSTER_IPS_CHECK][1] == \
        'ip daddr { 10.96.0.0/12 } drop comment "Drop traffic to unallocated ClusterIPs"'
    assert chains(script)[names("ns1").cluster][0] == "ip daddr 10.96.0.11 jump mark-for-masquerade"
    # without a cluster CIDR: no local-traffic rules at all (as upstream)
    bare = nft.render(state).script
    assert "saddr != 10.244" not in bare and "short-circuit pod traffic" not in bare
    assert "nodeport-ips" not in bare


# ------------------------------------------------------------------ partial syncs


def test_partial_sync_rewrites_only_what_changed():
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = nft.render(tracker.state, config=CONFIG)

    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    tracker.on_service("DELETED", services[1], None)
    changed = tracker.take()
    assert changed == {spn("ns1", "svc1"), spn("ns2", "svc2")}
    result = nft.render(tracker.state, changed, first.programmed, CONFIG)
    script, c1, c2 = result.script, names("ns1"), names("ns2")
    assert not result.full
    # svc1: its service chain flushed and rewritten with the new endpoint, nothing else of it
    assert set(chains(script)) == {c1.cluster}
    assert f"flush chain ip kube-proxy {c1.cluster}" in script
    assert chains(script)[c1.cluster][1:] == [f"numgen random mod 2 == 0 {dnat('10.244.1.2')}", dnat("10.244.2.3")]
    # svc2 deleted: its chains flushed; the sets and maps it leaves are rewritten whole, with
    # no svc2 in them (its local endpoint leaves hairpin-endpoints); nothing is deleted (nft
    # would list every chain first)
    svc2_chains = {c2.cluster, c2.external}
    assert {f"flush chain ip kube-proxy {chain}" for chain in svc2_chains} <= set(script.splitlines())
    flushed = [line for line in script.splitlines() if line.startswith(("flush set", "flush map"))]
    assert flushed == ["flush set ip kube-proxy cluster-ips", "flush map ip kube-proxy service-ips",
                       "flush map ip kube-proxy service-nodeports", "flush set ip kube-proxy hairpin-endpoints"]
    assert "10.244.1.3 . 10.244.1.3" not in elements(script).get("hairpin-endpoints", {})
    assert elements(script)["service-ips"] == {k: v for k, v in elements(first.script)["service-ips"].items()
                                               if "10.96.0.12" not in k}
    assert "10.96.0.12" not in elements(script)["cluster-ips"] and "10.96.0.11" in elements(script)["cluster-ips"]
    assert "delete" not in script and "add element" not in script and "add rule" not in script
    assert not result.deleted_chains and result.programmed.stale_chains == svc2_chains
    # flushes of the maps come after the chains their new elements point to
    lines = script.splitlines()
    assert lines.index(f"add chain ip kube-proxy {c1.cluster} {{") < lines.index("flush map ip kube-proxy service-ips")
    # the record equals a full render of the same state, which deletes what this one left
    full = nft.render(tracker.state, None, first.programmed, CONFIG)
    assert result.programmed.services == full.programmed.services
    assert result.programmed.elements == full.programmed.elements
    assert result.counts == full.counts
    assert full.deleted_chains == result.programmed.stale_chains
    assert nft.render(tracker.state, None, result.programmed, CONFIG).deleted_chains == full.deleted_chains


def test_partial_sync_defers_stale_objects_to_a_full_sync_or_a_threshold():
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = nft.render(tracker.state, config=CONFIG)
    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    second = nft.render(tracker.state, tracker.take(), first.programmed, CONFIG)
    assert "delete" not in second.script and "flush set" not in second.script and "flush map" not in second.script
    assert not second.programmed.stale_chains  # an endpoint has no chain of its own

    # affinity: svc5's endpoint leaves, its set goes stale
    tracker.on_slice("MODIFIED", slices[4], eps("ns5", "svc5", [("10.244.1.6", NODE)]))
    third = nft.render(tracker.state, tracker.take(), second.programmed, CONFIG)
    assert "delete" not in third.script
    assert third.programmed.stale_sets == {aff("ns5", "10.244.2.6")}
    # svc3 loses its only local endpoint: its local- chain goes stale
    tracker.on_slice("MODIFIED", slices[2], eps("ns3", "svc3", [("10.244.2.4", "node-b")]))
    third = nft.render(tracker.state, tracker.take(), third.programmed, CONFIG)
    gone = names("ns3").local
    assert f"flush chain ip kube-proxy {gone}" in third.script and "delete" not in third.script
    assert third.programmed.stale_chains == {gone}

    # svc4 gets endpoints: it leaves no-endpoint-services (rewritten) and joins service-ips (added to)
    tracker.on_slice("MODIFIED", slices[3], eps("ns4", "svc4", [("10.244.1.5", NODE)]))
    fourth = nft.render(tracker.state, tracker.take(), third.programmed, CONFIG)
    assert "flush map ip kube-proxy no-endpoint-services" in fourth.script
    assert elements(fourth.script)["no-endpoint-services"] == {'10.96.0.18 . tcp . 80 comment "ns8/svc8:p80"': "drop"}
    assert elements(fourth.script)["service-ips"] == {"10.96.0.14 . tcp . 80": f"goto {names('ns4').cluster}"}
    assert "flush map ip kube-proxy service-ips" not in fourth.script and "delete" not in fourth.script

    # a full sync deletes what waited
    full = nft.render(tracker.state, None, fourth.programmed, CONFIG)
    assert full.deleted_chains == {gone} and full.deleted_sets == {aff("ns5", "10.244.2.6")}
    # so does a partial one once gc_threshold stale chains piled up
    eager = nft.render(tracker.state, {spn("ns3", "svc3")}, fourth.programmed, nft.Config(
        cluster_cidr=CLUSTER_CIDR, node_ips=(NODE_IP,), gc_threshold=1))
    assert eager.script.splitlines() == [f"delete set ip kube-proxy {aff('ns5', '10.244.2.6')}",
                                         f"delete chain ip kube-proxy {gone}"]
    assert not eager.programmed.stale_chains and aff("ns5", "10.244.2.6") not in eager.programmed.sets


def test_partial_sync_replaces_an_affinity_set_whose_timeout_changed():
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = nft.render(tracker.state, config=CONFIG)
    longer = svc("ns5", "svc5", "10.96.0.15", sessionAffinity="ClientIP",
                 sessionAffinityConfig={"clientIP": {"timeoutSeconds": 900}})
    tracker.on_service("MODIFIED", services[4], longer)
    result = nft.render(tracker.state, tracker.take(), first.programmed, CONFIG)
    lines = result.script.splitlines()
    sa = aff("ns5", "10.244.1.6")
    # every chain naming the set is flushed before the set is deleted and made again
    flushed = [i for i, line in enumerate(lines) if line.startswith("flush chain")]
    assert len(flushed) == 1  # the service chain, the only one naming the sets
    assert max(flushed) < lines.index(f"delete set ip kube-proxy {sa}") < \
        lines.index(f"add set ip kube-proxy {sa} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 900s ; }}")
    assert result.programmed.sets[sa] == 900


def test_partial_sync_of_nothing_changes_nothing(golden):
    state, result = golden
    again = nft.render(state, set(state.services), result.programmed, CONFIG)
    assert again.script == ""
    assert again.programmed.services == result.programmed.services


def test_full_sync_on_a_known_table_flushes_and_deletes_what_is_stale():
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = nft.render(tracker.state, config=CONFIG)
    tracker.on_service("DELETED", services[4], None)  # svc5: chains and affinity sets go
    tracker.take()
    full = nft.render(tracker.state, None, first.programmed, CONFIG)
    lines = full.script.splitlines()
    assert lines[:2] == ['add table ip kube-proxy { comment "rules for kube-proxy" ; }', "flush table ip kube-proxy"]
    assert "flush map ip kube-proxy service-ips" in lines and "delete table ip kube-proxy" not in lines
    assert full.deleted_sets == {aff("ns5", "10.244.1.6"), aff("ns5", "10.244.2.6")}
    assert full.deleted_chains == {names("ns5").cluster}


def big_state(n: int, endpoints: int = 5) -> ProxyState:
    state = ProxyState(NODE)
    for i in range(n):
        name = spn("bench", f"s{i}", "http")
        state.services[name] = ServicePort(name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, "TCP")
        state.endpoints[name] = tuple(
            Endpoint(f"10.{244 + k // 65536}.{k // 256 % 256}.{k % 256}", 8080, f"n{k % 3}", is_local=k % 3 == 0)
            for k in range(i * endpoints, i * endpoints + endpoints))
    return state


def test_render_at_10k_services():
    """10,000 Services x 5 endpoints: what a full and a one-endpoint partial sync write (their
    timings are bench/kube_proxy.py's)."""
    state = big_state(10000)
    result = nft.render(state, config=CONFIG)
    local = sum(1 for k in range(50000) if k % 3 == 0)  # hairpin elements: local endpoints only
    assert result.counts == {"kube-proxy": 23 + 10000 * 6, "kube-proxy elements": 20000 + local}
    name = spn("bench", "s77", "http")
    state.endpoints[name] = state.endpoints[name][1:]
    partial = nft.render(state, {name}, result.programmed, CONFIG)
    assert partial.script.splitlines()[0] == f"flush chain ip kube-proxy {nft.service_names(name).cluster}"
    assert len(partial.script.splitlines()) < 20


# ------------------------------------------------------------------ real kernel

_kernel_here = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
    reason="needs root, ip and nft (network namespaces)")


def needs_kernel(test):
    """The kernel tier: root and the tools, in namespaces of its own."""
    return pytest.mark.kernel(_kernel_here(test))


netns = netns_fixture("nft")


def nft_in(ns: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", ns, "nft", *args], input=input, check=check)


def listed(ns: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The kernel's table: chain -> rules, and set/map name -> its `elements = { … }` text."""
    text = nft_in(ns, "list", "table", "ip", "kube-proxy").stdout
    table_chains: dict[str, list[str]] = {}
    containers: dict[str, str] = {}
    current, kind = None, None
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.match(r"(chain|set|map) (\S+) \{$", line):
            kind, current = m[1], m[2]
            if kind == "chain":
                table_chains[current] = []
            else:
                containers[current] = ""
        elif line == "}":
            current = None
        elif current and kind == "chain" and not line.startswith(("type ", "comment ")):
            table_chains[current].append(line)
        elif current and kind != "chain" and (line.startswith("elements") or containers[current]):
            containers[current] += " " + line
    return table_chains, containers


@needs_kernel
def test_kernel_loads_the_golden_script(netns, golden):
    state, result = golden
    node = netns.add("node")
    nft_in(node, "-c", "-f", "-", input=result.script)  # check first: nothing is committed
    assert nft_in(node, "list", "tables").stdout == ""
    nft_in(node, "-f", "-", input=result.script)
    table_chains, containers = listed(node)
    assert {chain for objects in result.programmed.services.values() for chain, _ in objects.chains} \
        | set(nft.TOP_CHAINS) | {b[0] for b in nft.BASE_CHAINS} == set(table_chains)
    # the kernel's normalised spelling of what was written
    c1 = names("ns1")
    assert table_chains[c1.cluster][1] == "numgen random mod 2 0 meta l4proto tcp dnat to 10.244.1.2:8080"
    assert table_chains[nft.MASQUERADING][0] == \
        "ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade"
    assert "10.244.1.2 . 10.244.1.2" in containers["hairpin-endpoints"]
    assert table_chains[nft.MARK_MASQ] == ["meta mark set meta mark | 0x00004000"]
    assert table_chains["nat-prerouting"] == ["jump services"]
    assert f"10.96.0.11 . tcp . 80 : goto {c1.cluster}" in containers["service-ips"]
    assert '10.96.0.14 . tcp . 80 comment "ns4/svc4:p80" : goto reject-chain' in containers["no-endpoint-services"]
    assert "flags dynamic,timeout" in nft_in(node, "list", "set", "ip", "kube-proxy", aff("ns5", "10.244.1.6")).stdout
    # the DNAT map (more endpoints than cascade_max) is accepted too
    maps = nft.render(state, config=nft.Config(cluster_cidr=CLUSTER_CIDR, cascade_max=1)).script
    assert "dnat to numgen random mod 2 map {" in maps
    nft_in(node, "-c", "-f", "-", input=maps)
    # a full sync on top (the flush path) is accepted and changes nothing
    again = nft.render(state, None, result.programmed, CONFIG)
    nft_in(node, "-f", "-", input=again.script)
    assert listed(node) == (table_chains, containers)


@needs_kernel
def test_kernel_backend_partial_sync_and_repair(netns):
    node = netns.add("node")
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    backend = NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        assert backend.needs_full_sync()
        counts = backend.sync(tracker.state, None)
        assert counts == nft.render(tracker.state, config=CONFIG).counts
        assert not backend.needs_full_sync()
        handle = table_handle(nft.TABLE)
    # markers show which chains a sync rewrote: a rewritten chain loses its marker
    untouched, rewritten = names("ns3").cluster, names("ns1").cluster
    for chain in (untouched, rewritten):
        nft_in(node, "add", "rule", "ip", "kube-proxy", chain, "counter", "comment", '"marker"')

    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    tracker.on_service("DELETED", services[1], None)
    with inside(node):
        backend.sync(tracker.state, tracker.take())
        assert table_handle(nft.TABLE) == handle and not backend.needs_full_sync()
    table_chains, containers = listed(node)
    assert 'comment "marker"' in table_chains[untouched][-1]
    assert not any("marker" in rule for rule in table_chains[rewritten])
    assert table_chains[rewritten][1:] == ["numgen random mod 2 0 meta l4proto tcp dnat to 10.244.1.2:8080",
                                           "meta l4proto tcp dnat to 10.244.2.3:8080"]
    svc2 = [chain for chain in table_chains if chain.endswith(names("ns2").base)]
    assert svc2 and all(table_chains[chain] == [] for chain in svc2)
    assert "10.96.0.12" not in containers["service-ips"] and "30082" not in containers["service-nodeports"]
    assert "10.96.0.12" not in containers["cluster-ips"] and "10.96.0.11" in containers["cluster-ips"]

    # a full sync on the known table: flush, rewrite, and delete what is stale; the handle stays
    with inside(node):
        backend.sync(tracker.state, None)
        assert table_handle(nft.TABLE) == handle and not backend.needs_full_sync()
    table_chains, _ = listed(node)
    assert not any(c.endswith(names("ns2").base) for c in table_chains)
    assert not any("marker" in rule for rules in table_chains.values() for rule in rules)

    # someone flushes or deletes the table: the next sync is full and puts everything back
    nft_in(node, "flush", "table", "ip", "kube-proxy")
    with inside(node):
        assert chain_rule_count(nft.TABLE, nft.MARK_MASQ) == 0
        assert backend.needs_full_sync()
        backend.sync(tracker.state, None)
        assert not backend.needs_full_sync()
    assert listed(node) == (table_chains, listed(node)[1])
    nft_in(node, "delete", "table", "ip", "kube-proxy")
    with inside(node):
        assert table_handle(nft.TABLE) is None and backend.needs_full_sync()
        backend.sync(tracker.state, None)
        assert table_handle(nft.TABLE) not in (None, handle) and not backend.needs_full_sync()
        backend.cleanup()
        backend.cleanup()  # nothing left: still fine
        assert table_handle(nft.TABLE) is None


@needs_kernel
def test_kernel_after_a_failed_sync_the_table_is_taken_over_as_found(netns):
    """A failed write leaves the backend not knowing the table: the next sync takes it over as
    the kernel holds it (listing it, rewriting it in place: same handle, affinity entries kept),
    as upstream's full syncs do, instead of replacing it."""
    node = netns.add("node")
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    backend = NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR))
    with inside(node):
        backend.sync(tracker.state, None)
        handle = table_handle(nft.TABLE)
        # a stale chain it means to delete vanishes behind its back: the sync deleting it fails
        tracker.on_service("DELETED", services[1], None)
        backend.sync(tracker.state, tracker.take())
        nft_in(node, "delete", "chain", "ip", "kube-proxy", names("ns2").external)
        sticky = aff("ns5", "10.244.1.6")
        nft_in(node, "add", "element", "ip", "kube-proxy", sticky, "{ 10.244.9.9 }")
        with pytest.raises(Exception, match="nft -f"):
            backend.sync(tracker.state, None)
        assert backend.needs_full_sync()
        backend.sync(tracker.state, None)
        assert not backend.last_script.startswith("add table ip kube-proxy\ndelete table")
        assert table_handle(nft.TABLE) == handle and not backend.needs_full_sync()
    assert not any(chain.endswith(names("ns2").base) for chain in listed(node)[0])
    assert "10.244.9.9" in nft_in(node, "list", "set", "ip", "kube-proxy", sticky).stdout
    assert listed(node)[0] == listed_after_a_fresh_load(netns, tracker.state)[0]


@needs_kernel
def test_kernel_a_table_no_takeover_can_fix_is_replaced(netns):
    """An object in the table that clashes with one of ours (a map of another type under our
    name) makes every takeover fail: after TAKEOVER_TRIES failed writes the table is replaced."""
    from testbed.proxy.nftables.backend import TAKEOVER_TRIES

    node = netns.add("node")
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    nft_in(node, "add", "table", "ip", "kube-proxy")
    nft_in(node, "add", "set", "ip", "kube-proxy", "cluster-ips", "{ type inet_service ; }")  # ours: ipv4_addr
    backend = NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR))
    with inside(node):
        for _ in range(TAKEOVER_TRIES):
            with pytest.raises(Exception, match="nft -f"):
                backend.sync(tracker.state, None)
            assert not backend.last_script.startswith("add table ip kube-proxy\ndelete table")
        backend.sync(tracker.state, None)
        assert backend.last_script.startswith("add table ip kube-proxy\ndelete table ip kube-proxy\n")
        assert not backend.needs_full_sync()
    assert listed(node)[0] == listed_after_a_fresh_load(netns, tracker.state)[0]


@needs_kernel
def test_kernel_restarted_backend_takes_over_the_table_in_place(netns):
    """A new backend (kube-proxy started again) finds the table a previous one left: its first
    sync flushes and rewrites it in place, so the table, its chains and sets keep their handles
    and an affinity set keeps its entries (ClientIP clients stay put); the chains of a Service
    deleted meanwhile go. Replacing the table would lose all that."""
    node = netns.add("node")
    services, slices = golden_objects()
    with inside(node):
        NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,))).sync(tracked(services, slices).state, None)

    def handles() -> dict:
        import json
        out = {}
        for item in json.loads(nft_in(node, "-j", "-a", "list", "table", "ip", "kube-proxy").stdout)["nftables"]:
            for kind in ("table", "chain", "set", "map"):
                if kind in item:
                    out[(kind, item[kind]["name"])] = item[kind]["handle"]
        return out

    sticky = aff("ns5", "10.244.1.6")
    nft_in(node, "add", "element", "ip", "kube-proxy", sticky, "{ 10.244.9.9 }")  # a client pinned to it
    before = handles()
    deleted = names("ns2")
    assert ("chain", deleted.cluster) in before
    tracker = tracked([s for s in services if s.metadata.name != "svc2"],
                      [e for e in slices if e.metadata.labels["kubernetes.io/service-name"] != "svc2"])
    restarted = NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        assert restarted.needs_full_sync()
        restarted.sync(tracker.state, None)
        assert not restarted.needs_full_sync()
    assert not restarted.last_script.startswith("add table ip kube-proxy\ndelete table")
    after = handles()
    assert {k: h for k, h in before.items() if not k[1].endswith(deleted.base)} == after
    assert not [k for k in after if k[1].endswith(deleted.base)]
    assert "10.244.9.9" in nft_in(node, "list", "set", "ip", "kube-proxy", sticky).stdout
    (chains, containers), (fresh_chains, fresh_containers) = listed(node), listed_after_a_fresh_load(netns, tracker.state)
    assert chains == fresh_chains  # the same rules as a fresh load writes
    assert {k: v for k, v in containers.items() if k != sticky} == {k: v for k, v in fresh_containers.items() if k != sticky}


def listed_after_a_fresh_load(netns, state):
    """The table a backend writes into an empty namespace for `state`: what a takeover must
    end with too."""
    fresh = netns.add("fresh")
    with inside(fresh):
        NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,))).sync(state, None)
    return listed(fresh)


# ------------------------------------------------------------------ real packets

@needs_kernel
def test_packets_through_the_rules(netns):
    """node-a's namespace holds the rules; pod1 and pod3 (on node-a) and pod2 ("on node-b") serve;
    a client pod and an outside client connect."""
    node = netns.add("node")
    pods = {role: netns.add(role) for role in ("pod1", "pod2", "pod3", "client", "ext")}
    run(["ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])  # the node namespace's own
    for role, node_if, gateway, ip in (("pod1", "veth1", "10.244.1.1", "10.244.1.2"),
                                       ("pod2", "veth2", "10.244.2.1", "10.244.2.2"),
                                       ("pod3", "veth4", "10.244.4.1", "10.244.4.2"),
                                       ("client", "veth3", "10.244.3.1", "10.244.3.2"),
                                       ("ext", "eth0", "203.0.113.1", "203.0.113.2")):
        link(node, node_if, f"{gateway}/24", pods[role], "eth0", f"{ip}/24")
        run(["ip", "-n", pods[role], "route", "add", "default", "via", gateway])
    run(["ip", "-n", pods["ext"], "addr", "add", "203.0.113.130/24", "dev", "eth0"])  # outside the source range
    # The node's own address sits on its outside interface; the Service CIDR must lead somewhere
    # for the node's own connections (a real node has a default route).
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
    run(["ip", "-n", node, "route", "add", "10.96.0.0/12", "dev", "eth0", "src", NODE_IP])
    for routed in ("203.0.113.10/32", "203.0.113.9/32"):  # the LB IP and the external IP lead to node-a
        run(["ip", "-n", pods["ext"], "route", "add", routed, "via", "203.0.113.1"])
    for role in ("pod1", "pod2", "pod3"):
        serve(netns, pods[role], role)

    one, two, three = ("10.244.1.2", NODE), ("10.244.2.2", "node-b"), ("10.244.4.2", NODE)
    services = [
        svc("default", "web", "10.96.0.20"),
        svc("default", "empty", "10.96.0.21"),
        svc("default", "local", "10.96.0.22", type="NodePort", externalTrafficPolicy="Local",
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30080}]),
        svc("default", "sticky", "10.96.0.23", sessionAffinity="ClientIP"),
        svc("default", "lb", "10.96.0.24", type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0/25"],
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30084}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}),
        svc("default", "elsewhere", "10.96.0.25", externalIPs=["203.0.113.9"], externalTrafficPolicy="Local"),
    ]
    slices = [eps("default", "web", [one, two, three]), eps("default", "empty", []),
              eps("default", "local", [one, two]), eps("default", "sticky", [one, two, three]),
              eps("default", "lb", [two]), eps("default", "elsewhere", [two])]
    tracker = tracked(services, slices)
    backend = NftablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with inside(node):
        backend.sync(tracker.state, None)

    # ClusterIP from a pod: DNAT to every endpoint, evenly, the pod's own address kept
    seen = Counter(ask(pods["client"], "10.96.0.20", 80) for _ in range(450))
    assert set(seen) == {"pod1 10.244.3.2", "pod2 10.244.3.2", "pod3 10.244.3.2"}
    assert all(100 <= n <= 200 for n in seen.values()), seen  # 150 each expected; sd ~10
    # ClusterIP from the node itself (source 172.18.0.2, outside the cluster CIDR): masqueraded
    answers = {ask(node, "10.96.0.20", 80) for _ in range(40)}
    assert answers == {"pod1 10.244.1.1", "pod2 10.244.2.1", "pod3 10.244.4.1"}

    # No endpoints: rejected, refused at once rather than a timeout; so is a port the ClusterIP lacks
    for client, ip, port in ((pods["client"], "10.96.0.21", 80), (node, "10.96.0.21", 80),
                             (pods["client"], "10.96.0.20", 81)):
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            ask(client, ip, port, timeout=5)
        assert time.monotonic() - start < 1

    # NodePort with externalTrafficPolicy Local from outside: the local endpoint only, client IP kept
    assert {ask(pods["ext"], NODE_IP, 30080) for _ in range(20)} == {"pod1 203.0.113.2"}
    # the same NodePort from a pod is short-circuited to every endpoint
    assert {ask(pods["client"], NODE_IP, 30080) for _ in range(30)} == {"pod1 10.244.3.2", "pod2 10.244.3.2"}

    # Local policy, no endpoint on this node: outside traffic dropped (a timeout, not a refusal);
    # the node itself is short-circuited to the endpoint elsewhere (and masqueraded)
    with pytest.raises(socket.timeout):
        ask(pods["ext"], "203.0.113.9", 80, timeout=1)
    assert ask(node, "203.0.113.9", 80) == "pod2 10.244.2.1"

    # ClientIP affinity: one client keeps its endpoint
    assert len({ask(pods["client"], "10.96.0.23", 80) for _ in range(30)}) == 1

    # LoadBalancer source ranges: 203.0.113.2 is inside 203.0.113.0/25, 203.0.113.130 is not
    # (dropped: a timeout); the NodePort ignores the ranges, as upstream's
    assert ask(pods["ext"], "203.0.113.10", 80) == "pod2 10.244.2.1"  # Cluster policy: masqueraded
    with pytest.raises(socket.timeout):
        ask(pods["ext"], "203.0.113.10", 80, timeout=1, source="203.0.113.130")
    assert ask(pods["ext"], NODE_IP, 30084, source="203.0.113.130") == "pod2 10.244.2.1"

    # A partial sync removes web's endpoints: its clients are refused from then on
    tracker.on_slice("MODIFIED", slices[0], eps("default", "web", []))
    with inside(node):
        backend.sync(tracker.state, tracker.take())
    with pytest.raises(ConnectionRefusedError):
        ask(pods["client"], "10.96.0.20", 80)
    assert ask(pods["ext"], NODE_IP, 30080) == "pod1 203.0.113.2"  # an untouched Service still served
