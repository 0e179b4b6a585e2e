"""svclab's kube-proxy iptables renderer (testbed.proxy.iptables), first as pure functions, then
loaded into a real kernel. The shared model's own tests are in test_proxy_model.py.

IP plan (the testbed's own ranges, see environment.md):
  pods      10.244.0.0/16 (the cluster CIDR); node-a's pods in 10.244.1.0/24, node-b's in 10.244.2.0/24
  services  10.96.0.0/12: 10.96.0.1x in the golden set, 10.96.0.2x in the packet test
  nodes     172.18.0.2 node-a (this node), 172.18.0.3 node-b
  external  203.0.113.0/24: LoadBalancer IP 203.0.113.10, external IPs 203.0.113.7 and .9, an
            outside client 203.0.113.2 behind the node's 203.0.113.1
  upstream's golden "basic test" keeps its own addresses (172.30.0.41, 10.180.0.1): rendered only

Kernel tests run only inside network namespaces named pxt<pid><random>-*, made by the
`netns` fixture and deleted at teardown, pass or fail, together with every process started
in them. Nothing touches the root namespace's firewall, routes or sysctls.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time

import pytest

from testbed.proxy import iptables as ipt
from testbed.proxy.model import Endpoint, ProxyState, ServicePort
from tests.netns import ask, in_ns, link, netns_fixture, run, serve
from tests.proxy_fixtures import CLUSTER_CIDR, NODE, NODE_IP, eps, golden_objects, spn, svc, tracked

pytestmark = pytest.mark.unit

CONFIG = ipt.Config(cluster_cidr=CLUSTER_CIDR, node_ips=(NODE_IP,))


def rules(document: str, table: str, chain: str) -> list[str]:
    """The rules a restore document (or iptables-save output) appends to one chain, without "-A CHAIN "."""
    section = document.split(f"*{table}\n", 1)[1].split("\nCOMMIT", 1)[0]
    head = f"-A {chain} "
    return [line[len(head):] for line in section.splitlines() if line.startswith(head)]


def chains(document: str, table: str) -> set[str]:
    section = document.split(f"*{table}\n", 1)[1].split("\nCOMMIT", 1)[0]
    return {line[1:].split(" ", 1)[0] for line in section.splitlines() if line.startswith(":")}


# ------------------------------------------------------------------ chain names


def test_chain_name_hashes_match_upstream():
    assert ipt.service_chains(spn("ns1", "svc1")).svc == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert ipt.endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    names = ipt.service_chains(spn("ns1", "svc1"))
    assert {names.svl, names.ext, names.fw} == {f"KUBE-{k}-XPGD46QRK7WJZT7O" for k in ("SVL", "EXT", "FW")}


# ------------------------------------------------------------------ rendering: golden


def test_golden_document_of_upstreams_basic_case():
    """The case of upstream's proxier_test.go "basic test", with its expected output."""
    state = ProxyState.from_objects(
        [svc("ns1", "svc1", "172.30.0.41", ports=[{"name": "p80", "port": 80}])],
        [eps("ns1", "svc1", [("10.180.0.1", "node1")], ports=[{"name": "p80", "port": 80}])], "node1")
    result = ipt.render(state, config=ipt.Config(cluster_cidr="10.0.0.0/8"))
    assert result.document == GOLDEN_BASIC
    assert result.chains == {"KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ"}
    assert result.full and not result.deleted


GOLDEN_BASIC = """\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
COMMIT
"""




@pytest.fixture
def golden():
    state = ProxyState.from_objects(*golden_objects(), NODE)
    return state, ipt.render(state, config=CONFIG)


def names(ns: str) -> ipt.ServiceChains:
    return ipt.service_chains(spn(ns, ns.replace("ns", "svc")))


def sep(ns: str, addr: str) -> str:
    return ipt.endpoint_chain(f"{ns}/{ns.replace('ns', 'svc')}:p80", "tcp", addr)


