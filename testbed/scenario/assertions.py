"""A scenario's assertions over request records, each in a window of the run.

One function per kind: successRate, maxConsecutiveFailures, latencyP99, balance,
clientIP, failoverWithin, noTrafficTo (the kinds that need a live cluster,
convergedWithin and rules, are in convergence.py). Each takes the generator's records
and a records.Window (absolute seconds after t0: the caller resolves action names and
offsets) and returns an AssertionResult naming what was expected, what was measured and
over which window. A window with no request in it fails, saying so: an assertion over
nothing never passes.

Expected values are the scenario model's comparisons (units.Comparison: `">= 0.99"`,
`"<= 200ms"`); durations are in seconds, as the model gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Iterable

from testbed.scenario.records import Record, Window, answers_by_pod, host_of, in_window, outcome_counts
from testbed.scenario.units import Comparison

DEFAULT_SIGNIFICANCE = 0.001


@dataclass(frozen=True)
class AssertionResult:
    name: str
    kind: str  # successRate, maxConsecutiveFailures, ... (the scenario file's key)
    subject: str  # the traffic generator, or the node(s) for convergedWithin / rules
    expected: str
    measured: str
    passed: bool
    window: str
    value: float | None = None  # the measured number, when there is one

    @property
    def message(self) -> str:
        """One line for a failure: what, over which window, expected against measured."""
        verdict = "held" if self.passed else "failed"
        return (f"{self.name} ({self.kind} of {self.subject}) {verdict} over {self.window}: "
                f"expected {self.expected}, measured {self.measured}")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "subject": self.subject, "expected": self.expected,
                "measured": self.measured, "passed": self.passed, "window": self.window, "value": self.value}


def _empty(name: str, kind: str, generator: str, expected: str, window: Window,
           what: str = "requests") -> AssertionResult:
    return AssertionResult(name, kind, generator, expected, f"no {what} in the window (nothing to judge)", False,
                           window.text)


def _failures_text(records: Iterable[Record]) -> str:
    """"2 timeout, 1 refused": the failed requests by outcome, most first."""
    failed = outcome_counts(r for r in records if not r.ok)
    return ", ".join(f"{n} {k}" for k, n in sorted(failed.items(), key=lambda kv: (-kv[1], kv[0])))


def success_rate(name: str, generator: str, records: list[Record], window: Window,
                 expected: Comparison) -> AssertionResult:
    """The fraction of the window's requests that succeeded."""
    inside = in_window(records, window)
    if not inside:
        return _empty(name, "successRate", generator, str(expected), window)
    ok = sum(r.ok for r in inside)
    rate = ok / len(inside)
    failures = f"; {_failures_text(inside)}" if ok < len(inside) else ""
    return AssertionResult(name, "successRate", generator, str(expected),
                           f"{rate:.4f} ({ok}/{len(inside)} ok{failures})", expected.holds(rate), window.text, rate)


def longest_failure_run(records: list[Record]) -> tuple[int, float, float]:
    """(length, first t, last t) of the longest run of failed requests, in start order."""
    best, start, run = (0, 0.0, 0.0), 0.0, 0
    for record in records:
        if record.ok:
            run = 0
            continue
        start = record.t if run == 0 else start
        run += 1
        if run > best[0]:
            best = (run, start, record.t)
    return best


