"""The client end of the write pipeline: concurrent writes share one stream.

Writes queued while a batch is being sent travel together in the next
message, so a busy client pays the per-message cost of gRPC once per batch
instead of once per write; a batch stays under gRPC's message limit in bytes
too, and a write too big for any batch is refused before it is queued. Each
write still gets its own result. A write in
flight when the stream breaks fails (it may or may not have been applied, as
with a unary call that loses its connection); writes not yet sent go out on
the next stream.
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from testbed.api.errors import ApiError, from_status
from testbed.api.limits import MAX_BATCH_BYTES, OP_FRAMING_BYTES, check_size
from testbed.api.v1 import api_pb2 as pb

MAX_BATCH = 512
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class WritePipeline:
    def __init__(self, open_stream) -> None:
        self._open_stream = open_stream  # () -> a stream-stream call
        self._queued: deque[tuple[pb.WriteOp, asyncio.Future, int]] = deque()  # op, its result, its size
        self._wake = asyncio.Event()
        self._sender: asyncio.Task | None = None
        self._closing = False

    async def submit(self, op: pb.WriteOp, timeout: float | None = 30) -> pb.Object:
        size = check_size(op)  # TooLarge, naming the object, for a write no batch can carry
        future = asyncio.get_running_loop().create_future()
        self._queued.append((op, future, size))
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_loop())
        result: pb.WriteResult = await asyncio.wait_for(asyncio.shield(future), timeout)
        if result.code:
            raise from_status(_CODES[result.code], result.message)
        return result.object

    async def _send_loop(self) -> None:
        while self._queued:
            call = self._open_stream()
            in_flight: deque[list[asyncio.Future]] = deque()
            reader = asyncio.create_task(self._read(call, in_flight))
            try:
                while not reader.done():
                    if not self._queued:
                        self._wake.clear()
                        waiter = asyncio.create_task(self._wake.wait())
                        await asyncio.wait([waiter, reader], return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                        continue
                    batch = self._next_batch()
                    in_flight.append([future for _, future, _ in batch])
                    await call.write(pb.WriteBatchRequest(ops=[op for op, _, _ in batch]))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass
            finally:
                error = await self._finish(call, reader, wait=not self._closing)
                for futures in in_flight:
                    for future in futures:
                        if not future.done():
                            future.set_exception(error)
            if self._queued:
                await asyncio.sleep(0.05)  # the stream broke; don't spin while the server is away

    def _next_batch(self) -> list[tuple[pb.WriteOp, asyncio.Future, int]]:
        """The queued writes of the next message: at most MAX_BATCH of them in MAX_BATCH_BYTES
        (always at least one: no write is over the size limit)."""
        batch: list[tuple[pb.WriteOp, asyncio.Future, int]] = []
        size = 0
        while self._queued and len(batch) < MAX_BATCH:
            op_size = self._queued[0][2] + OP_FRAMING_BYTES
            if batch and size + op_size > MAX_BATCH_BYTES:
                break
            batch.append(self._queued.popleft())
            size += op_size
        return batch

    async def _read(self, call, in_flight: deque[list[asyncio.Future]]) -> None:
        async for response in call:
            futures = in_flight.popleft()
            for future, result in zip(futures, response.results):
                if not future.done():
                    future.set_result(result)

    @staticmethod
    async def _finish(call, reader: asyncio.Task, wait: bool) -> ApiError:
        """The stream's end: the server's status (e.g. UNAUTHENTICATED) if it sent one. Closing
        the client does not wait for it (1 s at the exit of every writing CLI command)."""
        try:
            # The reader ends with the server's status; cancelling first would hide it.
            if wait:
                await asyncio.wait_for(asyncio.shield(reader), 1.0)
        except grpc.aio.AioRpcError as exc:
            return from_status(exc.code(), exc.details() or str(exc.code()))
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            call.cancel()
            reader.cancel()
        return from_status(grpc.StatusCode.UNAVAILABLE, "write stream closed before the server answered")

    async def close(self) -> None:
        self._closing = True
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except (asyncio.CancelledError, Exception):
                pass