def test_golden_clusterip_with_two_endpoints(golden):
    _, result = golden
    doc, c = result.document, names("ns1")
    a, b = sep("ns1", "10.244.1.2:8080"), sep("ns1", "10.244.2.2:8080")
    assert f'-m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.96.0.11 --dport 80 -j {c.svc}' \
        in rules(doc, "nat", "KUBE-SERVICES")
    assert rules(doc, "nat", c.svc) == [
        f'-m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.96.0.11 --dport 80 '
        f'! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ',
        f'-m comment --comment "ns1/svc1:p80 -> 10.244.1.2:8080" -m statistic --mode random '
        f'--probability 0.5000000000 -j {a}',
        f'-m comment --comment "ns1/svc1:p80 -> 10.244.2.2:8080" -j {b}',
    ]
    assert rules(doc, "nat", a) == [
        "-m comment --comment ns1/svc1:p80 -s 10.244.1.2 -j KUBE-MARK-MASQ",  # hairpin
        "-m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080",
    ]
    assert {c.svc, a, b} <= result.chains and c.ext not in result.chains


def test_golden_nodeport(golden):
    doc = golden[1].document
    c = names("ns2")
    assert f"-m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 30082 -j {c.ext}" \
        in rules(doc, "nat", "KUBE-NODEPORTS")
    assert rules(doc, "nat", c.ext) == [
        '-m comment --comment "masquerade traffic for ns2/svc2:p80 external destinations" -j KUBE-MARK-MASQ',
        f"-j {c.svc}",
    ]
    last = rules(doc, "nat", "KUBE-SERVICES")[-1]
    assert last.endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")


def test_golden_local_policy_with_a_local_and_a_remote_endpoint(golden):
    doc, result = golden[1].document, golden[1]
    c = names("ns3")
    local, remote = sep("ns3", "10.244.1.4:8080"), sep("ns3", "10.244.2.4:8080")
    assert rules(doc, "nat", c.ext) == [
        f'-m comment --comment "pod traffic for ns3/svc3:p80 external destinations" -s {CLUSTER_CIDR} -j {c.svc}',
        '-m comment --comment "masquerade LOCAL traffic for ns3/svc3:p80 external destinations" '
        "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
        '-m comment --comment "route LOCAL traffic for ns3/svc3:p80 external destinations" '
        f"-m addrtype --src-type LOCAL -j {c.svc}",
        f"-j {c.svl}",
    ]
    assert rules(doc, "nat", c.svl) == [f'-m comment --comment "ns3/svc3:p80 -> 10.244.1.4:8080" -j {local}']
    assert [r.rsplit(" ", 1)[1] for r in rules(doc, "nat", c.svc)] == ["KUBE-MARK-MASQ", local, remote]
    assert {c.svc, c.svl, c.ext, local, remote} <= result.chains
    assert "ns3/svc3:p80 has no" not in doc


def test_golden_no_endpoints_rejects_and_local_without_local_endpoints_drops(golden):
    doc, result = golden[1].document, golden[1]
    assert rules(doc, "filter", "KUBE-SERVICES") == [
        '-m comment --comment "ns4/svc4:p80 has no endpoints" -m tcp -p tcp -d 10.96.0.14 --dport 80 -j REJECT',
        '-m comment --comment "ns8/svc8:p80 has no local endpoints" -m tcp -p tcp -d 10.96.0.18 --dport 80 -j DROP',
    ]
    assert not any("10.96.0.14" in r or "10.96.0.18" in r for r in rules(doc, "nat", "KUBE-SERVICES"))
    assert not any(ch.endswith(names("ns4").svc[-16:]) for ch in result.chains)  # no nat chain at all
    # svc7: external traffic policy Local, its only endpoint elsewhere: NodePort traffic dropped...
    assert rules(doc, "filter", "KUBE-EXTERNAL-SERVICES") == [
        '-m comment --comment "ns7/svc7:p80 has no local endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp -p tcp --dport 30087 -j DROP",
    ]
    # ...except from pods and the node itself, short-circuited to the cluster-wide endpoints
    c = names("ns7")
    assert [r.rsplit(" ", 1)[1] for r in rules(doc, "nat", c.ext)] == [c.svc, "KUBE-MARK-MASQ", c.svc]
    assert c.svl not in result.chains


