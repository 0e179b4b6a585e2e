"""What the assertions need measured while the scenario runs (the rest is in the request records).

convergedWithin: a watch of every node's kube-proxy, started AT the action the window starts
with (its check is built just before the action is taken, so the baselines it reads are the
state before the change), on a thread of its own while the run goes on. The check suits the
action (convergence.py): for actions whose effect is a new set of endpoints (scale,
pod-delete, rollout, apply, delete, node-crash) the API's endpoints changed and the node's
rules send to the new set; for pod-kill and node-freeze (endpoints go and come back) the
node's kube-proxy applied an endpoint change since; for the others (a restart, a flush of
its rules, a network fault) it completed a sync since. An action on one node's kube-proxy (its
restart, a flush of its rules, the node's recovery) is watched on that node; the others on
every node but those whose kube-proxy a fault in force holds down (node-crash, node-freeze,
component-stop).

rules: each node's rules read once, RULES_LEAD_S before the window's end (planned: by the
planned time of the action it names; an end at a `when:` action is read just before it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from testbed import faults
from testbed.scenario.conditions import ClusterState
from testbed.scenario.convergence import (Check, Convergence, change_applied, endpoints_applied, synced_since,
                                          watch_convergence)
from testbed.scenario.model import Assertion, Scenario
from testbed.scenario.plan import ActionIndex, PlannedAction, point_time
from testbed.scenario.resolve import Resolver, Unresolved

RULES_LEAD_S = 0.25
#: actions whose effect is a new set of endpoints, and those whose endpoints go and come back
NEW_ENDPOINTS = ("apply", "delete", "scale", "rollout", "pod-delete", "node-crash")
BOUNCED_ENDPOINTS = ("pod-kill", "node-freeze")


def watch_timeout(limit: float) -> float:
    """How long a convergence watch goes on: long enough to measure a miss, not for ever."""
    return 2 * limit + 2


@dataclass
class RulesRead:
    """One read of a rules assertion: per node, (t read, rules text) or the error."""

    read_t: float | None = None
    endpoint: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass
class Watch:
    assertion: int
    action: int | None  # the timeline position it starts at; None: the window's start is a time
    check: Check | None = None
    thread: threading.Thread | None = None
    result: Convergence | None = None
    error: str = ""


def _own_node(step: PlannedAction) -> str | None:
    """The one node whose kube-proxy an action restarts or repairs (its convergence is that node's
    alone): kube-proxy's component-kill/stop/start on a node, flush-rules, node-recover, node-thaw."""
    action = step.action
    node = getattr(action, "node", None)
    if step.kind in ("flush-rules", "node-recover", "node-thaw"):
        return node
    if step.kind.startswith("component-") and action.component == "kube-proxy":
        return node
    return None


def held_down(target: faults.FaultTarget) -> set[str]:
    """Nodes whose kube-proxy a fault in force keeps from answering."""
    nodes = set()
    for fault in faults.list_faults(target):
        if fault.kind in ("node-crash", "node-freeze"):
            nodes.add(fault.params["node"])
        elif fault.kind == "component-stop" and fault.params.get("component") == "kube-proxy":
            nodes.update([fault.params["node"]] if fault.params.get("node") else target.node_names())
    return nodes


