"""YAML from users, read with the limits kubectl's YAML library (go-yaml) has.

PyYAML's safe loader, changed in four ways: nesting deeper than go-yaml's
10,000 levels is refused (PyYAML's own composer recurses, and dies of a
RecursionError some 500 levels down); a document whose aliases expand it far
beyond its text (a "billion laughs" bomb) is refused before anything walks the
expansion, by go-yaml's rule; an alias inside its own anchor is refused; and a
key set twice in one mapping is refused, naming the key and its line. Finding
stale simple keys is also made linear: PyYAML scans every open nesting level
for every token, which makes deep flow collections cost seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, MappingEndEvent, MappingStartEvent, ScalarEvent, SequenceEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.scanner import ScannerError

from testbed.api.errors import plain

MAX_DEPTH = 10_000  # go-yaml's max depth
#: Scalar bytes a document may expand to through aliases (its own text aside); go-yaml counts
#: only nodes, which lets a few aliases of one long string expand to gigabytes.
MAX_ALIASED_BYTES = 64 * 1024 * 1024
_MERGE = "tag:yaml.org,2002:merge"


class YamlProblem(yaml.YAMLError):
    """A document refused by one of these limits; line is 1-based, None for the whole document."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


@dataclass
class Size:
    """What a node expands to: nodes (as go-yaml counts them), those reached through an alias,
    and scalar bytes."""

    nodes: int = 1
    aliased: int = 0
    bytes: int = 0

    def add(self, other: "Size") -> None:
        self.nodes += other.nodes
        self.aliased += other.aliased
        self.bytes += other.bytes


def allowed_alias_ratio(nodes: int) -> float:
    """go-yaml's share of a document's nodes that may come from aliases: 99% up to 400,000
    nodes, falling to 10% at 4,000,000."""
    low, high = 400_000, 4_000_000
    if nodes <= low:
        return 0.99
    if nodes >= high:
        return 0.10
    return 0.99 - 0.89 * (nodes - low) / (high - low)


def check_aliasing(size: Size) -> None:
    excessive = size.aliased > 100 and size.nodes > 1000 and size.aliased / size.nodes > allowed_alias_ratio(size.nodes)
    if excessive or (size.aliased and size.bytes > MAX_ALIASED_BYTES):
        raise YamlProblem("document contains excessive aliasing")


@dataclass
class _Open:
    """A sequence or mapping being composed."""

    node: Node
    size: Size = field(default_factory=Size)
    key: Node | None = None  # a mapping's key, waiting for its value
    keys: dict[tuple[str, str], int] = field(default_factory=dict)  # scalar keys seen -> their line

    def add(self, child: Node, size: Size) -> None:
        self.size.add(size)
        if isinstance(self.node, SequenceNode):
            self.node.value.append(child)
        elif self.key is None:
            self._check_key(child)
            self.key = child
        else:
            self.node.value.append((self.key, child))
            self.key = None

    def _check_key(self, key: Node) -> None:
        if not isinstance(key, ScalarNode) or key.tag == _MERGE:
            return
        line = key.start_mark.line + 1
        if (key.tag, key.value) in self.keys:
            raise YamlProblem(f"key {plain(json.dumps(key.value))} already set in map", line)
        self.keys[(key.tag, key.value)] = line


class ManifestLoader(yaml.SafeLoader):
    def __init__(self, stream: str, name: str) -> None:
        super().__init__(stream)
        self.name = name  # marks in PyYAML's own errors name the file
        self._sizes: dict[int, Size] = {}  # anchored nodes, once composed
        self._composing: set[int] = set()  # anchored nodes still open

    # ---------------------------------------------------------------- composing, without recursion

    def compose_document(self) -> Node:
        self.get_event()  # DOCUMENT-START
        node, size = self._compose()
        self.get_event()  # DOCUMENT-END
        self.anchors, self._sizes, self._composing = {}, {}, set()
        check_aliasing(size)
        return node

    def compose_node(self, parent: Node | None, index: object) -> Node:
        return self._compose()[0]

    def _compose(self) -> tuple[Node, Size]:
        stack: list[_Open] = []
        while True:
            if stack and self.check_event(SequenceEndEvent, MappingEndEvent):
                node, size = self._close(stack.pop())
            else:
                started = self._start()
                if isinstance(started, _Open):
                    if len(stack) >= MAX_DEPTH:
                        raise YamlProblem(f"exceeded max depth of {MAX_DEPTH}", started.node.start_mark.line + 1)
                    stack.append(started)
                    continue
                node, size = started
            if not stack:
                return node, size
            stack[-1].add(node, size)

    def _start(self) -> _Open | tuple[Node, Size]:
        """The next node: a scalar or an alias whole, or a collection opened."""
        if self.check_event(AliasEvent):
            return self._alias(self.get_event())
        event = self.peek_event()
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise ComposerError(f"found duplicate anchor {plain(anchor)!r}; first occurrence",
                                self.anchors[anchor].start_mark, "second occurrence", event.start_mark)
        if self.check_event(ScalarEvent):
            node = self.compose_scalar_node(anchor)
            size = Size(bytes=len(node.value))
            if anchor is not None:
                self._sizes[id(node)] = size
            return node, size
        event = self.get_event()
        kind = MappingNode if isinstance(event, MappingStartEvent) else SequenceNode
        tag = event.tag if event.tag not in (None, "!") else self.resolve(kind, None, event.implicit)
        node = kind(tag, [], event.start_mark, None, flow_style=event.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
            self._composing.add(id(node))
        return _Open(node)

    def _alias(self, event: AliasEvent) -> tuple[Node, Size]:
        target = self.anchors.get(event.anchor)
        if target is None:
            raise ComposerError(None, None, f"found undefined alias {plain(event.anchor)!r}", event.start_mark)
        if id(target) in self._composing:
            raise YamlProblem(f"anchor {plain(event.anchor)!r} value contains itself", event.start_mark.line + 1)
        target_size = self._sizes[id(target)]
        return target, Size(1 + target_size.nodes, target_size.nodes, target_size.bytes)

    def _close(self, done: _Open) -> tuple[Node, Size]:
        done.node.end_mark = self.get_event().end_mark
        if id(done.node) in self._composing:
            self._composing.discard(id(done.node))
            self._sizes[id(done.node)] = done.size
        return done.node, done.size

    # ---------------------------------------------------------------- simple keys, in linear time

    def next_possible_simple_key(self) -> int | None:
        # Keys are saved in token order (saving one first removes its level's old one),
        # so the first is the nearest.
        for key in self.possible_simple_keys.values():
            return key.token_number
        return None

    def stale_possible_simple_keys(self) -> None:
        # Saved in order of position: once one is fresh (this line, within 1024 characters),
        # every later one is too.
        keys = self.possible_simple_keys
        while keys:
            level, key = next(iter(keys.items()))
            if key.line == self.line and self.index - key.index <= 1024:
                return
            if key.required:
                raise ScannerError("while scanning a simple key", key.mark,
                                   "could not find expected ':'", self.get_mark())
            del keys[level]


def load_all(text: str, name: str) -> list[object]:
    """Every document of text (None for an empty one); yaml.YAMLError (YamlProblem for the limits
    above) for a bad one."""
    loader = ManifestLoader(text, name)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    finally:
        loader.dispose()
