"""The API server over real gRPC: CRUD, conflicts, auth, dry runs, status, persistence."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from testbed.api.errors import AlreadyExists, ApiError, Conflict, NotFound, Unauthenticated
from testbed.api.v1 import api_pb2 as pb
from tests.builders import deployment, node, obj, service
from tests.conftest import run

pytestmark = pytest.mark.unit


def test_crud_for_every_kind(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            objects = [
                service("web"),
                deployment("web"),
                node("node-1", "172.18.0.2"),
                obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "labels": {"app": "web"}},
                     "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 80}]}]}}),
                obj({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
                     "addressType": "IPv4", "ports": [{"port": 80}],
                     "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True}}]}),
            ]
            for o in objects:
                kind = type(o).DESCRIPTOR.name
                created = await c.create(o)
                assert created.metadata.uid and created.metadata.resource_version
                assert created.metadata.creation_timestamp.endswith("Z")
                got = await c.get(kind, o.metadata.name)
                assert got == created
                items, revision = await c.list(kind)
                assert created in items and int(revision) >= int(created.metadata.resource_version)
                changed = got
                changed.metadata.labels["touched"] = "yes"
                updated = await c.update(changed)
                assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
                assert updated.metadata.labels["touched"] == "yes"
                await c.delete(kind, o.metadata.name, grace_period=0)
                with pytest.raises(NotFound):
                    await c.get(kind, o.metadata.name)
    run(scenario())


def test_stale_resource_version_is_a_conflict(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            first = await c.create(service("web"))
            a = await c.get("Service", "web")
            a.metadata.labels["a"] = "1"
            await c.update(a)
            first.metadata.labels["b"] = "2"
            with pytest.raises(Conflict, match="the object has been modified"):
                await c.update(first)
            current = await c.get("Service", "web")
            assert "b" not in current.metadata.labels and current.metadata.labels["a"] == "1"
            first.metadata.resource_version = ""  # unconditional update
            assert (await c.update(first)).metadata.labels["b"] == "2"
    run(scenario())


def test_create_twice_and_missing_objects(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(service("web"))
            with pytest.raises(AlreadyExists, match='services "web" already exists'):
                await c.create(service("web"))
            with pytest.raises(NotFound, match='services "nope" not found'):
                await c.get("svc", "nope")
            with pytest.raises(NotFound):
                await c.delete("Service", "nope")
    run(scenario())


def test_writes_need_the_token_reads_do_not(apiserver):
    async def scenario():
        async with apiserver.client(with_token=False) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.create(service("web"))
            items, _ = await anonymous.list("Service")
            assert [s.metadata.name for s in items] == ["kubernetes"]
        async with apiserver.client() as c:
            await c.create(service("web"))
            bad = type(c)(apiserver.state.api_address, "0" * 64)
            with pytest.raises(Unauthenticated):
                await bad.delete("Service", "web")
            await bad.close()
            assert (await c.get("Service", "web")).metadata.name == "web"
    run(scenario())


def test_state_socket_and_token_are_private(apiserver):
    assert apiserver.state.token_file.stat().st_mode & 0o077 == 0
    assert apiserver.state.api_socket.stat().st_mode & 0o077 == 0
    assert apiserver.state.path.stat().st_mode & 0o077 == 0


def test_dry_run_changes_nothing(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            _, before = await c.list("Service")
            preview = await c.create(service("web", type="NodePort"), dry_run=True)
            assert preview.spec.cluster_ip and preview.spec.ports[0].node_port
            items, after = await c.list("Service")
            assert before == after and [s.metadata.name for s in items] == ["kubernetes"]
            # what the dry run allocated was handed back
            real = await c.create(service("web2", type="NodePort",
                                          ports=[{"port": 80, "nodePort": preview.spec.ports[0].node_port}]))
            assert real.spec.ports[0].node_port == preview.spec.ports[0].node_port
    run(scenario())


def test_status_is_a_subresource(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            svc = await c.create(service("lb", type="LoadBalancer"))
            svc.status.load_balancer.ingress.add(ip="203.0.113.100")
            svc.spec.selector["app"] = "ignored-by-status-update"
            written = await c.update_status(svc)
            assert written.status.load_balancer.ingress[0].ip == "203.0.113.100"
            assert written.spec.selector["app"] == "lb"
            # a main update (like apply) keeps the status it does not carry
            plain = service("lb", type="LoadBalancer")
            after = await c.update(plain)
            assert after.status.load_balancer.ingress[0].ip == "203.0.113.100"
            assert after.metadata.generation == written.metadata.generation
            # leaving type LoadBalancer clears the ingress
            after = await c.update(service("lb", type="NodePort"))
            assert not after.status.load_balancer.ingress
            assert after.metadata.generation == written.metadata.generation + 1
    run(scenario())


def test_unchanged_update_writes_nothing(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            created = await c.create(service("web"))
            again = await c.update(service("web"))
            assert again.metadata.resource_version == created.metadata.resource_version
    run(scenario())


def test_pods_on_a_node_are_deleted_gracefully(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            pod = obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}})
            await c.create(pod)
            first = await c.delete("Pod", "p")
            assert first.metadata.deletion_timestamp and first.metadata.deletion_grace_period_seconds == 30
            assert (await c.get("Pod", "p")).metadata.deletion_timestamp
            await c.delete("Pod", "p", grace_period=0)
            with pytest.raises(NotFound):
                await c.get("Pod", "p")
    run(scenario())


def test_acknowledged_writes_survive_kill_9(apiserver):
    async def write():
        async with apiserver.client() as c:
            for i in range(200):
                await c.create(service(f"svc-{i}"))
            items, revision = await c.list("Service")
            return {s.metadata.name: s for s in items}, revision

    before, revision = run(write())
    apiserver.kill9()
    apiserver.start()

    async def read():
        async with apiserver.client() as c:
            items, after_revision = await c.list("Service")
            return {s.metadata.name: s for s in items}, after_revision

    after, after_revision = run(read())
    assert after == before and after_revision == revision
    # allocations were rebuilt: the same ClusterIP can't be handed out twice
    async def clash():
        async with apiserver.client() as c:
            with pytest.raises(ApiError, match="already allocated"):
                await c.create(service("again", clusterIP=before["svc-7"].spec.cluster_ip))
    run(clash())


def test_health_service_answers(apiserver):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(apiserver.state.api_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service_name in ("", "svclab.v1.Api"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_listener_serves_too_and_enforces_the_token(make_apiserver):
    """--listen: the same API over TCP (loopback here); reads are open, every write needs the
    token: on the unary RPCs and on the streaming Write the client library uses."""
    from testbed.api.v1 import api_pb2_grpc
    from testbed.client.client import ApiClient

    port = free_port()
    server = make_apiserver("--listen", f"127.0.0.1:{port}")
    address = f"127.0.0.1:{port}"
    token = server.state.read_token()
    web = pb.Object(service=service("web"))
    with grpc.insecure_channel(address) as channel:
        stub = api_pb2_grpc.ApiStub(channel)
        assert [o.service.metadata.name for o in stub.List(pb.ListRequest(kind="Service"), timeout=5).items] == [
            "kubernetes"]  # reads need no token, over TCP too
        for metadata in ((), (("authorization", "Bearer " + "0" * 64),), (("authorization", token),)):
            for call, request in ((stub.Create, pb.CreateRequest(object=web)),
                                  (stub.Delete, pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="kubernetes")))):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (call, metadata)
        created = stub.Create(pb.CreateRequest(object=web), metadata=(("authorization", f"Bearer {token}"),),
                              timeout=5).service
        assert created.spec.cluster_ip

    async def scenario():
        async with server.client() as unix:  # one API: what TCP wrote, the socket reads
            assert (await unix.get("Service", "web")).metadata.uid == created.metadata.uid
            assert {s.metadata.name for s in (await unix.list("Service"))[0]} == {"kubernetes", "web"}
        for bad in ("", "0" * 64):  # the client library's write stream, refused the same way
            async with ApiClient(address, bad) as refused:
                with pytest.raises(Unauthenticated):
                    await refused.create(service("other"))
                with pytest.raises(Unauthenticated):
                    await refused.delete("Service", "web")
        async with ApiClient(address, token) as tcp:  # the client library over TCP, with the token
            await tcp.delete("Service", "web")
            assert [s.metadata.name for s in (await tcp.list("Service"))[0]] == ["kubernetes"]
    run(scenario())


def test_kubernetes_service_is_bootstrapped(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            svc = await c.get("Service", "kubernetes")
            assert svc.spec.cluster_ip == "10.96.0.1"
            assert svc.spec.ports[0].port == 443
    run(scenario())


def test_field_selector_lists_a_nodes_pods(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            for i, node_name in enumerate(["a", "b", "a"]):
                await c.create(obj({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"},
                                    "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "x"}]}}))
            pods, _ = await c.list("Pod", field_selector="spec.nodeName=a")
            assert sorted(p.metadata.name for p in pods) == ["p0", "p2"]
            with pytest.raises(ApiError, match="field label not supported"):
                await c.list("Pod", field_selector="spec.bogus=a")
    run(scenario())


def test_pb_object_roundtrip():
    svc = service("x")
    assert pb.Service.FromString(svc.SerializeToString()) == svc


def test_unary_write_calls_work_alongside_the_pipeline(apiserver):
    """The plain unary Create/Update/Delete RPCs, as a gRPC client in any language calls them."""
    from testbed.api.v1 import api_pb2_grpc

    token = apiserver.state.read_token()
    auth = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(apiserver.state.api_address) as channel:
        stub = api_pb2_grpc.ApiStub(channel)
        created = stub.Create(pb.CreateRequest(object=pb.Object(service=service("web"))), metadata=auth).service
        assert created.spec.cluster_ip
        created.metadata.labels["x"] = "y"
        updated = stub.Update(pb.UpdateRequest(object=pb.Object(service=created)), metadata=auth).service
        assert updated.metadata.labels["x"] == "y"
        with pytest.raises(grpc.RpcError) as err:
            stub.Update(pb.UpdateRequest(object=pb.Object(service=created)), metadata=auth)
        assert err.value.code() == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.RpcError) as err:
            stub.Create(pb.CreateRequest(object=pb.Object(service=service("x", ports=[{"port": 0}]))), metadata=auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec.ports[0].port" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="web")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.Delete(pb.DeleteRequest(key=pb.ObjectKey(kind="Service", name="web")), metadata=auth)


def test_pipelined_writes_each_get_their_own_result(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            async def attempt(i):
                try:
                    return await c.create(service("dup" if i % 10 == 0 else f"s{i}"))
                except AlreadyExists:
                    return None
            results = await asyncio.gather(*(attempt(i) for i in range(200)))
            assert sum(r is None for r in results) == 19  # the 19 later "dup" creates
            items, _ = await c.list("Service")
            assert len(items) == 1 + 180 + 1
            assert len({s.spec.cluster_ip for s in items}) == len(items)
    run(scenario())


def test_pipeline_recovers_after_server_restart(apiserver):
    async def scenario():
        async with apiserver.client() as c:
            await c.create(service("before"))
            apiserver.kill9()
            with pytest.raises(ApiError):
                await c.create(service("while-down"))
            await asyncio.to_thread(apiserver.start)
            await c.create(service("after"))
            names = {s.metadata.name for s in (await c.list("Service"))[0]}
            assert {"before", "after"} <= names and "while-down" not in names
    run(scenario())


def wait_listening(path) -> None:
    """Until a server accepts on the unix socket (a plain connect: gRPC channels to one address
    share their connection and its back-off, so a gRPC probe would wait as the client does)."""
    deadline = time.monotonic() + 20
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                assert time.monotonic() < deadline, "the API server did not listen again"
                time.sleep(0.01)


def test_a_client_reconnects_within_a_second_of_the_server_coming_back(apiserver):
    """A component keeps calling through an outage (heartbeats, watches): with gRPC's default
    reconnect back-off (1 s growing 1.6x) its next try after a 6 s outage comes about 3 s after
    the server listens again; capped at 1 s (client.CHANNEL_OPTIONS), within about a second."""
    outage_s = 6.0

    async def scenario() -> float:
        async with apiserver.client() as c:
            await c.list("Service")
            apiserver.kill9()
            ends = time.monotonic() + outage_s
            while time.monotonic() < ends:  # fail-fast calls, as a heartbeat makes them
                with pytest.raises(ApiError):
                    await c.list("Service")
                await asyncio.sleep(0.1)
            apiserver.process.start()
            await asyncio.to_thread(wait_listening, apiserver.state.api_socket)
            back = time.monotonic()
            while True:
                try:
                    await c.list("Service")
                    return time.monotonic() - back
                except ApiError:
                    await asyncio.sleep(0.05)

    waited = run(scenario())
    assert waited <= 1.5, f"reconnected {waited:.2f} s after the server listened again"
