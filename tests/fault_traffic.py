"""Real packets between a cluster's hosts and pods, from the test process itself: sockets are
made inside a namespace (tests/netns.py `inside`) and used from here, so a test sends and
counts datagrams, times a transfer or holds a connection open without a process per probe.
Every socket has a timeout and every loop a bound."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from typing import Iterator

from dnslib import DNSRecord, QTYPE, RCODE

from tests.netns import inside


def sock_in(netns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with inside(netns):
        return socket.socket(socket.AF_INET, kind)


def udp_delivered(src: str, dst: str, dst_ip: str, count: int = 200, port: int = 9901) -> int:
    """Send `count` datagrams from namespace src to dst_ip:port (a socket in dst); how many arrived."""
    rx, tx = sock_in(dst, socket.SOCK_DGRAM), sock_in(src, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("0.0.0.0", port))
        rx.settimeout(0.3)
        for i in range(count):
            tx.sendto(str(i).encode(), (dst_ip, port))
            time.sleep(0.001)  # a pace the receiver keeps up with: only the fault loses packets
        seen = set()
        with contextlib.suppress(socket.timeout):
            while len(seen) < count:
                seen.add(rx.recv(64))
        return len(seen)


@contextlib.contextmanager
def echo_server(netns: str, port: int = 9902) -> Iterator[None]:
    """A TCP echo server in namespace netns for the block (a thread of the test process)."""
    listener = sock_in(netns)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while data := conn.recv(4096):
                    conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def connect(src: str, ip: str, port: int = 9902, timeout: float = 1.0) -> socket.socket:
    sock = sock_in(src)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def echoes(sock: socket.socket, timeout: float = 1.0) -> bool:
    """Does a message sent on the connection come back within timeout?"""
    sock.settimeout(timeout)
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b"ping"
    except (socket.timeout, OSError):
        return False


def outcome(src: str, ip: str, port: int = 9902, timeout: float = 1.0) -> str:
    """A new connection from src: "ok" (echoed), "refused" (RST), "unreachable" (ICMP) or "timeout"."""
    try:
        with connect(src, ip, port, timeout) as sock:
            return "ok" if echoes(sock, timeout) else "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return "timeout" if isinstance(exc, socket.timeout) else "unreachable"


def http_get(src: str, ip: str, port: int = 80, timeout: float = 1.0) -> str | None:
    """The body of GET / from namespace src, or None when it fails."""
    try:
        with connect(src, ip, port, timeout) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body.decode() if re.match(rb"HTTP/1\.[01] 200 ", head) else None


def transfer_seconds(src: str, dst: str, dst_ip: str, size: int, port: int = 9903) -> float:
    """Time to send `size` bytes over TCP from namespace src to a sink in dst (until the sink has all)."""
    listener = sock_in(dst)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(1)
    listener.settimeout(10)
    received: list[int] = []

    def sink() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            total = 0
            while total < size and (chunk := conn.recv(65536)):
                total += len(chunk)
            received.append(total)
            conn.sendall(b"k")

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    with listener, connect(src, dst_ip, port, timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(b"x" * size)
        assert sock.recv(1) == b"k"
        elapsed = time.monotonic() - start
    thread.join(5)
    assert received == [size]
    return elapsed


def dns_rcode(netns: str, name: str, server: str = "10.96.0.10", timeout: float = 1.0) -> tuple[str, list[str]]:
    """Ask cluster DNS from a pod's namespace: (rcode name, A records) or ("timeout", [])."""
    with sock_in(netns, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name, "A").pack(), (server, 53))
        try:
            reply = DNSRecord.parse(sock.recv(4096))
        except socket.timeout:
            return "timeout", []
    return RCODE.get(reply.header.rcode), [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
