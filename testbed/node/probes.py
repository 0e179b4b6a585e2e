"""Readiness probes, as the kubelet runs them: tcpSocket / httpGet, else every TCP containerPort."""

from __future__ import annotations

import asyncio
import socket

from testbed.api.kube_json import int_or_string
from testbed.api.v1 import api_pb2 as pb
from testbed.node import podnet


def readiness_checks(pod: pb.Pod) -> list[tuple[str, int, str]]:
    """(kind "tcp" or "http", port, path) of every check the pod's readiness needs."""
    checks = []
    for container in pod.spec.containers:
        probe = container.readiness_probe
        if probe.HasField("http_get"):
            checks.append(("http", _port(container, probe.http_get.port), probe.http_get.path))
        elif probe.HasField("tcp_socket"):
            checks.append(("tcp", _port(container, probe.tcp_socket.port), ""))
        else:
            checks += [("tcp", p.container_port, "") for p in container.ports if p.protocol == "TCP"]
    return checks


def _port(container: pb.Container, port: pb.IntOrString) -> int:
    value = int_or_string(port)
    if isinstance(value, int):
        return value
    return next((p.container_port for p in container.ports if p.name == value), 0)


async def check(ip: str, port: int, kind: str, path: str, timeout: float = 1.0, netns: str | None = None) -> bool:
    """Connect to ip:port (and GET path for http) from inside the pod's namespace (netns), as
    a client on the pod itself: no ARP. Probing every pod from the node every second kept two
    neighbour entries per pod alive (the node's for the pod, the pod's for its gateway), and the
    kernel's neighbour table is one for all namespaces of the machine, capped by the root
    namespace's gc_thresh3 (1,024): past ~500 pods probes failed with "neighbor table overflow"."""
    sock = None
    try:
        if netns is not None:
            with podnet.entered_netns(netns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        if sock is not None:
            sock.close()
        return False
    try:
        if kind != "http":
            return True
        writer.write(f"GET {path or '/'} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
