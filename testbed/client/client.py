"""An asyncio client for the API server, used by every component and the CLI."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from google.protobuf.message import Message

from testbed.api.errors import ApiError, from_status
from testbed.api.kinds import kind_named, unwrap, wrap
from testbed.api.v1 import api_pb2 as pb
from testbed.api.v1 import api_pb2_grpc
from testbed.client.pipeline import WritePipeline
from testbed.paths import StateDir


@dataclass
class WatchItem:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: Message | None
    resource_version: str


#: gRPC's default reconnect back-off grows to 120 s (1.6x from 1 s): after an API server outage
#: of 10 s a component could wait 10 s more to try again, and a kubelet heard again only after
#: the node lifecycle controller was would lose its node's Ready. Capped at 1 s, every
#: component is back within about a second of the server (a unix socket: retries cost nothing).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ApiClient:
    def __init__(self, address: str, token: str = "") -> None:
        self.address = address
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._stub: api_pb2_grpc.ApiStub | None = None
        self._pipeline: WritePipeline | None = None

    @classmethod
    def for_state_dir(cls, state: StateDir) -> "ApiClient":
        token = state.read_token() if state.token_file.exists() else ""
        return cls(state.api_address, token)

    @property
    def stub(self) -> api_pb2_grpc.ApiStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub = api_pb2_grpc.ApiStub(self._channel)
        return self._stub

    @property
    def pipeline(self) -> WritePipeline:
        if self._pipeline is None:
            self._pipeline = WritePipeline(lambda: self.stub.Write(metadata=self._auth()))
        return self._pipeline

    async def close(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.close()
            self._pipeline = None
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    async def _call(self, method, request, *, timeout: float | None = 30):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_status(exc.code(), exc.details() or str(exc.code())) from None

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the server answers (for processes started just before)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self._call(self.stub.List, pb.ListRequest(kind="Node"), timeout=1)
                return
            except ApiError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def create(self, obj: Message, dry_run: bool = False) -> Message:
        request = pb.CreateRequest(object=wrap(obj), options=pb.WriteOptions(dry_run=dry_run))
        return unwrap(await self.pipeline.submit(pb.WriteOp(create=request)))

    async def get(self, kind: str, name: str, namespace: str = "") -> Message:
        request = pb.ObjectKey(kind=kind_named(kind).name, namespace=namespace, name=name)
        return unwrap(await self._call(self.stub.Get, request))

    async def list(
        self, kind: str, namespace: str = "", label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Message], str]:
        request = pb.ListRequest(
            kind=kind_named(kind).name,
            namespace=namespace,
            selectors=pb.Selectors(label_selector=label_selector, field_selector=field_selector),
        )
        result = await self._call(self.stub.List, request)
        return [unwrap(item) for item in result.items], result.resource_version

    async def update(self, obj: Message, subresource: str = "", dry_run: bool = False) -> Message:
        request = pb.UpdateRequest(
            object=wrap(obj), subresource=subresource, options=pb.WriteOptions(dry_run=dry_run)
        )
        return unwrap(await self.pipeline.submit(pb.WriteOp(update=request)))

    async def update_status(self, obj: Message) -> Message:
        return await self.update(obj, subresource="status")

    async def delete(
        self, kind: str, name: str, namespace: str = "", grace_period: int | None = None
    ) -> Message:
        request = pb.DeleteRequest(key=pb.ObjectKey(kind=kind_named(kind).name, namespace=namespace, name=name))
        if grace_period is not None:
            request.grace_period_seconds = grace_period
        return unwrap(await self.pipeline.submit(pb.WriteOp(delete=request)))

    async def watch(
        self,
        kind: str = "",
        namespace: str = "",
        resource_version: str = "",
        label_selector: str = "",
        field_selector: str = "",
    ) -> AsyncIterator[WatchItem]:
        """Events after resource_version (or the current objects first, if empty), until cancelled."""
        request = pb.WatchRequest(
            kind=kind_named(kind).name if kind else "",
            namespace=namespace,
            resource_version=resource_version,
            selectors=pb.Selectors(label_selector=label_selector, field_selector=field_selector),
        )
        call = self.stub.Watch(request)
        try:
            async for batch in call:
                for event in batch.events:
                    obj = unwrap(event.object) if event.object.WhichOneof("kind") else None
                    yield WatchItem(event.type, obj, event.resource_version)
        except grpc.aio.AioRpcError as exc:
            raise from_status(exc.code(), exc.details() or str(exc.code())) from None
        finally:
            call.cancel()
