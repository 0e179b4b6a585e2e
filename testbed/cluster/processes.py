"""The cluster's own processes: started, recorded by pid, stopped by pid.

Each process is recorded with its start time (from /proc) so that a pid the
kernel has since given to another program is never signalled, and with how it
was started. Restarting is the supervisor's job (supervisor.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed import naming
from testbed.cluster.procfs import starttime


@dataclass
class Recorded:
    name: str
    pid: int
    starttime: int | None
    argv: list[str] | None = None  # `svclab <argv>`, for processes start() made
    netns: str | None = None

    def alive(self) -> bool:
        return self.starttime is not None and starttime(self.pid) == self.starttime

    def flag(self, name: str, default: str | None = None) -> str | None:
        """The value the process was started with for `name` (e.g. "--proxy-mode"), else default."""
        argv = self.argv or []
        return argv[argv.index(name) + 1] if name in argv[:-1] else default


class ProcessTable:
    """processes.json in the state directory: name -> pid and start time."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "processes.json"
        self.logs = state_dir / "logs"

    def load(self) -> dict[str, Recorded]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {name: Recorded(name, v["pid"], v["starttime"], v.get("argv"), v.get("netns"))
                for name, v in data.items()}

    def _save(self, table: dict[str, Recorded]) -> None:
        tmp = self.path.with_suffix(".tmp")
        entries = {n: {"pid": r.pid, "starttime": r.starttime,
                       **({"argv": r.argv, "netns": r.netns} if r.argv is not None else {})} for n, r in table.items()}
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.path)

    def record(self, name: str, pid: int, argv: list[str] | None = None, netns: str | None = None) -> Recorded:
        table = self.load()
        table[name] = Recorded(name, pid, starttime(pid), argv, netns)
        self._save(table)
        return table[name]

    def forget(self, name: str) -> None:
        table = self.load()
        if table.pop(name, None) is not None:
            self._save(table)

    def start(self, name: str, argv: list[str], netns: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `svclab <argv>` (in a named network namespace if given), logging to logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "testbed", *argv]
        if netns:
            # nsenter, not `ip netns exec`: that one also gives the process a mount
            # namespace of its own, where the pod namespaces it mounts would stay.
            command = ["nsenter", f"--net={naming.netns_path(netns)}", "--", *command]
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.record(name, proc.pid, argv, netns)
        return proc


def stop_pids(processes: list[Recorded], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`, to every recorded process that is still the same process."""
    alive = [p for p in processes if p.alive() and p.pid != os.getpid()]
    for p in alive:
        _signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap([p.pid for p in alive])
        alive = [p for p in alive if p.alive()]
    for p in alive:
        _signal(p.pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pids: list[int]) -> None:
    """Collect those of the pids that are exited children of this process (a foreground
    `svclab up` is their parent). Only these: a waitpid(-1) would take other children's exit
    statuses from the Popen objects (and the supervisor) that wait for them."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
