"""Every shipped scenario (scenarios/*.yaml, new files picked up as they come) runs with `svclab
run` on a real cluster and passes: exit 0, its report written and readable, nothing left.

node-failure is issue 11's contract and is checked further: it runs as written, its failover
is measured, and its failures stop once the node's pod has left the endpoints after the
grace period (but for a stray few, see check_node_failure). Its
`failoverWithin: 2s` cannot hold as the contract is written: one of the three frontend pods
runs on the crashed node, and kube-proxy on the surviving nodes sends a third of the new
connections to it until the node controller marks the node NotReady (nodeMonitorGracePeriod,
5 s) and its pod leaves the endpoints; only the load balancer's own part fails over within
2 s (bench/scenarios/lb-node-crash.yaml: 1.3 s). The test reports that as an expected
failure (and fails if anything else goes wrong), until the contract's premise is settled.
"""

from __future__ import annotations

import pytest

from testbed.scenario.loader import load_scenario
from tests.scenario_lab import SCENARIOS, check_report, run_to_end

pytestmark = pytest.mark.cluster

SHIPPED = sorted(p.name for p in SCENARIOS.glob("*.yaml"))
GRACE_S = 5.0  # node-failure's nodeMonitorGracePeriod


def check_node_failure(report: dict) -> None:
    """The contract as measured: all good before the crash, failover measured, failures only
    while the dead node's pod was still in the endpoints (timeouts), and none once it left."""
    run = report["runs"][0]
    assert not run["error"] and [a["name"] for a in run["actions"]] == ["crash", "node-recover"], run["actions"]
    crash_t = run["actions"][0]["t"]
    results = {a["kind"] + ":" + a["window"].split(" =")[0]: a for a in run["assertions"]}
    # (its balance, tolerance 0.25 over 200 requests and 3 pods, fails 3.3 % of runs of a perfectly
    # even balancer by chance alone: measured, not asserted here)
    assert results["successRate:[start, crash]"]["passed"] and results["balance:[start, crash]"]["value"], results
    failover = results["failoverWithin:[crash, end]"]
    assert failover["value"] is not None, failover  # measured
    web = next(g for g in run["generators"] if g["name"] == "web")
    failed = [r for r in web["requests"] if r["outcome"] != "ok"]
    assert failed and all(r["outcome"] == "timeout" and r["t"] >= crash_t for r in failed), failed
    # most while the pod was in the endpoints; a few later ones are most likely new connections
    # that reused the client port of an earlier one to the dead pod, whose connection-tracking
    # entry (SYN_SENT, 120 s) still sends them there
    during = [r for r in failed if r["t"] < crash_t + GRACE_S + 2]
    assert len(during) >= 0.85 * len(failed), failed
    assert failover["value"] >= GRACE_S - 1, failover


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_passes(tmp_path, name):
    path = SCENARIOS / name
    load_scenario(path)  # valid, or the problems say why
    run = run_to_end(tmp_path, path)
    assert not run.left(), run.left()
    assert run.proc.returncode in (0, 1), run.output()
    report = check_report(run)
    if name == "node-failure.yaml":
        check_node_failure(report)
        held = {a["kind"]: a["passed"] for a in report["runs"][0]["assertions"] if a["window"].startswith("[crash")}
        if run.proc.returncode == 1 and not held["failoverWithin"]:
            pytest.xfail(f"node-failure's failoverWithin 2s: measured {report['runs'][0]['assertions'][2]['measured']}"
                         " (the crashed node's pod stays in the endpoints for the grace period; see the module doc)")
    assert run.proc.returncode == 0, run.output()
