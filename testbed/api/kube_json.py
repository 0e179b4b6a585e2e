"""Convert between API objects and Kubernetes-shaped JSON/YAML dictionaries.

Field names follow the proto's json_name, which spells them as Kubernetes does
(spec.clusterIP, status.podIP). IntOrString fields become a plain int or str.
Reading a manifest collects unknown fields as warnings instead of failing, the
way kubectl warns about them.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from testbed.api.errors import brief, clip
from testbed.api.kinds import Kind, kind_of
from testbed.api.v1 import api_pb2 as pb

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
}
_INT_OR_STRING = pb.IntOrString.DESCRIPTOR.full_name


class ManifestError(ValueError):
    """A manifest value has the wrong type; the message names the field."""


def _invalid(path: str, value: Any, detail: str) -> ManifestError:
    """The refusal of a value, naming its field; neither is echoed at unbounded length."""
    return ManifestError(f"{clip(path)}: Invalid value: {brief(value)}: {detail}")


def to_dict(obj: Message) -> dict[str, Any]:
    """An API object as kubectl prints it with -o json (apiVersion and kind first)."""
    kind = kind_of(obj)
    return {"apiVersion": kind.api_version, "kind": kind.name, **_message_to_dict(obj)}


def _message_to_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        out[field.json_name] = _value_to_json(field, value)
    return out


def _value_to_json(field: FieldDescriptor, value: Any) -> Any:
    if _is_map(field):
        value_field = field.message_type.fields_by_name["value"]
        return {k: _scalar_or_message(value_field, v) for k, v in sorted(value.items())}
    if field.is_repeated:
        return [_scalar_or_message(field, v) for v in value]
    return _scalar_or_message(field, value)


def _scalar_or_message(field: FieldDescriptor, value: Any) -> Any:
    if field.type != FieldDescriptor.TYPE_MESSAGE:
        return value
    if field.message_type.full_name == _INT_OR_STRING:
        return int_or_string(value)
    return _message_to_dict(value)


def int_or_string(value: pb.IntOrString) -> int | str | None:
    which = value.WhichOneof("value")
    return None if which is None else getattr(value, which)


def from_dict(data: dict[str, Any], kind: Kind) -> tuple[Message, list[str]]:
    """Build an object of `kind` from a manifest; returns it and the unknown-field warnings."""
    body = {k: v for k, v in data.items() if k not in ("apiVersion", "kind")}
    warnings: list[str] = []
    msg = kind.message()
    _fill(msg, body, "", warnings)
    return msg, warnings


def _fill(msg: Message, data: Any, path: str, warnings: list[str]) -> None:
    if not isinstance(data, dict):
        raise _invalid(path or "<root>", data, "must be an object")
    descriptor: Descriptor = msg.DESCRIPTOR
    by_json = {f.json_name: f for f in descriptor.fields}
    for key, value in data.items():
        field_path = f"{path}.{key}" if path else str(key)
        field = by_json.get(key) or descriptor.fields_by_name.get(key)
        if field is None:
            warnings.append(f'unknown field "{clip(field_path)}"')
            continue
        if value is None:
            continue
        _set_field(msg, field, value, field_path, warnings)


def _set_field(msg: Message, field: FieldDescriptor, value: Any, path: str, warnings: list[str]) -> None:
    if _is_map(field):
        if not isinstance(value, dict):
            raise _invalid(path, value, "must be a map of strings")
        target = getattr(msg, field.name)
        for k, v in value.items():
            target[str(k)] = _coerce_scalar(field.message_type.fields_by_name["value"], v, f"{path}.{k}")
        return
    if field.is_repeated:
        if not isinstance(value, list):
            raise _invalid(path, value, "must be a list")
        target = getattr(msg, field.name)
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _fill_message(target.add(), field, item, item_path, warnings)
            else:
                target.append(_coerce_scalar(field, item, item_path))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _fill_message(getattr(msg, field.name), field, value, path, warnings)
        return
    setattr(msg, field.name, _coerce_scalar(field, value, path))


def _fill_message(target: Message, field: FieldDescriptor, value: Any, path: str, warnings: list[str]) -> None:
    if field.message_type.full_name == _INT_OR_STRING:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _invalid(path, value, "must be an integer or a string")
        if isinstance(value, int):
            target.int_val = value
        else:
            target.str_val = value
        return
    target.SetInParent()
    _fill(target, value, path, warnings)


def _coerce_scalar(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.type in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(path, value, "must be an integer")
        if not -(2**31) <= value < 2**31:
            raise _invalid(path, value, "out of range")
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise _invalid(path, value, "must be true or false")
        return value
    if field.type == FieldDescriptor.TYPE_STRING:
        if isinstance(value, (dict, list)):
            raise _invalid(path, value, "must be a string")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    raise ManifestError(f"{clip(path)}: unsupported field type")


def _is_map(field: FieldDescriptor) -> bool:
    return (
        field.is_repeated
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )
