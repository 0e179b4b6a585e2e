"""Supervision of a cluster's components, as systemd (Restart=always) and the kubelet
(CrashLoopBackOff) keep a real cluster's daemons running.

The process that runs the cluster (`svclab up`, `svclab run`) starts every component through
its Supervisor: the API server, the controller-manager, the cloud-controller, the
lb-controller, and each node's kubelet and kube-proxy. A component that exits is started
again exactly as before, after a back-off that doubles from 0.2 s up to 30 s and starts over
once the component has run for 10 s. Its restarts, last exit and the last lines of its log
are kept. `stop` keeps a component down until `start`; a killed one comes back.

Other processes (`svclab status|stop|start|restart`) talk to the supervisor over a Unix
socket in the state directory (supervisor.sock: one JSON request line, one JSON answer line);
`kill` (fault injection: testbed/faults/) sends SIGKILL to the current process, which then comes
back like any crashed component, or, with keepDown, stays down until `start` (a node crash);
it also writes what it knows to supervisor.json at every change, so `svclab status` can
still say something when the supervising process is gone. Every pid goes into
processes.json as before: `down` and `clean` stop restarted processes too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed.cluster.processes import ProcessTable

log = logging.getLogger("svclab.supervisor")

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 10.0  # a run this long starts the back-off over
TICK = 0.05
LOG_TAIL_LINES = 5
STOP_TIMEOUT = 10.0  # SIGTERM, then SIGKILL
LOG_MAX_BYTES = 20 * 1024 * 1024  # a component's log beyond this is rotated (one old copy kept)
LOG_CHECK_PERIOD = 1.0
RUNNING, RESTARTING, STOPPED = "RUNNING", "RESTARTING", "STOPPED"
#: What `svclab stop|start|restart COMPONENT` accepts (node components take --node).
COMPONENTS = ("apiserver", "controller-manager", "cloud-controller", "lb-controller", "kubelet", "kube-proxy")
NODE_COMPONENTS = ("kubelet", "kube-proxy")


class SupervisorError(RuntimeError):
    """A request the supervisor refuses (unknown component or node); nothing was changed."""


def component_of(process_name: str) -> tuple[str, str | None]:
    """("kube-proxy", "node1") for "kube-proxy-node1"; ("apiserver", None) for "apiserver"."""
    for kind in NODE_COMPONENTS:
        if process_name.startswith(kind + "-"):
            return kind, process_name[len(kind) + 1:]
    return process_name, None


def describe_exit(returncode: int) -> str:
    return f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"


@dataclass
class Supervised:
    """One component under supervision."""

    name: str  # its process name: "kube-proxy-node1"
    argv: list[str]
    netns: str | None
    proc: subprocess.Popen | None = None
    wanted: bool = True  # False after `stop`, until `start`
    state: str = STOPPED
    restarts: int = 0
    started_at: float = 0.0  # wall clock, for uptime
    started_mono: float = 0.0
    last_exit: str = ""
    last_error: list[str] = field(default_factory=list)
    backoff: float = BACKOFF_FIRST
    next_start: float | None = None  # monotonic

    def status(self, now: float) -> dict[str, Any]:
        kind, node = component_of(self.name)
        running = self.state == RUNNING and self.proc is not None
        return {
            "name": self.name, "component": kind, "node": node, "state": self.state,
            "pid": self.proc.pid if running else None, "restarts": self.restarts,
            "uptime": round(now - self.started_at, 1) if running else None,
            "lastExit": self.last_exit, "lastError": self.last_error,
            "nextStartIn": round(max(0.0, self.next_start - time.monotonic()), 1)
            if self.next_start is not None else None,
        }


class Supervisor:
    """Starts components, restarts those that exit, and serves stop/start/restart/status."""

    def __init__(self, processes: ProcessTable, state_dir: Path) -> None:
        self.processes = processes
        self.state_dir = state_dir
        self.socket_path = state_dir / "supervisor.sock"
        self.status_path = state_dir / "supervisor.json"
        self._components: dict[str, Supervised] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: socketserver.UnixStreamServer | None = None
        self.log_max_bytes = LOG_MAX_BYTES
        self._next_log_check = 0.0
        self.on_change: Callable[[], None] = lambda: None

    # ---- what the cluster's start calls ------------------------------------------------------
    def start(self, name: str, argv: list[str], netns: str | None = None) -> subprocess.Popen:
        """Start `svclab <argv>` as component `name` and keep it running."""
        with self._lock:
            component = Supervised(name, argv, netns)
            self._components[name] = component
            self._spawn(component, time.monotonic())
            assert component.proc is not None
            return component.proc

    def run_in_background(self) -> None:
        """Watch the components and serve the control socket, each in a daemon thread."""
        self.socket_path.unlink(missing_ok=True)
        self._server = _ControlServer(str(self.socket_path), self)
        os.chmod(self.socket_path, 0o600)
        for target, name in ((self._watch, "supervisor"), (self._server.serve_forever, "supervisor-control")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        """Stop supervising (the cluster's stop then stops the processes)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        self.socket_path.unlink(missing_ok=True)

    # ---- requests ----------------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        verb = request.get("verb")
        if verb == "status":
            return {"components": self.status()}
        if verb not in ("stop", "start", "restart", "kill"):
            raise SupervisorError(f"unknown verb {verb!r}: status, stop, start, restart or kill")
        names = self.resolve(request.get("component"), request.get("node"))
        killed: dict[str, int | None] = {}
        for name in names:
            if verb == "kill":
                killed[name] = self._kill(self._components[name], keep_down=request.get("keepDown") is True)
            else:
                getattr(self, f"_{verb}")(self._components[name])
        self._changed()
        answer: dict[str, Any] = {"components": [c for c in self.status() if c["name"] in names]}
        if verb == "kill":
            answer["killed"] = killed
        return answer

    def resolve(self, component: object, node: object) -> list[str]:
        """The process names a (component, node) request means; SupervisorError if none."""
        if component not in COMPONENTS:
            raise SupervisorError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")
        with self._lock:
            if component in NODE_COMPONENTS:
                nodes = sorted(component_of(n)[1] for n in self._components if component_of(n)[0] == component)
                if node is not None and node not in nodes:
                    raise SupervisorError(f"no node {node!r} in this cluster (nodes: {', '.join(nodes)})")
                return [f"{component}-{n}" for n in ([node] if node is not None else nodes)]
            if node is not None:
                raise SupervisorError(f"{component} runs once per cluster: it takes no --node")
            if component not in self._components:
                raise SupervisorError(f"{component} is not part of this cluster")
            return [str(component)]

    def status(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            return [c.status(now) for c in self._components.values()]

    def _stop(self, component: Supervised) -> None:
        with self._lock:
            component.wanted = False
            component.next_start = None
            proc = component.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: the component cleans up (a kubelet stops its pods)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with self._lock:
            self._exited(component)
            component.state = STOPPED

    def _start(self, component: Supervised) -> None:
        with self._lock:
            component.wanted = True
            component.backoff = BACKOFF_FIRST
            if component.proc is None or component.proc.poll() is not None:
                self._spawn(component, time.monotonic())

    def _kill(self, component: Supervised, keep_down: bool) -> int | None:
        """SIGKILL the running process (no clean-up, as a crash); the pid killed, None if none ran.
        The watch loop then restarts it with back-off, unless keep_down holds it until `start`."""
        with self._lock:
            if keep_down:
                component.wanted = False
                component.next_start = None
            proc = component.proc
            if proc is None or proc.poll() is not None:
                if keep_down:
                    self._exited(component)
                    component.state = STOPPED
                return None
            proc.kill()
        proc.wait(5)
        if keep_down:
            with self._lock:
                self._exited(component)
                component.state = STOPPED
        return proc.pid

    def _restart(self, component: Supervised) -> None:
        self._stop(component)
        self._start(component)

    # ---- the watch loop ----------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.wait(TICK):
            try:
                self.tick(time.monotonic())
            except Exception:  # never let one bad tick end supervision
                log.exception("supervisor tick failed")

    def tick(self, now: float) -> None:
        changed = False
        with self._lock:
            for component in self._components.values():
                if component.state == RUNNING and component.proc is not None and component.proc.poll() is not None:
                    self._exited(component)
                    if component.wanted:
                        self._schedule_restart(component, now)
                    else:
                        component.state = STOPPED
                    changed = True
                elif component.next_start is not None and now >= component.next_start and component.wanted:
                    component.restarts += 1
                    self._spawn(component, now)
                    changed = True
        if changed:
            self._changed()
        if now >= self._next_log_check:
            self._next_log_check = now + LOG_CHECK_PERIOD
            self.rotate_logs()

    def rotate_logs(self) -> list[str]:
        """Bound every component's log: past log_max_bytes it is copied to <name>.log.1 and
        truncated in place (components write with O_APPEND, so they go on at the new end; lines
        written between the copy and the truncation are lost, as with logrotate's copytruncate)."""
        rotated = []
        with self._lock:
            names = list(self._components)
        for name in names:
            path = self.processes.logs / f"{name}.log"
            try:
                if path.stat().st_size <= self.log_max_bytes:
                    continue
                shutil.copyfile(path, path.with_name(path.name + ".1"))
                os.truncate(path, 0)
            except OSError as exc:
                log.warning("rotating %s: %s", path, exc)
                continue
            rotated.append(name)
        return rotated

    def _schedule_restart(self, component: Supervised, now: float) -> None:
        if now - component.started_mono >= BACKOFF_RESET_AFTER:
            component.backoff = BACKOFF_FIRST
        component.next_start = now + component.backoff
        component.state = RESTARTING
        log.warning("%s %s; restarting in %.1f s", component.name, component.last_exit, component.backoff)
        component.backoff = min(component.backoff * 2, BACKOFF_MAX)

    def _exited(self, component: Supervised) -> None:
        if component.proc is None or component.proc.returncode is None:
            return
        component.last_exit = describe_exit(component.proc.returncode)
        component.last_error = self._log_tail(component.name)
        component.proc = None

    def _spawn(self, component: Supervised, now: float) -> None:
        component.proc = self.processes.start(component.name, component.argv, component.netns)
        component.state = RUNNING
        component.started_at, component.started_mono = time.time(), now
        component.next_start = None

    def _log_tail(self, name: str) -> list[str]:
        try:
            with open(self.processes.logs / f"{name}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return []
        return [line[:300] for line in lines[-LOG_TAIL_LINES:]]

    def _changed(self) -> None:
        with self._lock:  # the watch loop and a control request may both write: one tmp file at a time
            tmp = self.status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"updated": time.time(), "supervisorPid": os.getpid(),
                                       "components": self.status()}, indent=1))
            os.replace(tmp, self.status_path)
        self.on_change()


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        super().__init__(path, _ControlHandler)


class _ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(65536)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise SupervisorError("a request is one JSON object")
            answer: dict[str, Any] = {"ok": True, **self.server.supervisor.handle(request)}
        except (ValueError, SupervisorError) as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:  # the supervisor keeps serving
            log.exception("control request %r failed", line[:200])
            answer = {"ok": False, "error": f"internal error: {exc}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


def ask(state_dir: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a cluster's supervisor; OSError if none listens."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / "supervisor.sock"))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = sock.makefile("rb").readline()
    if not answer:
        raise OSError("the supervisor closed the connection without an answer")
    return json.loads(answer)


def last_known_status(state_dir: Path, processes: ProcessTable) -> list[dict[str, Any]]:
    """Status entries, in `Supervised.status`'s shape, for a cluster whose supervisor is gone:
    what it last wrote to supervisor.json, with liveness read from the process table."""
    try:
        written = json.loads((state_dir / "supervisor.json").read_text())["components"]
        last = {c["name"]: c for c in written}
    except (OSError, ValueError, KeyError, TypeError):
        last = {}
    entries = []
    for name, recorded in processes.load().items():
        if name == "up":
            continue
        kind, node = component_of(name)
        alive = recorded.alive()
        known = last.get(name, {})
        entries.append({
            "name": name, "component": kind, "node": node, "state": RUNNING if alive else STOPPED,
            "pid": recorded.pid if alive else None, "restarts": known.get("restarts", 0), "uptime": None,
            "lastExit": known.get("lastExit", ""), "lastError": known.get("lastError", []),
            "nextStartIn": None,
        })
    return entries