def test_golden_client_ip_affinity(golden):
    doc = golden[1].document
    c = names("ns5")
    a, b = sep("ns5", "10.244.1.6:8080"), sep("ns5", "10.244.2.6:8080")
    assert rules(doc, "nat", c.svc)[1:] == [
        f'-m comment --comment "ns5/svc5:p80 -> 10.244.1.6:8080" -m recent --name {a} --rcheck --seconds 600 '
        f"--reap -j {a}",
        f'-m comment --comment "ns5/svc5:p80 -> 10.244.2.6:8080" -m recent --name {b} --rcheck --seconds 600 '
        f"--reap -j {b}",
        f'-m comment --comment "ns5/svc5:p80 -> 10.244.1.6:8080" -m statistic --mode random '
        f"--probability 0.5000000000 -j {a}",
        f'-m comment --comment "ns5/svc5:p80 -> 10.244.2.6:8080" -j {b}',
    ]
    assert rules(doc, "nat", a)[1] == (f"-m comment --comment ns5/svc5:p80 -m recent --name {a} --set "
                                       "-m tcp -p tcp -j DNAT --to-destination 10.244.1.6:8080")


def test_golden_load_balancer_with_source_ranges(golden):
    doc = golden[1].document
    c = names("ns6")
    assert f'-m comment --comment "ns6/svc6:p80 loadbalancer IP" -m tcp -p tcp -d 203.0.113.10 --dport 80 ' \
           f"-j {c.fw}" in rules(doc, "nat", "KUBE-SERVICES")
    assert rules(doc, "nat", c.fw) == [
        f'-m comment --comment "ns6/svc6:p80 loadbalancer IP" -s 203.0.113.0/25 -j {c.ext}',
        f'-m comment --comment "ns6/svc6:p80 loadbalancer IP" -s 172.18.0.0/16 -j {c.ext}',
        # the node's own IP is in a range: the node reaching its LB IP comes from that IP
        f'-m comment --comment "ns6/svc6:p80 loadbalancer IP" -s 203.0.113.10 -j {c.ext}',
        '-m comment --comment "other traffic to ns6/svc6:p80 will be dropped by KUBE-PROXY-FIREWALL"',
    ]
    assert rules(doc, "filter", "KUBE-PROXY-FIREWALL") == [
        f'-m comment --comment "ns6/svc6:p80 traffic not accepted by {c.fw}" -m tcp -p tcp -d 203.0.113.10 '
        "--dport 80 -j DROP",
    ]
    assert f"-m comment --comment ns6/svc6:p80 -m tcp -p tcp --dport 30086 -j {c.ext}" \
        in rules(doc, "nat", "KUBE-NODEPORTS")  # NodePorts bypass the source ranges, as upstream


def test_golden_external_ip_and_headless(golden):
    state, result = golden
    c = names("ns9")
    assert f'-m comment --comment "ns9/svc9:p80 external IP" -m tcp -p tcp -d 203.0.113.9 --dport 80 ' \
           f"-j {c.ext}" in rules(result.document, "nat", "KUBE-SERVICES")
    assert "headless" not in result.document


def test_comments_dropped_in_large_clusters_as_upstream(golden):
    state, _ = golden
    doc = ipt.render(state, config=ipt.Config(cluster_cidr=CLUSTER_CIDR, large_cluster_endpoints=3)).document
    a = sep("ns1", "10.244.1.2:8080")
    assert rules(doc, "nat", a) == ["-s 10.244.1.2 -j KUBE-MARK-MASQ",
                                    "-m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080"]
    assert '-m comment --comment "ns1/svc1:p80 cluster IP"' in "\n".join(rules(doc, "nat", "KUBE-SERVICES"))


