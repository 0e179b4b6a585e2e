"""`apply`: create or update a set of objects, all or nothing.

Every object is first written as a dry run, so a set with one bad object
changes nothing; if a real write still fails (another writer got in between),
the writes already made are undone.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from testbed.api.errors import ApiError, NotFound
from testbed.api.kinds import kind_of
from testbed.client.client import ApiClient


@dataclass
class Applied:
    obj: Message
    action: str  # created, configured, unchanged


class ApplyFailed(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


async def _current(client: ApiClient, obj: Message) -> Message | None:
    try:
        return await client.get(kind_of(obj).name, obj.metadata.name, obj.metadata.namespace)
    except NotFound:
        return None


async def apply_objects(client: ApiClient, objects: list[Message]) -> list[Applied]:
    problems: list[str] = []
    for obj in objects:
        existing = await _current(client, obj)
        try:
            if existing is None:
                await client.create(obj, dry_run=True)
            else:
                await client.update(_as_update(obj, existing), dry_run=True)
        except ApiError as exc:
            problems.append(f"Error from server: {exc.message}")
    if problems:
        raise ApplyFailed(problems)

    done: list[tuple[Applied, Message | None]] = []
    for obj in objects:
        existing = await _current(client, obj)  # again: an earlier object of this set may be the same one
        try:
            if existing is None:
                result = Applied(await client.create(obj), "created")
            else:
                written = await client.update(_as_update(obj, existing))
                same = written.metadata.resource_version == existing.metadata.resource_version
                result = Applied(written, "unchanged" if same else "configured")
        except ApiError as exc:
            await _undo(client, done)
            raise ApplyFailed([f"Error from server: {exc.message}", "(earlier changes of this apply were undone)"])
        done.append((result, existing))
    return [applied for applied, _ in done]


def _as_update(obj: Message, existing: Message) -> Message:
    update = type(obj)()
    update.CopyFrom(obj)
    update.metadata.resource_version = existing.metadata.resource_version
    return update


async def _undo(client: ApiClient, done: list[tuple[Applied, Message | None]]) -> None:
    for applied, previous in reversed(done):
        kind = kind_of(applied.obj).name
        try:
            if previous is None:
                await client.delete(kind, applied.obj.metadata.name, applied.obj.metadata.namespace, grace_period=0)
            elif applied.action == "configured":
                restore = type(previous)()
                restore.CopyFrom(previous)
                restore.metadata.resource_version = ""
                await client.update(restore)
        except ApiError:
            pass
