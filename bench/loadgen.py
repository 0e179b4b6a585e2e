"""A paced HTTP load generator for the failover test and benchmark: `python -m bench.loadgen URL`.

Starts one request every 1/rate seconds (each on its own thread, so a hanging request
never delays the next), each a new TCP connection bounded by --timeout, and prints one
JSON object: the wall-clock start (time.time()) and per request its start (s after
that), ok, latency (ms) and the answering pod (or the error). Runs wherever it is started (e.g. `ip netns exec <c>-client`).
SIGTERM ends it early: it starts no more requests, waits for those under way and reports them.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import urllib.request


def fetch(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return True, json.loads(response.read()).get("pod", "")
    except Exception as exc:  # any failure counts; the kind is in the report
        reason = getattr(exc, "reason", None)  # URLError wraps the socket error
        return False, type(reason if isinstance(reason, BaseException) else exc).__name__


def run(url: str, rate: float, duration: float, timeout: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    wall, t0 = time.time(), time.monotonic()

    def one(start: float) -> None:
        ok, detail = fetch(url, timeout)
        with lock:
            results.append({"t": round(start, 4), "ok": ok, "ms": round((time.monotonic() - t0 - start) * 1000, 1),
                            "detail": detail})

    threads = []
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    for i in range(int(rate * duration)):
        if stopped.is_set():
            break
        start = i / rate
        time.sleep(max(0.0, t0 + start - time.monotonic()))
        thread = threading.Thread(target=one, args=(time.monotonic() - t0,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return {"start": wall, "requests": sorted(results, key=lambda r: r["t"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=1.0, help="per request, seconds")
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.rate, args.duration, args.timeout)))


if __name__ == "__main__":
    main()
