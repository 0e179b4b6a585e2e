"""The kinds the API serves: names, short names and how each maps onto the proto."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from testbed.api.v1 import api_pb2 as pb


@dataclass(frozen=True)
class Kind:
    name: str  # "Service"
    api_version: str  # "v1"
    plural: str  # "services"
    short_names: tuple[str, ...]
    namespaced: bool
    field: str  # the Object oneof field: "service"
    message: type[Message]


KINDS: tuple[Kind, ...] = (
    Kind("Node", "v1", "nodes", ("no", "node"), False, "node", pb.Node),
    Kind("Pod", "v1", "pods", ("po", "pod"), True, "pod", pb.Pod),
    Kind("Deployment", "apps/v1", "deployments", ("deploy", "deployment"), True, "deployment", pb.Deployment),
    Kind("Service", "v1", "services", ("svc", "service"), True, "service", pb.Service),
    Kind(
        "EndpointSlice",
        "discovery.k8s.io/v1",
        "endpointslices",
        ("ep", "endpointslice", "endpoints"),
        True,
        "endpoint_slice",
        pb.EndpointSlice,
    ),
)

BY_NAME = {k.name: k for k in KINDS}
BY_FIELD = {k.field: k for k in KINDS}
_BY_ALIAS = {alias.lower(): k for k in KINDS for alias in (k.name, k.plural, *k.short_names)}


class UnknownKind(ValueError):
    pass


def kind_named(name: str) -> Kind:
    """Resolve a kind name, plural or short name the way kubectl does ("svc" -> Service)."""
    kind = BY_NAME.get(name) or _BY_ALIAS.get(name.lower())
    if kind is None:
        known = ", ".join(k.plural for k in KINDS)
        raise UnknownKind(f'the server doesn\'t have a resource type "{name}" (known: {known})')
    return kind


def wrap(obj: Message) -> pb.Object:
    """Put a typed object into the generic Object envelope."""
    kind = kind_of(obj)
    wrapped = pb.Object()
    getattr(wrapped, kind.field).CopyFrom(obj)
    return wrapped


def unwrap(wrapped: pb.Object) -> Message:
    field = wrapped.WhichOneof("kind")
    if field is None:
        raise ValueError("object envelope holds no object")
    return getattr(wrapped, field)


def kind_of(obj: Message) -> Kind:
    for kind in KINDS:
        if isinstance(obj, kind.message):
            return kind
    raise UnknownKind(f"not an API object: {type(obj).__name__}")


def kind_of_wrapped(wrapped: pb.Object) -> Kind:
    field = wrapped.WhichOneof("kind")
    if field is None:
        raise ValueError("object envelope holds no object")
    return BY_FIELD[field]


def key_of(obj: Message) -> tuple[str, str, str]:
    """(kind, namespace, name): an object's identity in the store."""
    return (kind_of(obj).name, obj.metadata.namespace, obj.metadata.name)
