"""Scenario assertions, records, the report files and the plot, on records made up here.

Every assertion kind gets data that passes and data that fails (so a check that did
nothing fails one of them), and an empty window, which must fail. The report's files are
written and read back: report.json as JSON, junit.xml with xml.dom.minidom and
ElementTree, timeline.png with matplotlib.
"""

from __future__ import annotations

import json
import time
import xml.dom.minidom
import xml.etree.ElementTree as ET

import pytest

from testbed.proxy.metrics import ProxyMetrics
from testbed.cluster.proxy_readback import ENDPOINT_CHANGES, LAST_SYNC, parse_metrics
from testbed.scenario import assertions as A
from testbed.scenario.convergence import Convergence, converged_within, rules_mention, rules_result, watch_convergence
from testbed.scenario.records import Record, RecordTail, Window, load_records
from testbed.scenario.report import ActionRecord, GeneratorResult, Report, RunResult, write_report
from testbed.scenario.traffic import GeneratorSpec, GeneratorSummary
from testbed.scenario.units import Comparison

pytestmark = pytest.mark.unit

ALL = Window(0, 100, "[start, end]")
EMPTY = Window(200, 300, "[late, later]")


def ok(t: float, pod: str = "p1", latency: float = 2.0, client: str = "10.0.0.9:1000",
       source: str = "203.0.113.2:1000") -> Record:
    return Record(t, "ok", latency, pod=pod, node="node1", client=client, source=source, conn=int(t * 10))


def fail(t: float, outcome: str = "timeout") -> Record:
    return Record(t, outcome, 1000.0, error="timed out (connect)")


def steady(n: int, every: float = 0.1, start: float = 0.0, pods: tuple[str, ...] = ("p1", "p2", "p3")) -> list[Record]:
    return [ok(start + i * every, pods[i % len(pods)]) for i in range(n)]


def test_empty_windows_fail_for_every_kind():
    records = steady(30)
    results = [
        A.success_rate("s", "g", records, EMPTY, Comparison.parse(">= 0.0")),
        A.max_consecutive_failures("m", "g", records, EMPTY, 100),
        A.latency_p99("l", "g", records, EMPTY, Comparison.parse("<= 10.0")),
        A.balance("b", "g", records, EMPTY, tolerance=1.0),
        A.client_ip("c", "g", records, EMPTY, "masqueraded"),
        A.failover_within("f", "g", records, EMPTY, 100.0),
        A.no_traffic_to("n", "g", records, EMPTY, "nobody"),
    ]
    for result in results:
        assert not result.passed, result
        assert "no " in result.measured and "in the window" in result.measured, result
        assert result.window == "[late, later] = [200.00s, 300.00s]"


def test_success_rate():
    records = steady(99) + [fail(9.95)]
    held = A.success_rate("good", "web", records, ALL, Comparison.parse(">= 0.99"))
    assert held.passed and held.value == 0.99 and held.measured == "0.9900 (99/100 ok; 1 timeout)"
    broken = A.success_rate("good", "web", steady(98) + [fail(9.9), fail(9.95, "refused")], ALL,
                            Comparison.parse(">= 0.99"))
    assert not broken.passed and "1 refused, 1 timeout" in broken.measured
    assert "expected >= 0.99, measured 0.9800" in broken.message and "[start, end]" in broken.message
    # only the window counts: the failures after 9.9 s are outside [0, 5]
    assert A.success_rate("w", "web", records, Window(0, 5), Comparison.parse(">= 1.0")).passed


def test_max_consecutive_failures():
    records = [ok(0), fail(0.1), fail(0.2), ok(0.3), fail(0.4), ok(0.5)]
    held = A.max_consecutive_failures("run", "web", records, ALL, 2)
    assert held.passed and held.value == 2 and "from 0.10s to 0.20s" in held.measured
    assert not A.max_consecutive_failures("run", "web", records, ALL, 1).passed
    assert A.max_consecutive_failures("none", "web", steady(10), ALL, 0).passed


