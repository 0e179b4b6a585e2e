"""Taking a timeline action: one function per action kind (actions.ACTIONS), a dispatch table.

Object actions (apply, delete, scale, rollout, pod-delete) are API operations, as kubectl
does them; every other kind goes to the fault injection library (testbed/faults/). Each
function returns what it did, resolved (the pods it picked, the fault's summary), for the
report's action record; a failure raises (ActionFailed, FaultError, ApiError, ...) and the
runner stops the run. A selection that matches nothing is a failure, never a silent no-op.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from testbed import faults
from testbed.api.errors import NotFound
from testbed.api.kinds import kind_named, kind_of
from testbed.api.kube_json import from_dict, to_dict
from testbed.api.meta import now_rfc3339
from testbed.client.apply import ApplyFailed, apply_objects
from testbed.faults.api import update_retrying
from testbed.scenario import actions as A
from testbed.scenario.live import DEFAULT_NAMESPACE, Live, PodBook, PodInfo, active
from testbed.scenario.plan import ActionIndex, PlannedAction, UnknownReference

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
TRIGGER_KEYS = {"name", "at", "after", "when", "timeout", "action"}


class ActionFailed(RuntimeError):
    """An action that could not be taken (str(): why)."""


@dataclass
class ActionContext:
    """What actions act on: the cluster's API and fault target, the scenario's directory (for
    manifests), the pods seen so far, and what each action picked (by timeline position)."""

    live: Live
    target: faults.FaultTarget
    base_dir: Any
    index: ActionIndex
    pods: PodBook = field(default_factory=PodBook)
    picks: dict[int, list[PodInfo]] = field(default_factory=dict)

    def picked(self, ref: str) -> list[PodInfo] | None:
        """The pods the action named ref picked (None: no such action, or one that picks none)."""
        try:
            return self.picks.get(self.index.find(ref))
        except UnknownReference:
            return None


Executor = Callable[[ActionContext, PlannedAction], dict]


def take(ctx: ActionContext, step: PlannedAction) -> dict:
    """Take one action; returns its params as the report records them."""
    params = step.action.model_dump(by_alias=True, exclude_none=True, mode="json", exclude=TRIGGER_KEYS)
    params.update(EXECUTORS[step.kind](ctx, step))
    return params


def _namespace(action: Any) -> str:
    return getattr(action, "namespace", "") or DEFAULT_NAMESPACE


def _summary(result: faults.Fault | list[faults.Fault]) -> dict:
    if isinstance(result, list):
        return {"undone": [f"{f.id}: {f.summary}" for f in result]}
    return {"fault": result.id, "summary": result.summary}


# ---- objects ---------------------------------------------------------------------------------------

def apply(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Apply = step.action
    objects = A.load_manifests(action.manifests, ctx.base_dir, action.namespace).objects
    try:
        applied = ctx.live.call(lambda c: apply_objects(c, objects))
    except ApplyFailed as exc:
        raise ActionFailed("; ".join(exc.problems)) from None
    return {"objects": [f"{kind_of(a.obj).plural}/{a.obj.metadata.name} {a.action}" for a in applied]}


def delete(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Delete = step.action
    if action.object is not None:
        kind, _, name = action.object.partition("/")
        keys = [(kind_named(kind).name, name, _namespace(action))]
    else:
        objects = A.load_manifests(action.manifests, ctx.base_dir, action.namespace).objects
        keys = [(kind_of(o).name, o.metadata.name, o.metadata.namespace or DEFAULT_NAMESPACE) for o in objects]

    async def run(client) -> list[str]:
        for kind, name, namespace in keys:
            await client.delete(kind, name, namespace)
        return [f"{kind_named(kind).plural}/{name}" for kind, name, _ in keys]
    return {"deleted": ctx.live.call(run)}


def scale(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Scale = step.action
    before: list[int] = []

    def change(deploy) -> None:
        before.append(deploy.spec.replicas)
        deploy.spec.replicas = action.replicas

    ctx.live.call(lambda c: update_retrying(c, "Deployment", action.deployment, _namespace(action), change))
    return {"from": before[-1]}


def merge_template(base: dict, change: dict) -> dict:
    """change merged into base: mappings key by key, lists of named items (containers) by name,
    anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge_template(old, value)
        elif isinstance(old, list) and isinstance(value, list) and all(
                isinstance(i, dict) and "name" in i for i in old + value):
            merged = {item["name"]: item for item in old}
            for item in value:
                merged[item["name"]] = merge_template(merged.get(item["name"], {}), item)
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out


