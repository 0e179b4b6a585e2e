"""One request of a traffic generator on the wire, and what its outcome was.

Three protocols: `http` (GET over TCP; the built-in pod server answers JSON naming the
pod, its node and the client address it saw), `tcp` (a bare connect: ok once the
handshake completes; kept, each request checks that the connection is still open, sending
nothing) and `udp` (one datagram, one answer; the built-in server answers with the same
JSON). A Connection is opened per request (`new`) or kept and reused
(`keepalive`, probe.py's pool). Standard library only: this runs in the probe process,
inside the source's network namespace.

Outcomes: ok, refused (ECONNREFUSED, ICMP unreachable), timeout, reset (reset or closed
by the peer before the answer), dns-error (the name did not resolve, or resolving timed
out), http-error (an answer that is not 2xx), error (anything else, with its text).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Iterator

OUTCOMES = ("ok", "refused", "timeout", "reset", "dns-error", "http-error", "error")
PROTOCOLS = ("http", "tcp", "udp")
UDP_PAYLOAD = b"svclab-probe\n"
_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED}
BIND_TRIES = 16


class RequestFailed(Exception):
    """A request that failed in a way the code recognized itself (not a socket error)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class Target:
    protocol: str  # http | tcp | udp
    host: str
    port: int
    path: str = "/"

    @classmethod
    def parse(cls, target: str, protocol: str = "http") -> "Target":
        """`http://host[:port]/path` (protocol http), or `host:port` with protocol tcp or udp."""
        if target.startswith("http://"):
            url = urllib.parse.urlsplit(target)
            if not url.hostname:
                raise ValueError(f"no host in {target!r}")
            return cls("http", url.hostname, url.port or 80, (url.path or "/") + (f"?{url.query}" if url.query else ""))
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"{target!r}: a host:port target needs protocol tcp or udp (or write http://{target}/)")
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{target!r}: expected host:port")
        return cls(protocol, host, int(port))


@dataclass
class Phase:
    """Where a request is (resolve, connect, send, answer, pool): it names what a timeout interrupted."""

    name: str = "start"


def classify(exc: BaseException, phase: str) -> tuple[str, str]:
    """(outcome, error text) of a failed request."""
    if isinstance(exc, RequestFailed):
        return exc.outcome, str(exc)
    if isinstance(exc, TimeoutError):
        return ("dns-error" if phase == "resolve" else "timeout"), f"timed out ({phase})"
    if isinstance(exc, socket.gaierror):
        return "dns-error", f"resolving failed: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "refused", f"{os.strerror(exc.errno)} ({phase})"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset", f"{os.strerror(exc.errno) if exc.errno else type(exc).__name__} ({phase})"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "reset", f"connection closed by the peer ({phase})"
    return "error", f"{type(exc).__name__}: {exc} ({phase})"


async def resolve(host: str, port: int, kind: int, phase: Phase) -> str:
    """host's IPv4 address: a literal as is, a name through the namespace's resolver (its resolv.conf)."""
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        pass
    phase.name = "resolve"
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=socket.AF_INET, type=kind)
    except socket.gaierror as exc:
        raise RequestFailed("dns-error", f"{host}: {exc.strerror or exc}") from None
    return infos[0][4][0]


def identity(body: bytes) -> dict[str, str]:
    """pod, node and client from the built-in server's JSON answer; empty for any other answer."""
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(answer, dict):
        return {}
    return {key: str(answer.get(key, "")) for key in ("pod", "node", "client")}


