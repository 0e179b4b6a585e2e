"""The scenario file format (testbed/scenario/): the contract example of issue 11 loads as
written and plans as it reads, every action and assertion kind has a model, every kind of
bad input is refused with file:line and the field's path (all problems at once), the plan is
the same for the same seed, and `svclab validate` says so. Pure Python: no cluster."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest
import yaml

from testbed.cluster.config import TOP_KEYS, ClusterConfig
from testbed.scenario.actions import ACTIONS
from testbed.scenario.kernel import KernelFeatures
from testbed.scenario.loader import ScenarioError, load_scenario
from testbed.scenario.base import allowed_keys
from testbed.scenario.model import CLUSTER_CHECKS, TRAFFIC_CHECKS, ClusterSpec, Scenario, default_cluster_name
from testbed.scenario.plan import ActionIndex, resolve_timeline, traffic_seeds, window_times
from testbed.scenario.syntax import substitute, templates_in
from testbed.scenario.units import Bandwidth, Comparison, parse_duration, parse_percent, parse_rate
from tests.conftest import REPO, svclab_command

pytestmark = pytest.mark.unit

#: This kernel's features, fixed, so that the tests say the same on the VM.
HERE = KernelFeatures(netem=False, ipvs=False)
VM = KernelFeatures(netem=True, ipvs=True)

#: Issue 11's contract, verbatim.
CONTRACT = """\
name: node-failure
description: A node dies behind a LoadBalancer; new connections fail over to the other nodes.
cluster: {nodes: 3, proxyMode: iptables, nodeMonitorGracePeriod: 5s}
manifests:
  - file: manifests/frontend-deployment.yaml      # relative to this file
  - inline: |
      apiVersion: v1
      kind: Service
      metadata: {name: frontend-lb}
      spec: {type: LoadBalancer, selector: {app: frontend}, ports: [{port: 80, targetPort: 8080}]}
duration: 40s
seed: 7
traffic:
  - {name: web, from: client, to: "http://${externalIP:frontend-lb}/", rate: 20/s, connections: new, timeout: 1s}
  - {name: inside, from: "pod:app=frontend", to: "http://frontend-lb/", rate: 5/s}
timeline:
  - {name: crash, at: 10s, action: node-crash, node: node2}
  - {after: crash+15s, action: node-recover, node: node2}
assertions:
  - {name: all good before, traffic: web, window: [start, crash], successRate: ">= 1.0", balance: {tolerance: 0.25}}
  - {traffic: web, window: [crash, end], failoverWithin: 2s}
  - {traffic: web, window: [crash+3s, end], successRate: ">= 0.99"}
"""

#: A small valid scenario that the bad-input tests break one line at a time (line numbers matter).
BASE = """\
name: base
cluster: {nodes: 3}
duration: 40s
traffic:
  - {name: web, from: client, to: "http://${externalIP:frontend-lb}/", rate: 20/s}
timeline:
  - {name: crash, at: 10s, action: node-crash, node: node2}
  - {after: crash+15s, action: node-recover, node: node2}
assertions:
  - {traffic: web, window: [crash+3s, end], successRate: ">= 0.99"}
