"""`svclab run` as a user runs it (a subprocess, a real cluster each): the exit status (1 when an
assertion fails, naming window, expected and measured; 2 for a file that cannot run, before any
cluster starts), Ctrl-C tearing the cluster down mid-run, --keep leaving it up until `svclab
down`, --proxy-mode with two modes giving two runs in one report, and the seed deciding the
random pick. Every run that ends is checked for leftovers (tests/scenario_lab.py).
The shipped scenarios run in tests/test_scenarios_shipped.py, every action kind in
tests/test_scenario_actions.py."""

from __future__ import annotations

import signal

import pytest

from testbed import naming
from testbed.scenario.loader import load_scenario
from testbed.scenario.plan import resolve_timeline
from tests.scenario_lab import check_report, run_to_end, scenario_run, wait_for, write

pytestmark = pytest.mark.cluster

SMALL = """\
name: small
cluster: {nodes: 2}
manifests:
  - file: @SCENARIOS@/manifests/frontend-deployment.yaml
  - inline: |
      apiVersion: v1
      kind: Service
      metadata: {name: frontend-service}
      spec: {type: NodePort, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080, nodePort: 30007}]}
duration: DURATION
seed: 5
traffic:
  - {name: np, from: client, to: "http://${nodeIP:node1}:30007/", rate: 10/s}
  - {name: inside, from: client, to: "http://${clusterIP:frontend-service}/", rate: 2/s, timeout: 300ms}
timeline:
  - {name: gone, at: 1s, action: pod-delete, selector: app=frontend, pick: random}
assertions:
  - {name: served, traffic: np, successRate: ">= 0.9"}
"""


def line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def small(tmp_path, duration: str = "4s", extra: str = "") -> object:
    return write(tmp_path, "small.yaml", SMALL.replace("DURATION", duration) + extra)


def test_a_failed_assertion_exits_1_naming_window_expected_and_measured(tmp_path):
    wrong = "  - {name: ClusterIP from outside, traffic: inside, window: [gone, end], successRate: \">= 0.5\"}\n"
    run = run_to_end(tmp_path, small(tmp_path, extra=wrong))
    assert run.proc.returncode == 1, run.output()
    assert not run.left(), run.left()
    report = check_report(run)
    failed = [a for a in report["runs"][0]["assertions"] if not a["passed"]]
    assert [a["name"] for a in failed] == ["ClusterIP from outside"], failed
    assert failed[0]["window"].startswith("[gone, end] = [1.0") and failed[0]["expected"] == ">= 0.5"
    assert failed[0]["measured"].startswith("0.0000 (0/") and "refused" in failed[0]["measured"], failed[0]
    failure = next(c for c in run.junit().iter("testcase") if c.find("failure") is not None).find("failure")
    for text in ("[gone, end]", "expected >= 0.5", "measured 0.0000"):
        assert text in failure.get("message"), failure.get("message")
    assert "FAIL" in run.stdout and "ClusterIP from outside" in run.stdout and "FAILED: report in" in run.stdout


def test_an_invalid_scenario_exits_2_with_file_and_line_before_any_cluster(tmp_path):
    bad = write(tmp_path, "bad.yaml", SMALL.replace("DURATION", "4s").replace("pick: random", "pick: sometimes")
                .replace("traffic: np,", "traffic: nope,"))
    run = run_to_end(tmp_path, bad, timeout=60)
    assert run.proc.returncode == 2, run.output()
    assert f"{bad}:{line_of(bad, 'pick:')}: timeline[0].pick: invalid pick 'sometimes'" in run.stderr, run.stderr
    assert f"{bad}:{line_of(bad, 'nope')}: assertions[0].traffic: no traffic generator named 'nope'" in run.stderr
    assert not run.state.exists() and not run.report.exists() and not run.left()
    delay = write(tmp_path, "delay.yaml", SMALL.replace("DURATION", "4s").replace(
        "action: pod-delete, selector: app=frontend, pick: random", "action: delay, target: node1, delay: 50ms"))
    run = run_to_end(tmp_path, delay, timeout=60)
    line = line_of(delay, "action: delay")
    assert run.proc.returncode == 2 and f"{delay}:{line}: timeline[0].action: delay needs the kernel's netem" in run.stderr
    assert not run.state.exists()