class Connection:
    """One connection of a generator: opened, used for one or more exchanges, closed."""

    id: int
    source: str = ""  # local ip:port
    reusable: bool = True  # False once the server said it closes

    async def exchange(self, target: Target, keep: bool, phase: Phase) -> dict[str, str]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TcpConnection(Connection):
    def __init__(self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.id, self.reader, self.writer = conn_id, reader, writer
        local = writer.get_extra_info("sockname")
        self.source = f"{local[0]}:{local[1]}" if local else ""

    async def exchange(self, target: Target, keep: bool, phase: Phase) -> dict[str, str]:
        if target.protocol == "tcp":  # nothing is sent: the handshake was the request, or, kept, the connection
            if keep and (self.reader.exception() or self.reader.at_eof() or self.writer.is_closing()):
                raise self.reader.exception() or RequestFailed("reset", "connection closed by the peer")
            return {}
        phase.name = "send"
        self.writer.write((f"GET {target.path} HTTP/1.1\r\nHost: {target.host}\r\nUser-Agent: svclab-probe\r\n"
                           f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n").encode())
        await self.writer.drain()
        phase.name = "answer"
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise RequestFailed("error", f"not an HTTP answer: {head[0][:80]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        length = headers.get("content-length", "")
        body = await (self.reader.readexactly(int(length)) if length.isdigit() else self.reader.read())
        if not length.isdigit() or "close" in headers.get("connection", "").lower():
            self.reusable = False
        status = int(parts[1])
        if not 200 <= status < 300:
            raise RequestFailed("http-error", f"HTTP {status} {parts[2] if len(parts) > 2 else ''}".strip())
        return identity(body)

    def close(self) -> None:
        self.writer.close()


class _UdpReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future | None = None

    def datagram_received(self, data: bytes, _addr) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable on a connected socket
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


class UdpConnection(Connection):
    """A connected UDP socket: one source port; one datagram out and one answer per exchange."""

    def __init__(self, conn_id: int, transport: asyncio.DatagramTransport, receiver: _UdpReceiver) -> None:
        self.id, self.transport, self.receiver = conn_id, transport, receiver
        local = transport.get_extra_info("sockname")
        self.source = f"{local[0]}:{local[1]}" if local else ""

    async def exchange(self, target: Target, keep: bool, phase: Phase) -> dict[str, str]:
        phase.name = "answer"
        self.receiver.waiter = asyncio.get_running_loop().create_future()
        self.transport.sendto(UDP_PAYLOAD)
        return identity(await self.receiver.waiter)

    def close(self) -> None:
        self.transport.close()


def bound_socket(kind: int, ports: Iterator[int]) -> socket.socket:
    """A non-blocking socket bound to the next free port `ports` gives. SO_REUSEADDR: a port
    whose last connection here is in TIME_WAIT may be bound again (connect() still refuses a
    4-tuple in use)."""
    for _ in range(BIND_TRIES):
        sock = socket.socket(socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        try:
            sock.bind(("0.0.0.0", next(ports)))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise RequestFailed("error", f"no free source port in {BIND_TRIES} tries")


async def open_connection(target: Target, conn_id: int, phase: Phase,
                          ports: Iterator[int] | None = None) -> Connection:
    """A new connection to target (resolving its name first), bounded by the caller's timeout;
    from the next free port of `ports` if given, else from one the kernel picks."""
    loop = asyncio.get_running_loop()
    kind = socket.SOCK_DGRAM if target.protocol == "udp" else socket.SOCK_STREAM
    ip = await resolve(target.host, target.port, kind, phase)
    phase.name = "connect"
    if ports is None:
        if kind == socket.SOCK_DGRAM:
            transport, receiver = await loop.create_datagram_endpoint(_UdpReceiver, remote_addr=(ip, target.port))
            return UdpConnection(conn_id, transport, receiver)
        reader, writer = await asyncio.open_connection(ip, target.port)
        return TcpConnection(conn_id, reader, writer)
    sock = bound_socket(kind, ports)
    try:
        if kind == socket.SOCK_DGRAM:
            sock.connect((ip, target.port))
            transport, receiver = await loop.create_datagram_endpoint(_UdpReceiver, sock=sock)
            return UdpConnection(conn_id, transport, receiver)
        await loop.sock_connect(sock, (ip, target.port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    return TcpConnection(conn_id, reader, writer)
