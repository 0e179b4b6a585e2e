"""Network namespaces of the kernel tests (proxy backends, SCTP): made per test, named
<tag><pid><random>-<role>, deleted at teardown, pass or fail, with every process started
in them. Nothing here touches the root namespace's firewall, routes or sysctls.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys

import pytest


def run(cmd: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])}... exited {result.returncode}: {result.stderr.strip()}")
    return result


def in_ns(ns: str, *cmd: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", ns, *cmd], input=input, check=check)


class Namespaces:
    """Network namespaces named <tag><pid><random>-<role>, and the processes started in them."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"{tag}{os.getpid()}{secrets.token_hex(2)}"
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def add(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        run(["ip", "netns", "add", name])
        self.names.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def popen(self, ns: str, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.names.clear()


def netns_fixture(tag: str):
    """A `netns` fixture whose namespaces are named after `tag` (one per test module)."""

    @pytest.fixture
    def netns():
        spaces = Namespaces(tag)
        try:
            yield spaces
        finally:
            spaces.cleanup()
            leftovers = [n for n in os.listdir("/run/netns") if n.startswith(spaces.prefix)] \
                if os.path.isdir("/run/netns") else []
            assert not leftovers

    return netns


class inside:
    """Run the block with this thread in namespace `ns` (and refuse to run it anywhere else)."""

    def __init__(self, ns: str) -> None:
        from testbed.node.podnet import entered_netns
        self.ns, self._cm = ns, entered_netns(ns)

    def __enter__(self) -> None:
        outside = os.stat("/proc/thread-self/ns/net").st_ino
        self._cm.__enter__()
        assert os.stat("/proc/thread-self/ns/net").st_ino != outside, "not inside the test namespace"

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def link(ns_a: str, if_a: str, ip_a: str, ns_b: str, if_b: str, ip_b: str) -> None:
    """A veth pair made inside ns_a with its peer created directly in ns_b (never in the root namespace)."""
    run(["ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])
    for ns, ifname, ip in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
        run(["ip", "-n", ns, "addr", "add", ip, "dev", ifname])
        run(["ip", "-n", ns, "link", "set", ifname, "up"])


# A TCP server on port 8080 that answers "<name> <client address it saw>" and exits once idle.
SERVER = r"""
import socket, sys
name = sys.argv[1]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(128)
s.settimeout(60)  # exits by itself once idle
print("listening", flush=True)
while True:
    try:
        c, peer = s.accept()
    except socket.timeout:
        break
    c.sendall(f"{name} {peer[0]}".encode())
    c.close()
"""


def serve(spaces: Namespaces, ns: str, name: str) -> None:
    """SERVER in namespace ns, listening before this returns."""
    server = spaces.popen(ns, sys.executable, "-c", SERVER, name)
    assert server.stdout.readline().strip() == "listening", server.stderr.read()


def ask(ns: str, ip: str, port: int, timeout: float = 3.0, source: str | None = None) -> str:
    """Connect from namespace ns; the server's answer "<pod> <client address it saw>"."""
    with inside(ns):
        sock = socket.socket()
    with sock:
        sock.settimeout(timeout)
        if source:
            sock.bind((source, 0))
        sock.connect((ip, port))
        return sock.recv(100).decode()