def test_nodeport_addresses_limit_the_nodeports_jump_to_those_ips(golden):
    state, _ = golden
    doc = ipt.render(state, config=dataclasses.replace(CONFIG, nodeport_addresses=("172.18.0.2", "10.0.0.5"))).document
    jumps = [r for r in rules(doc, "nat", "KUBE-SERVICES") if r.endswith("-j KUBE-NODEPORTS")]
    assert jumps == [f'-m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                     f'last rule in this chain" -d {ip} -j KUBE-NODEPORTS' for ip in ("172.18.0.2", "10.0.0.5")]
    assert "--dst-type LOCAL -j KUBE-NODEPORTS" in golden[1].document  # the default: every local address


def test_without_cluster_cidr_no_local_detector_rules(golden):
    state, _ = golden
    doc = ipt.render(state).document
    nat = doc.split("*nat\n", 1)[1]  # the filter table's KUBE-FIREWALL has a `! -s 127.0.0.0/8` of its own
    assert "! -s" not in nat and "pod traffic for" not in doc
    masq_all = ipt.render(state, config=ipt.Config(masquerade_all=True, random_fully=True)).document
    assert rules(masq_all, "nat", names("ns1").svc)[0].endswith("--dport 80 -j KUBE-MARK-MASQ")
    assert rules(masq_all, "nat", "KUBE-POSTROUTING")[-1].endswith("-j MASQUERADE --random-fully")


def test_probabilities():
    state = ProxyState.from_objects(
        [svc("ns", "s", "10.96.0.30")], [eps("ns", "s", [(f"10.244.1.{i}", NODE) for i in range(2, 6)])], NODE)
    doc = ipt.render(state).document
    probabilities = [re.search(r"--probability (\S+)", r) for r in rules(doc, "nat", names_of("ns", "s").svc)]
    assert [m.group(1) if m else None for m in probabilities] == ["0.2500000000", "0.3333333333", "0.5000000000",
                                                                  None]


def names_of(ns: str, name: str) -> ipt.ServiceChains:
    return ipt.service_chains(spn(ns, name))


# ------------------------------------------------------------------ rendering: partial sync


def test_partial_render_rewrites_only_changed_services():
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = ipt.render(tracker.state, config=CONFIG)

    old1 = sep("ns1", "10.244.2.2:8080")
    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    tracker.on_service("DELETED", services[1], None)
    changed = tracker.take()
    assert changed == {spn("ns1", "svc1"), spn("ns2", "svc2")}
    result = ipt.render(tracker.state, changed, first.programmed, config=CONFIG)
    new1 = sep("ns1", "10.244.2.3:8080")
    declared = chains(result.document, "nat")
    # KUBE-MARK-MASQ never changes: only a full sync writes it
    assert declared == {*ipt.NAT_CHAINS} - {"KUBE-MARK-MASQ"} | {names("ns1").svc, sep("ns1", "10.244.1.2:8080"), new1,
                        old1, names("ns2").svc, names("ns2").ext, sep("ns2", "10.244.1.3:8080")}  # stale
    assert result.deleted == {old1, names("ns2").svc, names("ns2").ext, sep("ns2", "10.244.1.3:8080")}
    assert [f"-X {ch}" for ch in sorted(result.deleted)] == \
        [line for line in result.document.splitlines() if line.startswith("-X ")]
    assert result.chains == (first.chains - result.deleted) | {new1} and not result.full
    # svc2 is gone, so the top-level chains changed: written complete
    assert rules(result.document, "nat", "KUBE-SERVICES") == [
        r for r in rules(first.document, "nat", "KUBE-SERVICES") if "ns2/svc2" not in r]
    first_filter = first.document.split("*filter\n", 1)[1].split("\nCOMMIT", 1)[0]
    assert ("*filter" in result.document) == ("ns2/svc2" in first_filter)  # the filter table if svc2 had rules there
    # a full render of the same state: the same rules, every chain declared
    full = ipt.render(tracker.state, None, first.programmed, config=CONFIG)
    assert full.chains == result.chains and full.deleted == result.deleted
    assert set(rules(result.document, "nat", names("ns1").svc)) == set(rules(full.document, "nat", names("ns1").svc))


def test_partial_render_leaves_unchanged_top_level_chains_alone():
    """An endpoint change that keeps the Service's endpoints non-empty does not alter the top
    level: the document writes only that Service's chains (no KUBE-SERVICES, no filter table);
    a change that alters nothing writes no document at all."""
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = ipt.render(tracker.state, config=CONFIG)
    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    result = ipt.render(tracker.state, tracker.take(), first.programmed, config=CONFIG)
    assert "*filter" not in result.document
    declared = chains(result.document, "nat")
    assert declared == {names("ns1").svc, sep("ns1", "10.244.1.2:8080"), sep("ns1", "10.244.2.3:8080"),
                        sep("ns1", "10.244.2.2:8080")}  # the last one stale: flushed and deleted
    assert result.programmed.nat_top == first.programmed.nat_top
    assert result.programmed.filter_top == first.programmed.filter_top
    # the same state again, through the same change: nothing to write
    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    again = ipt.render(tracker.state, {spn("ns1", "svc1")}, result.programmed, config=CONFIG)
    assert again.document == "" and again.programmed.chains == result.programmed.chains
    # the Service losing its last endpoint changes the top level (REJECT in filter): written
    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", []))
    emptied = ipt.render(tracker.state, tracker.take(), result.programmed, config=CONFIG)
    assert chains(emptied.document, "filter") == set(ipt.FILTER_CHAINS)
    assert any("ns1/svc1" in r and "REJECT" in r for r in rules(emptied.document, "filter", "KUBE-SERVICES"))
    assert not any("ns1/svc1" in r for r in rules(emptied.document, "nat", "KUBE-SERVICES"))


def sections(document: str, table: str) -> list[str]:
    return [part.split("\nCOMMIT", 1)[0] for part in document.split(f"*{table}\n")[1:]]


def test_large_documents_are_split_into_nat_sections(golden):
    state, single = golden
    result = ipt.render(state, config=dataclasses.replace(CONFIG, section_chains=4))
    parts = sections(result.document, "nat")
    assert len(parts) > 3 and result.chains == single.chains
    assert parts[0].startswith(":KUBE-MARK-MASQ - [0:0]\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n")
    for part in parts[:-1]:  # each Service's chains whole in one section: every jump target is there
        declared = {line[1:].split(" ")[0] for line in part.splitlines() if line.startswith(":")}
        targets = {line.rsplit(" ", 1)[1] for line in part.splitlines() if line.startswith("-A ")}
        assert {t for t in targets if ipt.is_service_chain(t)} <= declared
        assert "-A KUBE-SERVICES" not in part
    final_declared = {line for line in parts[-1].splitlines() if line.startswith(":")}
    assert final_declared == {f":{c} - [0:0]" for c in ipt.NAT_CHAINS if c != "KUBE-MARK-MASQ"}
    # the same rules as one COMMIT, chain by chain, each written once
    for chain in result.chains | set(ipt.NAT_CHAINS):
        split_rules = [r for p in parts for r in rules(f"*nat\n{p}\nCOMMIT", "nat", chain)]
        assert split_rules == rules(single.document, "nat", chain)
    # small documents (a partial sync) stay one COMMIT, shaped as upstream's
    assert len(sections(ipt.render(state, {spn("ns1", "svc1")}, single.programmed).document, "nat")) == 1


def test_top_level_jumps_are_ordered_by_target_descending(golden):
    doc = golden[1].document
    for chain in ("KUBE-SERVICES", "KUBE-NODEPORTS"):
        targets = [r.rsplit(" ", 1)[1] for r in rules(doc, "nat", chain)
                   if '"kubernetes service nodeports' not in r]
        assert targets == sorted(targets, reverse=True) and len(targets) > 3


def test_hook_rules_are_upstreams():
    hooks = ipt.hook_rules()
    assert ipt.HookRule("nat", "PREROUTING", ("-m", "comment", "--comment", "kubernetes service portals",
                                              "-j", "KUBE-SERVICES")) in hooks
    assert ipt.HookRule("filter", "FORWARD", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                                              "kubernetes service portals", "-j", "KUBE-SERVICES")) in hooks
    assert {(h.table, h.chain, h.args[-1]) for h in hooks} >= {
        ("nat", "OUTPUT", "KUBE-SERVICES"), ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
        ("filter", "INPUT", "KUBE-NODEPORTS"), ("filter", "FORWARD", "KUBE-FORWARD"),
        ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL"), ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES")}
    assert hooks[0].insert_argv()[:5] == ["-t", "filter", "-I", "INPUT", "1"]