def rollout(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Rollout = step.action
    restarted = now_rfc3339()

    def change(deploy) -> None:
        if action.template is None:
            deploy.spec.template.metadata.annotations[RESTARTED_AT] = restarted
            return
        whole = to_dict(deploy)
        whole["spec"]["template"] = merge_template(whole["spec"].get("template", {}), action.template)
        rebuilt, warnings = from_dict(whole, kind_named("Deployment"))
        if warnings:
            raise ActionFailed(f"template: {'; '.join(warnings)}")
        deploy.spec.template.CopyFrom(rebuilt.spec.template)

    ctx.live.call(lambda c: update_retrying(c, "Deployment", action.deployment, _namespace(action), change))
    return {"restartedAt": restarted} if action.template is None else {}


def select_pods(ctx: ActionContext, step: PlannedAction) -> tuple[list[PodInfo], list[str]]:
    """The pods a pod-delete / pod-kill acts on (its pod, or those of its selector its pick
    draws), and the names it chose among, sorted as the seeded pick draws from them."""
    action: A.PodSelection = step.action
    namespace = _namespace(action)
    if action.pod is not None:
        try:
            pods = [ctx.live.get("Pod", action.pod, namespace)]
        except NotFound:
            raise ActionFailed(f"pod: no pod named {action.pod} in namespace {namespace}") from None
    else:
        pods = [p for p in ctx.live.list("Pod", namespace, action.selector) if active(p)]
        if not pods:
            raise ActionFailed(f"selector: no pod matches {action.selector} in namespace {namespace}")
    infos = {p.name: p for p in ctx.pods.add(pods)}
    chosen = [infos[name] for name in step.choose(infos)]
    ctx.picks[step.position] = chosen
    return chosen, sorted(infos)


def pod_delete(ctx: ActionContext, step: PlannedAction) -> dict:
    chosen, candidates = select_pods(ctx, step)

    async def run(client) -> None:
        for pod in chosen:
            await client.delete("Pod", pod.name, pod.namespace)
    ctx.live.call(run)
    return {"pods": [p.to_json() for p in chosen], "candidates": candidates}


def pod_kill(ctx: ActionContext, step: PlannedAction) -> dict:
    chosen, candidates = select_pods(ctx, step)
    done = [faults.pod_kill(ctx.target, p.name, p.namespace).summary for p in chosen]
    return {"pods": [p.to_json() for p in chosen], "candidates": candidates, "summary": "; ".join(done)}


# ---- nodes and components ------------------------------------------------------------------------

def _node_pods(ctx: ActionContext, step: PlannedAction) -> list[PodInfo]:
    """The pods on the action's node now: what noTrafficTo means by this action."""
    node = step.action.node
    pods = ctx.pods.add(p for p in ctx.live.list("Pod", "", fields=f"spec.nodeName={node}") if active(p))
    ctx.picks[step.position] = pods
    return pods


def _node_fault(fn: Callable[..., Any], records_pods: bool) -> Executor:
    def run(ctx: ActionContext, step: PlannedAction) -> dict:
        pods = _node_pods(ctx, step) if records_pods else None
        out = _summary(fn(ctx.target, step.action.node))
        if pods is not None:
            out["pods"] = [p.name for p in pods]
        return out
    return run


def _component(fn: Callable[..., Any]) -> Executor:
    def run(ctx: ActionContext, step: PlannedAction) -> dict:
        return _summary(fn(ctx.target, step.action.component, step.action.node))
    return run


# ---- network ---------------------------------------------------------------------------------------

def link_flap(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.LinkFlap = step.action
    return _summary(faults.link_flap(ctx.target, action.target, action.count, action.interval))


def partition(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Partition = step.action
    return _summary(faults.partition(ctx.target, [list(g) for g in action.groups], action.direction, action.mode))


def loss(ctx: ActionContext, step: PlannedAction) -> dict:
    return _summary(faults.loss(ctx.target, step.action.target, step.action.percent))


def bandwidth(ctx: ActionContext, step: PlannedAction) -> dict:
    return _summary(faults.bandwidth(ctx.target, step.action.target, step.action.rate))


def delay(ctx: ActionContext, step: PlannedAction) -> dict:
    action: A.Delay = step.action
    return _summary(faults.delay(ctx.target, action.target, action.delay, action.jitter))


def _on(fn: Callable[..., Any], key: str) -> Executor:
    """A fault taking one host argument, read from the action's `key`."""
    def run(ctx: ActionContext, step: PlannedAction) -> dict:
        return _summary(fn(ctx.target, getattr(step.action, key)))
    return run


def dns_error(ctx: ActionContext, step: PlannedAction) -> dict:
    return _summary(faults.dns_error(ctx.target, step.action.names, step.action.rcode))


def heal(ctx: ActionContext, step: PlannedAction) -> dict:
    return _summary(faults.heal(ctx.target))


EXECUTORS: dict[str, Executor] = {
    "apply": apply, "delete": delete, "scale": scale, "rollout": rollout,
    "pod-delete": pod_delete, "pod-kill": pod_kill,
    "node-crash": _node_fault(faults.node_crash, records_pods=True),
    "node-recover": _node_fault(faults.node_recover, records_pods=False),
    "node-freeze": _node_fault(faults.node_freeze, records_pods=True),
    "node-thaw": _node_fault(faults.node_thaw, records_pods=False),
    "component-kill": _component(faults.component_kill),
    "component-stop": _component(faults.component_stop),
    "component-start": _component(faults.component_start),
    "link-down": _on(faults.link_down, "target"), "link-up": _on(faults.link_up, "target"), "link-flap": link_flap,
    "partition": partition, "heal": heal, "loss": loss, "bandwidth": bandwidth, "delay": delay,
    "flush-rules": _on(faults.flush_rules, "node"), "flush-conntrack": _on(faults.flush_conntrack, "node"),
    "dns-error": dns_error,
}
assert set(EXECUTORS) == set(A.ACTIONS), set(A.ACTIONS) ^ set(EXECUTORS)
