"""Reading a scenario file: YAML with line marks, the models, the whole-file checks, and every
problem reported at once as `file:line: field.path: message`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from testbed.manifest_yaml import ManifestLoader, YamlProblem
from testbed.scenario.actions import ACTIONS
from testbed.scenario.base import allowed_keys
from testbed.scenario.checks import Parts, check
from testbed.scenario.kernel import KernelFeatures
from testbed.scenario.model import Scenario

Loc = tuple[Union[str, int], ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str  # "timeline[0].node"; "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path + ': ' if self.path else ''}{self.message}"


class ScenarioError(ValueError):
    """A scenario file that cannot run; problems lists every reason, str() one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def load_scenario(path: str | Path, kernel: KernelFeatures | None = None) -> Scenario:
    """The scenario in path, checked completely; ScenarioError listing every problem.
    kernel: what the kernel offers (delay needs netem, proxy mode ipvs IPVS); detected by default."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(name, 1, "", f"cannot read it: {exc}")]) from None
    data, marks = _parse_yaml(text, name)
    if not isinstance(data, dict):
        raise ScenarioError([Problem(name, 1, "", "want a mapping of keys (name, duration, traffic, timeline, ...)")])
    problems: list[tuple[Loc, str]] = []
    scenario = None
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        problems += [_from_pydantic(error, data) for error in exc.errors(include_url=False)]
    problems += [(p.path, p.message) for p in check(Parts.of(data), path.parent, kernel or KernelFeatures.detect())]
    if problems:
        located = {Problem(name, _line(marks, loc), _dotted(loc), message) for loc, message in problems}
        raise ScenarioError(sorted(located, key=lambda p: (p.line, p.path, p.message)))
    scenario._path = path
    return scenario


# ---------------------------------------------------------------------- YAML with lines


def _parse_yaml(text: str, name: str) -> tuple[Any, dict[Loc, int]]:
    loader = ManifestLoader(text, name)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except YamlProblem as exc:
        raise ScenarioError([Problem(name, exc.line or 1, "", exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ScenarioError([Problem(name, line, "", f"invalid YAML: {exc.problem or exc.context}")]) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ScenarioError([Problem(name, 1, "", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    marks: dict[Loc, int] = {}
    if node is not None:
        _mark(node, (), marks)
    return data, marks


def _mark(node: Node, loc: Loc, marks: dict[Loc, int]) -> None:
    """Line of every key and list item (the key's own line for a mapping's value), iteratively."""
    stack = [(node, loc, node.start_mark.line + 1)]
    while stack:
        node, loc, line = stack.pop()
        marks.setdefault(loc, line)
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, ScalarNode):
                    stack.append((value, loc + (key.value,), key.start_mark.line + 1))
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, loc + (i,), item.start_mark.line + 1))


def _line(marks: dict[Loc, int], loc: Loc) -> int:
    while loc not in marks and loc:
        loc = loc[:-1]
    return marks.get(loc, 1)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


# ---------------------------------------------------------------------- pydantic's errors, in the file's words


def _from_pydantic(error: dict, data: Any) -> tuple[Loc, str]:
    loc = _data_loc(error["loc"], data, missing=error["type"] == "missing")
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(Scenario, error["loc"][:-1])
        allowed = f" (allowed: {', '.join(allowed_keys(model))})" if model else ""
        return loc, f"unknown key{allowed}"
    if kind == "missing":
        return loc, "required"
    if kind == "union_tag_invalid":
        return loc + ("action",), f"unknown action {ctx.get('tag')!r} (known: {_unquote(ctx.get('expected_tags', ''))})"
    if kind == "union_tag_not_found":
        return loc, f"which action? give action: ({_unquote(_tags())})"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "value_error":
        loc, message = _at_key_named(loc, error["loc"], data, message)
    value = error.get("input")
    if kind not in ("value_error", "assertion_error") and isinstance(value, (str, int, float)):
        message += f" (got {value!r})"
    return loc, message


def _at_key_named(loc: Loc, pydantic_loc: tuple, data: Any, message: str) -> tuple[Loc, str]:
    """A model's own check that starts with one of its keys ("to: ...") is that key's problem."""
    key, sep, rest = message.partition(": ")
    model = _model_at(Scenario, pydantic_loc)
    value = _value_at(data, loc)
    if sep and model and key in allowed_keys(model) and isinstance(value, dict) and key in value:
        return loc + (key,), rest
    return loc, message


def _value_at(data: Any, loc: Loc) -> Any:
    for part in loc:
        data = data[part]
    return data


def _data_loc(loc: tuple, data: Any, missing: bool) -> Loc:
    """pydantic's loc as keys and positions of the file: union tags (the action's kind) and
    validator names are dropped; a missing key's name is kept."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            out.append(part)
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            out.append(part)
            data = data[part]
        elif missing and i == len(loc) - 1:
            out.append(part)
    return tuple(out)


def _model_at(model: Any, loc: tuple) -> type[BaseModel] | None:
    """The model that validates the mapping at pydantic loc (from the Scenario down)."""
    tp = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            if part not in fields:
                return None
            tp = fields[part].annotation
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        elif get_origin(tp) is Union:
            members = [m for m in get_args(tp) if _tag(m) == part]
            if not members:
                return None
            tp = members[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X."""
    while True:
        if hasattr(tp, "__metadata__"):
            tp = get_args(tp)[0]
            continue
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (Union, type(int | None)) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _tag(model: Any) -> str | None:
    return getattr(model, "kind", None) if isinstance(model, type) else None


def _tags() -> str:
    return ", ".join(ACTIONS)


def _unquote(text: str) -> str:
    return text.replace("'", "")
