"""The durable object store: every object and a bounded history of changes in SQLite.

One global revision numbers every change, as etcd's does; an object's
metadata.resourceVersion is the revision of its last change. The history table
lets a watch resume from any revision still retained. SQLite runs in WAL mode
with synchronous=NORMAL: a commit is durable against the process being killed
(kill -9), though not against the machine losing power.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from google.protobuf.message import Message

from testbed.api.kinds import BY_NAME, kind_of
from testbed.api.v1 import api_pb2 as pb

Key = tuple[str, str, str]  # (kind, namespace, name)

ADDED, MODIFIED, DELETED, BOOKMARK = "ADDED", "MODIFIED", "DELETED", "BOOKMARK"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    revision INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY, type TEXT NOT NULL,
    kind TEXT NOT NULL, data BLOB NOT NULL, prev BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class Event:
    """One change: the object after it (for DELETED, its last state) and before it."""

    revision: int
    type: str
    obj: Message
    prev: Message | None = None
    _encoded: bytes | None = field(default=None, repr=False)

    def encoded(self) -> bytes:
        """This event as one element of a WatchBatch, encoded once for every watcher."""
        if self._encoded is None:
            self._encoded = encode_event(self.type, self.obj, self.revision)
        return self._encoded


def encode_event(event_type: str, obj: Message | None, revision: int) -> bytes:
    batch = pb.WatchBatch()
    event = batch.events.add(type=event_type, resource_version=str(revision))
    if obj is not None:
        getattr(event.object, kind_of(obj).field).CopyFrom(obj)
    return batch.SerializeToString()


class HistoryExpired(Exception):
    """The requested revision is older than the retained history."""


class Store:
    """Objects in memory, every change also in SQLite; writes happen inside transaction().

    A transaction commits once for all the writes made in it (group commit);
    if the commit fails, the in-memory state is rolled back too.
    """

    def __init__(self, path: Path, history_limit: int = 100_000) -> None:
        self._path = path
        self._history_limit = history_limit
        self._db: sqlite3.Connection | None = None
        self._objects: dict[Key, Message] = {}
        self.revision = 0
        self.oldest_revision = 0  # events after this revision are retained
        self._undo: list[tuple[Key, Message | None]] | None = None  # set while a transaction is open

    def open(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        for kind, namespace, name, data in db.execute("SELECT kind, namespace, name, data FROM objects"):
            self._objects[(kind, namespace, name)] = _decode(kind, data)
        row = db.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()
        self.oldest_revision = row[0] if row else 0
        row = db.execute("SELECT MAX(revision) FROM events").fetchone()
        self.revision = max(row[0] or 0, self.oldest_revision)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------ reads

    def get(self, key: Key) -> Message | None:
        return self._objects.get(key)

    def list(self, kind: str, namespace: str = "") -> list[Message]:
        return [
            obj
            for (k, ns, _), obj in sorted(self._objects.items())
            if k == kind and (not namespace or ns == namespace)
        ]

    def all_objects(self) -> list[Message]:
        return [obj for _, obj in sorted(self._objects.items())]

    def events_since(self, revision: int) -> list[Event]:
        """Every retained event after `revision`, in order."""
        if revision < self.oldest_revision:
            raise HistoryExpired(revision)
        assert self._db is not None
        rows = self._db.execute(
            "SELECT revision, type, kind, data, prev FROM events WHERE revision > ? ORDER BY revision",
            (revision,),
        )
        return [
            Event(rev, etype, _decode(kind, data), _decode(kind, prev) if prev else None)
            for rev, etype, kind, data, prev in rows
        ]

    # ------------------------------------------------------------ writes

    @contextmanager
    def transaction(self) -> Iterator[None]:
        assert self._db is not None and self._undo is None, "transactions do not nest"
        revision_before = self.revision
        self._undo = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._compact()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            for key, prev in reversed(self._undo):
                if prev is None:
                    self._objects.pop(key, None)
                else:
                    self._objects[key] = prev
            self.revision = revision_before
            raise
        finally:
            self._undo = None

    def put(self, obj: Message) -> Event:
        """Create or replace an object; stamps and returns it at the new revision."""
        key = _key(obj)
        prev = self._objects.get(key)
        revision = self._next_revision()
        obj.metadata.resource_version = str(revision)
        data = obj.SerializeToString()
        db = self._db
        db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)", (*key, revision, data))
        event_type = ADDED if prev is None else MODIFIED
        self._record(revision, event_type, key, data, prev)
        self._objects[key] = obj
        return Event(revision, event_type, obj, prev)

    def delete(self, key: Key) -> Event:
        prev = self._objects[key]
        revision = self._next_revision()
        final = type(prev)()
        final.CopyFrom(prev)
        final.metadata.resource_version = str(revision)
        self._db.execute("DELETE FROM objects WHERE kind=? AND namespace=? AND name=?", key)
        self._record(revision, DELETED, key, final.SerializeToString(), prev)
        del self._objects[key]
        return Event(revision, DELETED, final, prev)

    def _next_revision(self) -> int:
        if self._undo is None:
            raise RuntimeError("store writes must happen inside Store.transaction()")
        self.revision += 1
        return self.revision

    def _record(self, revision: int, event_type: str, key: Key, data: bytes, prev: Message | None) -> None:
        self._db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            (revision, event_type, key[0], data, prev.SerializeToString() if prev is not None else None),
        )
        self._undo.append((key, prev))

    def _compact(self) -> None:
        """Drop history older than history_limit revisions (checked every 1,000 revisions)."""
        compact_to = self.revision - self._history_limit
        if compact_to - self.oldest_revision < 1000:
            return
        self._db.execute("DELETE FROM events WHERE revision <= ?", (compact_to,))
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('compacted', ?)", (compact_to,))
        self.oldest_revision = compact_to


def _key(obj: Message) -> Key:
    return (kind_of(obj).name, obj.metadata.namespace, obj.metadata.name)


def _decode(kind: str, data: bytes) -> Message:
    msg = BY_NAME[kind].message()
    msg.ParseFromString(data)
    return msg