"""


def write(tmp_path, text: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path, text: str, kernel: KernelFeatures = HERE) -> list[str]:
    """Every problem of text as `s.yaml:LINE: path: message`; fails if it loads."""
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write(tmp_path, text), kernel=kernel)
    lines = str(caught.value).splitlines()
    assert lines == [str(p) for p in caught.value.problems]
    return [line.removeprefix(f"{tmp_path}/") for line in lines]


def broken(tmp_path, old: str, new: str, kernel: KernelFeatures = HERE) -> list[str]:
    assert old in BASE
    return problems(tmp_path, BASE.replace(old, new), kernel)


def one_problem(tmp_path, old: str, new: str, kernel: KernelFeatures = HERE) -> str:
    found = broken(tmp_path, old, new, kernel)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------- the contract


def test_the_shipped_node_failure_scenario_is_the_contract_plus_its_cluster_policy_twin():
    """The contract example with one line changed (frontend-lb's externalTrafficPolicy: Local,
    without which its failoverWithin: 2s cannot hold: see the scenario's header) and the
    contract's own Service, policy Cluster, added beside it with its generator and assertions."""
    text = (REPO / "scenarios/node-failure.yaml").read_text()
    assert text.startswith("# node-failure:") and "What it teaches" in text
    shipped, contract = yaml.safe_load(text), yaml.safe_load(CONTRACT)
    local, twin = yaml.safe_load_all(shipped["manifests"][1]["inline"])
    written = yaml.safe_load(contract["manifests"][1]["inline"])
    assert local["spec"].pop("externalTrafficPolicy") == "Local" and local == written
    assert twin["metadata"]["name"] == "frontend-lb-cluster" and twin["spec"] == written["spec"]
    web_cluster = shipped["traffic"].pop(1)
    assert web_cluster == dict(contract["traffic"][0], name="web-cluster",
                               to="http://${externalIP:frontend-lb-cluster}/")
    added = shipped["assertions"][3:]
    assert added and all(a["traffic"] == "web-cluster" for a in added)
    del shipped["assertions"][3:]
    shipped["manifests"][1] = contract["manifests"][1]
    assert shipped == contract


def test_the_contract_loads_as_written_and_plans_crash_at_10s_recover_at_25s(tmp_path):
    (tmp_path / "manifests").mkdir()
    shutil.copy(REPO / "scenarios/manifests/frontend-deployment.yaml", tmp_path / "manifests")
    scenario = load_scenario(write(tmp_path, CONTRACT), kernel=HERE)
    assert (scenario.name, scenario.duration, scenario.seed) == ("node-failure", 40.0, 7)
    web, inside = scenario.traffic
    assert (web.source.kind, web.destination, web.rate, web.connections, web.timeout, web.kind) == \
        ("client", "http://${externalIP:frontend-lb}/", 20.0, "new", 1.0, "http")
    assert (inside.source.pod.selector, inside.rate, inside.connections) == ("app=frontend", 5.0, "new")
    plan = resolve_timeline(scenario)
    assert [(p.label, p.kind, p.action.node, p.at) for p in plan] == \
        [("crash", "node-crash", "node2", 10.0), ("node-recover", "node-recover", "node2", 25.0)]
    first, failover, after = scenario.assertions
    assert [c.kind for c in first.checks()] == ["successRate", "balance"]
    assert first.success_rate.holds(1.0) and not first.success_rate.holds(0.999)
    assert first.balance.tolerance == 0.25 and failover.failover_within == 2.0
    assert str(after.window) == "[crash+3s, end]"
    times = {p.position: p.at for p in plan}
    assert window_times(after.window, ActionIndex.of(scenario.timeline), times, scenario.duration) == (13.0, 40.0)
    objects = scenario.manifest_objects().objects
    assert [(o.DESCRIPTOR.name, o.metadata.name) for o in objects] == [("Deployment", "frontend"), ("Service", "frontend-lb")]


def test_the_shipped_scenarios_validate():
    for path in sorted((REPO / "scenarios").glob("*.yaml")):
        load_scenario(path, kernel=HERE)


def test_cluster_config_is_what_svclab_up_config_takes(tmp_path):
    scenario = load_scenario(REPO / "scenarios/node-failure.yaml", kernel=HERE)
    config = scenario.cluster_config()
    assert (config.name, config.nodes, config.proxy_mode, config.node_monitor_grace_period) == \
        ("nodefail", 3, "iptables", 5.0)
    # the same settings through the config file `svclab up --config` reads
    config_file = write(tmp_path, yaml.safe_dump(scenario.cluster_settings()), "cluster.yaml")
    assert ClusterConfig.from_file(config_file) == config
    assert scenario.cluster_config(name="lab", proxy_mode="nftables") == \
        config.with_overrides(name="lab", proxy_mode="nftables")
    # every setting of the config file is a key of cluster:, plus proxyMode
    assert set(allowed_keys(ClusterSpec)) == set(TOP_KEYS) - {"kind", "apiVersion"} | {"proxyMode"}
    slow = Scenario.model_validate({"name": "x", "duration": 5, "cluster": {"nodeMonitorGracePeriod": "40s"}})
    assert slow.cluster_config().node_monitor_grace_period == 40.0
    assert default_cluster_name("node-failure") == "nodefail" and default_cluster_name("42-x") == "s42x"


# ---------------------------------------------------------------------- every action and assertion


def test_every_action_and_assertion_kind_has_a_model_with_its_keys():
    scenario = load_scenario(REPO / "tests/scenarios/every-action.yaml", kernel=VM)
    assert {a.kind for a in scenario.timeline} == set(ACTIONS)
    by_kind = {a.kind: a for a in scenario.timeline}
    assert by_kind["partition"].groups == [["client"], ["node2"]]
    assert (by_kind["partition"].direction, by_kind["partition"].mode) == ("one-way", "reject")
    assert (by_kind["loss"].target, by_kind["loss"].percent) == ("node1", 20.0)
    assert by_kind["bandwidth"].rate.bits_per_second == 1_000_000 and str(by_kind["bandwidth"].rate) == "1mbit"
    assert (by_kind["delay"].delay, by_kind["delay"].jitter) == (0.1, 0.01)
    assert (by_kind["link-flap"].count, by_kind["link-flap"].interval) == (2, 0.5)
    assert (by_kind["component-kill"].component, by_kind["component-kill"].node) == ("kube-proxy", "node1")
    assert by_kind["component-stop"].node is None
    assert (by_kind["pod-delete"].selector, by_kind["pod-delete"].pick) == ("app=frontend", "random")
    assert (by_kind["scale"].deployment, by_kind["scale"].replicas) == ("frontend", 5)
    assert by_kind["rollout"].template == {"metadata": {"annotations": {"v": "2"}}}
    assert (by_kind["dns-error"].names, by_kind["dns-error"].rcode) == ("frontend-*", "NXDOMAIN")
    assert by_kind["delete"].object == "pod/extra" and len(by_kind["apply"].manifests) == 1
    when = scenario.timeline[-1].trigger
    assert (when.kind, when.when.function, when.when.argument, when.when.comparison.value, when.timeout) == \
        ("when", "endpoints", "frontend-lb", 3.0, 20.0)
    kinds = [c.kind for a in scenario.assertions for c in a.checks()]
    assert sorted(kinds) == sorted(TRAFFIC_CHECKS + CLUSTER_CHECKS)
    assert scenario.cluster.proxy_modes == ["iptables", "nftables"]
    assert [t.kind for t in scenario.traffic] == ["http", "tcp", "udp"]


def test_a_loaded_scenario_dumps_to_a_document_that_loads_to_the_same(tmp_path):
    scenario = load_scenario(REPO / "tests/scenarios/every-action.yaml", kernel=VM)
    document = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
    again = Scenario.model_validate(yaml.safe_load(yaml.safe_dump(document)))
    assert again.model_dump() == scenario.model_dump() and again.timeline == scenario.timeline


# ---------------------------------------------------------------------- plans and seeds


PICKY = BASE.replace("timeline:\n", "timeline:\n  - {name: kill, at: 5s, action: pod-delete, selector: app=frontend, "
                                    "pick: random}\n  - {at: 6s, action: pod-kill, selector: app=web, pick: 3}\n")
PODS = [f"frontend-{i:02d}" for i in range(20)]


def test_the_same_seed_gives_the_same_plan_and_picks(tmp_path):
    scenario = load_scenario(write(tmp_path, PICKY), kernel=HERE)
    one, two = resolve_timeline(scenario), resolve_timeline(scenario)
    assert one == two
    assert one == resolve_timeline(scenario, random.Random(scenario.seed))
    assert one[0].choose(PODS) == two[0].choose(reversed(PODS)) and len(one[0].choose(PODS)) == 1
    assert len(set(one[1].choose(PODS))) == 3 and one[2].choose(PODS) == PODS  # pick: 3; a node action takes all


def test_another_seed_picks_other_pods(tmp_path):
    scenario = load_scenario(write(tmp_path, PICKY), kernel=HERE)
    picks = {seed: resolve_timeline(scenario.with_seed(seed))[0].choose(PODS) for seed in (0, 1, 2, 3)}
    assert len({tuple(p) for p in picks.values()}) > 1, picks
    assert [p.at for p in resolve_timeline(scenario.with_seed(1))] == [5.0, 6.0, 10.0, 25.0]
    assert scenario.with_seed(1).path == scenario.path and scenario.with_seed(None) is scenario


def test_traffic_seeds_follow_the_seed_and_the_generators_name(tmp_path):
    scenario = load_scenario(REPO / "scenarios/node-failure.yaml", kernel=HERE)
    seeds = traffic_seeds(scenario)
    assert seeds == traffic_seeds(scenario) and seeds["web"] != seeds["inside"]
    assert traffic_seeds(scenario.with_seed(8))["web"] != seeds["web"]
    # run in another process, the seeds are the same (str seeds are not hashed per process)
    r = subprocess.run([sys.executable, "-c", "from testbed.scenario.loader import load_scenario; "
                        "from testbed.scenario.plan import traffic_seeds; "
                        "print(traffic_seeds(load_scenario('scenarios/node-failure.yaml'))['web'])"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == str(seeds["web"]), r.stderr


def test_when_triggers_stay_conditional_and_their_followers_wait(tmp_path):
    text = BASE.replace("  - {after: crash+15s, action: node-recover, node: node2}\n",
                        "  - {name: gone, when: \"endpoints(frontend-lb) == 2\", timeout: 20s, action: heal}\n"
                        "  - {after: gone+2s, action: node-recover, node: node2}\n"
                        "  - {at: 30s, action: flush-rules, node: node1}\n")
    plan = resolve_timeline(load_scenario(write(tmp_path, text), kernel=HERE))
    assert [(p.label, p.at) for p in plan] == [("crash", 10.0), ("flush-rules", 30.0), ("gone", None),
                                              ("node-recover", None)]
    gone, recover = plan[2], plan[3]
    assert (str(gone.condition), gone.timeout, gone.waits_from) == ("endpoints(frontend-lb) == 2", 20.0, 0)
    assert (recover.follows, recover.delay) == (1, 2.0)


def test_templates_are_found_and_substituted():
    text = "${nodeIP:node1}:${nodePort:frontend-service}"
    assert [(t.kind, t.argument) for t in templates_in(text)] == [("nodeIP", "node1"), ("nodePort", "frontend-service")]
    values = {"nodeIP": "172.18.0.2", "nodePort": "30007"}
    assert substitute(text, lambda t: values[t.kind]) == "172.18.0.2:30007"


def test_units():
    assert [parse_duration(x) for x in ("40s", "500ms", "2m", "1m30s", 5)] == [40, 0.5, 120, 90, 5]
    assert [parse_rate(x) for x in ("20/s", "120/m", 3)] == [20, 2, 3]
    assert parse_percent("20%") == parse_percent(20) == 20
    assert Bandwidth.parse("1mbit").bits_per_second == 10**6 and Bandwidth.parse("1mbps").bits_per_second == 8 * 10**6
    ge, lt, pct = Comparison.parse(">= 0.99"), Comparison.parse("< 200ms"), Comparison.parse("> 95%")
    assert ge.holds(0.99) and not ge.holds(0.98) and lt.holds(0.199) and not lt.holds(0.2)
    assert (pct.value, pct.unit, lt.unit) == (0.95, "percent", "duration")
    for parse, bad in ((parse_duration, "-1s"), (parse_duration, "5 parsecs"), (parse_rate, "0/s"),
                       (parse_rate, "fast"), (parse_percent, 0), (parse_percent, 101), (Bandwidth.parse, "1 lightyear"),
                       (Comparison.parse, "0.99"), (Comparison.parse, "=> 1")):
        with pytest.raises(ValueError):
            parse(bad)


# ---------------------------------------------------------------------- bad input: one test per kind of problem
# BASE's lines: 1 name, 2 cluster, 3 duration, 5 traffic[0], 7 timeline[0] (crash), 8 timeline[1], 10 assertions[0]


def test_unknown_top_level_key_lists_the_allowed_ones(tmp_path):
    assert one_problem(tmp_path, "duration: 40s\n", "duration: 40s\nfaults: []\n") == (
        "s.yaml:4: faults: unknown key (allowed: name, description, cluster, manifests, duration, seed, traffic, "
        "timeline, assertions)")


def test_unknown_key_of_an_action_lists_that_actions_keys(tmp_path):
    assert broken(tmp_path, "node: node2}\n  - {after", "nod: node2}\n  - {after") == [
        "s.yaml:7: timeline[0].nod: unknown key (allowed: name, at, after, when, timeout, node, action)",
        "s.yaml:7: timeline[0].node: required"]
    found = one_problem(tmp_path, 'successRate: ">= 0.99"}', 'successRate: ">= 0.99", balance: {tolerence: 1}}')
    assert found == "s.yaml:10: assertions[0].balance.tolerence: unknown key (allowed: tolerance, pValue, pods)"


def test_unknown_action(tmp_path):
    found = one_problem(tmp_path, "action: node-crash", "action: node-crsh")
    assert found.startswith("s.yaml:7: timeline[0].action: unknown action 'node-crsh' (known: apply, delete, scale, ")


def test_an_action_without_action_key(tmp_path):
    found = one_problem(tmp_path, "action: node-recover, ", "")
    assert found.startswith("s.yaml:8: timeline[1]: which action? give action: (apply, delete, ")


def test_missing_required_key(tmp_path):
    assert one_problem(tmp_path, "after: crash+15s, action: node-recover, node: node2",
                       "after: crash+15s, action: node-recover") == "s.yaml:8: timeline[1].node: required"
    assert one_problem(tmp_path, "duration: 40s\n", "") == "s.yaml:1: duration: required"


@pytest.mark.parametrize("old, new, expected", [
    ("duration: 40s", "duration: 40x", "s.yaml:3: duration: invalid duration '40x' (e.g. 500ms, 5s, 1m)"),
    ("duration: 40s", "duration: 0s", "s.yaml:3: duration: invalid duration '0s': must be more than 0"),
    ("rate: 20/s", "rate: 20 per second", "s.yaml:5: traffic[0].rate: invalid rate '20 per second' (e.g. 20/s, 120/m)"),
    ('">= 0.99"', '"at least 0.99"', "s.yaml:10: assertions[0].successRate: invalid comparison 'at least 0.99'"),
    ('">= 0.99"', '">= 2"', "s.yaml:10: assertions[0].successRate: >= 2: a fraction from 0 to 1 (or a percent)"),
])
def test_bad_values(tmp_path, old, new, expected):
    assert one_problem(tmp_path, old, new).startswith(expected)


def test_bad_bandwidth_percent_and_condition(tmp_path):
    found = broken(tmp_path, "  - {after: crash+15s", "  - {at: 11s, action: bandwidth, target: client, rate: 1 mbit/s}\n"
                   "  - {at: 12s, action: loss, target: node1, percent: 0}\n"
                   "  - {when: \"endpoints(frontend-lb) = 3\", timeout: 5s, action: heal}\n  - {after: crash+15s")
    assert [f.split(": ")[1] for f in found] == ["timeline[1].rate", "timeline[2].percent", "timeline[3].when"]
    assert "invalid bandwidth '1 mbit/s'" in found[0] and "invalid percent 0" in found[1]
    assert "invalid condition 'endpoints(frontend-lb) = 3'" in found[2]


def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    assert one_problem(tmp_path, "duration: 40s\n", "duration: 40s\nduration: 50s\n") == \
        's.yaml:4: key "duration" already set in map'


def test_invalid_yaml_gives_its_line(tmp_path):
    found = one_problem(tmp_path, "node: node2}\n  - {after", "node: node2\n  - {after")
    assert found.startswith("s.yaml:8: invalid YAML: ")


def test_a_window_naming_an_unknown_action(tmp_path):
    assert one_problem(tmp_path, "[crash+3s, end]", "[crsh+3s, end]") == \
        "s.yaml:10: assertions[0].window: no action named 'crsh' (actions: crash, node-crash, node-recover)"


def test_a_window_that_ends_before_it_starts(tmp_path):
    assert one_problem(tmp_path, "[crash+3s, end]", "[crash+3s, crash]") == \
        "s.yaml:10: assertions[0].window: [crash+3s, crash]: ends (10s) before it starts (13s)"
    assert one_problem(tmp_path, "[crash+3s, end]", "[crash, 10s]") == \
        "s.yaml:10: assertions[0].window: [crash, 10s]: empty (both ends at 10s)"


def test_a_window_beyond_the_run(tmp_path):
    assert one_problem(tmp_path, "[crash+3s, end]", "[crash+3s, end+5s]") == \
        "s.yaml:10: assertions[0].window: end+5s: at 45s, outside the run (0s to 40s)"


def test_after_naming_an_unknown_action(tmp_path):
    assert one_problem(tmp_path, "after: crash+15s", "after: crush+15s") == \
        "s.yaml:8: timeline[1].after: no action named 'crush' (actions: crash, node-crash, node-recover)"


def test_an_action_is_named_by_its_kind_unless_two_share_it(tmp_path):
    by_kind = BASE.replace("{name: crash, at: 10s", "{at: 10s").replace("crash+", "node-crash+")
    assert [(p.label, p.at) for p in resolve_timeline(load_scenario(write(tmp_path, by_kind), kernel=HERE))] == \
        [("node-crash", 10.0), ("node-recover", 25.0)]
    text = BASE.replace("node-recover, node: node2}", "node-recover, node: node2}\n  - {at: 30s, action: node-crash, "
                        "node: node1}").replace("[crash+3s, end]", "[node-crash, end]")
    assert problems(tmp_path, text) == ["s.yaml:11: assertions[0].window: 'node-crash' is the kind of 2 actions "
                                        "(timeline[0], timeline[2]): name the one you mean"]


def test_after_chains_that_loop(tmp_path):
    found = broken(tmp_path, "  - {after: crash+15s", "  - {name: a, after: b, action: heal}\n"
                   "  - {name: b, after: a+1s, action: heal}\n  - {after: crash+15s")
    assert found == ["s.yaml:8: timeline[1].after: after: goes round in a loop (a -> b -> a)",
                     "s.yaml:9: timeline[2].after: after: goes round in a loop (a -> b -> a)"]


def test_an_action_beyond_the_duration(tmp_path):
    assert one_problem(tmp_path, "after: crash+15s", "after: crash+35s") == \
        "s.yaml:8: timeline[1].after: at 45s: beyond the end of the run (duration 40s)"


def test_times_out_of_order(tmp_path):
    found = one_problem(tmp_path, "node: node2}\nassertions", "node: node2}\n  - {at: 20s, action: heal}\nassertions")
    assert found == ("s.yaml:9: timeline[2].at: out of order: at 20s, but timeline[1] listed before it is at 25s "
                     "(list the timeline in time order)")


def test_triggers_exactly_one_and_timeout_only_with_when(tmp_path):
    assert one_problem(tmp_path, "{after: crash+15s, ", "{").startswith(
        "s.yaml:8: timeline[1]: say when it happens with exactly one of at: (a time), after: ")
    assert one_problem(tmp_path, "{after: crash+15s, ", "{at: 25s, after: crash+15s, ").endswith("; got at, after")
    assert one_problem(tmp_path, "{after: crash+15s, ", "{when: converged(), ").startswith(
        "s.yaml:8: timeline[1].when: needs a timeout:")


def test_unknown_generator_and_traffic_checks_without_one(tmp_path):
    assert one_problem(tmp_path, "{traffic: web, window", "{traffic: wbe, window") == \
        "s.yaml:10: assertions[0].traffic: no traffic generator named 'wbe' (generators: web)"
    assert one_problem(tmp_path, "{traffic: web, window", "{window") == \
        "s.yaml:10: assertions[0]: traffic: needed for successRate (which generator's requests to measure)"


def test_an_assertion_without_a_check(tmp_path):
    assert one_problem(tmp_path, ', successRate: ">= 0.99"', "").startswith(
        "s.yaml:10: assertions[0]: no check: give one or more of successRate, maxConsecutiveFailures, ")


def test_unknown_nodes_beyond_cluster_nodes(tmp_path):
    text = BASE.replace("action: node-recover, node: node2", "action: node-recover, node: node4").replace(
        "from: client", "from: node5").replace("{nodes: 3}", "{nodes: 3}\nmanifests: []")
    text = text.replace("node: node2}\n  - {after", "node: node2}\n  - {at: 11s, action: partition, groups: [[node1], "
                        "[node2, node7]]}\n  - {after")
    assert problems(tmp_path, text) == [
        "s.yaml:6: traffic[0].from: unknown node node5: the cluster has 3 nodes (node1-node3)",
        "s.yaml:9: timeline[1].groups[1][1]: unknown node node7: the cluster has 3 nodes (node1-node3)",
        "s.yaml:10: timeline[2].node: unknown node node4: the cluster has 3 nodes (node1-node3)"]
    assert one_problem(tmp_path, "http://${externalIP:frontend-lb}/", "http://${nodeIP:node9}:30007/") == \
        "s.yaml:5: traffic[0].to: unknown node node9: the cluster has 3 nodes (node1-node3)"


def test_address_templates_of_unknown_kind_or_unfinished(tmp_path):
    assert one_problem(tmp_path, "${externalIP:frontend-lb}", "${externlIP:frontend-lb}").startswith(
        "s.yaml:5: traffic[0].to: unknown address template '${externlIP:frontend-lb}' (known: ${clusterIP:...}, ")
    assert one_problem(tmp_path, "${externalIP:frontend-lb}", "${externalIP:frontend-lb").startswith(
        "s.yaml:5: traffic[0].to: unfinished address template")
    assert one_problem(tmp_path, '"http://${externalIP:frontend-lb}/"', '"${clusterIP:x}"') == \
        "s.yaml:5: traffic[0].to: '${clusterIP:x}': want a URL (http://frontend-service/) or host:port (a port from 1 to 65535)"


def test_delay_is_refused_here_saying_where_it_works_and_loads_on_the_vm(tmp_path):
    old, new = "node: node2}\nassertions", "node: node2}\n  - {at: 30s, action: delay, target: node1, delay: 100ms, " \
        "jitter: 10ms}\nassertions"
    found = one_problem(tmp_path, old, new)
    assert found.startswith("s.yaml:9: timeline[2].action: delay needs the kernel's netem qdisc (sch_netem)")
    assert "Vagrant" in found and "loss and bandwidth work here" in found
    load_scenario(write(tmp_path, BASE.replace(old, new)), kernel=VM)


def test_proxy_mode_ipvs_is_refused_without_ipvs(tmp_path):
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 3, proxyMode: ipvs}").startswith(
        "s.yaml:2: cluster.proxyMode: proxy mode ipvs: this kernel has no IPVS")
    load_scenario(write(tmp_path, BASE.replace("{nodes: 3}", "{nodes: 3, proxyMode: ipvs}")), kernel=VM)


def test_bad_cluster_settings_are_refused_by_the_cluster_configs_rules(tmp_path):
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 3, networking: {podSubnet: 10.244.0.0/33}}") == \
        "s.yaml:2: cluster.networking.podSubnet: '10.244.0.0/33': '33' is not a valid netmask"
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 300}") == \
        "s.yaml:2: cluster.nodes: 300: must be a number from 1 to 200"
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 3, proxyMode: ebpf}").startswith(
        "s.yaml:2: cluster.proxyMode: unknown proxy mode 'ebpf' (known: iptables, nftables, ipvs)")
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 3, kubeProxy: {minSync: 1s}}") == \
        "s.yaml:2: cluster.kubeProxy.minSync: unknown setting (known: ipvs.scheduler, masqueradeAll, minSyncPeriod, mode)"
    assert one_problem(tmp_path, "{nodes: 3}", "{nodes: 3, proxyMode: iptables, kubeProxy: {mode: nftables}}") == \
        "s.yaml:2: cluster.kubeProxy.mode: the proxy mode twice: give proxyMode or kubeProxy.mode, not both"


