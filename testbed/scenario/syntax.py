"""The small languages inside a scenario's strings: time references ("crash+15s"), windows,
hosts ("node2", "client", "pod:app=web"), `when:` conditions and address templates.

Each parser raises ValueError naming what is wrong; whether a name exists (an action, a node
beyond cluster.nodes) is checked later, against the whole file (testbed/scenario/checks.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from testbed.api.selectors import SelectorError, parse_label_selector
from testbed.scenario.base import parsed, text_type
from testbed.scenario.units import Comparison, format_duration, parse_duration

#: Window anchors that are not actions.
START, END = "start", "end"
#: An action's (or generator's) name: letters, digits and - _ . ; not a time and not "start"/"end".
NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_OFFSET = re.compile(r"^(?P<anchor>.+?)\s*(?P<sign>[+-])\s*(?P<offset>\d+(?:\.\d+)?(?:ms|s|m|h)(?:\d+(?:\.\d+)?(?:ms|s|m|h))*)$")
NODE = re.compile(r"^node([1-9][0-9]*)$")
CLIENT = "client"


def check_name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '-', '_' and '.'")
    if value in (START, END):
        raise ValueError(f"invalid {what} {value!r}: start and end name the scenario's own bounds")
    if _OFFSET.match(value) or _is_time(value):
        raise ValueError(f"invalid {what} {value!r}: it reads as a time or a name plus an offset")
    return value


def _is_time(text: str) -> bool:
    try:
        parse_duration(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class TimeRef:
    """A moment: `anchor` is "start", "end" or an action's name (or its kind, when only one
    action has that kind), plus `offset` seconds (negative before it). "10s" is start+10s."""

    anchor: str
    offset: float
    text: str

    @classmethod
    def parse(cls, value: Any, allow_bounds: bool = True) -> "TimeRef":
        """allow_bounds=False: an action reference only, as `after:` takes it."""
        if isinstance(value, TimeRef):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, str) and _is_time(value):
            if not allow_bounds:
                raise ValueError(f"invalid reference {value!r}: after: names an action (use at: for a time)")
            return cls(START, parse_duration(value), format_duration(parse_duration(value)))
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"invalid time reference {value!r} (e.g. crash, crash+2s, start, end-5s, 10s)")
        text = value.strip()
        anchor, offset = text, 0.0
        if m := _OFFSET.match(text):
            anchor = m.group("anchor")
            offset = parse_duration(m.group("offset")) * (-1 if m.group("sign") == "-" else 1)
        if anchor in (START, END):
            if not allow_bounds:
                raise ValueError(f"invalid reference {value!r}: after: names an action (use at: for a time)")
        elif not NAME.match(anchor):
            raise ValueError(f"invalid time reference {value!r} (e.g. crash, crash+2s, start, end-5s, 10s)")
        return cls(anchor, offset, text)

    @property
    def names_action(self) -> bool:
        return self.anchor not in (START, END)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Window:
    """[from, to] of an assertion."""

    start: TimeRef
    end: TimeRef

    @classmethod
    def parse(cls, value: Any) -> "Window":
        if isinstance(value, Window):
            return value
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"invalid window {value!r}: want [from, to], e.g. [start, crash] or [crash+3s, end]")
        problems, points = [], []
        for which, point in zip(("from", "to"), value):
            try:
                points.append(TimeRef.parse(point))
            except ValueError as exc:
                problems.append(f"{which}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(*points)

    def as_list(self) -> list[str]:
        return [self.start.text, self.end.text]

    def __str__(self) -> str:
        return f"[{self.start}, {self.end}]"


WHOLE_RUN = Window(TimeRef(START, 0.0, START), TimeRef(END, 0.0, END))


def check_node(value: Any) -> str:
    if not isinstance(value, str) or not NODE.match(value):
        raise ValueError(f"invalid node {value!r}: nodes are node1, node2, ...")
    return value


def node_number(node: str) -> int | None:
    m = NODE.match(node)
    return int(m.group(1)) if m else None


def check_link_host(value: Any) -> str:
    """A host with a link of its own: a node or the client."""
    if value == CLIENT:
        return value
    if not isinstance(value, str) or not NODE.match(value):
        raise ValueError(f"invalid host {value!r}: want client or a node (node1, node2, ...)")
    return value


def check_selector(value: Any) -> str:
    """A label selector as kubectl -l takes it ("app=web", "app=web,tier!=db")."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"invalid label selector {value!r} (e.g. app=frontend)")
    try:
        parse_label_selector(value)
    except SelectorError as exc:
        raise ValueError(f"invalid label selector {value!r}: {exc}") from None
    return value


