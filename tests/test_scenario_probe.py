"""The traffic generator's probe process against real servers on loopback (no cluster).

The servers are svclab's own: the pods' built-in workload (testbed/node/workload.py:
HTTP with keep-alive and UDP echo, both answering the JSON identity), run on an event loop
in a thread of the test, plus raw sockets that never answer or reset. Every generator is a
real probe process started and stopped by pid (testbed/scenario/traffic.py), in this
namespace (netns ""), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import asdict

import pytest

from testbed import simplehttp
from testbed.node.workload import BuiltinServer, PodIdentity
from testbed.scenario.traffic import Generator, GeneratorSpec, Traffic, with_source_ports

pytestmark = pytest.mark.kernel

LOOP = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


class Loop:
    """An asyncio loop in a thread of the test, for servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn, *args):
        async def wrapped():
            return fn(*args)
        return self.run(wrapped())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop():
    server_loop = Loop()
    yield server_loop
    server_loop.close()


def builtin(loop: Loop, port: int) -> BuiltinServer:
    server = BuiltinServer(PodIdentity("web-1", "default", LOOP, "node1"), [("TCP", port), ("UDP", port)])
    loop.run(server.start(contextlib.nullcontext))
    return server


def run(tmp_path, *specs: GeneratorSpec, lead: float = 0.5):
    with Traffic(list(specs), time.monotonic() + lead, tmp_path) as traffic:
        summaries = traffic.wait()
    return summaries, traffic.records()


def test_new_connections_and_a_keepalive_pool(tmp_path, loop):
    port = free_port()
    server = builtin(loop, port)
    url = f"http://{LOOP}:{port}/"
    summaries, records = run(tmp_path, GeneratorSpec("new", "", url, rate=40, stop=1),
                             GeneratorSpec("kept", "", url, rate=40, stop=1, connections="keepalive", pool=2),
                             GeneratorSpec("udp", "", f"{LOOP}:{port}", protocol="udp", rate=40, stop=1))
    for name in ("new", "kept", "udp"):
        assert summaries[name].sent == 40 and summaries[name].outcomes == {"ok": 40}, summaries[name]
        assert all(r.pod == "web-1" and r.node == "node1" and r.client == r.source for r in records[name])
    assert len({r.source for r in records["new"]}) == 40 and summaries["new"].connections_opened == 40
    assert len({r.source for r in records["kept"]}) == 2 and summaries["kept"].connections_opened == 2
    assert {r.conn for r in records["kept"]} == {1, 2}
    assert len({r.source for r in records["udp"]}) == 40  # a socket (source port) per request
    server.stop()


def test_a_keepalive_connection_the_server_closes_is_recorded_and_reopened(tmp_path, loop):
    port = free_port()
    server = builtin(loop, port)
    spec = GeneratorSpec("kept", "", f"http://{LOOP}:{port}/", rate=20, stop=2.5, connections="keepalive")
    generator = Generator(spec, time.monotonic() + 0.3, tmp_path)
    generator.start()
    generator.wait_ready()
    time.sleep(1.3)
    loop.call(server.stop)  # the pod stops: listener and established connection closed
    time.sleep(0.2)
    server = builtin(loop, port)  # and is back
    summary = generator.wait()
    records = generator.records()
    first = [r for r in records if r.conn == 1]  # ok until the server closed it: that request is the reset
    assert len(first) >= 15 and all(r.ok for r in first[:-1]), records
    failed = [r for r in records if not r.ok]
    assert failed[0] == first[-1] and failed[0].outcome == "reset" and "closed by the peer" in failed[0].error, failed
    assert {r.outcome for r in failed} <= {"reset", "refused"}
    after = [r for r in records if r.t > failed[-1].t]
    assert after and all(r.ok and r.conn > 1 for r in after), after  # reopened, then reused
    assert len({r.conn for r in after}) == 1 and summary.connections_opened == 2
    server.stop()


