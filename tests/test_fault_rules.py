"""Fault injection without a cluster: the nft rules a partition or a loss writes on each side,
rates and arguments refused naming the field, the faults.json record, the dns-error rules the
DNS server matches, the container restart back-off, and every `svclab fault` action's --help.
What the rules do to real packets is tests/test_faults.py's."""

from __future__ import annotations

import threading

import pytest
from click.testing import CliRunner

from testbed.cli.main import cli
from testbed.faults import nft, shaping
from testbed.faults.network import _partition_sides
from testbed.faults.state import Fault, FaultStore
from testbed.faults.target import FaultError, Host
from testbed.node import containers
from testbed.node.dns import matching_rule, parse_dns_errors

pytestmark = pytest.mark.unit

CLIENT = Host("client", "t-client", ("eth0",), ("203.0.113.2",))
NODE2 = Host("node2", "t-node2", ("eth0",), ("172.18.0.3", "10.244.1.0/24"))
GW = Host("gw", "t-gw", ("eth0", "eth1"), ("172.18.0.1", "203.0.113.1"))


def test_both_ways_each_side_blocks_the_other_sides_addresses_in_and_out():
    sides = _partition_sides([[CLIENT], [NODE2, GW]], "both")
    assert sides[CLIENT] == nft.PartitionSide(("eth0",), ("172.18.0.3", "10.244.1.0/24", "172.18.0.1", "203.0.113.1"),
                                              True, True, False)
    assert sides[NODE2].peers == ("203.0.113.2",) and sides[NODE2].block_in and sides[NODE2].block_out
    script = nft.partition_script("lab", "f3", sides[GW], "drop")
    assert "add table inet lab-fault\n" in script
    assert "add element inet lab-fault f3-peers { 203.0.113.2 }" in script
    for hook in ("input", "forward", "output"):
        assert f"add chain inet lab-fault f3-{hook} {{ type filter hook {hook} priority -10; policy accept; }}" in script
    assert 'add rule inet lab-fault f3-input iifname { "eth0", "eth1" } ip saddr @f3-peers counter drop' in script
    assert 'add rule inet lab-fault f3-output oifname { "eth0", "eth1" } ip daddr @f3-peers counter drop' in script
    assert "ct direction" not in script  # established connections are cut too


def test_one_way_the_first_group_sends_only_replies_and_the_second_takes_only_replies():
    sides = _partition_sides([[CLIENT], [NODE2]], "one-way")
    first, second = sides[CLIENT], sides[NODE2]
    assert (first.block_in, first.block_out, first.replies_pass) == (False, True, True)
    assert (second.block_in, second.block_out, second.replies_pass) == (True, False, True)
    out = nft.partition_script("lab", "f1", first, "reject").splitlines()
    assert "add chain inet lab-fault f1-input" not in "\n".join(out)  # the first group takes everything in
    output = [line for line in out if line.startswith("add rule inet lab-fault f1-output")]
    assert [line.split("@f1-peers ", 1)[1] for line in output] == [
        "ct state related accept",  # the RST or ICMP error of a reject gets out
        "ct direction reply accept",
        "meta l4proto tcp counter reject with tcp reset",
        "counter reject with icmpx type host-unreachable",
    ]
    incoming = nft.partition_script("lab", "f1", second, "drop")
    assert 'f1-forward iifname { "eth0" } ip saddr @f1-peers ct direction reply accept' in incoming
    assert "f1-output" not in incoming


def test_loss_drops_at_the_links_ingress_and_egress_hooks():
    script = nft.loss_script("lab", "f2", ("eth0", "eth1"), 20.5)
    assert script.count("numgen random mod 10000 < 2050 counter drop") == 4
    assert 'add chain netdev lab-fault f2-out-eth1 { type filter hook egress device "eth1" priority -500;' in script
    assert nft.loss_chains("f2", ("eth0",)) == ["f2-in-eth0", "f2-out-eth0"]


