"""The API server process: gRPC over a Unix socket (and optionally TCP), state in SQLite."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from testbed.api.kinds import UnknownKind, kind_named, kind_of, unwrap, wrap
from testbed.api.selectors import ObjectFilter, SelectorError
from testbed.api.v1 import api_pb2 as pb
from testbed.api.errors import ApiError, Expired, Unauthenticated
from testbed.api.limits import MAX_MESSAGE_BYTES, check_size
from testbed.apiserver.registry import Registry
from google.protobuf.message import Message

from testbed.apiserver.store import BOOKMARK, Event, HistoryExpired, Store, encode_event
from testbed.apiserver.watch import WatcherOverflow, WatchHub
from testbed.paths import StateDir

log = logging.getLogger("svclab.apiserver")

SERVICE_NAME = "svclab.v1.Api"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def ensure_token(state: StateDir) -> str:
    """The bearer token that every write must carry; readable by root only."""
    if not state.token_file.exists():
        fd = os.open(state.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return state.read_token()


class ApiService:
    def __init__(self, registry: Registry, hub: WatchHub, token: str) -> None:
        self.registry = registry
        self.store = registry.store
        self.hub = hub
        self._token = token

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if not secrets.compare_digest(metadata.get("authorization", ""), f"Bearer {self._token}"):
            raise Unauthenticated("writes need the cluster's bearer token (state directory, file 'token')")

    # ------------------------------------------------------------ writes

    def _apply(self, op: pb.WriteOp) -> tuple[Message, list[Event]]:
        check_size(op)  # whatever the client: no write over the limit is stored
        which = op.WhichOneof("op")
        if which == "create":
            return self.registry.create(unwrap(op.create.object), op.create.options.dry_run)
        if which == "update":
            req = op.update
            return self.registry.update(unwrap(req.object), req.subresource, req.options.dry_run)
        if which == "delete":
            req = op.delete
            kind = kind_named(req.key.kind)
            namespace = (req.key.namespace or "default") if kind.namespaced else ""
            grace = req.grace_period_seconds if req.HasField("grace_period_seconds") else None
            return self.registry.delete((kind.name, namespace, req.key.name), grace, req.resource_version)
        raise ApiError("empty write")

    def write_batch(self, ops: list[pb.WriteOp]) -> list[pb.WriteResult]:
        """Apply each write on its own, commit them together, then tell the watchers."""
        results: list[pb.WriteResult] = []
        events: list[Event] = []
        try:
            with self.store.transaction():
                for op in ops:
                    try:
                        obj, op_events = self._apply(op)
                    except ApiError as exc:
                        results.append(pb.WriteResult(code=exc.code.value[0], message=exc.message))
                        continue
                    except (UnknownKind, SelectorError, ValueError) as exc:
                        code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                        results.append(pb.WriteResult(code=code, message=str(exc)))
                        continue
                    events += op_events
                    results.append(pb.WriteResult(object=wrap(obj)))
        except sqlite3.Error as exc:
            log.error("commit failed: %s", exc)
            self.registry.rebuild_allocations()
            raise ApiError(f"storage error: {exc}") from None
        self.hub.publish(events)
        return results

    async def _write_one(self, op: pb.WriteOp, context) -> pb.Object:
        self._authorize(context)
        result = self.write_batch([op])[0]
        if result.code:
            await context.abort(_CODES[result.code], result.message)
        return result.object

    async def create(self, request: pb.CreateRequest, context) -> pb.Object:
        return await self._write_one(pb.WriteOp(create=request), context)

    async def update(self, request: pb.UpdateRequest, context) -> pb.Object:
        return await self._write_one(pb.WriteOp(update=request), context)

    async def delete(self, request: pb.DeleteRequest, context) -> pb.Object:
        return await self._write_one(pb.WriteOp(delete=request), context)

    async def write(self, requests, context):
        try:
            self._authorize(context)
        except Unauthenticated:
            # Read the client's first message before refusing: a stream ended before then
            # races the client's write of it, which gRPC then reports as INTERNAL ("Internal
            # error from Core") instead of this status (1 refusal in 15 here, on either socket).
            async for _ in requests:
                break
            raise
        async for request in requests:
            yield pb.WriteBatchResponse(results=self.write_batch(list(request.ops)))

    # ------------------------------------------------------------ reads

    async def get(self, request: pb.ObjectKey, context) -> pb.Object:
        kind = kind_named(request.kind)
        namespace = (request.namespace or "default") if kind.namespaced else ""
        return wrap(self.registry.existing(kind, namespace, request.name))

    async def list(self, request: pb.ListRequest, context) -> pb.ObjectList:
        kind = kind_named(request.kind)
        filt = ObjectFilter.parse(kind.name, request.namespace, request.selectors)
        out = pb.ObjectList(resource_version=str(self.store.revision))
        for obj in self.store.list(kind.name, request.namespace if kind.namespaced else ""):
            if filt.matches(kind.name, obj):
                getattr(out.items.add(), kind.field).CopyFrom(obj)
        return out

    async def watch(self, request: pb.WatchRequest, context):
        kind = kind_named(request.kind).name if request.kind else ""
        watcher = self.hub.new_watcher(ObjectFilter.parse(kind, request.namespace, request.selectors))
        # Everything up to subscribe() runs without yielding to the loop, so no
        # event can slip between the snapshot (or the replay) and the live feed.
        if request.resource_version in ("", "0"):
            for obj in self.store.all_objects():
                obj_kind = kind_of(obj).name
                if watcher.filter.matches(obj_kind, obj):
                    watcher.push(encode_event("ADDED", obj, int(obj.metadata.resource_version)))
            watcher.push(encode_event(BOOKMARK, None, self.store.revision))
        else:
            try:
                since = int(request.resource_version)
            except ValueError:
                raise ApiError(f"invalid resourceVersion {request.resource_version!r}") from None
            try:
                for event in self.store.events_since(since):
                    watcher.offer(event)
            except HistoryExpired:
                raise Expired(
                    f"too old resource version: {since} ({self.store.oldest_revision}): expired, relist"
                ) from None
        self.hub.subscribe(watcher)
        try:
            while True:
                try:
                    batch = await watcher.next_batch()
                except WatcherOverflow:
                    raise ApiError("watcher fell too far behind; resume from the last resourceVersion") from None
                yield batch if batch is not None else encode_event(BOOKMARK, None, self.store.revision)
        finally:
            self.hub.unsubscribe(watcher)


def _guarded(fn: Callable[..., Awaitable[Any]]):
    async def handler(request, context):
        try:
            return await fn(request, context)
        except ApiError as exc:
            await context.abort(exc.code, exc.message)
        except (UnknownKind, SelectorError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return handler


def _guarded_stream(fn):
    async def handler(request, context):
        try:
            async for item in fn(request, context):
                yield item
        except ApiError as exc:
            await context.abort(exc.code, exc.message)
        except (UnknownKind, SelectorError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    return handler


def _handlers(api: ApiService) -> grpc.GenericRpcHandler:
    def unary(fn, request_type):
        return grpc.unary_unary_rpc_method_handler(
            _guarded(fn), request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Create": unary(api.create, pb.CreateRequest),
            "Get": unary(api.get, pb.ObjectKey),
            "List": unary(api.list, pb.ListRequest),
            "Update": unary(api.update, pb.UpdateRequest),
            "Delete": unary(api.delete, pb.DeleteRequest),
            # Watch yields pre-encoded WatchBatch bytes: no per-watcher serialisation.
            "Write": grpc.stream_stream_rpc_method_handler(
                _guarded_stream(api.write),
                request_deserializer=pb.WriteBatchRequest.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                _guarded_stream(api.watch),
                request_deserializer=pb.WatchRequest.FromString,
                response_serializer=lambda data: data,
            ),
        },
    )


def _bootstrap(registry: Registry) -> list:
    """The default "kubernetes" Service at the first address of the service CIDR."""
    if registry.store.get(("Service", "default", "kubernetes")) is not None:
        return []
    svc = pb.Service()
    svc.metadata.name, svc.metadata.namespace = "kubernetes", "default"
    svc.metadata.labels.update({"component": "apiserver", "provider": "kubernetes"})
    svc.spec.cluster_ip = registry.cluster_ips.nth(1)
    svc.spec.ports.add(name="https", protocol="TCP", port=443).target_port.int_val = 6443
    with registry.store.transaction():
        _, events = registry.create(svc)
    return events


async def serve(state: StateDir, listen: str, service_cidr: str, node_port_range: str, history: int) -> None:
    state.path.mkdir(parents=True, exist_ok=True)
    os.chmod(state.path, 0o700)
    token = ensure_token(state)
    store = Store(state.database, history_limit=history)
    store.open()
    registry = Registry(store, service_cidr, node_port_range)
    registry.load_allocations()
    _bootstrap(registry)
    hub = WatchHub()
    bookmarks = asyncio.create_task(hub.run_bookmarks())

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers([_handlers(ApiService(registry, hub, token))])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if state.api_socket.exists():
        state.api_socket.unlink()
    server.add_insecure_port(state.api_address)
    if listen:
        server.add_insecure_port(listen)
    await server.start()
    os.chmod(state.api_socket, 0o600)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s%s (revision %d)", state.api_address, f" and {listen}" if listen else "", store.revision)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    bookmarks.cancel()
    await server.stop(grace=1)
    store.close()
    try:
        state.api_socket.unlink()
    except FileNotFoundError:
        pass


def run(state_dir: Path, listen: str, service_cidr: str, node_port_range: str, history: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(StateDir(state_dir), listen, service_cidr, node_port_range, history))