def test_ctrl_c_mid_run_tears_the_cluster_down(tmp_path):
    run = scenario_run(tmp_path, small(tmp_path, duration="60s")).start()
    records = run.report / "iptables" / "np.jsonl"
    wait_for(lambda: records.exists() and records.stat().st_size > 200 or run.proc.poll() is not None, 120,
             "the traffic to start")
    assert run.proc.poll() is None, run.output()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(120) == 2, run.output()
    assert not run.left(), run.left()
    report = run.json()
    assert report["runs"][0]["error"].startswith("interrupted") and not report["passed"]
    assert report["runs"][0]["generators"][0]["requests"], "the requests made before Ctrl-C are kept"
    assert "INTERRUPTED" in run.stdout, run.output()


def test_keep_leaves_the_cluster_up_until_svclab_down(tmp_path):
    run = scenario_run(tmp_path, small(tmp_path, duration="2s"), "--keep").start()
    wait_for(lambda: (run.report / "report.json").exists() or run.proc.poll() is not None, 120, "the report")
    assert run.proc.poll() is None, run.output()
    pods = run.svclab("get", "pods")
    assert pods.returncode == 0 and pods.stdout.count("frontend-") == 3, pods
    assert (naming.NETNS_DIR / naming.node_netns(run.name, "client")).exists()
    down = run.svclab("down")
    assert down.returncode == 0, down
    assert run.wait(60) == 0, run.output()  # the run's verdict, once `down` ended it
    assert "kept up" in run.stderr and not run.left(), run.left()


def test_two_modes_run_side_by_side_and_the_seed_decides_the_pick(tmp_path):
    scenario = small(tmp_path)
    run = run_to_end(tmp_path, scenario, "--proxy-mode", "iptables,nftables", "--seed", "11")
    assert run.proc.returncode == 0, run.output()
    assert not run.left(), run.left()
    report = check_report(run)
    assert [r["mode"] for r in report["runs"]] == ["iptables", "nftables"] and report["seed"] == 11
    assert [r["cluster"]["kubeProxy"]["mode"] for r in report["runs"]] == ["iptables", "nftables"]
    assert [s.get("name") for s in run.junit().iter("testsuite")] == ["small [iptables]", "small [nftables]"]
    assert "measured [iptables]" in run.stdout and "measured [nftables]" in run.stdout, run.stdout
    # the same seed, two clusters (other pod names): the same choice among the sorted candidates
    picks = []
    for mode_run in report["runs"]:
        params = mode_run["actions"][0]["params"]
        picks.append(params["candidates"].index(params["pods"][0]["name"]))
    step = resolve_timeline(load_scenario(scenario).with_seed(11))[0]
    expected = ["a", "b", "c"].index(step.choose(["a", "b", "c"])[0])
    assert picks == [expected, expected], (picks, report["runs"][0]["actions"])


@pytest.mark.parametrize("timeline, message", [
    ("  - {name: never, when: \"pods(app=nothing) >= 1\", timeout: 1s, action: heal}\n",
     "timeline[0] never: when: pods(app=nothing) >= 1 did not hold within timeout 1s"),
    ("  - {name: nobody, at: 1s, action: pod-delete, selector: app=nothing}\n",
     "timeline[0] nobody (pod-delete) at 1."),
], ids=["when-times-out", "action-fails"])
def test_a_timeline_that_cannot_go_on_exits_2_and_says_why(tmp_path, timeline, message):
    text = SMALL.replace("DURATION", "6s").replace("cluster: {nodes: 2}", "cluster: {nodes: 1}")
    text = text[:text.index("timeline:\n") + len("timeline:\n")] + timeline + text[text.index("assertions:"):]
    run = run_to_end(tmp_path, write(tmp_path, "stuck.yaml", text))
    assert run.proc.returncode == 2, run.output()
    assert not run.left(), run.left()
    error = check_report(run)["runs"][0]["error"]
    assert error.startswith(message) and error in run.stderr, (error, run.stderr[-2000:])
    if "pod-delete" in message:
        assert "selector: no pod matches app=nothing" in error
        assert run.json()["runs"][0]["actions"][0]["ok"] is False
    else:
        assert "last: pods(app=nothing) = 0" in error