@dataclass(frozen=True)
class PodRef:
    """Pods by name or by label selector ("pod:<name>" / "pod:app=web" in host positions)."""

    name: str | None = None
    selector: str | None = None

    @classmethod
    def parse(cls, text: str) -> "PodRef":
        if any(c in text for c in "=!") or " in " in text or " notin " in text:
            return cls(selector=check_selector(text))
        if not re.match(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$", text):
            raise ValueError(f"invalid pod name {text!r}")
        return cls(name=text)

    def __str__(self) -> str:
        return f"pod:{self.name or self.selector}"


@dataclass(frozen=True)
class Host:
    """Where traffic comes from or goes to: the client, a node, or pods ("pod:<name or selector>")."""

    kind: str  # "client" | "node" | "pod" | "action"
    node: str | None = None
    pod: PodRef | None = None
    action: str | None = None  # the pods an action picked or the node it hit (noTrafficTo only)

    @classmethod
    def parse(cls, value: Any, allow_action: bool = False) -> "Host":
        if isinstance(value, Host):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"invalid host {value!r}: want client, a node (node1, ...) or pod:<name or selector>")
        text = value.strip()
        if text == CLIENT:
            return cls("client")
        if NODE.match(text):
            return cls("node", node=text)
        if text.startswith("pod:"):
            return cls("pod", pod=PodRef.parse(text[4:].strip()))
        if allow_action and NAME.match(text):
            return cls("action", action=text)
        what = ", or an action's name" if allow_action else ""
        raise ValueError(f"invalid host {value!r}: want client, a node (node1, ...), pod:<name> or pod:<label>=<value>{what}")

    def __str__(self) -> str:
        return {"client": CLIENT, "node": self.node, "action": self.action}.get(self.kind) or str(self.pod)


#: `when:` functions: name -> (takes an argument, has a numeric value)
CONDITIONS = {"endpoints": (True, True), "pods": (True, True), "readyNodes": (False, True), "converged": (None, False)}
_CONDITION = re.compile(r"^\s*(?P<fn>[A-Za-z]+)\s*\(\s*(?P<arg>[^()]*?)\s*\)\s*(?P<cmp>(?:>=|<=|==|!=|>|<).*)?$")


@dataclass(frozen=True)
class Condition:
    """A `when:` condition: endpoints(SERVICE) == 3 (its ready endpoints), pods(SELECTOR) >= 2
    (Ready pods), readyNodes() == 2, converged() / converged(node1) (kube-proxy applied the
    current Services and endpoints on every node / that node)."""

    function: str
    argument: str
    comparison: Comparison | None
    text: str

    @classmethod
    def parse(cls, value: Any) -> "Condition":
        if isinstance(value, Condition):
            return value
        m = _CONDITION.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(f"invalid condition {value!r} (e.g. \"endpoints(frontend-lb) == 3\", \"converged()\")")
        fn, arg, cmp = m.group("fn"), m.group("arg"), m.group("cmp")
        if fn not in CONDITIONS:
            raise ValueError(f"invalid condition {value!r}: unknown function {fn}() (known: "
                             f"{', '.join(f + '()' for f in CONDITIONS)})")
        takes, numeric = CONDITIONS[fn]
        if takes is True and not arg or takes is False and arg:
            raise ValueError(f"invalid condition {value!r}: {fn}() takes {'one argument' if takes else 'no argument'}")
        if numeric and not cmp:
            raise ValueError(f"invalid condition {value!r}: compare {fn}() with a number, e.g. {fn}(...) == 3")
        if not numeric and cmp:
            raise ValueError(f"invalid condition {value!r}: {fn}() is true or false, not a number")
        if fn == "pods":
            check_selector(arg)
        if fn == "converged" and arg:
            check_node(arg)
        comparison = Comparison.parse(cmp) if cmp else None
        if comparison and comparison.unit != "number":
            raise ValueError(f"invalid condition {value!r}: {fn}() counts, compare it with a whole number")
        return cls(fn, arg, comparison, value.strip())

    def __str__(self) -> str:
        return self.text


