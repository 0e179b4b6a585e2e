"""New-connection rate: `python -m bench.connrate HOST:PORT [HOST:PORT ...] [--clients 20] [--connections 200]`.

Each client is a process of its own that opens `connections` new TCP connections one
after another as fast as they are answered: connect, `GET / HTTP/1.0`, read to the
server's close. Every connection is bounded by --timeout; a connection that fails or
times out counts as failed (and is not retried). Prints one JSON object: clients,
connections per client, failed (with the errors by kind), seconds, rate (connections
answered per second, all clients together), p50/p99/max latency in ms (connect to
close). With several targets, client i uses target i mod their number. Runs wherever it is started (e.g. `ip netns exec <c>-client`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time

from bench.common import percentile

REQUEST = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"


def one(host: str, port: int, timeout: float) -> str:
    """'' when answered, else the kind of error."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(REQUEST)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return "" if data.startswith(b"HTTP/1.") else "BadAnswer"
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__


def client(host: str, port: int, count: int, timeout: float, start_at: float, out) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    latencies, errors = [], {}
    for _ in range(count):
        t0 = time.monotonic()
        error = one(host, port, timeout)
        if error:
            errors[error] = errors.get(error, 0) + 1
        else:
            latencies.append((time.monotonic() - t0) * 1000)
    out.send((latencies, errors, time.time()))
    out.close()


def run(targets: list[tuple[str, int]], clients: int, connections: int, timeout: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.2  # every client forked before any starts
    pipes, procs = [], []
    for i in range(clients):
        receiver, sender = ctx.Pipe(duplex=False)
        host, port = targets[i % len(targets)]
        proc = ctx.Process(target=client, args=(host, port, connections, timeout, start_at, sender))
        proc.start()
        sender.close()
        pipes.append(receiver)
        procs.append(proc)
    latencies, errors, ended = [], {}, start_at
    for receiver in pipes:
        lat, err, end = receiver.recv()
        latencies += lat
        for kind, n in err.items():
            errors[kind] = errors.get(kind, 0) + n
        ended = max(ended, end)
    for proc in procs:
        proc.join()
    seconds = ended - start_at
    return {"clients": clients, "connections": connections, "answered": len(latencies),
            "failed": sum(errors.values()), "errors": errors, "seconds": round(seconds, 3),
            "rate": round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": round(percentile(latencies, 50), 2), "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies, default=float("nan")), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--connections", type=int, default=200, help="per client")
    parser.add_argument("--timeout", type=float, default=3.0, help="per connection, seconds")
    args = parser.parse_args()
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.targets]
    print(json.dumps(run(targets, args.clients, args.connections, args.timeout)))


if __name__ == "__main__":
    main()