def silent_listener() -> socket.socket:
    """Accepts (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind((LOOP, 0))
    sock.listen(64)
    return sock


def resetting_listener(stop: threading.Event) -> socket.socket:
    """Accepts and resets every connection (SO_LINGER 0)."""
    sock = silent_listener()
    sock.settimeout(0.1)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.recv(1024)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return sock


def test_outcomes_refused_timeout_reset_http_error(tmp_path, loop):
    stop = threading.Event()
    silent, resetting = silent_listener(), resetting_listener(stop)
    mute_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mute_udp.bind((LOOP, 0))

    async def unavailable():
        return await simplehttp.serve(lambda *_: (503, "text/plain", b"no\n"), LOOP, 0)
    http503 = loop.run(unavailable())
    port503 = http503.sockets[0].getsockname()[1]
    spec = dict(rate=10, stop=1, timeout=0.3)
    summaries, records = run(
        tmp_path,
        GeneratorSpec("refused", "", f"http://{LOOP}:{free_port()}/", **spec),
        GeneratorSpec("timeout", "", f"http://{LOOP}:{silent.getsockname()[1]}/", **spec),
        GeneratorSpec("reset", "", f"http://{LOOP}:{resetting.getsockname()[1]}/", **spec),
        GeneratorSpec("http503", "", f"http://{LOOP}:{port503}/", **spec),
        GeneratorSpec("udprefused", "", f"{LOOP}:{free_port(socket.SOCK_DGRAM)}", protocol="udp", **spec),
        GeneratorSpec("udptimeout", "", f"{LOOP}:{mute_udp.getsockname()[1]}", protocol="udp", **spec),
        GeneratorSpec("tcp", "", f"{LOOP}:{silent.getsockname()[1]}", protocol="tcp", **spec))
    stop.set()
    want = {"refused": "refused", "timeout": "timeout", "reset": "reset", "http503": "http-error",
            "udprefused": "refused", "udptimeout": "timeout", "tcp": "ok"}
    for name, outcome in want.items():
        assert summaries[name].outcomes == {outcome: 10}, (name, summaries[name], records[name][:2])
    assert all(r.latency_ms < 100 for r in records["refused"] + records["udprefused"])  # refused at once
    assert all(290 <= r.latency_ms < 600 and r.error == "timed out (answer)" for r in records["timeout"])
    assert records["http503"][0].error == "HTTP 503 Service Unavailable"
    for sock in (silent, resetting, mute_udp):
        sock.close()
    loop.call(http503.close)


def test_a_kept_bare_tcp_connection_is_checked_open_and_reopened_when_closed(tmp_path):
    listener = silent_listener()
    listener.settimeout(5)
    port = listener.getsockname()[1]
    spec = GeneratorSpec("tcp", "", f"{LOOP}:{port}", protocol="tcp", rate=20, stop=2, connections="keepalive")
    generator = Generator(spec, time.monotonic() + 0.3, tmp_path)
    generator.start()
    generator.wait_ready()
    accepted, _ = listener.accept()
    time.sleep(1.0)
    accepted.close()  # the server side goes away: FIN
    summary = generator.wait()
    records = generator.records()
    failed = [r for r in records if not r.ok]
    assert len(failed) == 1 and failed[0].outcome == "reset" and failed[0].conn == 1, records
    assert all(r.ok and r.conn == 2 for r in records if r.t > failed[0].t) and summary.connections_opened == 2
    assert summary.outcomes["ok"] == 39
    listener.close()


def test_achieved_rate_is_the_asked_one_or_reported_lower(tmp_path, loop):
    port = free_port()
    server = builtin(loop, port)
    url = f"http://{LOOP}:{port}/"
    summaries, _ = run(tmp_path, GeneratorSpec("steady", "", url, rate=20, stop=2))
    steady = summaries["steady"]
    assert steady.sent == steady.planned == 40 and steady.rate_kept and abs(steady.achieved_rate - 20) < 0.5
    assert steady.late_starts <= 2, steady
    # a rate no machine keeps with 20 requests in flight: what was achieved is reported, not the asked rate
    summaries, records = run(tmp_path, GeneratorSpec("flood", "", url, rate=50_000, stop=1, max_inflight=20))
    flood = summaries["flood"]
    assert flood.planned == 50_000 and flood.sent < 25_000 and flood.achieved_rate < 25_000, flood
    assert not flood.rate_kept and flood.late_starts > flood.sent / 2 and flood.peak_inflight <= 20
    assert flood.sent == len(records["flood"]) and flood.outcomes.get("ok") == flood.sent
    server.stop()


def test_stopped_by_pid_before_its_stop_time(tmp_path, loop):
    port = free_port()
    server = builtin(loop, port)
    generator = Generator(GeneratorSpec("long", "", f"http://{LOOP}:{port}/", rate=10, stop=60), time.monotonic(),
                          tmp_path)
    generator.start()
    generator.wait_ready()
    time.sleep(1.5)
    started = time.monotonic()
    generator.stop()
    assert not generator.alive() and time.monotonic() - started < 2
    summary = generator.summary()
    assert summary.stopped_early and 10 <= summary.sent <= 20 and summary.planned == 600
    assert abs(summary.achieved_rate - 10) < 1.5, summary
    server.stop()


# ------------------------------------------------------------------ the built-in server's keep-alive

def exchange(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(1)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_builtin_http_keeps_connections_as_http_1_1_says(loop):
    port = free_port()
    server = builtin(loop, port)
    with socket.create_connection((LOOP, port)) as s:  # HTTP/1.1: persistent
        first = exchange(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        second = exchange(s, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"Connection: keep-alive" in first and b'"pod": "web-1"' in second
        assert not closed_by_server(s)
    with socket.create_connection((LOOP, port)) as s:  # asked to close
        assert b"Connection: close" in exchange(s, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert closed_by_server(s)
    with socket.create_connection((LOOP, port)) as s:  # HTTP/1.0: closes unless asked to keep
        assert b"Connection: close" in exchange(s, b"GET / HTTP/1.0\r\n\r\n")
        assert closed_by_server(s)
    with socket.create_connection((LOOP, port)) as s:  # two requests in one write: two answers, in order
        s.sendall(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK") == 2
    with socket.create_connection((LOOP, port)) as s:  # a stopped pod closes what is established
        exchange(s, b"GET / HTTP/1.1\r\n\r\n")
        loop.call(server.stop)
        assert closed_by_server(s)


@pytest.mark.unit
def test_generator_spec_refuses_what_cannot_run():
    for bad, message in ((dict(protocol="sctp"), "protocol 'sctp'"), (dict(connections="pooled"), "connections"),
                         (dict(rate=0), "rate"), (dict(start=5, stop=5), "start"),
                         (dict(target="10.0.0.1:80", protocol="http"), "needs protocol tcp or udp"),
                         (dict(target="10.0.0.1", protocol="udp"), "expected host:port")):
        args = dict(name="g", netns="", target="http://x/", rate=10, stop=10) | bad
        with pytest.raises(ValueError, match=message):
            GeneratorSpec(**args)
    spec = GeneratorSpec("g", "", "http://x/", rate=20, start=1, stop=3.5)
    assert spec.planned == 50 and spec.inflight_limit == 36
    assert GeneratorSpec("g", "", "http://x/", rate=3, stop=1).planned == 3  # at 0, 1/3, 2/3


def test_generators_of_one_namespace_bind_disjoint_source_ports(tmp_path, loop):
    """Two generators of one namespace (the client's, in a scenario) each bind their own slice
    of the ephemeral ports, in turn, so that none of their connections shares a 4-tuple with the
    other's once a load balancer's DNAT makes their destinations one (traffic.with_source_ports)."""
    port = free_port()
    server = builtin(loop, port)
    udp = free_port(socket.SOCK_DGRAM)
    server_udp = BuiltinServer(PodIdentity("web-1", "default", LOOP, "node1"), [("UDP", udp)])
    loop.run(server_udp.start(contextlib.nullcontext))
    specs = [GeneratorSpec("a", "", f"http://{LOOP}:{port}/", rate=40, stop=1),
             GeneratorSpec("b", "", f"http://{LOOP}:{port}/", rate=40, stop=1),
             GeneratorSpec("u", "", f"{LOOP}:{udp}", protocol="udp", rate=20, stop=1)]
    summaries, records = run(tmp_path, *specs)
    ranges = {}
    for name in ("a", "b", "u"):
        assert summaries[name].outcomes == {"ok": summaries[name].sent}, summaries[name]
        ports = [int(r.source.rsplit(":", 1)[1]) for r in sorted(records[name], key=lambda r: r.t)]
        ranges[name] = (min(ports), max(ports))
        assert len(set(ports)) == len(ports) and ports == sorted(ports)  # a new port each, in turn
    slices = sorted(ranges.values())
    assert slices[0][0] >= 32768 and slices[0][1] < slices[1][0] and slices[1][1] < slices[2][0]
    assert slices[2][1] <= 60999
    loop.call(server.stop)
    loop.call(server_udp.stop)


def test_source_port_slices_only_for_a_shared_namespace():
    specs = [GeneratorSpec("a", "ns1", "http://x/", rate=1, stop=1), GeneratorSpec("b", "ns1", "http://x/", rate=1, stop=1),
             GeneratorSpec("c", "ns2", "http://x/", rate=1, stop=1)]
    a, b, c = with_source_ports(specs)
    assert a.source_ports == (32768, 46883) and b.source_ports == (46884, 60999) and c.source_ports is None
    assert GeneratorSpec(**{**asdict(a), "source_ports": [1, 2]}).source_ports == (1, 2)  # read back from JSON
    with pytest.raises(ValueError, match="source_ports"):
        GeneratorSpec("d", "", "http://x/", rate=1, stop=1, source_ports=(70000, 70001))


def test_a_generator_without_t0_starts_its_clock_at_go_not_at_launch(tmp_path, loop):
    """t0=None (what `svclab run` uses): a probe set up and ready sends nothing until go(t0); its
    records count from that t0, and none is late however long the launch took."""
    port = free_port()
    server = builtin(loop, port)
    generator = Generator(GeneratorSpec("go", "", f"http://{LOOP}:{port}/", rate=20, stop=1.0), None, tmp_path)
    generator.start()
    generator.wait_ready()
    time.sleep(1.2)  # past its stop time, had the clock started at launch
    assert generator.alive() and generator.records() == []
    t0 = time.monotonic() + 0.2
    generator.go(t0)
    summary = generator.wait()
    records = generator.records()
    assert len(records) == 20 and all(r.ok for r in records), records
    assert 0 <= records[0].t < 0.05 and summary.late_starts == 0, (records[0], summary)
    server.stop()


def test_traffic_without_t0_sends_go_once_every_generator_is_ready(tmp_path, loop):
    port = free_port()
    server = builtin(loop, port)
    specs = [GeneratorSpec(name, "", f"http://{LOOP}:{port}/", rate=10, stop=0.5) for name in ("a", "b")]
    before = time.monotonic()
    with Traffic(specs, None, tmp_path) as traffic:
        assert traffic.t0 is not None and traffic.t0 > before
        summaries = traffic.wait()
    assert [s.sent for s in summaries.values()] == [5, 5] and all(s.late_starts == 0 for s in summaries.values())
    server.stop()
