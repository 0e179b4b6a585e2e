"""A pod's containers as the kubelet runs them: exits, restarts per restartPolicy, statuses.

svclab runs one workload per pod (the first container's command, or the built-in servers of
every container's ports), so every container of a pod shares one run: it starts, it exits (the
process ends, or the runtime socket kills a built-in server: exit 137 as SIGKILL), and the
restartPolicy decides (Always: restart; OnFailure: restart unless it exited 0; Never: the pod
ends Failed or Succeeded). Restarts back off as upstream's kubelet does: the first at once,
then 10 s doubling to 5 min while they keep failing (the container waits in CrashLoopBackOff),
from the start again after 10 min without a failure. Each restart counts in
status.containerStatuses[].restartCount; lastState says how the previous run ended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Callable

from testbed.api.meta import now_rfc3339
from testbed.api.v1 import api_pb2 as pb

BACKOFF_FIRST = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0
KILLED = 128 + signal.SIGKILL  # a container killed with SIGKILL exits 137, as the runtime reports it
CRASH_LOOP = "CrashLoopBackOff"


def should_restart(policy: str, exit_code: int) -> bool:
    policy = policy or "Always"
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def exit_code_of(returncode: int) -> int:
    """Popen's returncode (-9 for a signal) as a runtime reports it (128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class ContainerRun:
    """The current and last run of a pod's containers, and its restart back-off."""

    restarts: int = 0
    started_at: str = ""
    last_started_at: str = ""
    last_exit: tuple[int, str] | None = None  # (exit code, finished at)
    waiting: str = ""  # CrashLoopBackOff while waiting for a restart
    backoff: float = 0.0  # the delay before the next restart; 0: at once
    last_failure: float | None = None  # monotonic
    exit_code: int | None = None  # set when the workload exited (a built-in server killed), until restarted
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self) -> None:
        self.started_at, self.exit_code, self.waiting = now_rfc3339(), None, ""

    def exited(self, code: int) -> None:
        self.last_exit, self.last_started_at = (code, now_rfc3339()), self.started_at
        self.started_at, self.exit_code = "", code

    def restart_delay(self, now: float) -> float:
        """How long to wait before restarting after an exit at `now` (upstream's back-off)."""
        if self.last_failure is not None and now - self.last_failure > BACKOFF_RESET_AFTER:
            self.backoff = 0.0
        delay = self.backoff
        self.backoff = min(max(self.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        self.last_failure = now
        return delay

    def statuses(self, pod: pb.Pod, ready: bool) -> list[pb.ContainerStatus]:
        out = []
        for container in pod.spec.containers:
            status = pb.ContainerStatus(name=container.name, image=container.image, ready=ready,
                                        restart_count=self.restarts, started=bool(self.started_at))
            if self.started_at:
                status.state.running.started_at = self.started_at
            else:
                status.state.waiting.reason = self.waiting or "ContainerCreating"
            if self.last_exit is not None:
                code, finished = self.last_exit
                last = status.last_state.terminated
                last.exit_code, last.reason, last.finished_at = code, "Completed" if code == 0 else "Error", finished
                last.started_at = self.last_started_at
                if code > 128:
                    last.signal = code - 128
            out.append(status)
        return out

    def carry_over(self, pod: pb.Pod) -> None:
        """Keep the restart count a pod had (its kubelet was restarted)."""
        self.restarts = max((s.restart_count for s in pod.status.container_statuses), default=0)


def watch_exit(proc: subprocess.Popen, on_exit: Callable[[], None]) -> None:
    """Call on_exit (in the event loop) as soon as the process ends, without a thread: a pidfd."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)

    def readable() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        on_exit()

    loop.add_reader(fd, readable)