def test_manifests_that_are_missing_or_invalid(tmp_path):
    found = broken(tmp_path, "duration: 40s\n", "manifests:\n  - file: manifests/nope.yaml\n  - inline: |\n"
                   "      apiVersion: v1\n      kind: Servic\nduration: 40s\n")
    assert found == [f"s.yaml:4: manifests[0].file: no such file: {tmp_path}/manifests/nope.yaml",
                     's.yaml:5: manifests[1].inline: inline (document 1): no matches for kind "Servic" in version "v1" '
                     "(svclab serves: v1 Node, v1 Pod, apps/v1 Deployment, v1 Service, discovery.k8s.io/v1 EndpointSlice)"]


def test_names_given_twice(tmp_path):
    found = one_problem(tmp_path, "{after: crash+15s, ", "{name: crash, after: crash+15s, ")
    assert found.startswith("s.yaml:8: timeline[1].name: 'crash' is already the name of timeline[0]")


def test_local_rules_of_actions_and_traffic(tmp_path):
    found = broken(tmp_path, "  - {after: crash+15s", "  - {at: 11s, action: partition, groups: [[client], [node2, client]]}\n"
                   "  - {at: 11s, action: partition, groups: [[node1], [node2], [node3]], direction: one-way}\n"
                   "  - {at: 11s, action: component-stop, component: apiserver, node: node1}\n"
                   "  - {at: 11s, action: pod-delete, pod: web-1, pick: random}\n  - {after: crash+15s")
    assert [f.split(": ", 1)[1] for f in found] == [
        "timeline[1]: client in more than one place: each host belongs to one group",
        "timeline[2].direction: one-way takes exactly two groups (the first cannot reach the second)",
        "timeline[3].node: only for kubelet and kube-proxy (apiserver runs once per cluster)",
        "timeline[4].pick: chooses among the pods of a selector:, not a named pod:"]
    assert one_problem(tmp_path, "rate: 20/s}", "rate: 20/s, start: 30s, stop: 10s}") == \
        "s.yaml:5: traffic[0].stop: stop (10s) must come after start (30s)"
    assert one_problem(tmp_path, '"http://${externalIP:frontend-lb}/"', '"x:99999"').endswith(
        "want a URL (http://frontend-service/) or host:port (a port from 1 to 65535)")
    assert one_problem(tmp_path, '"http://${externalIP:frontend-lb}/"', '"http://x/", protocol: udp') == \
        "s.yaml:5: traffic[0].to: 'http://x/': protocol udp takes host:port, not a URL"