def test_latency_p99():
    records = [ok(i * 0.01, latency=float(i + 1)) for i in range(100)] + [fail(1.5)]  # 1..100 ms; the timeout is left out
    held = A.latency_p99("p99", "web", records, ALL, Comparison.parse("<= 100ms"))
    assert held.passed and held.value == pytest.approx(0.099) and held.measured.startswith("99.0ms")
    assert not A.latency_p99("p99", "web", records, ALL, Comparison.parse("<= 0.05")).passed
    assert not A.latency_p99("p99", "web", [fail(1)], ALL, Comparison.parse("<= 10s")).passed  # nothing succeeded


def test_chi_square_tail_matches_published_critical_values():
    for statistic, dof in ((3.841, 1), (5.991, 2), (7.815, 3), (9.488, 4), (11.070, 5)):
        assert A.chi_square_sf(statistic, dof) == pytest.approx(0.05, abs=2e-4)
    assert A.chi_square_sf(13.816, 2) == pytest.approx(0.001, abs=2e-5)
    assert A.chi_square_sf(0.0, 3) == 1.0


def test_balance_chi_square_and_tolerance():
    even = steady(300)
    held = A.balance("even", "web", even, ALL)
    assert held.passed and held.value == pytest.approx(1.0) and "p1 100, p2 100, p3 100" in held.measured
    skewed = steady(100, pods=("p1",)) + steady(20, pods=("p2",)) + steady(20, pods=("p3",))
    assert not A.balance("skewed", "web", skewed, ALL).passed
    assert not A.balance("skewed", "web", skewed, ALL, p_value=0.05).passed
    near = steady(100, pods=("p1",)) + steady(110, pods=("p2",)) + steady(90, pods=("p3",))
    assert A.balance("tol", "web", near, ALL, tolerance=0.25).passed
    assert not A.balance("tol", "web", near, ALL, tolerance=0.05).passed
    # a pod that should answer but never did is the worst imbalance
    assert not A.balance("missing", "web", steady(200, pods=("p1", "p2")), ALL, pods=["p1", "p2", "p3"]).passed
    single = A.balance("one", "web", steady(50, pods=("p1",)), ALL)
    assert not single.passed and single.measured == "1 pods answered (p1 50)"
    # pods: N: so many must answer; the missing count 0, one too many fails
    assert A.balance("three", "web", even, ALL, pod_count=3).passed
    short = A.balance("four", "web", even, ALL, pod_count=4, tolerance=0.5)
    assert not short.passed and "(missing 1) 0" in short.measured and short.expected.endswith("over 4 pods")
    assert not A.balance("two", "web", even, ALL, pod_count=2).passed
    # pods: 1: every answer from one pod (ClientIP affinity); a second pod answering fails
    assert A.balance("sticky", "web", steady(50, pods=("p1",)), ALL, pod_count=1).passed
    assert A.balance("sticky", "web", steady(50, pods=("p1",)), ALL, pod_count=1, tolerance=0.1).passed
    leak = A.balance("leak", "web", steady(49, pods=("p1",)) + steady(1, pods=("p2",)), ALL, pod_count=1)
    assert not leak.passed and leak.measured == "2 pods answered (p1 49, p2 1)"


def test_client_ip_preserved_or_masqueraded():
    kept = [ok(i * 0.1, client=f"203.0.113.2:{4000 + i}", source=f"203.0.113.2:{4000 + i}") for i in range(10)]
    masq = [ok(i * 0.1, client="172.18.0.2:5000", source="203.0.113.2:4000") for i in range(10)]
    assert A.client_ip("c", "web", kept, ALL, "preserved").passed
    assert not A.client_ip("c", "web", kept, ALL, "masqueraded").passed
    assert A.client_ip("c", "web", masq, ALL, "masqueraded").passed
    result = A.client_ip("c", "web", masq, ALL, "preserved")
    assert not result.passed and "pods saw 172.18.0.2; generator 203.0.113.2" in result.measured
    assert not A.client_ip("c", "web", kept[:9] + masq[:1], ALL, "preserved").passed  # one masqueraded answer
    with pytest.raises(ValueError):
        A.client_ip("c", "web", kept, ALL, "kept")


