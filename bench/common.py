"""Shared benchmark plumbing: a throwaway API server process and table printing."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from testbed.client.client import ApiClient
from testbed.paths import StateDir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@contextlib.contextmanager
def apiserver_process(*extra: str) -> Iterator[StateDir]:
    """An API server in a fresh temporary state directory, stopped (by pid) afterwards."""
    with tempfile.TemporaryDirectory(prefix="svclab-bench-") as tmp:
        state = StateDir(Path(tmp) / "state")
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed", "apiserver", "--state-dir", str(state.path), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 20
            while not (state.api_socket.exists() and state.token_file.exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("apiserver did not start")
                time.sleep(0.02)
            yield state
        finally:
            proc.terminate()
            proc.wait(10)


def client_for(state: StateDir) -> ApiClient:
    return ApiClient.for_state_dir(state)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


__all__ = ["apiserver_process", "client_for", "percentile", "print_table", "statistics", "RESULTS"]