@pytest.mark.parametrize("text,bits", [("1mbit", 1_000_000), ("500kbit", 500_000), ("2mbps", 16_000_000),
                                       ("1.5Mbit", 1_500_000)])
def test_rates_in_tc_units(text, bits):
    assert shaping.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["fast", "1 mbot", "", "1kbit", "100gbit", 5])
def test_a_bad_rate_names_the_field(text):
    with pytest.raises(FaultError, match="^rate: "):
        shaping.parse_rate(text)


def test_bandwidth_shapes_both_ways_through_an_ifb_per_link():
    batch = shaping.bandwidth_batch("lab", ("eth0",), 1_000_000).splitlines()
    assert batch == ["qdisc replace dev eth0 root tbf rate 1000000bit burst 4096 latency 100ms",
                     "qdisc replace dev lab-ifb0 root tbf rate 1000000bit burst 4096 latency 100ms",
                     "qdisc add dev eth0 handle ffff: ingress",
                     "filter add dev eth0 parent ffff: protocol all u32 match u32 0 0 action mirred egress "
                     "redirect dev lab-ifb0"]


def test_fault_records_get_ids_and_survive_concurrent_writers(tmp_path):
    store = FaultStore(tmp_path / "faults.json")

    def add(n: int) -> None:
        for _ in range(n):
            with store.changing() as changes:
                changes.add(Fault("loss", {"target": "node1"}))

    threads = [threading.Thread(target=add, args=(20,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    faults = store.load()
    assert sorted(int(f.id[1:]) for f in faults) == list(range(1, 81))
    with store.changing() as changes:
        changes.remove(faults[0])
        assert len(changes.find("loss", target="node1")) == 79
    assert len(store.load()) == 79


def test_dns_error_rules_match_the_whole_name_or_its_first_label():
    rules = parse_dns_errors('[{"id": "f1", "names": "frontend-*", "rcode": "SERVFAIL"},'
                             ' {"id": "f2", "names": "*.kube-system.svc.cluster.local", "rcode": "NXDOMAIN"}]')
    assert matching_rule(rules, "frontend-service.default.svc.cluster.local")["id"] == "f1"
    assert matching_rule(rules, "frontend-service")["id"] == "f1"
    assert matching_rule(rules, "kube-dns.kube-system.svc.cluster.local")["id"] == "f2"
    assert matching_rule(rules, "backend.default.svc.cluster.local") is None
    for bad in ('{"names": "x"}', '[{"names": "", "rcode": "SERVFAIL"}]', '[{"names": "x", "rcode": "REFUSED"}]'):
        with pytest.raises(ValueError):
            parse_dns_errors(bad)


def test_restarts_back_off_as_upstreams_kubelet():
    run = containers.ContainerRun()
    delays = [run.restart_delay(float(t)) for t in (0, 1, 12, 33, 74, 155, 316, 617, 918, 1219)]
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300, 300, 300]
    assert run.restart_delay(1219 + 601) == 0  # 10 min without a failure: from the start again
    assert [containers.should_restart(p, code) for p, code in
            [("Always", 0), ("", 1), ("OnFailure", 0), ("OnFailure", 137), ("Never", 1)]] == [
        True, True, False, True, False]
    assert containers.exit_code_of(-9) == 137 and containers.exit_code_of(3) == 3


ACTIONS = ["list", "heal", "partition", "loss", "bandwidth", "delay", "link-down", "link-up", "link-flap",
           "node-crash", "node-recover", "node-freeze", "node-thaw", "component-kill", "component-stop",
           "component-start", "pod-kill", "flush-rules", "flush-conntrack", "dns-error"]


def test_every_action_has_help_and_none_is_missing():
    runner = CliRunner()
    listed = runner.invoke(cli, ["fault", "--help"])
    assert listed.exit_code == 0
    assert sorted(line.split()[0] for line in listed.output.split("Commands:")[1].splitlines() if line.strip()
                  and not line.startswith("    ")) == sorted(ACTIONS)
    for action in ACTIONS:
        result = runner.invoke(cli, ["fault", action, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output and "--name" in result.output, (action, result)