def max_consecutive_failures(name: str, generator: str, records: list[Record], window: Window,
                             limit: int) -> AssertionResult:
    inside = in_window(records, window)
    if not inside:
        return _empty(name, "maxConsecutiveFailures", generator, f"<= {limit}", window)
    run, first, last = longest_failure_run(inside)
    where = f" (from {first:.2f}s to {last:.2f}s)" if run else ""
    return AssertionResult(name, "maxConsecutiveFailures", generator, f"<= {limit}", f"{run}{where}",
                           run <= limit, window.text, float(run))


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_p99(name: str, generator: str, records: list[Record], window: Window,
                expected: Comparison) -> AssertionResult:
    """The 99th percentile (nearest rank) of the successful requests' latencies, in seconds."""
    ok = [r.latency_ms / 1000 for r in in_window(records, window) if r.ok]
    if not ok:
        return _empty(name, "latencyP99", generator, str(expected), window, "successful requests")
    p99 = percentile(ok, 99)
    return AssertionResult(name, "latencyP99", generator, str(expected),
                           f"{p99 * 1000:.1f}ms (over {len(ok)} successful requests)",
                           expected.holds(p99), window.text, p99)


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for a chi-square X with dof degrees of freedom (the closed forms of the
    upper regularized gamma function for integer and half-integer shape, summed in log space)."""
    if statistic <= 0:
        return 1.0
    half = statistic / 2
    if dof % 2 == 0:
        return min(1.0, sum(math.exp(-half + i * math.log(half) - math.lgamma(i + 1)) for i in range(dof // 2)))
    tail = math.erfc(math.sqrt(half))
    # + sum over r = 1 .. (dof-1)/2 of e^{-x/2} x^{r-1/2} / Gamma(r + 1/2)
    tail += sum(math.exp(-half + (r - 0.5) * math.log(half) - math.lgamma(r + 0.5)) for r in range(1, (dof + 1) // 2))
    return min(1.0, tail)


def _balance_counts(records: list[Record], window: Window, pods: Collection[str],
                    pod_count: int | None) -> dict[str, int]:
    """Answers per pod; a pod of `pods` that never answered counts 0, and so do the pods short of
    `pod_count` ("(missing 1)", ...)."""
    counts = answers_by_pod(in_window(records, window))
    counts.update({pod: 0 for pod in pods if pod not in counts})
    for i in range(1, (pod_count or 0) - len(counts) + 1):
        counts[f"(missing {i})"] = 0
    return counts


def balance(name: str, generator: str, records: list[Record], window: Window, *,
            p_value: float | None = None, tolerance: float | None = None,
            pods: Collection[str] = (), pod_count: int | None = None) -> AssertionResult:
    """Successful answers spread evenly over the pods: a chi-square test of evenness whose p-value
    must be at least `p_value` (default 0.001), or, with `tolerance`, every pod's count within
    that fraction of the mean (0.25: 1/n of the answers +- 25 %). Over the pods that answered,
    plus those of `pods` (names) that did not, or exactly `pod_count` pods (missing ones count 0;
    more than that fails). At least two pods must answer, unless pod_count is 1: then one pod
    answering everything is the even share (session affinity), a second one fails."""
    counts = _balance_counts(records, window, pods, pod_count)
    shown = ", ".join(f"{pod} {n}" for pod, n in sorted(counts.items()))
    expected = (f"every pod within {tolerance:.0%} of the mean" if tolerance is not None
                else f"chi-square p >= {p_value or DEFAULT_SIGNIFICANCE:g}")
    if pod_count:
        expected += f" over {pod_count} pods"
    total = sum(counts.values())
    if total == 0:
        return _empty(name, "balance", generator, expected, window, "answers")
    if len(counts) < min(2, pod_count or 2) or (pod_count and len(counts) > pod_count):
        return AssertionResult(name, "balance", generator, expected, f"{len(counts)} pods answered ({shown})", False,
                               window.text)
    mean = total / len(counts)
    if tolerance is not None:
        worst = max(abs(n - mean) / mean for n in counts.values())
        return AssertionResult(name, "balance", generator, expected, f"max deviation {worst:.1%} ({shown})",
                               worst <= tolerance, window.text, worst)
    statistic = sum((n - mean) ** 2 / mean for n in counts.values())
    p = chi_square_sf(statistic, len(counts) - 1)
    return AssertionResult(name, "balance", generator, expected,
                           f"p = {p:.3g} (chi-square {statistic:.2f}, {len(counts) - 1} dof; {shown})",
                           p >= (p_value or DEFAULT_SIGNIFICANCE), window.text, p)


def client_ip(name: str, generator: str, records: list[Record], window: Window, expected: str) -> AssertionResult:
    """`preserved`: every pod saw the generator's own source address; `masqueraded`: none did."""
    if expected not in ("preserved", "masqueraded"):
        raise ValueError(f"clientIP: {expected!r} is neither preserved nor masqueraded")
    answers = [r for r in in_window(records, window) if r.ok and r.client and r.source]
    if not answers:
        return _empty(name, "clientIP", generator, expected, window, "answers naming the client")
    kept = sum(host_of(r.client) == host_of(r.source) for r in answers)
    seen = ", ".join(sorted({host_of(r.client) for r in answers}))
    sources = ", ".join(sorted({host_of(r.source) for r in answers}))
    passed = kept == len(answers) if expected == "preserved" else kept == 0
    return AssertionResult(name, "clientIP", generator, expected,
                           f"preserved in {kept}/{len(answers)} answers (pods saw {seen}; generator {sources})",
                           passed, window.text, kept / len(answers))


def failover_within(name: str, generator: str, records: list[Record], window: Window, limit: float,
                    action_t: float | None = None) -> AssertionResult:
    """From the action (default: the window's start) to the first success after the last failure
    of the window; 0 when nothing failed. `limit` in seconds."""
    action_t = window.start if action_t is None else action_t
    inside = [r for r in in_window(records, window) if r.t >= action_t]
    expected = f"<= {limit:g}s after {action_t:.2f}s"
    if not inside:
        return _empty(name, "failoverWithin", generator, expected, window)
    failures = [r for r in inside if not r.ok]
    if not failures:
        return AssertionResult(name, "failoverWithin", generator, expected, "0s (no request failed)", True,
                               window.text, 0.0)
    last = failures[-1]
    recovered = next((r for r in inside if r.ok and r.t > last.t), None)
    if recovered is None:
        return AssertionResult(name, "failoverWithin", generator, expected,
                               f"never: no success after the last failure at {last.t:.2f}s ({len(failures)} failed)",
                               False, window.text)
    seconds = recovered.t - action_t
    return AssertionResult(name, "failoverWithin", generator, expected,
                           f"{seconds:.2f}s (last failure at {last.t:.2f}s, {len(failures)} failed: "
                           f"{_failures_text(failures)})", seconds <= limit, window.text, seconds)


def no_traffic_to(name: str, generator: str, records: list[Record], window: Window,
                  pods: str | Collection[str]) -> AssertionResult:
    """No request of the window was answered by the pod(s)."""
    targets = {pods} if isinstance(pods, str) else set(pods)
    inside = in_window(records, window)
    expected = f"no answer from {', '.join(sorted(targets))}"
    if not inside:
        return _empty(name, "noTrafficTo", generator, expected, window)
    hits = [r for r in inside if r.ok and r.pod in targets]
    measured = (f"{len(hits)} of {len(inside)} answered by them (first at {hits[0].t:.2f}s, last at "
                f"{hits[-1].t:.2f}s)" if hits else f"0 of {len(inside)} answered by them")
    return AssertionResult(name, "noTrafficTo", generator, expected, measured, not hits, window.text, float(len(hits)))
