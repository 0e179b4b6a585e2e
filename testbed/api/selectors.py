"""Label and field selectors, as kubectl's -l and --field-selector spell them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

from google.protobuf.message import Message

from testbed.api.v1 import api_pb2 as pb


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "=":
            return present and value == self.values[0]
        if self.operator == "!=":
            return not present or value != self.values[0]
        if self.operator == "in":
            return present and value in self.values
        if self.operator == "notin":
            return not present or value not in self.values
        if self.operator == "exists":
            return present
        return not present  # "!"


_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse "a=b,c!=d,e in (x,y),f,!g"."""
    requirements: list[Requirement] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            continue
        if m := _SET_RE.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(Requirement(m.group(1), m.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append(Requirement(key.strip(), "!=", (value.strip(),)))
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            requirements.append(Requirement(key.strip(), "=", (value.strip(),)))
        elif part.startswith("!"):
            requirements.append(Requirement(part[1:].strip(), "!"))
        elif re.fullmatch(r"[\w./-]+", part):
            requirements.append(Requirement(part, "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return tuple(requirements)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def labels_match(requirements: tuple[Requirement, ...], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in requirements)


def label_selector_requirements(selector: pb.LabelSelector) -> tuple[Requirement, ...]:
    """A LabelSelector message (matchLabels, matchExpressions) as requirements."""
    reqs = [Requirement(k, "=", (v,)) for k, v in sorted(selector.match_labels.items())]
    operators = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.match_expressions:
        if expr.operator not in operators:
            raise SelectorError(f"invalid operator {expr.operator!r}")
        reqs.append(Requirement(expr.key, operators[expr.operator], tuple(expr.values)))
    return tuple(reqs)


# Field selectors: the fields that can be selected on, per kind, as Kubernetes allows.
_FIELDS: dict[str, Callable[[Message], str]] = {
    "metadata.name": lambda o: o.metadata.name,
    "metadata.namespace": lambda o: o.metadata.namespace,
    "spec.nodeName": lambda o: o.spec.node_name if isinstance(o, pb.Pod) else "",
    "status.phase": lambda o: o.status.phase if isinstance(o, pb.Pod) else "",
    "spec.type": lambda o: o.spec.type if isinstance(o, pb.Service) else "",
}


def parse_field_selector(text: str) -> tuple[tuple[str, str, str], ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        op = "!=" if "!=" in part else "="
        field_name, value = part.split("!=" if op == "!=" else ("==" if "==" in part else "="), 1)
        field_name = field_name.strip()
        if field_name not in _FIELDS:
            raise SelectorError(f'field label not supported: {field_name} (supported: {", ".join(_FIELDS)})')
        out.append((field_name, op, value.strip()))
    return tuple(out)


def fields_match(requirements: tuple[tuple[str, str, str], ...], obj: Message) -> bool:
    for field_name, op, value in requirements:
        actual = _FIELDS[field_name](obj)
        if (actual == value) != (op == "="):
            return False
    return True


@dataclass(frozen=True)
class ObjectFilter:
    """Which objects a list or watch wants: kind, namespace, labels, fields."""

    kind: str = ""
    namespace: str = ""
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, kind: str, namespace: str, selectors: pb.Selectors) -> "ObjectFilter":
        return cls(
            kind,
            namespace,
            parse_label_selector(selectors.label_selector),
            parse_field_selector(selectors.field_selector),
        )

    @property
    def by_content(self) -> bool:
        """True when matching looks inside objects (labels or fields), not just at kind/namespace."""
        return bool(self.labels or self.fields)

    def matches(self, kind: str, obj: Message) -> bool:
        if self.kind and kind != self.kind:
            return False
        if self.namespace and obj.metadata.namespace != self.namespace:
            return False
        return labels_match(self.labels, obj.metadata.labels) and fields_match(self.fields, obj)