class Observer:
    def __init__(self, scenario: Scenario, cluster: ClusterState, resolver: Resolver,
                 target: faults.FaultTarget, t0: float) -> None:
        self.scenario, self.cluster, self.resolver, self.target, self.t0 = scenario, cluster, resolver, target, t0
        self.index = ActionIndex.of(scenario.timeline)
        self.watches: list[Watch] = []
        self.reads: dict[int, RulesRead] = {}
        self._pending_reads = [i for i, a in enumerate(scenario.assertions) if a.rules is not None]
        self._threads: list[threading.Thread] = []
        for i, assertion in enumerate(scenario.assertions):
            if assertion.converged_within is not None:
                start = assertion.window.start
                self.watches.append(Watch(i, self.index.find(start.anchor) if start.names_action else None))

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- convergence -----------------------------------------------------------------------------

    def before_action(self, step: PlannedAction) -> None:
        for watch in self.watches:
            if watch.action == step.position:
                watch.check = self._check_for(step.kind)
        for i in list(self._pending_reads):  # a window ending at this (conditional) action: read now
            end = self.scenario.assertions[i].window.end
            if end.names_action and self.index.find(end.anchor) == step.position and end.offset <= 0:
                self._pending_reads.remove(i)
                self.reads[i] = read = RulesRead()
                self._read_rules(self.scenario.assertions[i], read)

    def _check_for(self, kind: str) -> Check:
        proxies = self.cluster.proxies()
        if kind in NEW_ENDPOINTS:
            return endpoints_applied(proxies, self.cluster.endpoints_everywhere, self.cluster.endpoints_everywhere())
        if kind in BOUNCED_ENDPOINTS:
            return change_applied(proxies)
        return synced_since(proxies, time.time())

    def after_action(self, step: PlannedAction, action_t: float) -> None:
        for watch in self.watches:
            if watch.action == step.position and watch.check is not None:
                self._start_watch(watch, step.label, action_t, _own_node(step))

    def _start_watch(self, watch: Watch, label: str, action_t: float, node: str | None = None) -> None:
        limit = self.scenario.assertions[watch.assertion].converged_within
        try:
            nodes = [node] if node else sorted(set(self.target.node_names()) - held_down(self.target))
        except (OSError, ValueError) as exc:
            watch.error = f"nodes to watch: {exc}"
            return

        def run() -> None:
            watch.result = watch_convergence(watch.check, nodes, label, action_t, self.t0, watch_timeout(limit))
        watch.thread = self._spawn(run, f"converge-{watch.assertion}")

    def _time_watches(self, now_t: float) -> None:
        """Watches whose window starts at a time, not an action: started when it comes."""
        for watch in self.watches:
            if watch.action is None and watch.thread is None and not watch.error:
                start = self.scenario.assertions[watch.assertion].window.start
                at = point_time(start, self.index, {}, self.scenario.duration)
                if at is not None and now_t >= at:
                    watch.check = synced_since(self.cluster.proxies(), self.t0_wall(at))
                    self._start_watch(watch, str(start), at)

    def t0_wall(self, t: float) -> float:
        return time.time() - (time.monotonic() - (self.t0 + t))

    # ---- rules ------------------------------------------------------------------------------------

    def tick(self, times: dict[int, float], planned: dict[int, float]) -> None:
        """Called by the runner's loop: starts what is due (times: actions taken, position -> t;
        planned: the planned times of those not taken yet)."""
        now_t = self.now()
        self._time_watches(now_t)
        known = {**planned, **times}
        for i in list(self._pending_reads):
            assertion = self.scenario.assertions[i]
            start = point_time(assertion.window.start, self.index, known, self.scenario.duration)
            end = point_time(assertion.window.end, self.index, known, self.scenario.duration)
            if start is None or end is None:
                continue
            if now_t >= max(start, end - RULES_LEAD_S):
                self._pending_reads.remove(i)
                self.reads[i] = read = RulesRead()
                self._spawn(lambda a=assertion, r=read: self._read_rules(a, r), f"rules-{i}")

    def _read_rules(self, assertion: Assertion, read: RulesRead) -> None:
        rules = assertion.rules
        nodes = self.target.node_names() if rules.node == "all" else [rules.node]
        read.read_t = self.now()
        try:
            read.endpoint = self.resolver.address(rules.contains or rules.not_contains)
        except Unresolved as exc:
            read.error = str(exc)
            return
        for node, proxy in self.cluster.proxies(nodes).items():
            try:
                read.texts[node] = proxy.rules()
            except Exception as exc:  # the dump failing (node gone, tools missing) is a measurement
                read.texts[node] = ""
                read.error += f"{node}: {exc}; "

    # ---- threads ----------------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=fn, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for the watches and reads still going (each ends by itself)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def to_json(self) -> dict:
        return {"convergence": [w.result.to_json() for w in self.watches if w.result],
                "rules_reads": {str(i): {"t": r.read_t, "endpoint": r.endpoint, "nodes": sorted(r.texts),
                                         "error": r.error} for i, r in self.reads.items()}}
