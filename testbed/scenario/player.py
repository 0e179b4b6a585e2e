"""Playing a scenario's timeline against the clock, from t0 to the end of the run.

Each action happens when its trigger says, by the times actions were really taken: `at:`
a time; `after:` the real time of the action it names plus the offset (a negative offset
from a planned action counts from its planned time); `when:` as soon as its condition
holds, watched from the moment the action listed before it happened, for at most its
timeout. Every action taken is an ActionRecord with its real time; an action that fails,
or a condition that does not hold in time, stops the run (PlayError).
"""

from __future__ import annotations

import time
from typing import Callable

from testbed.scenario.conditions import ClusterState
from testbed.scenario.execute import ActionContext, take
from testbed.scenario.observe import Observer
from testbed.scenario.plan import ActionIndex, PlannedAction, resolve_timeline
from testbed.scenario.report import ActionRecord
from testbed.scenario.units import format_duration

TICK_S = 0.05
CONDITION_POLL_S = 0.25
SNAPSHOT_EVERY_S = 2.0  # pods re-read this often (noTrafficTo names pods that are gone by the end)

Progress = Callable[[float, "str | None"], None]


class PlayError(RuntimeError):
    """The timeline could not be played: an action failed or a condition did not hold in time."""


class Player:
    def __init__(self, scenario, ctx: ActionContext, cluster: ClusterState, observer: Observer, t0: float,
                 progress: Progress = lambda _t, _last: None) -> None:
        self.scenario, self.ctx, self.cluster, self.observer = scenario, ctx, cluster, observer
        self.t0, self.progress = t0, progress
        self.steps = resolve_timeline(scenario)
        self.index = ActionIndex.of(scenario.timeline)
        self.times: dict[int, float] = {}  # timeline position -> t it was taken at
        self.actions: list[ActionRecord] = []
        self._watching: dict[int, float] = {}  # when: position -> t its watch began
        self._polled: dict[int, float] = {}
        self._last_condition: dict[int, str] = {}
        self._snapshot_t = 0.0
        self._planned = {s.position: s.at for s in self.steps if s.at is not None}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def play(self) -> None:
        """Until the end of the run; PlayError when the timeline cannot go on."""
        pending = list(self.steps)
        while True:
            now_t = self.now()
            for step in list(pending):
                if self._due(step, now_t):
                    self._take(step)
                    pending.remove(step)
                    now_t = self.now()
            self.observer.tick(self.times, self._planned)
            if now_t >= self.scenario.duration:
                break
            self._snapshot(now_t)
            self.progress(max(0.0, now_t), None)
            time.sleep(max(0.0, min(TICK_S, self._next_due(pending) - self.now())))
        waiting = [s for s in pending if s.position in self._watching]
        if waiting:
            step = waiting[0]
            raise PlayError(f"timeline[{step.position}] {step.label}: when: {step.condition} still did not hold at "
                            f"the end of the run ({self._last_condition.get(step.position, 'not evaluated')})")

    # ---- triggers ----------------------------------------------------------------------------------

    def _next_due(self, pending: list[PlannedAction]) -> float:
        """The soonest time a planned or after: action of pending is due (or the end of the run)."""
        soonest = self.scenario.duration
        for step in pending:
            trigger = step.action.trigger
            if trigger.kind == "at":
                soonest = min(soonest, trigger.at)
            elif trigger.kind == "after" and self.index.find(trigger.after.anchor) in self.times:
                soonest = min(soonest, self.times[self.index.find(trigger.after.anchor)] + trigger.after.offset)
        return soonest

    def _due(self, step: PlannedAction, now_t: float) -> bool:
        trigger = step.action.trigger
        if trigger.kind == "at":
            return now_t >= trigger.at
        if trigger.kind == "after":
            anchor = self.index.find(trigger.after.anchor)
            offset = trigger.after.offset
            if anchor in self.times:
                return now_t >= self.times[anchor] + offset
            planned = next(s.at for s in self.steps if s.position == anchor)
            return offset < 0 and planned is not None and now_t >= planned + offset
        return self._condition_due(step, now_t)

    def _condition_due(self, step: PlannedAction, now_t: float) -> bool:
        if step.waits_from is not None and step.waits_from not in self.times:
            return False
        began = self._watching.setdefault(step.position, now_t)
        if now_t - self._polled.get(step.position, -1e9) < CONDITION_POLL_S:
            return False
        self._polled[step.position] = now_t
        try:
            state = self.cluster.condition(step.condition)
        except Exception as exc:  # the API or a kube-proxy not answering: not yet
            self._last_condition[step.position] = f"not evaluated: {exc}"
            state = None
        if state is not None:
            self._last_condition[step.position] = state.detail
            if state.holds:
                return True
        if now_t - began > step.timeout:
            raise PlayError(f"timeline[{step.position}] {step.label}: when: {step.condition} did not hold within "
                            f"timeout {format_duration(step.timeout)} (watched from {began:.2f}s; last: "
                            f"{self._last_condition[step.position]})")
        return False

    # ---- actions -----------------------------------------------------------------------------------

    def _take(self, step: PlannedAction) -> None:
        self.observer.before_action(step)
        t = self.now()
        started = time.monotonic()
        try:
            params = take(self.ctx, step)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            self.actions.append(ActionRecord(step.label, step.kind, round(t, 4), {}, False, error,
                                             round(time.monotonic() - started, 4)))
            self.progress(max(0.0, t), f"{step.label} FAILED")
            raise PlayError(f"timeline[{step.position}] {step.label} ({step.kind}) at {t:.2f}s failed: {error}") from exc
        self.times[step.position] = t
        self.actions.append(ActionRecord(step.label, step.kind, round(t, 4), params, True, "",
                                         round(time.monotonic() - started, 4)))
        self.observer.after_action(step, t)
        self.progress(max(0.0, t), f"{step.label} at {t:.1f}s")

    def _snapshot(self, now_t: float) -> None:
        if now_t - self._snapshot_t < SNAPSHOT_EVERY_S:
            return
        self._snapshot_t = now_t
        try:
            self.ctx.pods.snapshot(self.ctx.live)
        except Exception:  # the API server down (component-stop apiserver): the next one
            pass
