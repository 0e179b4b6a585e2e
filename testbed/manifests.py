"""Reading Kubernetes YAML into API objects, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml
from google.protobuf.message import Message

from testbed.api.errors import clip, plain
from testbed.api.kinds import BY_NAME, KINDS, kind_of
from testbed.api.kube_json import ManifestError, from_dict
from testbed.manifest_yaml import YamlProblem, load_all


class ManifestInvalid(ValueError):
    """One or more documents can't be used; the message lists every problem."""


@dataclass
class Manifest:
    objects: list[Message] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def read_source(source: str, stdin: bytes | str | None = None) -> str:
    """A manifest's text: a file's (or standard input's, for "-") bytes as UTF-8."""
    if source == "-":
        data = stdin if stdin is not None else b""
    else:
        path = Path(source)
        if not path.exists():
            raise ManifestInvalid(f'error: the path "{source}" does not exist')
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ManifestInvalid(f"error: error reading {source}: {exc.strerror}") from None
    return data if isinstance(data, str) else decode(data, _name(source))


def decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestInvalid(
            f"error: error parsing {name}:{line}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "manifests must be UTF-8 text"
        ) from None


def _name(source: str) -> str:
    return "STDIN" if source == "-" else source


def load_paths(sources: list[str], stdin: bytes | str | None = None, namespace: str = "") -> Manifest:
    """Every document of every file (or directory of .yaml files) given, or an error naming each bad one."""
    return merge(lambda source=source: parse(read_source(source, stdin), _name(source), namespace)
                 for source in _expand(sources))


def merge(loaders: Iterable[Callable[[], Manifest]]) -> Manifest:
    """What every loader returns, in order; ManifestInvalid listing every loader's problems."""
    manifest = Manifest()
    problems: list[str] = []
    for load in loaders:
        try:
            part = load()
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
    documents = [d for d in _documents(text, source) if d is not None]
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


def _documents(text: str, source: str) -> list[object]:
    try:
        return load_all(text, source)
    except YamlProblem as exc:
        where = f"{source}:{exc.line}" if exc.line else source
        raise ManifestInvalid(f"error: error parsing {where}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise ManifestInvalid(f"error: error parsing {source}: {clip(str(exc), 4096)}") from None
    except (RecursionError, ValueError) as exc:  # a merge chain too deep; an integer too long to convert
        raise ManifestInvalid(f"error: error parsing {source}: {clip(str(exc))}") from None


def object_of(doc: object, where: str = "<object>") -> tuple[Message, list[str]]:
    """One Kubernetes object given as a dict: the message and warnings on unknown fields;
    ManifestInvalid naming `where` and the bad field."""
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"error: {where}: not a Kubernetes object (expected a mapping with apiVersion and kind)")
    api_version, kind_name = doc.get("apiVersion"), doc.get("kind")
    if not api_version or not kind_name:
        missing = "apiVersion" if not api_version else "kind"
        raise ManifestInvalid(f"error: {where}: {missing} not set")
    kind = BY_NAME.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None or kind.api_version != api_version:
        supported = ", ".join(f"{k.api_version} {k.name}" for k in KINDS)
        raise ManifestInvalid(
            f'error: {where}: no matches for kind "{plain(kind_name)}" in version "{plain(api_version)}" '
            f"(svclab serves: {supported})"
        )
    try:
        return from_dict(doc, kind)
    except ManifestError as exc:
        name = (doc.get("metadata") or {}).get("name", "") if isinstance(doc.get("metadata"), dict) else ""
        raise ManifestInvalid(f'error: {where}: {kind.name} "{plain(name)}" is invalid: {exc}') from None
