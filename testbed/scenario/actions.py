"""The timeline's actions: one model per kind, in a union told apart by the `action` key.

Every action has a trigger (exactly one of `at:`, `after:` or `when:` + `timeout:`) and an
optional name that windows and `after:` refer to. The kinds and their keys follow Chaos Mesh's
and Litmus' names (pod-kill, pod-delete, partition, loss, bandwidth, delay, dns-error, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import Field, model_validator

from testbed.manifests import Manifest, merge, parse, read_source
from testbed.scenario.base import Strict, parsed
from testbed.scenario.syntax import (Name, AfterRef, Condition, ConditionValue, LinkHost, NodeName, Selector,
                                     TimeRef)
from testbed.scenario.units import BandwidthValue, Duration, Percent, PositiveDuration

COMPONENTS = ("kubelet", "kube-proxy", "apiserver", "controller-manager", "cloud-controller", "lb-controller", "coredns")
#: Components that run once per node (an action may pick one node, or all without `node:`).
NODE_COMPONENTS = ("kubelet", "kube-proxy")


@dataclass(frozen=True)
class Trigger:
    """When an action happens: at a time, after another action (+ offset), or when a condition holds."""

    kind: str  # "at" | "after" | "when"
    at: float | None = None
    after: TimeRef | None = None
    when: Condition | None = None
    timeout: float | None = None


class ManifestRef(Strict):
    """Kubernetes YAML: a file (relative to the scenario file) or the text itself under `inline:`."""

    file: str | None = None
    inline: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ManifestRef":
        if (self.file is None) == (self.inline is None):
            raise ValueError("give either file: (a path relative to the scenario) or inline: (YAML text)")
        return self

    def read(self, base_dir: Path) -> tuple[str, str]:
        """(source name, YAML text): the file's, relative to base_dir, or the inline text;
        ManifestInvalid when the file cannot be read."""
        if self.file is None:
            return "inline", self.inline or ""
        path = base_dir / self.file
        return str(path), read_source(str(path))


def load_manifests(refs: list[ManifestRef], base_dir: Path, namespace: str = "") -> Manifest:
    """The API objects of refs, in order (what `svclab apply -f` would send); ManifestInvalid
    listing every bad document."""
    return merge(partial(_parse_ref, ref, base_dir, namespace) for ref in refs)


def _parse_ref(ref: ManifestRef, base_dir: Path, namespace: str) -> Manifest:
    source, text = ref.read(base_dir)
    return parse(text, source, namespace)


class ActionBase(Strict):
    kind: ClassVar[str]
    name: Name | None = None
    at: Duration | None = None
    after: AfterRef | None = None
    when: ConditionValue | None = None
    timeout: PositiveDuration | None = None

    @model_validator(mode="after")
    def _one_trigger(self) -> "ActionBase":
        given = [key for key in ("at", "after", "when") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("say when it happens with exactly one of at: (a time), after: (an action, "
                             f"e.g. crash+15s) or when: (a condition, with timeout:){'; got ' + ', '.join(given) if given else ''}")
        if (self.when is None) != (self.timeout is None):
            raise ValueError("when: needs a timeout: (how long to wait for the condition), and only when: takes one")
        return self

    @property
    def trigger(self) -> Trigger:
        if self.at is not None:
            return Trigger("at", at=self.at)
        if self.after is not None:
            return Trigger("after", after=self.after)
        return Trigger("when", when=self.when, timeout=self.timeout)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        """Each action's kind is the one value its `action:` Literal takes."""
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("action")
        if field is not None:
            (cls.kind,) = get_args(field.annotation)

    @property
    def label(self) -> str:
        """How reports name it: its name, else its kind."""
        return self.name or self.kind


# ------------------------------------------------------------------ objects


class Apply(ActionBase):
    action: Literal["apply"]
    manifests: list[ManifestRef] = Field(min_length=1)
    namespace: str = ""


class Delete(ActionBase):
    """Delete one object (`object: service/frontend-lb`, kubectl's kind/name) or what manifests define."""

    action: Literal["delete"]
    object: str | None = None
    manifests: list[ManifestRef] | None = Field(default=None, min_length=1)
    namespace: str = ""

    @model_validator(mode="after")
    def _one_target(self) -> "Delete":
        if (self.object is None) == (self.manifests is None):
            raise ValueError("give either object: (kind/name, e.g. service/frontend-lb) or manifests:")
        return self


class Scale(ActionBase):
    action: Literal["scale"]
    deployment: str
    replicas: int = Field(ge=0)
    namespace: str = ""


class Rollout(ActionBase):
    """Change a Deployment's pod template, which rolls its pods over. `template` is merged into
    spec.template (mappings key by key, containers by name); without it the rollout is a restart
    (as `kubectl rollout restart`: an annotation of the template changes)."""

    action: Literal["rollout"]
    deployment: str
    template: dict[str, Any] | None = None
    namespace: str = ""


PICKS = ("all", "random")


def _pick(value: Any) -> str | int:
    if value in PICKS or isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"invalid pick {value!r}: all, random (one pod) or a number of pods to pick at random")