def test_failover_within():
    crash = 10.0
    records = steady(100) + [fail(10 + i * 0.05) for i in range(1, 20)] + steady(40, start=11.2)
    window = Window(crash, 20, "[crash, end]")
    held = A.failover_within("fo", "web", records, window, 2.0)
    assert held.passed and held.value == pytest.approx(1.2) and "last failure at 10.95s, 19 failed" in held.measured
    assert not A.failover_within("fo", "web", records, window, 1.0).passed
    assert A.failover_within("fo", "web", steady(200), window, 0.5).measured == "0s (no request failed)"
    never = A.failover_within("fo", "web", steady(100) + [fail(12), fail(13)], window, 100.0)
    assert not never.passed and never.measured.startswith("never")
    # measured from the action, which may precede the window
    assert A.failover_within("fo", "web", records, Window(10.5, 20), 2.0, action_t=crash).value == pytest.approx(1.2)


def test_no_traffic_to():
    records = steady(30) + steady(30, start=5, pods=("p1", "p2"))
    after = Window(5, 100, "[delete, end]")
    assert A.no_traffic_to("gone", "web", records, after, "p3").passed
    hit = A.no_traffic_to("gone", "web", records, after, "p2")
    assert not hit.passed and hit.value == 15 and "15 of 30" in hit.measured
    assert not A.no_traffic_to("gone", "web", records, ALL, {"p3", "p9"}).passed


# ------------------------------------------------------------------ convergence (pure parts)

IPTABLES_DUMP = """*nat
-A KUBE-SEP-ABC -s 10.244.1.5/32 -m comment --comment default/web -j KUBE-MARK-MASQ
-A KUBE-SEP-ABC -p tcp -m comment --comment default/web -m tcp -j DNAT --to-destination 10.244.1.5:8080
COMMIT
"""
NFT_DUMP = """table ip kube-proxy {
	chain endpoint-X-default/web/tcp/__10.244.2.7/8080 {
		meta l4proto tcp dnat to 10.244.2.7:8080
	}
	chain service-Y {
		meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.3.9 . 8080, 1 : 10.244.3.10 . 8080 }
	}
}
"""


def test_rules_mention_endpoints_in_both_formats():
    assert rules_mention(IPTABLES_DUMP, "10.244.1.5:8080")
    assert not rules_mention(IPTABLES_DUMP, "10.244.1.50:8080") and not rules_mention(IPTABLES_DUMP, "10.244.1.5:80")
    assert not rules_mention(IPTABLES_DUMP, "0.244.1.5:8080")
    assert rules_mention(NFT_DUMP, "10.244.2.7:8080") and rules_mention(NFT_DUMP, "10.244.3.10:8080")
    assert not rules_mention(NFT_DUMP, "10.244.3.1:8080")
    assert rules_mention(NFT_DUMP, "10.244.3.9") and not rules_mention(NFT_DUMP, "10.244.3.1")  # an address alone


def test_rules_result():
    window = Window(5, 40, "[scale, end]")
    assert rules_result("has", "node1", "10.244.1.5:8080", True, IPTABLES_DUMP, 6.0, window).passed
    gone = rules_result("gone", "node1", "10.244.1.5:8080", False, IPTABLES_DUMP, 6.0, window)
    assert not gone.passed and gone.measured == "contain 10.244.1.5:8080 at 6.00s"
    assert rules_result("gone", "node1", "10.244.9.9:8080", False, IPTABLES_DUMP, 6.0, window).passed
    assert not rules_result("has", "node1", "10.244.1.5:8080", True, IPTABLES_DUMP, 1.0, window).passed  # outside


def test_converged_within():
    quick = Convergence("scale", 10.0, 5.0, {"node1": 0.2, "node2": 0.35, "node3": 0.3})
    held = converged_within("conv", quick, 1.0)
    assert held.passed and held.value == 0.35 and held.measured == "node1 0.20s; node2 0.35s; node3 0.30s"
    assert not converged_within("conv", quick, 0.3).passed
    stuck = Convergence("scale", 10.0, 5.0, {"node1": 0.2, "node2": None})
    result = converged_within("conv", stuck, 10.0)
    assert not result.passed and "node2 not within 5s" in result.measured
    assert not converged_within("conv", Convergence("scale", 1.0, 5.0, {}), 10.0).passed


