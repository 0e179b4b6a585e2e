"""What needs the stock kernel, run inside `svclab vm` (tests/test_vm_tier.py boots it once for
the tests marked vm and not cluster): netem delay, and the OVS kernel datapath.

The test marked vm and cluster runs a whole scenario with delay in the VM; under TCG a cluster
takes minutes to start, so it is outside make test's tier:
`svclab vm -- .venv/bin/python -m pytest -m "vm and cluster" tests/test_vm_stock_kernel.py`.
"""

from __future__ import annotations

import re
import statistics
import subprocess

import pytest

from testbed.faults.shaping import add_delay, netem_available, unshape
from testbed.scenario.loader import load_scenario
from tests.netns import in_ns, link, netns_fixture
from tests.scenario_lab import TEST_SCENARIOS, check_report, run_to_end
from tests import test_topology
from tests.test_topology import assert_network_works, tcp_works

netns = netns_fixture("vmk")
cluster = test_topology.cluster  # the fixture: started ClusterNetworks, stopped and cleaned after
DELAY_SCENARIO = TEST_SCENARIOS / "vm-delay.yaml"


def _rtts_ms(ns: str, ip: str, count: int = 5) -> list[float]:
    out = in_ns(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", ip).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


@pytest.mark.vm
@pytest.mark.kernel
def test_delay_is_netem_on_the_link_and_heal_removes_it(netns):
    """The delay action's kernel step: netem delays what leaves the link, both directions of a
    ping cross it once; unshape (heal) puts the default qdisc back. The scenario loader accepts
    delay here, where this machine's kernel refuses it."""
    assert netem_available()
    load_scenario(DELAY_SCENARIO)  # no "delay needs sch_netem" refusal in the VM
    a, b = netns.add("a"), netns.add("b")
    link(a, "va", "10.77.0.1/24", b, "vb", "10.77.0.2/24")
    assert statistics.median(_rtts_ms(a, "10.77.0.2")) < 50
    add_delay(a, ("va",), 100.0, 10.0)
    assert "netem" in in_ns(a, "tc", "qdisc", "show", "dev", "va").stdout
    delayed = _rtts_ms(a, "10.77.0.2")
    assert len(delayed) == 5 and min(delayed) >= 85 and statistics.median(delayed) >= 95, delayed
    unshape(a, "vmk", ("va",))
    assert "netem" not in in_ns(a, "tc", "qdisc", "show", "dev", "va").stdout
    assert statistics.median(_rtts_ms(a, "10.77.0.2")) < 50


def _datapath() -> str:
    return subprocess.run(["ovs-dpctl", "show"], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.vm
@pytest.mark.kernel
def test_a_cluster_network_runs_on_the_ovs_kernel_datapath(cluster):
    """With the openvswitch module loaded the bridges live in the kernel's datapath (ovs-dpctl
    lists their ports), and packets cross them: node to node, and out through the router."""
    net = cluster(nodes=2)
    assert net.datapath == "kernel"
    ports = _datapath()
    assert all(f": {bridge}" in ports for bridge in net.bridges.values()), ports
    assert_network_works(net)
    assert tcp_works(net, "node1", "client", 5201)
    net.stop()
    assert net.name not in _datapath()


def _latencies_ms(report: dict, start: float, end: float) -> list[float]:
    requests = report["runs"][0]["generators"][0]["requests"]
    return [r["latency_ms"] for r in requests if r["outcome"] == "ok" and start <= r["t"] < end]


@pytest.mark.vm
@pytest.mark.cluster
@pytest.mark.timeout(1200)
def test_delay_scenario_slows_every_new_connection_and_heals(tmp_path):
    run = run_to_end(tmp_path, DELAY_SCENARIO, "--start-timeout", "600s", timeout=1100)
    assert not run.left(), run.left()
    assert run.proc.returncode == 0, run.output()
    report = check_report(run)
    actions = {a["name"]: a["t"] for a in report["runs"][0]["actions"]}
    delayed = _latencies_ms(report, actions["slow"] + 0.5, actions["heal-slow"])
    before = _latencies_ms(report, 0, actions["slow"])
    # a SYN and a request, each 100 +- 10 ms late: the median, not just the tail
    assert statistics.median(delayed) >= 190, delayed
    assert statistics.median(before) <= 50, before
