"""The pure parts of `svclab run` (unit tier, no cluster): the timeline's triggers by real
times, the verdicts over real action times (a window whose action never happened is not
judged), a rollout's template merge, the dispatch table, which node a convergence watch
watches, and the CLI refusing bad input with exit 2 before anything starts."""

from __future__ import annotations

import subprocess

import pytest

from testbed.scenario.actions import ACTIONS
from testbed.scenario.execute import EXECUTORS, merge_template
from testbed.scenario.judge import RunFacts, judge
from testbed.scenario.live import PodBook
from testbed.scenario.loader import load_scenario
from testbed.scenario.observe import _own_node
from testbed.scenario.player import Player
from testbed.scenario.plan import resolve_timeline
from testbed.scenario.records import Record
from tests.conftest import REPO, svclab_command

pytestmark = pytest.mark.unit

TIMELINE = """\
name: units
duration: 30s
traffic:
  - {name: web, from: client, to: "http://10.0.0.1/", rate: 10/s}
timeline:
  - {name: before, after: crash-2s, action: heal}
  - {name: crash, at: 10s, action: node-crash, node: node2}
  - {name: back, after: crash+5s, action: node-recover, node: node2}
  - {name: ready, when: "readyNodes() == 3", timeout: 5s, action: heal}
assertions:
  - {name: before crash, traffic: web, window: [start, crash], successRate: ">= 1.0"}
  - {name: after ready, traffic: web, window: [ready, end], successRate: ">= 1.0"}
"""


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "units.yaml"
    path.write_text(TIMELINE)
    return load_scenario(path)


def test_after_counts_from_the_real_time_of_its_action(scenario):
    player = Player(scenario, None, None, None, t0=0.0)
    steps = {s.label: s for s in resolve_timeline(scenario)}
    assert player._due(steps["before"], 8.0) and not player._due(steps["before"], 7.9)  # planned crash - 2s
    assert not player._due(steps["back"], 15.0)  # crash not taken yet
    player.times[1] = 10.7  # crash taken late
    assert not player._due(steps["back"], 15.6) and player._due(steps["back"], 15.7)
    assert player._next_due([steps["back"]]) == pytest.approx(15.7)


def test_windows_use_the_real_times_and_a_missing_action_is_not_judged(scenario):
    records = {"web": [Record(t / 10, "ok", 1.0, pod="p") for t in range(300)]}
    observer = type("NoObserver", (), {"watches": [], "reads": {}})()
    facts = RunFacts(records, {0: 8.0, 1: 10.7, 2: 15.7}, PodBook(), {}, observer)
    before, after = judge(scenario, facts)
    assert before.passed and before.window == "[start, crash] = [0.00s, 10.70s]" and "107/107" in before.measured
    assert not after.passed and after.measured == "not judged: ready did not happen"


def test_a_rollout_template_merges_mappings_and_containers_by_name():
    base = {"metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]},
                                    {"name": "side", "image": "busybox"}]}}
    change = {"metadata": {"labels": {"revision": "2"}}, "spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}
    merged = merge_template(base, change)
    assert merged["metadata"]["labels"] == {"app": "web", "revision": "2"}
    assert merged["spec"]["containers"] == [{"name": "web", "image": "nginx:2", "ports": [{"containerPort": 8080}]},
                                            {"name": "side", "image": "busybox"}]
    assert base["spec"]["containers"][0]["image"] == "nginx"  # the base is left alone


def test_every_action_kind_has_an_executor():
    assert set(EXECUTORS) == set(ACTIONS)


def test_one_node_actions_are_watched_on_their_node(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("name: w\nduration: 20s\ntimeline:\n"
                    "  - {at: 1s, action: component-kill, component: kube-proxy, node: node2}\n"
                    "  - {at: 2s, action: component-kill, component: kube-proxy}\n"
                    "  - {at: 3s, action: flush-rules, node: node3}\n"
                    "  - {at: 4s, action: node-crash, node: node1}\n")
    steps = resolve_timeline(load_scenario(path))
    assert [_own_node(s) for s in steps] == ["node2", None, "node3", None]


def test_run_refuses_bad_input_with_exit_2_before_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nduration: 5x\n")
    state = tmp_path / "state"
    result = subprocess.run(svclab_command("--state-root", str(state), "run", str(bad)), capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and f"{bad}:2: duration: invalid duration '5x'" in result.stderr, result
    good = REPO / "scenarios" / "quickstart.yaml"
    result = subprocess.run(svclab_command("--state-root", str(state), "run", str(good), "--proxy-mode", "iptables,ipvz"),
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "--proxy-mode" in result.stderr, result
    assert not state.exists()
