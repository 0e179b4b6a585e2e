"""Reading Kubernetes YAML into API objects, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from google.protobuf.message import Message

from testbed.api.kinds import BY_NAME, KINDS, kind_of
from testbed.api.kube_json import ManifestError, from_dict


class ManifestInvalid(ValueError):
    """One or more documents can't be used; the message lists every problem."""


@dataclass
class Manifest:
    objects: list[Message] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_source(source: str, stdin_text: str | None = None) -> str:
    if source == "-":
        return stdin_text if stdin_text is not None else ""
    path = Path(source)
    if not path.exists():
        raise ManifestInvalid(f'the path "{source}" does not exist')
    return path.read_text()


def load_paths(sources: list[str], stdin_text: str | None = None, namespace: str = "") -> Manifest:
    """Every document of every file (or directory of .yaml files) given, or an error naming each bad one."""
    manifest = Manifest()
    problems: list[str] = []
    for source in _expand(sources):
        try:
            text = read_source(source, stdin_text)
            part = parse(text, "STDIN" if source == "-" else source, namespace)
        except ManifestInvalid as exc:
            problems.append(str(exc))
            continue
        manifest.objects += part.objects
        manifest.warnings += part.warnings
    if problems:
        raise ManifestInvalid("\n".join(problems))
    return manifest


def _expand(sources: list[str]) -> list[str]:
    out = []
    for source in sources:
        path = Path(source)
        if source != "-" and path.is_dir():
            out += sorted(str(p) for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
        else:
            out.append(source)
    return out


def parse(text: str, source: str = "<stdin>", namespace: str = "") -> Manifest:
    manifest = Manifest()
    problems: list[str] = []
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestInvalid(f"error parsing {source}: {exc}") from None
    for index, doc in enumerate(documents):
        where = f"{source} (document {index + 1})"
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items = doc["items"]
        else:
            items = [doc]
        for item in items:
            try:
                obj, warnings = object_of(item, where)
            except ManifestInvalid as exc:
                problems.append(str(exc))
                continue
            if namespace and kind_of(obj).namespaced and not obj.metadata.namespace:
                obj.metadata.namespace = namespace
            manifest.objects.append(obj)
            manifest.warnings += [f"{where}: {w}" for w in warnings]
    if problems:
        raise ManifestInvalid("\n".join(problems))
    return manifest


def object_of(doc: object, where: str = "<object>") -> tuple[Message, list[str]]:
    """One Kubernetes object given as a dict: the message and warnings on unknown fields;
    ManifestInvalid naming `where` and the bad field."""
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"error: {where}: not a Kubernetes object (expected a mapping with apiVersion and kind)")
    api_version, kind_name = doc.get("apiVersion"), doc.get("kind")
    if not api_version or not kind_name:
        missing = "apiVersion" if not api_version else "kind"
        raise ManifestInvalid(f"error: {where}: {missing} not set")
    kind = BY_NAME.get(str(kind_name))
    if kind is None or kind.api_version != api_version:
        supported = ", ".join(f"{k.api_version} {k.name}" for k in KINDS)
        raise ManifestInvalid(
            f'error: {where}: no matches for kind "{kind_name}" in version "{api_version}" '
            f"(svclab serves: {supported})"
        )
    try:
        return from_dict(doc, kind)
    except ManifestError as exc:
        name = (doc.get("metadata") or {}).get("name", "") if isinstance(doc.get("metadata"), dict) else ""
        raise ManifestInvalid(f'error: {where}: {kind.name} "{name}" is invalid: {exc}') from None
