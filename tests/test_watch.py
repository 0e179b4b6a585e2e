"""Watch: every event after a revision exactly once, in order; resumable; expiry is explicit."""

from __future__ import annotations

import asyncio

import pytest

from testbed.api.errors import Expired
from tests.builders import service
from tests.conftest import run

pytestmark = pytest.mark.unit


async def collect(client, count: int, timeout: float = 10, **watch_args) -> list:
    out = []

    async def consume():
        async for item in client.watch(**watch_args):
            if item.type != "BOOKMARK":
                out.append(item)
                if len(out) == count:
                    return

    await asyncio.wait_for(consume(), timeout)
    return out


def test_watch_from_a_revision_delivers_each_later_event_once_in_order(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            for i in range(20):
                await c.create(service(f"s{i}"))
            for i in range(0, 20, 2):
                await c.delete("Service", f"s{i}")
            events = await collect(c, 30, kind="Service", resource_version=start)
            revisions = [int(e.resource_version) for e in events]
            assert revisions == sorted(set(revisions)) and revisions[0] == int(start) + 1
            assert [e.type for e in events] == ["ADDED"] * 20 + ["DELETED"] * 10
            assert [e.obj.metadata.name for e in events[20:]] == [f"s{i}" for i in range(0, 20, 2)]
    run(scenario())


def test_watch_without_revision_starts_with_current_objects(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(service("a"))
            got = []

            async def consume():
                async for item in c.watch(kind="Service"):
                    got.append(item)
                    if item.type == "ADDED" and item.obj.metadata.name == "late":
                        return

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            await c.create(service("late"))
            await asyncio.wait_for(task, 10)
            types = [g.type for g in got]
            bookmark = types.index("BOOKMARK")  # marks the end of the initial state
            assert types[:bookmark] == ["ADDED", "ADDED"]
            assert {g.obj.metadata.name for g in got[:bookmark]} == {"kubernetes", "a"}
            assert got[-1].obj.metadata.name == "late"
    run(scenario())


def test_watch_resumes_after_reconnect_without_loss_or_duplicates(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            for i in range(5):
                await c.create(service(f"a{i}"))
            first = await collect(c, 5, kind="Service", resource_version=start)
            last = first[-1].resource_version
            # the client is gone; changes happen meanwhile
            for i in range(5):
                await c.create(service(f"b{i}"))
            second = await collect(c, 5, kind="Service", resource_version=last)
            assert [e.obj.metadata.name for e in second] == [f"b{i}" for i in range(5)]
    run(scenario())


def test_watch_resumes_after_server_kill_9(apiserver):
    async def before():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            for i in range(10):
                await c.create(service(f"a{i}"))
            events = await collect(c, 10, kind="Service", resource_version=start)
            return events[-1].resource_version

    last = run(before())
    apiserver.kill9()
    apiserver.start()

    async def after():
        async with apiserver.client() as c:
            for i in range(3):
                await c.create(service(f"b{i}"))
            events = await collect(c, 3, kind="Service", resource_version=last)
            assert [e.obj.metadata.name for e in events] == ["b0", "b1", "b2"]
            assert int(events[0].resource_version) == int(last) + 1
    run(after())


def test_too_old_revision_is_expired(make_apiserver):
    server = make_apiserver("--watch-history", "100")

    async def scenario():
        async with server.client() as c:
            for i in range(1100):  # compaction runs every 1000 revisions
                await c.create(service(f"s{i}"))
            with pytest.raises(Expired, match="too old resource version: 5 .*expired, relist"):
                await collect(c, 1, kind="Service", resource_version="5")
            # a recent revision still works
            _, now = await c.list("Service")
            await c.create(service("fresh"))
            events = await collect(c, 1, kind="Service", resource_version=str(int(now) - 50))
            assert events
    run(scenario())


def test_label_selector_watch_sees_objects_enter_and_leave(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            svc = await c.create(service("web"))
            svc.metadata.labels["tier"] = "front"
            svc = await c.update(svc)
            svc.metadata.labels["tier"] = "back"
            svc = await c.update(svc)
            await c.delete("Service", "web")
            events = await collect(c, 2, kind="Service", resource_version=start, label_selector="tier=front")
            assert [e.type for e in events] == ["ADDED", "DELETED"]
    run(scenario())


def test_watch_all_kinds_and_namespaces(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            a = service("a")
            a.metadata.namespace = "team-a"
            await c.create(a)
            await c.create(service("b"))
            events = await collect(c, 1, namespace="team-a", resource_version=start)
            assert events[0].obj.metadata.name == "a"
    run(scenario())


def test_fifty_watchers_all_see_every_event(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            watchers = [asyncio.create_task(collect(c, 100, 20, kind="Service", resource_version=start))
                        for _ in range(50)]
            for i in range(100):
                await c.create(service(f"s{i}"))
            results = await asyncio.gather(*watchers)
            for events in results:
                assert [e.obj.metadata.name for e in events] == [f"s{i}" for i in range(100)]
    run(scenario())
