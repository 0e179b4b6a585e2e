"""The durable object store: every object and a bounded history of changes in SQLite.

One global revision numbers every change, as etcd's does; an object's
metadata.resourceVersion is the revision of its last change. The history table
lets a watch resume from any revision still retained. SQLite runs in WAL mode
with synchronous=NORMAL: a commit is durable against the process being killed
(kill -9), though not against the machine losing power.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

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
    def __init__(self, path: Path, history_limit: int = 100_000) -> None:
        self._path = path
        self._history_limit = history_limit
        self._db: sqlite3.Connection | None = None
        self._objects: dict[Key, Message] = {}
        self.revision = 0
        self.oldest_revision = 0  # events after this revision are retained

    def open(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        for kind, namespace, name, data in db.execute("SELECT kind, namespace, name, data FROM objects"):
            self._objects[(kind, namespace, name)] = _decode(kind, data)
        row = db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        self.revision = row[0] if row else 0
        row = db.execute("SELECT value FROM meta WHERE key='compacted'").fetchone()
        self.oldest_revision = row[0] if row else 0

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

    def put(self, obj: Message) -> Event:
        """Create or replace an object; stamps and returns it at the new revision."""
        key = _key(obj)
        prev = self._objects.get(key)
        revision = self.revision + 1
        obj.metadata.resource_version = str(revision)
        data = obj.SerializeToString()
        self._write(
            revision,
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
            (*key, revision, data),
            ADDED if prev is None else MODIFIED,
            key[0],
            data,
            prev,
        )
        self._objects[key] = obj
        return Event(revision, ADDED if prev is None else MODIFIED, obj, prev)

    def delete(self, key: Key) -> Event:
        prev = self._objects[key]
        revision = self.revision + 1
        final = type(prev)()
        final.CopyFrom(prev)
        final.metadata.resource_version = str(revision)
        self._write(
            revision,
            "DELETE FROM objects WHERE kind=? AND namespace=? AND name=?",
            key,
            DELETED,
            key[0],
            final.SerializeToString(),
            prev,
        )
        del self._objects[key]
        return Event(revision, DELETED, final, prev)

    def _write(
        self,
        revision: int,
        sql: str,
        args: tuple,
        event_type: str,
        kind: str,
        data: bytes,
        prev: Message | None,
    ) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(sql, args)
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (revision, event_type, kind, data, prev.SerializeToString() if prev is not None else None),
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', ?)", (revision,))
            compact_to = revision - self._history_limit
            if compact_to > self.oldest_revision and revision % 1000 == 0:
                db.execute("DELETE FROM events WHERE revision <= ?", (compact_to,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('compacted', ?)", (compact_to,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.revision = revision
        if compact_to > self.oldest_revision and revision % 1000 == 0:
            self.oldest_revision = compact_to


def _key(obj: Message) -> Key:
    return (kind_of(obj).name, obj.metadata.namespace, obj.metadata.name)


def _decode(kind: str, data: bytes) -> Message:
    msg = BY_NAME[kind].message()
    msg.ParseFromString(data)
    return msg
