"""Request records: one JSON line per request a generator made, read back whole or as they come.

A line: {"t": 12.3051, "outcome": "ok", "latency_ms": 3.41, "pod": "web-7c9f-x2kqp",
"node": "node2", "client": "172.18.0.3:40312", "source": "203.0.113.2:51234", "conn": 17,
"error": ""}. `t` is when the request started, in seconds after the scenario's t0;
`client` is the address the pod saw, `source` the generator's own (local) address of the
connection, `conn` the connection's number within its generator (new connections: one per
request; keepalive: the same number while a connection is reused).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Record:
    t: float
    outcome: str
    latency_ms: float
    pod: str = ""
    node: str = ""
    client: str = ""
    source: str = ""
    conn: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_json(self) -> dict:
        return asdict(self)


def parse_lines(lines: Iterable[str]) -> list[Record]:
    return [Record.from_json(json.loads(line)) for line in lines if line.strip()]


def load_records(path: Path | str) -> list[Record]:
    """Every complete record of a file, by start time (a line still being written is left out)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    complete = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
    return sorted(parse_lines(complete.splitlines()), key=lambda r: r.t)


class RecordTail:
    """Reads a records file as it grows: each call returns the records completed since the last."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[Record]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return parse_lines(data[:end].decode().splitlines())


@dataclass(frozen=True)
class Window:
    """[start, end) in seconds after t0, and how the scenario wrote it (e.g. "[crash+3s, end]").

    Half open: a request that starts at `end` belongs to the next window (as [start, crash]
    and [crash, end] share the crash's instant); no request starts at a run's own end."""

    start: float
    end: float
    label: str = ""

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"window {self.label or ''} ends ({self.end}) before it starts ({self.start})")

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end

    @property
    def text(self) -> str:
        span = f"[{self.start:.2f}s, {self.end:.2f}s]"
        return f"{self.label} = {span}" if self.label else span


def in_window(records: Iterable[Record], window: Window) -> list[Record]:
    """The records whose request started inside the window, by start time."""
    return sorted((r for r in records if window.holds(r.t)), key=lambda r: r.t)


def outcome_counts(records: Iterable[Record]) -> dict[str, int]:
    return dict(Counter(r.outcome for r in records))


def answers_by_pod(records: Iterable[Record]) -> dict[str, int]:
    """Successful answers per answering pod."""
    return dict(Counter(r.pod for r in records if r.ok and r.pod))


def host_of(address: str) -> str:
    """The IP of "ip:port" ("" stays "")."""
    return address.rpartition(":")[0] if ":" in address else address
