"""The assertions that read a live cluster: convergedWithin and rules.

convergedWithin: after an action, how long until every node's kube-proxy applied it.
watch_convergence() polls a check per node from the action on (the runner runs it in a
thread while the scenario goes on) and converged_within() judges what it saw. A check
is a callable node -> bool built by one of:

- change_applied(proxies): the node's kube-proxy saw an endpoint change after the action
  (its endpoint-changes counter passed the value read when the check was built, i.e. at
  the action) and has nothing pending (its last sync applied it). For actions that change
  endpoints and back again: pod-kill, node-freeze.
- synced_since(proxies, wall_time): a sync completed after wall_time with nothing pending.
  For actions after which kube-proxy must write its rules again: component-start,
  flush-rules, a restart.
- endpoints_applied(proxies, current, before): the API's ready endpoints changed from those
  before the action, and the node's rules send to every current one and none of those that
  left, nothing pending. For actions whose effect is a new set of endpoints: scale,
  pod-delete, rollout, apply, delete, node-crash (its pods leave after the grace period).
- rules_match(proxies, contain, lack): the node's rules mention every endpoint of
  `contain` and none of `lack` ("10.244.1.5:8080").

rules: rules_result() judges one dump of a node's rules (rules_mention() finds an
endpoint in iptables-save or nft output).
A node whose kube-proxy does not answer (stopped, partitioned) is not converged.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

from testbed.cluster.proxy_readback import (ENDPOINT_CHANGES, ENDPOINTS_PENDING, LAST_SYNC, SERVICES_PENDING,
                                            NodeProxy)
from testbed.scenario.assertions import AssertionResult
from testbed.scenario.records import Window

Check = Callable[[str], bool]


def _metrics_or_none(proxy: NodeProxy) -> dict[str, float] | None:
    try:
        return proxy.metrics()
    except OSError:
        return None


def _idle(metrics: dict[str, float]) -> bool:
    return metrics.get(ENDPOINTS_PENDING, 0) == 0 and metrics.get(SERVICES_PENDING, 0) == 0


def change_applied(proxies: Mapping[str, NodeProxy]) -> Check:
    """Build at the action: baselines are read now."""
    baseline = {node: (_metrics_or_none(p) or {}).get(ENDPOINT_CHANGES, 0.0) for node, p in proxies.items()}

    def check(node: str) -> bool:
        metrics = _metrics_or_none(proxies[node])
        if metrics is None:
            return False
        # != rather than >: a restarted kube-proxy counts from 0 again, and its first sync applies everything
        return metrics.get(ENDPOINT_CHANGES, 0.0) != baseline[node] and _idle(metrics)
    return check


def synced_since(proxies: Mapping[str, NodeProxy], wall_time: float) -> Check:
    def check(node: str) -> bool:
        metrics = _metrics_or_none(proxies[node])
        return metrics is not None and metrics.get(LAST_SYNC, 0.0) >= wall_time and _idle(metrics)
    return check


def rules_mention(rules: str, endpoint: str) -> bool:
    """Does a rules dump send traffic to endpoint "ip:port" (iptables `--to-destination ip:port`,
    nftables `dnat to ip:port` or a map element `ip . port`), or mention address "ip" at all?"""
    ip, sep, port = endpoint.rpartition(":")
    if not sep:
        return re.search(rf"(?<![\d.]){re.escape(endpoint)}(?![\d])", rules) is not None
    ip_re, port_re = re.escape(ip), re.escape(port)
    return re.search(rf"(?<![\d.]){ip_re}(:{port_re}| \. {port_re})(?!\d)", rules) is not None


def rules_match(proxies: Mapping[str, NodeProxy], contain: Collection[str] = (), lack: Collection[str] = ()) -> Check:
    def check(node: str) -> bool:
        try:
            text = proxies[node].rules()
        except Exception:  # a dump that fails (the node's tools, its namespace gone) is no answer
            return False
        return all(rules_mention(text, e) for e in contain) and not any(rules_mention(text, e) for e in lack)
    return check


def endpoints_applied(proxies: Mapping[str, NodeProxy], current: Callable[[], Collection[str]],
                      before: Collection[str], cache_s: float = 0.1) -> Check:
    """Build at the action, with `before` the API's ready endpoints ("ip:port") just before it:
    the API's endpoints have changed since (the action took effect: pods started, left or were
    replaced), the node's rules send to every current one and to none of those that left, and its
    kube-proxy has nothing pending. For actions whose effect is a new set of endpoints: scale,
    pod-delete, rollout, apply, delete, node-crash (after the grace period)."""
    before_set = set(before)
    seen: dict[str, object] = {"at": -1.0, "endpoints": before_set}

    def endpoints() -> set[str]:
        if time.monotonic() - seen["at"] > cache_s:  # one API read per poll round, not per node
            seen["endpoints"], seen["at"] = set(current()), time.monotonic()
        return seen["endpoints"]

    def check(node: str) -> bool:
        now = endpoints()
        if now == before_set:
            return False
        metrics = _metrics_or_none(proxies[node])
        return metrics is not None and _idle(metrics) and rules_match(proxies, now, before_set - now)(node)
    return check


@dataclass(frozen=True)
class Convergence:
    """What a watch saw: per node, the seconds from the action until its check first held (None: not
    within the watch)."""

    action: str
    action_t: float  # s after t0
    watched_s: float
    nodes: dict[str, float | None]

    def to_json(self) -> dict:
        return {"action": self.action, "action_t": self.action_t, "watched_s": self.watched_s, "nodes": self.nodes}


def watch_convergence(check: Check, nodes: Collection[str], action: str, action_t: float, t0: float,
                      timeout: float, poll: float = 0.05) -> Convergence:
    """Poll check(node) for every node until all held or `timeout` s after the action passed."""
    action_at = t0 + action_t
    pending, seen = set(nodes), {node: None for node in nodes}
    while pending:
        for node in sorted(pending):
            if check(node):
                seen[node] = round(max(0.0, time.monotonic() - action_at), 3)
                pending.discard(node)
        if not pending or time.monotonic() - action_at >= timeout:
            break
        time.sleep(poll)
    return Convergence(action, action_t, timeout, seen)


def converged_within(name: str, convergence: Convergence, limit: float,
                     window: Window | None = None) -> AssertionResult:
    subject = ", ".join(sorted(convergence.nodes))
    expected = f"every node within {limit:g}s of {convergence.action}"
    parts = [f"{node} {'%.2fs' % s if s is not None else f'not within {convergence.watched_s:g}s'}"
             for node, s in sorted(convergence.nodes.items())]
    times = [s for s in convergence.nodes.values() if s is not None]
    done = len(times) == len(convergence.nodes) and bool(times)
    worst = max(times) if done else None
    window_text = window.text if window else f"from {convergence.action} ({convergence.action_t:.2f}s)"
    return AssertionResult(name, "convergedWithin", subject, expected, "; ".join(parts) or "no node watched",
                           done and worst <= limit, window_text, worst)


def rules_result(name: str, node: str, endpoint: str, present: bool, rules: str, read_t: float,
                 window: Window) -> AssertionResult:
    """A node's rules (read at read_t, inside the window) contain, or no longer contain, an endpoint."""
    expected = f"{'contain' if present else 'no longer contain'} {endpoint}"
    found = rules_mention(rules, endpoint)
    where = f"at {read_t:.2f}s"
    if not window.holds(read_t):
        return AssertionResult(name, "rules", node, expected, f"read {where}, outside the window", False, window.text)
    measured = f"{'contain' if found else 'do not contain'} {endpoint} {where}"
    return AssertionResult(name, "rules", node, expected, measured, found == present, window.text,
                           1.0 if found else 0.0)