#: ${kind:argument} in addresses, resolved at run time from the cluster's objects.
TEMPLATE_KINDS = {
    "clusterIP": "a Service's ClusterIP",
    "nodeIP": "a node's address (node1, ...)",
    "nodePort": "a Service's nodePort (its first port, or ${nodePort:service:port-name})",
    "externalIP": "a LoadBalancer Service's external IP",
    "podIP": "a pod's address: a pod's name, a label selector (the first ready pod) or a pod-delete/pod-kill action's name",
}
TEMPLATE = re.compile(r"\$\{(?P<kind>[^:{}]*):(?P<arg>[^{}]*)\}")


@dataclass(frozen=True)
class Template:
    kind: str
    argument: str
    text: str  # "${kind:argument}"


def templates_in(text: str) -> list[Template]:
    """Every ${kind:argument} of text; ValueError for an unknown kind, an empty argument or a stray ${."""
    found = []
    for m in TEMPLATE.finditer(text):
        kind, arg = m.group("kind"), m.group("arg").strip()
        if kind not in TEMPLATE_KINDS:
            raise ValueError(f"unknown address template {m.group(0)!r} (known: "
                             f"{', '.join('${' + k + ':...}' for k in TEMPLATE_KINDS)})")
        if not arg:
            raise ValueError(f"address template {m.group(0)!r} names nothing (e.g. ${{{kind}:frontend-service}})")
        if kind == "nodeIP":
            check_node(arg)
        found.append(Template(kind, arg, m.group(0)))
    if "${" in TEMPLATE.sub("", text):
        raise ValueError(f"unfinished address template in {text!r}: write ${{kind:argument}}")
    return found


def substitute(text: str, resolve: Callable[[Template], str]) -> str:
    """text with each template replaced by resolve(template) (what the runner does at run time)."""
    return TEMPLATE.sub(lambda m: resolve(Template(m.group("kind"), m.group("arg").strip(), m.group(0))), text)


def _scenario_name(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", value):
        raise ValueError(f"invalid scenario name {value!r}: lower-case letters, digits and '-', at most 63")
    return value


def _after_ref(value: Any) -> TimeRef:
    return TimeRef.parse(value, allow_bounds=False)


def _target_pods(value: Any) -> Host:
    return Host.parse(value, allow_action=True)


def _address(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"invalid address {value!r}")
    templates_in(value)
    return value.strip()


#: Field types for models (kept as parsed objects, dumped back as the text they came from).
TimeRefValue = Annotated[TimeRef, *parsed(TimeRef.parse)]
AfterRef = Annotated[TimeRef, *parsed(_after_ref)]
WindowValue = Annotated[Window, *parsed(Window.parse, Window.as_list)]
HostValue = Annotated[Host, *parsed(Host.parse)]
PodsTarget = Annotated[Host, *parsed(_target_pods)]
ConditionValue = Annotated[Condition, *parsed(Condition.parse)]
NodeName = text_type(check_node)
LinkHost = text_type(check_link_host)
Selector = text_type(check_selector)
Name = text_type(check_name)
Address = text_type(_address)
ScenarioName = text_type(_scenario_name)
