"""Every timeline action kind played by `svclab run` on a real cluster, each with an assertion
that would fail if the action did nothing (tests/scenarios/objects.yaml, network.yaml,
nodes.yaml: what each checks is in its header and its assertions' names). A run passes only if
every action was taken and every assertion held; nothing of the cluster is left after it.
delay cannot run on this kernel (no sch_netem): `svclab run` refuses it before any cluster
starts (tests/test_scenario_run.py)."""

from __future__ import annotations

import pytest
import yaml

from testbed.scenario.actions import ACTIONS
from tests.scenario_lab import SCENARIOS, TEST_SCENARIOS, check_report, run_to_end

pytestmark = pytest.mark.cluster

FILES = ("objects.yaml", "network.yaml", "nodes.yaml")
NOT_HERE = {"delay"}  # needs sch_netem: refused on this kernel


def kinds(path) -> set[str]:
    return {entry["action"] for entry in yaml.safe_load(path.read_text()).get("timeline", [])}


def test_the_scenarios_take_every_action_kind():
    played = set().union(*(kinds(TEST_SCENARIOS / f) for f in FILES), kinds(SCENARIOS / "node-failure.yaml"))
    assert played | NOT_HERE == set(ACTIONS), set(ACTIONS) - played - NOT_HERE


@pytest.mark.parametrize("name", FILES)
def test_every_action_has_its_effect(tmp_path, name):
    run = run_to_end(tmp_path, TEST_SCENARIOS / name)
    assert not run.left(), run.left()
    assert run.proc.returncode == 0, run.output()
    report = check_report(run)
    actions = report["runs"][0]["actions"]
    assert all(a["ok"] for a in actions) and {a["action"] for a in actions} == kinds(TEST_SCENARIOS / name), actions
    assert all(a["passed"] for a in report["runs"][0]["assertions"])
