"""The checks that need the whole scenario file: names that must exist, times in order and
within the duration, nodes within cluster.nodes, the cluster settings, manifests that exist
and parse, what this kernel cannot do.

They run over each part of the file that validated on its own (Parts), so that a file with a
bad action still has its windows, generators and other actions checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from testbed.api.kinds import UnknownKind, kind_named
from testbed.cluster.config import ClusterConfig, ConfigError
from testbed.manifests import ManifestInvalid
from testbed.scenario.actions import ACTIONS, Action, ActionBase, Delay, Delete, ManifestRef, load_manifests
from testbed.scenario.kernel import WHERE_IT_WORKS, KernelFeatures
from testbed.scenario.model import TRAFFIC_CHECKS, Assertion, ClusterSpec, TrafficSpec, default_cluster_name
from testbed.scenario.plan import ActionIndex, UnknownReference, planned_times, point_time
from testbed.scenario.syntax import NODE, Condition, TimeRef, node_number, templates_in
from testbed.scenario.units import PositiveDuration, format_duration

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class FieldProblem:
    path: Loc  # keys and list positions from the top of the file
    message: str


#: The actions whose pods (or node's pods) noTrafficTo may name.
POD_ACTIONS = ("pod-delete", "pod-kill", "node-crash", "node-freeze")

#: How each list of the file is validated item by item (and the cluster and duration alone).
_ADAPTERS: dict[str, TypeAdapter] = {key: TypeAdapter(item_type) for key, item_type in (
    ("manifests", ManifestRef), ("traffic", TrafficSpec), ("timeline", Action), ("assertions", Assertion),
    ("cluster", ClusterSpec), ("duration", PositiveDuration))}
_LISTS = ("manifests", "traffic", "timeline", "assertions")


@dataclass
class Parts:
    """The parts of a file that are valid on their own, with their positions in the file."""

    raw: dict
    cluster: ClusterSpec | None = None
    duration: float | None = None
    items: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict) -> "Parts":
        parts = cls(raw, cluster=_valid("cluster", raw.get("cluster", {})), duration=_valid("duration", raw.get("duration")))
        for key in _LISTS:
            listed = raw.get(key)
            items = listed if isinstance(listed, list) else []
            parts.items[key] = [(i, v) for i, v in ((i, _valid(key, x)) for i, x in enumerate(items)) if v is not None]
        return parts

    def raw_list(self, key: str) -> list[dict]:
        listed = self.raw.get(key)
        return [x if isinstance(x, dict) else {} for x in listed] if isinstance(listed, list) else []


def _valid(key: str, value: Any) -> Any:
    try:
        return _ADAPTERS[key].validate_python(value)
    except ValidationError:
        return None


def check(parts: Parts, base_dir: Path, kernel: KernelFeatures) -> list[FieldProblem]:
    checker = _Checker(parts, base_dir, kernel)
    checker.run()
    return checker.problems


class _Checker:
    def __init__(self, parts: Parts, base_dir: Path, kernel: KernelFeatures) -> None:
        self.parts, self.base_dir, self.kernel = parts, base_dir, kernel
        self.problems: list[FieldProblem] = []
        self.nodes = parts.cluster.nodes if parts.cluster is not None else None
        raw_timeline = parts.raw_list("timeline")
        self.index = ActionIndex((i, _text(a.get("name")), _known_kind(a.get("action")))
                                 for i, a in enumerate(raw_timeline))
        self.generators = {_text(t.get("name")) for t in parts.raw_list("traffic")} - {None}
        self.actions: list[tuple[int, ActionBase]] = parts.items["timeline"]
        self.times = planned_times(self.actions, self.index)

    def add(self, path: Loc, message: str) -> None:
        self.problems.append(FieldProblem(path, message))

    def run(self) -> None:
        self.check_unique_names()
        self.check_cluster()
        for i, ref in self.parts.items["manifests"]:
            self.check_manifest(("manifests", i), ref)
        self.check_triggers()
        for i, action in self.actions:
            self.check_action(("timeline", i), action)
        for i, traffic in self.parts.items["traffic"]:
            self.check_traffic(("traffic", i), traffic)
        for i, assertion in self.parts.items["assertions"]:
            self.check_assertion(("assertions", i), assertion)

    # ------------------------------------------------------------------ names and references

    def check_unique_names(self) -> None:
        for key in ("traffic", "timeline", "assertions"):
            seen: dict[str, int] = {}
            for i, item in enumerate(self.parts.raw_list(key)):
                name = _text(item.get("name"))
                if name is None:
                    continue
                if name in seen:
                    self.add((key, i, "name"), f"{name!r} is already the name of {key}[{seen[name]}]")
                seen.setdefault(name, i)

    def find_action(self, path: Loc, ref: str) -> int | None:
        try:
            return self.index.find(ref)
        except UnknownReference as exc:
            self.add(path, str(exc))
            return None

    def check_node(self, path: Loc, node: str | None) -> None:
        number = node_number(node) if node else None
        if number is not None and self.nodes is not None and number > self.nodes:
            self.add(path, f"unknown node {node}: the cluster has {self.nodes} node{'s' * (self.nodes > 1)} "
                           f"(node1{f'-node{self.nodes}' if self.nodes > 1 else ''})")

    def check_templates(self, path: Loc, text: str) -> None:
        for template in templates_in(text):
            if template.kind == "nodeIP":
                self.check_node(path, template.argument)

    # ------------------------------------------------------------------ cluster and manifests

    def check_cluster(self) -> None:
        spec = self.parts.cluster
        if spec is None:
            return
        name = _text(self.parts.raw.get("name")) or "svclab"
        if spec.proxy_mode and "mode" in (spec.kube_proxy or {}):
            self.add(("cluster", "kubeProxy", "mode"), "the proxy mode twice: give proxyMode or kubeProxy.mode, not both")
        for mode in spec.proxy_modes:
            try:
                ClusterConfig.from_dict(spec.settings(spec.name or default_cluster_name(name), mode))
            except ConfigError as exc:
                self.add(*_config_problem(spec, str(exc)))
                return
            if mode == "ipvs" and not self.kernel.ipvs:
                self.add(("cluster", "proxyMode" if spec.proxy_mode else "kubeProxy"),
                         f"proxy mode ipvs: this kernel has no IPVS; use iptables or nftables, or run in {WHERE_IT_WORKS}")

    def check_manifest(self, path: Loc, ref: ManifestRef) -> None:
        key = "file" if ref.file is not None else "inline"
        if ref.file is not None and not (self.base_dir / ref.file).is_file():
            self.add(path + (key,), f"no such file: {self.base_dir / ref.file}")
            return
        try:
            load_manifests([ref], self.base_dir)
        except ManifestInvalid as exc:
            for line in str(exc).splitlines():
                self.add(path + (key,), line.removeprefix("error: "))

    # ------------------------------------------------------------------ the timeline

    def check_triggers(self) -> None:
        for cycle in self.times.cycles:
            names = " -> ".join(self.actions_label(p) for p in cycle + cycle[:1])
            for position in cycle:
                self.add(("timeline", position, "after"), f"after: goes round in a loop ({names})")
        latest: tuple[float, int] | None = None
        for position, action in self.actions:
            path = ("timeline", position, action.trigger.kind)
            if action.trigger.kind == "after":
                self.find_action(path, action.after.anchor)
            when = self.times.at.get(position)
            if when is None:
                continue
            if when < 0:
                self.add(path, f"{format_duration(when)}: before the start")
            elif self.parts.duration is not None and when > self.parts.duration:
                self.add(path, f"at {format_duration(when)}: beyond the end of the run "
                               f"(duration {format_duration(self.parts.duration)})")
            if latest is not None and when < latest[0]:
                self.add(path, f"out of order: at {format_duration(when)}, but timeline[{latest[1]}] listed before it "
                               f"is at {format_duration(latest[0])} (list the timeline in time order)")
            if latest is None or when >= latest[0]:
                latest = (when, position)

    def actions_label(self, position: int) -> str:
        action = dict(self.actions).get(position)
        return action.label if action else f"timeline[{position}]"

    def check_action(self, path: Loc, action: ActionBase) -> None:
        for key in ("node", "target"):
            value = getattr(action, key, None)
            if isinstance(value, str) and NODE.match(value):
                self.check_node(path + (key,), value)
        for g, group in enumerate(getattr(action, "groups", [])):
            for h, host in enumerate(group):
                self.check_node(path + ("groups", g, h), host)
        if action.when is not None:
            self.check_condition(path + ("when",), action.when)
        for m, ref in enumerate(getattr(action, "manifests", None) or []):
            self.check_manifest(path + ("manifests", m), ref)
        if isinstance(action, Delete) and action.object is not None:
            self.check_object(path + ("object",), action.object)
        if isinstance(action, Delay) and not self.kernel.netem:
            self.add(path + ("action",), "delay needs the kernel's netem qdisc (sch_netem), which this kernel lacks "
                                         f"(CONFIG_NET_SCH_NETEM is not set): it works in {WHERE_IT_WORKS}; "
                                         "loss and bandwidth work here")

    def check_condition(self, path: Loc, condition: Condition) -> None:
        if condition.function == "converged" and condition.argument:
            self.check_node(path, condition.argument)

    def check_object(self, path: Loc, text: str) -> None:
        kind, _, name = text.partition("/")
        if not name or "/" in name:
            self.add(path, f"{text!r}: want kind/name, e.g. service/frontend-lb")
            return
        try:
            kind_named(kind)
        except UnknownKind as exc:
            self.add(path, str(exc))

    # ------------------------------------------------------------------ traffic and assertions

    def check_traffic(self, path: Loc, traffic: TrafficSpec) -> None:
        if traffic.source.kind == "node":
            self.check_node(path + ("from",), traffic.source.node)
        self.check_templates(path + ("to",), traffic.destination)
        if traffic.stop is not None and traffic.stop <= traffic.start:
            self.add(path + ("stop",), f"stop ({format_duration(traffic.stop)}) must come after start "
                                       f"({format_duration(traffic.start)})")
        for key in ("start", "stop"):
            value = getattr(traffic, key)
            if value is not None and self.parts.duration is not None and value > self.parts.duration:
                self.add(path + (key,), f"{format_duration(value)}: beyond the end of the run "
                                        f"(duration {format_duration(self.parts.duration)})")

    def check_assertion(self, path: Loc, assertion: Assertion) -> None:
        needs_traffic = [c.kind for c in assertion.checks() if c.kind in TRAFFIC_CHECKS]
        if assertion.traffic is None and needs_traffic:
            self.add(path, f"traffic: needed for {', '.join(needs_traffic)} (which generator's requests to measure)")
        elif assertion.traffic is not None and assertion.traffic not in self.generators:
            self.add(path + ("traffic",), f"no traffic generator named {assertion.traffic!r} "
                                          f"(generators: {', '.join(sorted(self.generators)) or 'none'})")
        self.check_window(path + ("window",), assertion)
        target = assertion.no_traffic_to
        if target is not None and target.kind == "node":
            self.check_node(path + ("noTrafficTo",), target.node)
        if target is not None and target.kind == "action":
            self.check_pod_action(path + ("noTrafficTo",), target.action)
        if assertion.rules is not None:
            self.check_node(path + ("rules", "node"), assertion.rules.node)
            self.check_templates(path + ("rules",), assertion.rules.contains or assertion.rules.not_contains)

    def check_pod_action(self, path: Loc, ref: str) -> None:
        position = self.find_action(path, ref)
        kind = _text(self.parts.raw_list("timeline")[position].get("action")) if position is not None else None
        if position is not None and kind not in POD_ACTIONS:
            self.add(path, f"{ref!r} is a {kind} action: noTrafficTo takes pods, a node, or the name of a "
                           f"{', '.join(POD_ACTIONS)} action")

    def check_window(self, path: Loc, assertion: Assertion) -> None:
        points: list[float | None] = []
        for ref in (assertion.window.start, assertion.window.end):
            points.append(self.point(path, ref))
        start, end = points
        if start is not None and end is not None:
            if end < start:
                self.add(path, f"{assertion.window}: ends ({format_duration(end)}) before it starts ({format_duration(start)})")
            elif end == start:
                self.add(path, f"{assertion.window}: empty (both ends at {format_duration(start)})")

    def point(self, path: Loc, ref: TimeRef) -> float | None:
        if ref.names_action and self.find_action(path, ref.anchor) is None:
            return None
        duration = self.parts.duration
        when = point_time(ref, self.index, self.times.at, duration)
        if when is not None and (when < 0 or duration is not None and when > duration):
            bounds = f"0s to {format_duration(duration)}" if duration is not None else "it starts at 0s"
            self.add(path, f"{ref}: at {format_duration(when)}, outside the run ({bounds})")
            return None
        return when


def _config_problem(spec: ClusterSpec, message: str) -> tuple[Loc, str]:
    """A ConfigError ("networking.podSubnet: ...") at the scenario's key it came from."""
    head, sep, rest = message.partition(": ")
    if not sep or " " in head:
        return ("cluster",), message
    keys: list[str] = head.split(".")
    if keys == ["kubeProxy", "mode"] and spec.proxy_mode:
        keys = ["proxyMode"]
    return ("cluster", *keys), rest


def _known_kind(value: Any) -> str | None:
    return value if isinstance(value, str) and value in ACTIONS else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None

