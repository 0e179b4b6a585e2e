"""A very small HTTP/1.1 responder for svclab's own endpoints.

Used by the pods' built-in workload, kube-proxy's /metrics and /healthz, and
its healthCheckNodePort servers: a handler maps (method, path, client address)
to (status, content type, body). Connections persist as HTTP/1.1 says (an
HTTP/1.1 request keeps its connection unless it asks `Connection: close`, an
HTTP/1.0 one only with `Connection: keep-alive`), as nginx does, so a client
can reuse one connection for many requests; an idle connection closes after
IDLE_TIMEOUT seconds. A server given a `connections` set keeps its open
connections there, so that its owner can close them (a pod that stops takes
its established connections with it).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

Handler = Callable[[str, str, tuple[str, int]], tuple[int, str, bytes]]

MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 60.0  # nginx's keepalive_timeout is 75 s
_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _head_end(buffer: bytes) -> tuple[int, int]:
    """(end of the request head, length of its terminator), or (-1, 0) while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end >= 0:
        return end, 4
    end = buffer.find(b"\n\n")
    return (end, 2) if end >= 0 else (-1, 0)


def _keeps_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        return "close" not in connection
    return "keep-alive" in connection


class HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, connections: set[asyncio.Transport] | None = None) -> None:
        self.handler = handler
        self.connections = connections
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections is not None:
            self.connections.add(transport)
        self._arm_idle()

    def connection_lost(self, _exc) -> None:
        if self.connections is not None:
            self.connections.discard(self.transport)
        if self._idle is not None:
            self._idle.cancel()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.transport.is_closing():
            end, sep = _head_end(self.buffer)
            if end < 0:
                if len(self.buffer) > MAX_REQUEST:
                    self.transport.close()
                return
            lines = self.buffer[:end].decode("latin-1").splitlines()
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = headers.get("content-length", "0")
            body = int(length) if length.isdigit() else 0
            if body > MAX_REQUEST:
                self.transport.close()
                return
            if len(self.buffer) < end + sep + body:
                return  # the request's body is still coming
            self.buffer = self.buffer[end + sep + body:]
            self._respond(lines[0].split() if lines else [], headers)

    def _respond(self, parts: list[str], headers: dict[str, str]) -> None:
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("GET", "/")
        keep = _keeps_alive(parts[2] if len(parts) >= 3 else "HTTP/1.0", headers)
        peer = self.transport.get_extra_info("peername")[:2]
        status, content_type, body = self.handler(method, path, peer)
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode()
        self.transport.write(head + (body if method != "HEAD" else b""))
        if keep:
            self._arm_idle()
        else:
            self.transport.close()


async def serve(handler: Handler, host: str = "", port: int = 0, sock: socket.socket | None = None,
                connections: set[asyncio.Transport] | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(lambda: HttpProtocol(handler, connections), sock=sock)
    return await loop.create_server(lambda: HttpProtocol(handler, connections), host or None, port,
                                    reuse_address=True)
