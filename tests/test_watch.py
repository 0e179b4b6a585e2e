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
    """A client read up to `last`, then lagged: the changes it missed before the kill
    (creates, an update, a delete) and those after the restart all arrive, in order, once."""
    async def before():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            for i in range(10):
                await c.create(service(f"a{i}"))
            events = await collect(c, 5, kind="Service", resource_version=start)
            last = events[-1].resource_version  # the client saw a0..a4 only
            changed = await c.get("Service", "a1")
            changed.metadata.labels["seen"] = "no"
            await c.update(changed)
            await c.delete("Service", "a2")
            return last

    last = run(before())
    apiserver.kill9()
    apiserver.start()

    async def after():
        async with apiserver.client() as c:
            for i in range(3):
                await c.create(service(f"b{i}"))
            events = await collect(c, 10, kind="Service", resource_version=last)
            assert [(e.type, e.obj.metadata.name) for e in events] == (
                [("ADDED", f"a{i}") for i in range(5, 10)] + [("MODIFIED", "a1"), ("DELETED", "a2")]
                + [("ADDED", f"b{i}") for i in range(3)])
            assert events[5].obj.metadata.labels["seen"] == "no"
            revisions = [int(e.resource_version) for e in events]
            assert revisions == list(range(int(last) + 1, int(last) + 11))  # none lost, none twice
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
            svc = await c.create(service("web"))  # not selected yet: not sent
            svc.metadata.labels["tier"] = "front"
            svc = await c.update(svc)  # enters the selection: ADDED
            svc.metadata.labels["color"] = "blue"
            svc = await c.update(svc)  # stays in it: MODIFIED
            svc.metadata.labels["tier"] = "back"
            svc = await c.update(svc)  # leaves it: DELETED
            svc.metadata.labels["color"] = "red"
            svc = await c.update(svc)  # outside: not sent
            await c.delete("Service", "web")  # deleted outside the selection: not sent
            end = service("end")
            end.metadata.labels["tier"] = "front"
            await c.create(end)
            events = await collect(c, 4, kind="Service", resource_version=start, label_selector="tier=front")
            assert [(e.type, e.obj.metadata.name) for e in events] == [
                ("ADDED", "web"), ("MODIFIED", "web"), ("DELETED", "web"), ("ADDED", "end")]
            assert events[2].obj.metadata.labels["tier"] == "back"  # the object as it left
    run(scenario())


def test_field_selector_watch_sees_objects_enter_and_leave(apiserver):
    """spec.type=NodePort: a Service that becomes NodePort arrives as ADDED, one that stops
    being NodePort as DELETED, as Kubernetes' watch cache sends them."""
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            await c.create(service("web"))  # ClusterIP: not sent
            await c.update(service("web", type="NodePort"))  # enters: ADDED
            await c.update(service("web", type="NodePort", sessionAffinity="ClientIP"))  # stays: MODIFIED
            await c.update(service("web", type="LoadBalancer"))  # leaves: DELETED
            await c.update(service("web", type="ClusterIP"))  # outside: not sent
            await c.update(service("web", type="NodePort"))  # enters again: ADDED
            await c.delete("Service", "web")  # deleted while selected: DELETED
            await c.create(service("other"))  # never selected: not sent
            await c.create(service("end", type="NodePort"))
            events = await collect(c, 6, kind="Service", resource_version=start, field_selector="spec.type=NodePort")
            assert [(e.type, e.obj.metadata.name) for e in events] == [
                ("ADDED", "web"), ("MODIFIED", "web"), ("DELETED", "web"), ("ADDED", "web"), ("DELETED", "web"),
                ("ADDED", "end")]
            assert events[2].obj.spec.type == "LoadBalancer"  # the object as it left the selection
            revisions = [int(e.resource_version) for e in events]
            assert revisions == sorted(set(revisions))
            # a live watch (no resourceVersion) sees the same: current objects, then changes
            got = []

            async def live():
                async for item in c.watch(kind="Service", field_selector="spec.type=NodePort"):
                    if item.type != "BOOKMARK":
                        got.append((item.type, item.obj.metadata.name))
                        if item.obj.metadata.name == "end2":
                            return

            task = asyncio.create_task(live())
            await asyncio.sleep(0.2)
            await c.update(service("other", type="NodePort"))
            await c.update(service("end", type="ClusterIP"))
            await c.create(service("end2", type="NodePort"))
            await asyncio.wait_for(task, 10)
            assert got == [("ADDED", "end"), ("ADDED", "other"), ("DELETED", "end"), ("ADDED", "end2")]
    run(scenario())


def test_watch_all_kinds_and_namespaces(apiserver):
    """A watch without a kind, on namespace team-a: every kind of that namespace, nothing of
    another, whatever the order of creation."""
    async def scenario():
        async with apiserver.client() as c:
            from tests.builders import obj
            _, start = await c.list("Service")

            def in_ns(o, namespace):
                o.metadata.namespace = namespace
                return o

            await c.create(service("b"))  # default: not sent
            await c.create(in_ns(service("a"), "team-a"))
            await c.create(in_ns(service("c"), "team-b"))  # not sent
            pod = obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team-a"},
                       "spec": {"containers": [{"name": "c", "image": "x"}]}})
            await c.create(pod)
            await c.create(obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q"},
                                "spec": {"containers": [{"name": "c", "image": "x"}]}}))  # default: not sent
            await c.delete("Service", "b")  # not sent
            await c.delete("Service", "a", "team-a")
            await c.create(in_ns(service("end"), "team-a"))
            events = await collect(c, 4, namespace="team-a", resource_version=start)
            assert [(e.type, type(e.obj).__name__, e.obj.metadata.name) for e in events] == [
                ("ADDED", "Service", "a"), ("ADDED", "Pod", "p"), ("DELETED", "Service", "a"), ("ADDED", "Service", "end")]
            assert {e.obj.metadata.namespace for e in events} == {"team-a"}
    run(scenario())


def test_idle_watch_gets_bookmarks_that_keep_its_resume_point_fresh(apiserver):
    """No event for the watch: a BOOKMARK about every second, carrying the store's current
    revision, which moves on with changes the watch does not see (another kind)."""
    async def scenario():
        async with apiserver.client() as c:
            _, start = await c.list("Service")
            bookmarks: list[int] = []
            others = []

            async def consume():
                async for item in c.watch(kind="Service", resource_version=start):
                    if item.type == "BOOKMARK":
                        assert item.obj is None
                        bookmarks.append(int(item.resource_version))
                        if len(bookmarks) == 3:
                            return
                    else:
                        others.append(item)

            task = asyncio.create_task(consume())
            deadline = asyncio.get_running_loop().time() + 10
            while not bookmarks:
                assert asyncio.get_running_loop().time() < deadline, "no bookmark on an idle watch"
                await asyncio.sleep(0.05)
            assert bookmarks[0] == int(start)
            pod = await c.create(obj_pod("p"))  # a change of another kind: not an event of this watch
            await asyncio.wait_for(task, 10)
            assert not others, others
            assert bookmarks[-1] == int(pod.metadata.resource_version) > int(start)
            # resuming from the bookmark's revision: nothing missed, nothing replayed
            await c.create(service("next"))
            events = await collect(c, 1, kind="Service", resource_version=str(bookmarks[-1]))
            assert events[0].obj.metadata.name == "next"
    run(scenario())


def obj_pod(name: str):
    from tests.builders import obj
    return obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "x"}]}})


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