def test_every_problem_of_a_file_at_once_without_pydantic_noise(tmp_path):
    text = (BASE.replace("name: base", "name: Base").replace("40s", "40x").replace("20/s", "fast")
            .replace("node-recover", "node-recovr").replace("[crash+3s, end]", "[crsh, end]")
            .replace("{nodes: 3}", "{nodes: 3, colour: blue}"))
    found = problems(tmp_path, text)
    assert [f.split(": ")[0:2] for f in found] == [
        ["s.yaml:1", "name"], ["s.yaml:2", "cluster.colour"], ["s.yaml:3", "duration"], ["s.yaml:5", "traffic[0].rate"],
        ["s.yaml:8", "timeline[1].action"], ["s.yaml:10", "assertions[0].window"]]
    for line in found:
        assert "pydantic" not in line and "For further information" not in line and "Value error" not in line


# ---------------------------------------------------------------------- svclab validate


def test_svclab_validate_prints_ok_or_every_problem_and_exits_0_or_1(tmp_path):
    bad = write(tmp_path, BASE.replace("40s", "40x").replace("node2}\n  - {after", "node7}\n  - {after"), "bad.yaml")
    good = REPO / "scenarios/node-failure.yaml"
    r = subprocess.run(svclab_command("validate", str(good)), capture_output=True, text=True, cwd=REPO)
    assert (r.returncode, r.stdout) == (0, f"{good}: ok\n"), r.stderr
    r = subprocess.run(svclab_command("validate", str(good), str(bad)), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [f"{good}: ok", f"{bad}:3: duration: invalid duration '40x' (e.g. 500ms, 5s, 1m)",
                                     f"{bad}:7: timeline[0].node: unknown node node7: the cluster has 3 nodes (node1-node3)"]
    r = subprocess.run(svclab_command("validate", str(tmp_path / "missing.yaml")), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stdout.startswith(f"{tmp_path}/missing.yaml:1: cannot read it: ")