def test_render_at_10k_services():
    """10,000 Services x 5 endpoints: what a full and a one-endpoint partial sync write (their
    timings are bench/kube_proxy.py's)."""
    state = ProxyState(NODE)
    for i in range(10000):
        name = spn("bench", f"s{i}", "http")
        state.services[name] = ServicePort(name, f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", 80, "TCP")
        state.endpoints[name] = tuple(
            Endpoint(f"10.{244 + k // 65536}.{k // 256 % 256}.{k % 256}", 8080, f"n{k % 3}", is_local=k % 3 == 0)
            for k in range(i * 5, i * 5 + 5))
    result = ipt.render(state, config=CONFIG)
    assert result.document.count("\n") > 230000 and len(result.chains) == 10000 * 6
    name = spn("bench", "s77", "http")
    state.endpoints[name] = state.endpoints[name][1:]
    partial = ipt.render(state, {name}, result.programmed, CONFIG)
    # the Service's chains only: its KUBE-SVC and the remaining KUBE-SEPs, and the stale one deleted
    assert chains(partial.document, "nat") == {ipt.service_chains(name).svc} | {
        c for c in result.chains if c.startswith("KUBE-SEP-") and c in partial.document}
    assert "*filter" not in partial.document and len(partial.document.splitlines()) < 30


# ------------------------------------------------------------------ real kernel

_kernel_here = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables-restore") is None or shutil.which("ip") is None,
    reason="needs root, ip and iptables-restore (network namespaces)")


