"""svclab's built-in workload: what every pod runs unless its container has a command.

One JSON document tells a student which pod answered and how the request
looked from inside the pod (the client address shows whether it was
masqueraded):

    {"pod": "frontend-7c9f6-x2kqp", "namespace": "default", "podIP": "10.244.1.5",
     "node": "node1", "client": "10.244.2.7:41234"}

TCP ports answer HTTP/1.1 (any path; connections persist as HTTP/1.1 says,
so a client may send many requests on one); UDP ports answer each datagram with the
same JSON. The kubelet hosts these servers itself: the sockets are opened
inside the pod's network namespace and served from the kubelet's event loop,
so a pod costs a few sockets, not a process.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from typing import Callable, ContextManager

from testbed import simplehttp

@dataclass(frozen=True)
class PodIdentity:
    pod: str
    namespace: str
    pod_ip: str
    node: str

    def answer(self, client: tuple[str, int]) -> bytes:
        return json.dumps(
            {"pod": self.pod, "namespace": self.namespace, "podIP": self.pod_ip, "node": self.node,
             "client": f"{client[0]}:{client[1]}"}
        ).encode() + b"\n"


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, identity: PodIdentity) -> None:
        self.identity = identity
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(self.identity.answer(addr[:2]), addr)


def open_listener(protocol: str, port: int) -> socket.socket:
    """A bound socket on 0.0.0.0:port in the calling thread's network namespace."""
    kind = socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    sock.setblocking(False)
    return sock


class BuiltinServer:
    """The built-in servers of one pod."""

    def __init__(self, identity: PodIdentity, ports: list[tuple[str, int]]) -> None:
        self.identity = identity
        self.ports = ports  # (protocol, port)
        self._closers: list[Callable[[], None]] = []
        self._connections: set[asyncio.Transport] = set()  # established HTTP connections

    async def start(self, in_pod_netns: Callable[[], ContextManager]) -> None:
        """Open every port inside the pod (in_pod_netns() enters its namespace), then serve them here."""
        with in_pod_netns():
            sockets = [(protocol, open_listener(protocol, port)) for protocol, port in self.ports
                       if protocol in ("TCP", "UDP")]
        loop = asyncio.get_running_loop()
        for protocol, sock in sockets:
            if protocol == "TCP":
                server = await simplehttp.serve(self._answer_http, sock=sock, connections=self._connections)
                self._closers.append(server.close)
            else:
                transport, _ = await loop.create_datagram_endpoint(lambda: _UdpEcho(self.identity), sock=sock)
                self._closers.append(transport.close)

    def _answer_http(self, _method: str, _path: str, client: tuple[str, int]) -> tuple[int, str, bytes]:
        return 200, "application/json", self.identity.answer(client)

    def stop(self) -> None:
        """Close the listeners and the established connections, as a process that exits would."""
        for close in self._closers:
            close()
        self._closers.clear()
        for transport in list(self._connections):
            transport.close()
        self._connections.clear()