def test_watch_convergence_times_each_node_from_the_action():
    t0 = time.monotonic()
    ready_at = {"node1": t0 + 0.1, "node2": t0 + 0.3, "node3": float("inf")}
    seen = watch_convergence(lambda node: time.monotonic() >= ready_at[node], list(ready_at), "scale", 0.0, t0,
                             timeout=0.6, poll=0.01)
    assert 0.1 <= seen.nodes["node1"] < 0.25 and 0.3 <= seen.nodes["node2"] < 0.45 and seen.nodes["node3"] is None
    assert time.monotonic() - t0 >= 0.6


def test_kube_proxy_metrics_parse():
    metrics = ProxyMetrics()
    metrics.last_sync.set(1234.5)
    metrics.endpoint_changes_total.inc(3)
    metrics.rules.labels(table="nat").set(42)
    parsed = parse_metrics(metrics.exposition().decode())
    assert parsed[LAST_SYNC] == 1234.5 and parsed[ENDPOINT_CHANGES] == 3
    assert parsed['kubeproxy_sync_proxy_rules_iptables_total{table="nat"}'] == 42


# ------------------------------------------------------------------ records

def test_records_load_and_tail(tmp_path):
    path = tmp_path / "web.jsonl"
    tail = RecordTail(path)
    assert tail.read_new() == [] and load_records(path) == []
    lines = [json.dumps(r.to_json()) for r in (ok(0.2), fail(0.1))]
    path.write_text(lines[0] + "\n" + lines[1][:20])  # the second still being written
    assert [r.t for r in tail.read_new()] == [0.2] and [r.t for r in load_records(path)] == [0.2]
    path.write_text(lines[0] + "\n" + lines[1] + "\n")
    assert [r.outcome for r in tail.read_new()] == ["timeout"] and tail.read_new() == []
    assert [r.t for r in load_records(path)] == [0.1, 0.2]  # by start time
    with pytest.raises(ValueError):
        Window(5, 1)


# ------------------------------------------------------------------ report files

def sample_report() -> Report:
    spec = GeneratorSpec("web", "tx-client", "http://203.0.113.100/", rate=10, stop=20, source="client")
    records = steady(100) + [fail(10 + i * 0.1, kind) for i, kind in enumerate(["timeout", "refused", "reset"])]
    records += steady(80, start=12, pods=("p1", "p2"))
    summary = GeneratorSummary("web", 10, 200, 183, 9.15, 3, 12.5, {"ok": 180, "timeout": 1, "refused": 1, "reset": 1},
                               183, 4, 26, False)
    window = Window(10, 20, "[crash, end]")
    results = [A.success_rate("all good", "web", records, Window(0, 10, "[start, crash]"),
                              Comparison.parse(">= 1.0")),
               A.failover_within("failover", "web", records, window, 2.0),
               A.no_traffic_to("p3 gone", "web", records, Window(12, 20), "p3"),
               A.success_rate("after", "web", records, window, Comparison.parse(">= 0.999"))]
    actions = [ActionRecord("crash", "node-crash", 10.0, {"node": "node2"}),
               ActionRecord("recover", "node-recover", 15.0, {"node": "node2"}, ok=False, error="no such node")]
    runs = [RunResult(mode, {"nodes": 3, "kubeProxy": {"mode": mode}}, 1_800_000_000.0 + i, 20.0,
                      [GeneratorResult(spec, summary, records)], actions, results) for i, mode in
            enumerate(("iptables", "nftables"))]
    return Report("node-failure", "A node dies <behind> a LoadBalancer & fails over", 7, runs, source="s.yaml")


