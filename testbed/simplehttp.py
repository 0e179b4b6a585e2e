"""A very small HTTP/1.1 responder for svclab's own endpoints.

Used by the pods' built-in workload, kube-proxy's /metrics and /healthz, and
its healthCheckNodePort servers: each request gets one response and the
connection closes. A handler maps (method, path, client address) to
(status, content type, body).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

Handler = Callable[[str, str, tuple[str, int]], tuple[int, str, bytes]]

MAX_REQUEST = 64 * 1024
_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


class HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            end = self.buffer.find(b"\n\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST:
                self.transport.close()
            return
        parts = self.buffer.split(b"\n", 1)[0].decode("latin-1").split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("GET", "/")
        peer = self.transport.get_extra_info("peername")[:2]
        status, content_type, body = self.handler(method, path, peer)
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + (body if method != "HEAD" else b""))
        self.transport.close()


async def serve(handler: Handler, host: str = "", port: int = 0, sock: socket.socket | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(lambda: HttpProtocol(handler), sock=sock)
    return await loop.create_server(lambda: HttpProtocol(handler), host or None, port, reuse_address=True)
