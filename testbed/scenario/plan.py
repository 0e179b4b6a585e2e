"""The timeline in time: which action happens when, and the seeded random choices.

`at:` and `after:` triggers resolve to offsets from the start; an action triggered by `when:`
(or after one that is) stays conditional and happens when the runner sees its condition hold.
Every action draws one number from the seeded generator, in timeline order, whether it uses
it or not: the same seed gives the same choices, and an edit of one action's pick does not
change the others'.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from testbed.scenario.actions import ActionBase, PodSelection
from testbed.scenario.syntax import END, START, Condition, TimeRef, Window


class UnknownReference(LookupError):
    """A name that no action has, or that several share; str() says which."""


class ActionIndex:
    """Finds a timeline entry by what windows and `after:` write: its name, or its kind
    (node-crash) when exactly one action has that kind."""

    def __init__(self, entries: Iterable[tuple[int, str | None, str | None]]) -> None:
        """entries: (position in the timeline, name or None, kind or None)."""
        self.by_name: dict[str, int] = {}
        self.by_kind: dict[str, list[int]] = {}
        for position, name, kind in entries:
            if name is not None:
                self.by_name.setdefault(name, position)
            if kind is not None:
                self.by_kind.setdefault(kind, []).append(position)

    @classmethod
    def of(cls, timeline: Sequence[ActionBase]) -> "ActionIndex":
        return cls((i, a.name, a.kind) for i, a in enumerate(timeline))

    def find(self, ref: str) -> int:
        if ref in self.by_name:
            return self.by_name[ref]
        positions = self.by_kind.get(ref, [])
        if len(positions) == 1:
            return positions[0]
        if positions:
            where = ", ".join(f"timeline[{i}]" for i in positions)
            raise UnknownReference(f"{ref!r} is the kind of {len(positions)} actions ({where}): name the one you mean")
        known = sorted(set(self.by_name) | {k for k, v in self.by_kind.items() if len(v) == 1})
        raise UnknownReference(f"no action named {ref!r} (actions: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class Times:
    """Planned offsets from the start (None: conditional) and the after:-chains that loop."""

    at: dict[int, float | None]
    cycles: list[list[int]]


def planned_times(timeline: Sequence[tuple[int, ActionBase]], index: ActionIndex) -> Times:
    """Offsets of the entries given (position, action); an after: naming an entry not given
    (or an unknown one) leaves the action unplanned (None), as a when: does."""
    actions = dict(timeline)
    times: dict[int, float | None] = {}
    anchors: dict[int, int | None] = {}  # after: entries -> the entry they follow
    for position, action in actions.items():
        trigger = action.trigger
        if trigger.kind == "after":
            try:
                anchors[position] = index.find(trigger.after.anchor)
            except UnknownReference:
                anchors[position] = None
        else:
            times[position] = trigger.at
    while ready := {p: a for p, a in anchors.items() if a not in anchors}:
        for position, anchor in ready.items():
            base = times.get(anchor) if anchor is not None else None
            times[position] = None if base is None else base + actions[position].trigger.after.offset
            del anchors[position]
    times.update({p: None for p in anchors})  # what is left follows itself round a loop
    return Times(times, _cycles(anchors))


def _cycles(follows: dict[int, int]) -> list[list[int]]:
    """The loops of a graph where each entry follows exactly one other of the graph."""
    cycles, seen = [], set()
    for start in follows:
        path: list[int] = []
        node = start
        while node not in seen:
            seen.add(node)
            path.append(node)
            node = follows[node]
        if node in path:
            cycles.append(path[path.index(node):])
    return cycles


def point_time(ref: TimeRef, index: ActionIndex, times: Mapping[int, float | None],
               duration: float | None) -> float | None:
    """Seconds from the start of a window point or after: reference, given the times the actions
    happen(ed) at (position -> seconds; planned or measured); None while its action has no time
    (or for end without a duration). UnknownReference for a name no action has."""
    if ref.anchor == START:
        return ref.offset
    if ref.anchor == END:
        return None if duration is None else duration + ref.offset
    base = times.get(index.find(ref.anchor))
    return None if base is None else base + ref.offset


def window_times(window: Window, index: ActionIndex, times: Mapping[int, float | None],
                 duration: float) -> tuple[float | None, float | None]:
    return point_time(window.start, index, times, duration), point_time(window.end, index, times, duration)


@dataclass(frozen=True)
class PlannedAction:
    """One timeline entry, placed in time. at: seconds from the start, or None when it waits for
    a condition (when:) or for an action that does (after: whose anchor is conditional): then
    follows/delay say which entry and how long after it, condition/timeout what it waits for,
    and the condition is watched once the entry listed before it (waits_from) has happened."""

    position: int
    action: ActionBase
    at: float | None
    follows: int | None = None
    delay: float = 0.0
    condition: Condition | None = None
    timeout: float | None = None
    waits_from: int | None = None
    draw: int = 0  # this action's seeded random number (see choose)

    @property
    def label(self) -> str:
        return self.action.label

    @property
    def kind(self) -> str:
        return self.action.kind

    def choose(self, candidates: Iterable[str]) -> list[str]:
        """The pods this action acts on among candidates (names): all of them, or those its pick
        draws at random; the same for the same seed and candidates, in whatever order given."""
        names = sorted(set(candidates))
        pick = self.action.pick if isinstance(self.action, PodSelection) else "all"
        if pick == "all" or not names:
            return names
        count = 1 if pick == "random" else min(pick, len(names))
        return sorted(random.Random(self.draw).sample(names, count))


def resolve_timeline(scenario, rng: random.Random | None = None) -> list[PlannedAction]:
    """The timeline of a loaded (valid) scenario in the order it happens: planned actions by
    time (ties in listing order), then the conditional ones in listing order.
    rng: the source of the random choices, random.Random(scenario.seed) by default."""
    rng = rng if rng is not None else random.Random(scenario.seed)
    timeline = list(scenario.timeline)
    index = ActionIndex.of(timeline)
    times = planned_times(list(enumerate(timeline)), index).at
    planned = []
    for position, action in enumerate(timeline):
        trigger = action.trigger
        draw = rng.getrandbits(64)
        entry = PlannedAction(position, action, times[position], draw=draw)
        if times[position] is None and trigger.kind == "after":
            entry = PlannedAction(position, action, None, follows=index.find(trigger.after.anchor),
                                  delay=trigger.after.offset, draw=draw)
        elif trigger.kind == "when":
            entry = PlannedAction(position, action, None, condition=trigger.when, timeout=trigger.timeout,
                                  waits_from=position - 1 if position else None, draw=draw)
        planned.append(entry)
    return sorted(planned, key=lambda p: (p.at is None, p.at or 0.0, p.position))


def traffic_seeds(scenario) -> dict[str, int]:
    """A seed per traffic generator (for randomness of its own), made from the scenario's seed
    and the generator's name alone: the same whatever the timeline and the other generators."""
    return {t.name: random.Random(f"{scenario.seed}/traffic/{t.name}").getrandbits(32) for t in scenario.traffic}