def test_report_files_parse_back(tmp_path):
    report = sample_report()
    files = write_report(report, tmp_path / "out")
    data = json.loads(files.json.read_text())
    assert data["schema"] == "svclab.scenario.report/v1" and data["seed"] == 7 and data["passed"] is False
    assert data["svclab_version"] and [run["mode"] for run in data["runs"]] == ["iptables", "nftables"]
    run = data["runs"][0]
    assert run["cluster"]["kubeProxy"]["mode"] == "iptables" and run["t0"].startswith("2027-01-15T")
    generator = run["generators"][0]
    assert len(generator["requests"]) == 183 and generator["summary"]["achieved_rate"] == 9.15
    assert generator["spec"]["target"] == "http://203.0.113.100/"
    assert {"t", "outcome", "latency_ms", "pod", "node", "client", "source", "conn", "error"} <= set(generator["requests"][0])
    assert [a["name"] for a in run["actions"]] == ["crash", "recover"] and run["actions"][1]["error"] == "no such node"
    verdicts = {a["name"]: (a["passed"], a["measured"]) for a in run["assertions"]}
    assert verdicts["failover"][0] and verdicts["failover"][1].startswith("2.00s")
    assert not verdicts["after"][0] and verdicts["after"][1].startswith("0.9")

    xml.dom.minidom.parse(str(files.junit))  # well-formed
    top = ET.parse(files.junit).getroot()
    assert top.tag == "testsuites" and top.get("tests") == "8" and top.get("failures") == "2"
    suites = top.findall("testsuite")
    assert [s.get("name") for s in suites] == ["node-failure [iptables]", "node-failure [nftables]"]
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == ["all good", "failover", "p3 gone", "after"]
    failure = cases[3].find("failure")
    assert failure is not None and "expected >= 0.999" in failure.get("message") and "[crash, end]" in failure.get("message")
    assert all(c.find("failure") is None for c in cases[:3])
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["seed"] == "7" and props["proxyMode"] == "iptables"


def test_junit_reports_a_run_that_could_not_complete(tmp_path):
    report = sample_report()
    broken = RunResult("iptables", {}, time.time(), 0.0, [], [], [], error="cluster did not come up: <timeout>")
    files = write_report(Report("x", "", 1, [broken]), tmp_path)
    top = ET.parse(files.junit).getroot()
    assert top.get("errors") == "1" and top.find("testsuite/testcase/error").get("message").startswith("cluster did")
    assert not report.passed and not Report("x", "", 1, []).passed


def test_timeline_png_is_drawn(tmp_path):
    import matplotlib.image

    files = write_report(sample_report(), tmp_path)
    assert files.timeline.stat().st_size > 20_000
    image = matplotlib.image.imread(files.timeline)
    height, width = image.shape[:2]
    assert width > 1000 and height > 500  # two panels (one generator, two modes)
    assert image.std() > 0.05  # not a blank canvas


# ------------------------------------------------------------------ what `svclab run` prints

def test_progress_line_and_assertions_table():
    import io

    from rich.console import Console

    from testbed.scenario.progress import ScenarioProgress, assertions_table
    from testbed.scenario.traffic import GeneratorStats

    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    stats = GeneratorStats("web")
    stats.add(steady(10) + [fail(1.1)])
    with ScenarioProgress("node-failure", 40, mode="iptables", console=console) as progress:
        progress.update(12.34, {"web": stats, "inside": GeneratorStats("inside")}, "crash (node-crash node2)")
        line = progress.render().plain
    assert line == ("node-failure [iptables]   12.3s / 40s  web 10 ok / 1 failed  inside 0 ok / 0 failed  "
                    "last: crash (node-crash node2)")
    report = sample_report()
    console = Console(file=io.StringIO(), width=250, force_terminal=False, record=True)
    console.print(assertions_table({run.mode: run.assertions for run in report.runs}))
    text = console.export_text()
    assert "measured [iptables]" in text and "measured [nftables]" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert rows["after"].count("FAIL") == 2 and rows["failover"].count("PASS") == 2
    assert "[start, crash] = [0.00s, 10.00s]" in rows["all good"]  # no markup eaten
