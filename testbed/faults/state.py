"""Active faults, recorded in the cluster's state directory (faults.json).

Each fault that stays in force until it is undone (a partition, loss, a stopped component, a
frozen node, ...) is recorded with what undoing it takes, so `svclab fault list` shows it,
`svclab fault heal` and the matching recover/start/thaw undo it from any process, and
`svclab down`/`clean` continue what a fault stopped. Changes are serialised by an flock on
faults.lock: two `svclab fault` commands at once never lose each other's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

#: Faults that `heal` undoes (the network's); the others have their own way back.
NETWORK_KINDS = ("partition", "loss", "bandwidth", "delay", "link-down", "link-flap", "dns-error")


@dataclass
class Fault:
    """One fault: what was asked (params) and what undoing it takes (undo)."""

    kind: str
    params: dict[str, Any]
    id: str = ""  # "f3"; "" for a one-shot action that leaves nothing to undo (component-kill)
    created: float = field(default_factory=time.time)
    undo: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def network(self) -> bool:
        return self.kind in NETWORK_KINDS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class FaultStore:
    """faults.json of one cluster: {"next": N, "faults": [...]}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name("faults.lock")

    def load(self) -> list[Fault]:
        return [Fault(**item) for item in self._read()["faults"]]

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"next": 1, "faults": []}
        return {"next": int(data.get("next", 1)), "faults": list(data.get("faults", []))}

    @contextlib.contextmanager
    def changing(self) -> Iterator["Changes"]:
        """Hold the lock; the faults as a mutable list, written back when the block ends."""
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"no cluster state in {self.path.parent}")
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self._read()
            changes = Changes(data["next"], [Fault(**item) for item in data["faults"]])
            try:
                yield changes
            finally:  # what was done stays recorded, also when a later step failed
                self._write(changes)
        finally:
            os.close(fd)

    def _write(self, changes: "Changes") -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"next": changes.next_id, "faults": [f.to_json() for f in changes.faults]},
                                  indent=1))
        os.replace(tmp, self.path)


@dataclass
class Changes:
    next_id: int
    faults: list[Fault]

    def add(self, fault: Fault) -> Fault:
        fault.id = f"f{self.next_id}"
        self.next_id += 1
        self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        self.faults = [f for f in self.faults if f.id != fault.id]

    def find(self, kind: str, **params: Any) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and all(f.params.get(k) == v for k, v in params.items())]
