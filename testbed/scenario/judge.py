"""A run's verdict: every check of every assertion judged over its window.

Windows are placed with the times the actions were really taken (plan.window_times); the
request checks go to assertions.py, convergedWithin and rules to convergence.py with what
observe.py measured during the run. An assertion whose window names an action that never
happened is not judged, and fails saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from testbed.scenario import assertions as A
from testbed.scenario.convergence import converged_within, rules_result
from testbed.scenario.live import PodBook, PodInfo
from testbed.scenario.model import Assertion, Check, Scenario
from testbed.scenario.observe import Observer
from testbed.scenario.plan import ActionIndex, window_times
from testbed.scenario.records import Record, Window


@dataclass
class RunFacts:
    """What the run produced: requests per generator, when each action was taken (timeline
    position -> t), the pods seen and those each action picked, and in-run measurements."""

    records: Mapping[str, list[Record]]
    times: Mapping[int, float]
    pods: PodBook
    picks: Mapping[int, list[PodInfo]]
    observer: Observer


def judge(scenario: Scenario, facts: RunFacts) -> list[A.AssertionResult]:
    index = ActionIndex.of(scenario.timeline)
    results = []
    for i, assertion in enumerate(scenario.assertions):
        checks = assertion.checks()
        for check in checks:
            name = assertion.label if len(checks) == 1 else f"{assertion.label}: {check.kind}"
            results.append(_judge_check(scenario, index, facts, i, assertion, check, name))
    return results


def _window(scenario: Scenario, index: ActionIndex, facts: RunFacts, assertion: Assertion) -> Window | str:
    start, end = window_times(assertion.window, index, facts.times, scenario.duration)
    if start is None or end is None:
        missing = [str(p) for p, t in ((assertion.window.start, start), (assertion.window.end, end)) if t is None]
        return f"not judged: {' and '.join(missing)} did not happen"
    return Window(start, min(end, scenario.duration), str(assertion.window))


def _judge_check(scenario: Scenario, index: ActionIndex, facts: RunFacts, i: int, assertion: Assertion,
                 check: Check, name: str) -> A.AssertionResult:
    window = _window(scenario, index, facts, assertion)
    subject = assertion.traffic or (assertion.rules.node if assertion.rules else "nodes")
    if isinstance(window, str):
        return A.AssertionResult(name, check.kind, subject, check.expected, window, False, str(assertion.window))
    if check.kind == "convergedWithin":
        return _converged(facts, i, name, check.value, window)
    if check.kind == "rules":
        return _rules(facts, i, name, assertion, window)
    records = facts.records.get(assertion.traffic, [])
    value, gen = check.value, assertion.traffic
    if check.kind == "successRate":
        return A.success_rate(name, gen, records, window, value)
    if check.kind == "maxConsecutiveFailures":
        return A.max_consecutive_failures(name, gen, records, window, value)
    if check.kind == "latencyP99":
        return A.latency_p99(name, gen, records, window, value)
    if check.kind == "balance":
        return A.balance(name, gen, records, window, p_value=value.p_value, tolerance=value.tolerance,
                         pod_count=value.pods)
    if check.kind == "clientIP":
        return A.client_ip(name, gen, records, window, value)
    if check.kind == "failoverWithin":
        start = assertion.window.start
        action_t = facts.times.get(index.find(start.anchor)) if start.names_action else None
        return A.failover_within(name, gen, records, window, value, action_t)
    return A.no_traffic_to(name, gen, records, window, _target_pods(index, facts, value))


def _target_pods(index: ActionIndex, facts: RunFacts, target) -> set[str]:
    """The pod names a noTrafficTo target means: a pod, a selector's pods (every one seen during
    the run), a node's pods (seen there, or answering from there), an action's picks."""
    if target.kind == "action":
        return {p.name for p in facts.picks.get(index.find(target.action), [])}
    if target.kind == "node":
        answered = {r.pod for records in facts.records.values() for r in records if r.node == target.node and r.pod}
        return answered | {p.name for p in facts.pods.on_node(target.node)}
    if target.pod.selector is not None:
        return {p.name for p in facts.pods.matching(target.pod.selector)}
    return {target.pod.name}


def _converged(facts: RunFacts, i: int, name: str, limit: float, window: Window) -> A.AssertionResult:
    watch = next(w for w in facts.observer.watches if w.assertion == i)
    if watch.result is None:
        why = watch.error or "the watch did not start (its action was not taken)"
        return A.AssertionResult(name, "convergedWithin", "nodes", f"every node within {limit:g}s", why, False,
                                 window.text)
    return converged_within(name, watch.result, limit, window)


def _rules(facts: RunFacts, i: int, name: str, assertion: Assertion, window: Window) -> A.AssertionResult:
    rules = assertion.rules
    present = rules.contains is not None
    expected = f"{rules.node} {'contain' if present else 'no longer contain'} {rules.contains or rules.not_contains}"
    read = facts.observer.reads.get(i)
    if read is None or read.read_t is None:
        return A.AssertionResult(name, "rules", rules.node, expected, "not read (the window's end never came)",
                                 False, window.text)
    if not read.texts:
        return A.AssertionResult(name, "rules", rules.node, expected, f"not read: {read.error}", False, window.text)
    per_node = [rules_result(name, node, read.endpoint, present, text, read.read_t, window)
                for node, text in sorted(read.texts.items())]
    if len(per_node) == 1:
        return per_node[0]
    measured = "; ".join(f"{r.subject}: {r.measured}" for r in per_node)
    return A.AssertionResult(name, "rules", rules.node, per_node[0].expected + " on every node", measured,
                             all(r.passed for r in per_node), window.text,
                             float(sum(r.passed for r in per_node)))