class PodSelection(ActionBase):
    """Pods by name (`pod:`) or label (`selector:`); `pick` chooses among the selected pods:
    all of them, one at random, or N at random (the choice is drawn from the scenario's seed)."""

    pod: str | None = None
    selector: Selector | None = None
    pick: Annotated[str | int, *parsed(_pick, lambda v: v)] = "all"
    namespace: str = ""

    @model_validator(mode="after")
    def _one_selection(self) -> "PodSelection":
        if (self.pod is None) == (self.selector is None):
            raise ValueError("give either pod: (a name) or selector: (labels, e.g. app=frontend)")
        if self.pod is not None and self.pick != "all":
            raise ValueError("pick: chooses among the pods of a selector:, not a named pod:")
        return self


class PodDelete(PodSelection):
    action: Literal["pod-delete"]


class PodKill(PodSelection):
    """The pods' containers die (SIGKILL); the kubelet restarts them as restartPolicy says."""

    action: Literal["pod-kill"]


# ------------------------------------------------------------------ nodes and components


class NodeAction(ActionBase):
    node: NodeName


class NodeCrash(NodeAction):
    """The node's kubelet and kube-proxy are killed and kept down, and its links go down."""

    action: Literal["node-crash"]


class NodeRecover(NodeAction):
    action: Literal["node-recover"]


class NodeFreeze(NodeAction):
    """SIGSTOP of the node's processes (its links stay up)."""

    action: Literal["node-freeze"]


class NodeThaw(NodeAction):
    action: Literal["node-thaw"]


class ComponentAction(ActionBase):
    """kubelet and kube-proxy: on `node:`, or on every node without it; the others run once."""

    component: Literal[COMPONENTS]  # type: ignore[valid-type]
    node: NodeName | None = None

    @model_validator(mode="after")
    def _node_only_for_node_components(self) -> "ComponentAction":
        if self.node is not None and self.component not in NODE_COMPONENTS:
            raise ValueError(f"node: only for {' and '.join(NODE_COMPONENTS)} ({self.component} runs once per cluster)")
        return self


class ComponentKill(ComponentAction):
    """SIGKILL; supervision starts it again, as in a real cluster."""

    action: Literal["component-kill"]


class ComponentStop(ComponentAction):
    """Stopped and kept down until component-start."""

    action: Literal["component-stop"]


class ComponentStart(ComponentAction):
    action: Literal["component-start"]


# ------------------------------------------------------------------ network


class LinkAction(ActionBase):
    target: LinkHost


class LinkDown(LinkAction):
    action: Literal["link-down"]


class LinkUp(LinkAction):
    action: Literal["link-up"]


class LinkFlap(LinkAction):
    """count times: the link down for interval, then up for interval."""

    action: Literal["link-flap"]
    count: int = Field(default=3, ge=1)
    interval: PositiveDuration = 1.0


class Partition(ActionBase):
    """Hosts of one group cannot reach those of another. one-way: the first group cannot reach
    the second (replies still flow); drop loses packets, reject refuses them at once."""

    action: Literal["partition"]
    groups: list[Annotated[list[LinkHost], Field(min_length=1)]] = Field(min_length=2)
    direction: Literal["both", "one-way"] = "both"
    mode: Literal["drop", "reject"] = "drop"

    @model_validator(mode="after")
    def _disjoint_groups(self) -> "Partition":
        seen: set[str] = set()
        for group in self.groups:
            twice = seen.intersection(group) or {h for h in group if group.count(h) > 1}
            if twice:
                raise ValueError(f"{', '.join(sorted(twice))} in more than one place: each host belongs to one group")
            seen.update(group)
        if self.direction == "one-way" and len(self.groups) != 2:
            raise ValueError("direction: one-way takes exactly two groups (the first cannot reach the second)")
        return self


class Heal(ActionBase):
    """Undo every network fault in force: partitions, links down, loss, bandwidth, delay, dns-error."""

    action: Literal["heal"]


class Loss(LinkAction):
    """Drop percent of the packets on the target's link, both directions."""

    action: Literal["loss"]
    percent: Percent


class BandwidthLimit(LinkAction):
    """Limit the target's link to rate (tbf). Named apart from units.Bandwidth, the value it takes."""

    action: Literal["bandwidth"]
    rate: BandwidthValue


class Delay(LinkAction):
    """Needs the kernel's sch_netem (refused where it is missing: see scenarios/README.md)."""

    action: Literal["delay"]
    delay: PositiveDuration
    jitter: Duration = 0.0


class FlushRules(ActionBase):
    """Remove the node's kube-proxy rules behind its back (as `iptables -t nat -F` would)."""

    action: Literal["flush-rules"]
    node: NodeName


class FlushConntrack(ActionBase):
    action: Literal["flush-conntrack"]
    node: NodeName


class DnsError(ActionBase):
    """Cluster DNS answers rcode for names matching the glob, until heal."""

    action: Literal["dns-error"]
    names: str = Field(min_length=1)
    rcode: Literal["SERVFAIL", "NXDOMAIN"] = "SERVFAIL"


ACTION_MODELS: tuple[type[ActionBase], ...] = (
    Apply, Delete, Scale, Rollout, PodDelete, PodKill,
    NodeCrash, NodeRecover, NodeFreeze, NodeThaw, ComponentKill, ComponentStop, ComponentStart,
    LinkDown, LinkUp, LinkFlap, Partition, Heal, Loss, BandwidthLimit, Delay, FlushRules, FlushConntrack, DnsError,
)
#: action kind -> its model
ACTIONS: dict[str, type[ActionBase]] = {m.kind: m for m in ACTION_MODELS}
Action = Annotated[Union[ACTION_MODELS], Field(discriminator="action")]  # type: ignore[valid-type]