def needs_kernel(test):
    """The kernel tier: root and the tools, in namespaces of its own."""
    return pytest.mark.kernel(_kernel_here(test))


netns = netns_fixture("pxt")


def restore(ns: str, document: str) -> None:
    in_ns(ns, "iptables-restore", *ipt.RESTORE_FLAGS, input=document)


def ensure_hooks(ns: str) -> None:
    """What the applier does on a full sync: check each hook rule, insert it if missing."""
    for hook in ipt.hook_rules():
        if in_ns(ns, "iptables", "-w", *hook.check_argv(), check=False).returncode != 0:
            in_ns(ns, "iptables", "-w", *hook.insert_argv())


def saved(ns: str) -> str:
    return in_ns(ns, "iptables-save").stdout





@needs_kernel
def test_kernel_loads_the_golden_document(netns, golden):
    state, result = golden
    node = netns.add("node")
    restore(node, result.document)
    ensure_hooks(node)
    ensure_hooks(node)  # idempotent: -C finds what -I put there
    dump = saved(node)
    assert result.chains <= chains(dump, "nat")
    assert set(ipt.FILTER_CHAINS) <= chains(dump, "filter")
    assert sum(r.endswith("-j KUBE-SERVICES") for r in rules(dump, "nat", "PREROUTING")) == 1
    assert len(rules(dump, "filter", "FORWARD")) == 4 and len(rules(dump, "filter", "INPUT")) == 4
    # the kernel's normalised spelling of what was written
    c1 = names("ns1")
    assert "--probability 0.50000000000" in rules(dump, "nat", c1.svc)[1]
    assert rules(dump, "nat", "KUBE-SERVICES")[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    assert any("10.96.0.14/32" in r and "has no endpoints" in r and "REJECT" in r
               for r in rules(dump, "filter", "KUBE-SERVICES"))
    assert any("--dport 30087" in r and "DROP" in r for r in rules(dump, "filter", "KUBE-EXTERNAL-SERVICES"))
    a = sep("ns5", "10.244.1.6:8080")
    assert any(f"--name {a}" in r and "--set" in r and "--to-destination 10.244.1.6:8080" in r
               for r in rules(dump, "nat", a))
    assert rules(dump, "nat", "KUBE-MARK-MASQ") == ["-j MARK --set-xmark 0x4000/0x4000"]
    # applying the same document again changes nothing
    restore(node, result.document)
    assert saved_rules(saved(node)) == saved_rules(dump)


@needs_kernel
def test_kernel_sectioned_document_gives_the_same_ruleset(netns, golden):
    state, single = golden
    one, split = netns.add("one"), netns.add("split")
    restore(one, single.document)
    sectioned = ipt.render(state, config=dataclasses.replace(CONFIG, section_chains=4))
    assert len(sections(sectioned.document, "nat")) > 3
    restore(split, sectioned.document)
    a, b = saved(one), saved(split)
    for table in ("nat", "filter"):
        assert chains(a, table) == chains(b, table)
        for chain in chains(a, table):
            assert rules(a, table, chain) == rules(b, table, chain), chain


def saved_rules(dump: str) -> list[str]:
    return [line for line in dump.splitlines() if not line.startswith("#")]


@needs_kernel
def test_kernel_partial_sync(netns):
    node = netns.add("node")
    services, slices = golden_objects()
    tracker = tracked(services, slices)
    first = ipt.render(tracker.state, config=CONFIG)
    restore(node, first.document)
    # Marker rules show which chains a sync flushed: a rewritten chain loses its marker.
    untouched, rewritten = names("ns3").svc, names("ns1").svc
    for chain in (untouched, rewritten):
        in_ns(node, "iptables", "-w", "-t", "nat", "-A", chain, "-m", "comment", "--comment", "marker")

    tracker.on_slice("MODIFIED", slices[0], eps("ns1", "svc1", [("10.244.1.2", NODE), ("10.244.2.3", "node-b")]))
    tracker.on_service("DELETED", services[1], None)
    second = ipt.render(tracker.state, tracker.take(), first.programmed, config=CONFIG)
    assert untouched not in chains(second.document, "nat")  # not even declared
    restore(node, second.document)

    dump = saved(node)
    present = {ch for ch in chains(dump, "nat") if ipt.is_service_chain(ch)}
    assert present == second.chains
    assert "marker" in rules(dump, "nat", untouched)[-1]
    assert not any("marker" in r for r in rules(dump, "nat", rewritten))
    assert sep("ns1", "10.244.2.3:8080") in present and sep("ns1", "10.244.2.2:8080") not in present
    assert not any(ch.endswith(names("ns2").svc[-16:]) for ch in present)  # svc2 deleted: all its chains gone
    assert not any("ns2/svc2" in r for r in rules(dump, "nat", "KUBE-SERVICES") + rules(dump, "nat", "KUBE-NODEPORTS"))
    assert any("ns3/svc3" in r for r in rules(dump, "nat", "KUBE-NODEPORTS"))
    # the kernel's view matches a full render of the same state
    assert ipt.service_chains_in(in_ns(node, "iptables-save", "-t", "nat").stdout) == second.chains


# ------------------------------------------------------------------ real packets

@needs_kernel
def test_packets_through_the_rules(netns):
    """node-a's namespace holds the rules; pod1 (on node-a) and pod2 ("on node-b") serve; a client
    pod and an outside client connect."""
    node = netns.add("node")
    pods = {role: netns.add(role) for role in ("pod1", "pod2", "client", "ext")}
    in_ns(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")  # the node namespace's own sysctl
    for role, node_if, gateway, ip in (("pod1", "veth1", "10.244.1.1", "10.244.1.2"),
                                       ("pod2", "veth2", "10.244.2.1", "10.244.2.2"),
                                       ("client", "veth3", "10.244.3.1", "10.244.3.2"),
                                       ("ext", "eth0", "203.0.113.1", "203.0.113.2")):
        link(node, node_if, f"{gateway}/24", pods[role], "eth0", f"{ip}/24")
        run(["ip", "-n", pods[role], "route", "add", "default", "via", gateway])
    # The node's own address sits on its outside interface; the Service CIDR must lead somewhere
    # for the node's own connections (a real node has a default route).
    run(["ip", "-n", node, "addr", "add", f"{NODE_IP}/16", "dev", "eth0"])
    run(["ip", "-n", node, "route", "add", "10.96.0.0/12", "dev", "eth0", "src", NODE_IP])
    for role in ("pod1", "pod2"):
        serve(netns, pods[role], role)

    services = [
        svc("default", "web", "10.96.0.20"),
        svc("default", "empty", "10.96.0.21"),
        svc("default", "local", "10.96.0.22", type="NodePort", externalTrafficPolicy="Local",
            ports=[{"name": "p80", "port": 80, "targetPort": 8080, "nodePort": 30080}]),
    ]
    both = [("10.244.1.2", NODE), ("10.244.2.2", "node-b")]
    slices = [eps("default", "web", both), eps("default", "empty", []), eps("default", "local", both)]
    state = ProxyState.from_objects(services, slices, NODE)
    restore(node, ipt.render(state, config=CONFIG).document)
    ensure_hooks(node)

    # ClusterIP from a pod: DNAT to both endpoints, the pod's own address kept
    answers = {ask(pods["client"], "10.96.0.20", 80) for _ in range(30)}
    assert answers == {"pod1 10.244.3.2", "pod2 10.244.3.2"}
    # ClusterIP from the node itself (source 172.18.0.2, outside the cluster CIDR): masqueraded
    answers = {ask(node, "10.96.0.20", 80) for _ in range(30)}
    assert answers == {"pod1 10.244.1.1", "pod2 10.244.2.1"}

    # No endpoints: REJECT, refused at once rather than a timeout
    for client in (pods["client"], node):
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            ask(client, "10.96.0.21", 80, timeout=5)
        assert time.monotonic() - start < 2  # a timeout would take 5 s

    # NodePort with externalTrafficPolicy Local from outside: the local endpoint only, client IP kept
    answers = {ask(pods["ext"], NODE_IP, 30080) for _ in range(20)}
    assert answers == {"pod1 203.0.113.2"}
    # the same NodePort from a pod is short-circuited to every endpoint
    answers = {ask(pods["client"], NODE_IP, 30080) for _ in range(30)}
    assert answers == {"pod1 10.244.3.2", "pod2 10.244.3.2"}

    # A partial sync removes web's endpoints: its clients are refused from then on
    tracker = tracked(services, slices)
    before = ipt.render(tracker.state, config=CONFIG)
    tracker.on_slice("MODIFIED", slices[0], eps("default", "web", []))
    after = ipt.render(tracker.state, tracker.take(), before.programmed, config=CONFIG)
    restore(node, after.document)
    with pytest.raises(ConnectionRefusedError):
        ask(pods["client"], "10.96.0.20", 80)
    assert ask(pods["ext"], NODE_IP, 30080) == "pod1 203.0.113.2"  # untouched Service still served


@needs_kernel
def test_kernel_backend_notices_flushed_or_deleted_chains_and_repairs(netns):
    from testbed.proxy.backends import NodeSettings
    from testbed.proxy.iptables.backend import CANARY, IptablesBackend
    from testbed.node.podnet import entered_netns

    node = netns.add("node")
    state = ProxyState.from_objects(*golden_objects(), NODE)
    backend = IptablesBackend(NodeSettings(NODE, CLUSTER_CIDR, (NODE_IP,)))
    with entered_netns(node):
        assert backend.needs_full_sync()  # nothing synced yet
        backend.sync(state, None)
        assert not backend.needs_full_sync()
    whole = saved(node)
    for breakage in (["-t", "nat", "-F"],  # rules gone, chains kept: upstream's canary alone misses it
                     ["-t", "filter", "-F"],
                     ["-t", "mangle", "-X", CANARY]):  # upstream's case: chains deleted
        in_ns(node, "iptables", "-w", *breakage)
        with entered_netns(node):
            assert backend.needs_full_sync(), breakage
            assert backend.needs_full_sync()  # until a full sync repaired it
            backend.sync(state, None)
            assert not backend.needs_full_sync()
        repaired = saved(node)
        for table in ("nat", "filter"):
            assert rules(repaired, table, "KUBE-SERVICES") == rules(whole, table, "KUBE-SERVICES")
        assert rules(repaired, "nat", "PREROUTING") == rules(whole, "nat", "PREROUTING")  # the hooks too
