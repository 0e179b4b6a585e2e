"""A pod's containers as the kubelet runs them: exits, restarts per restartPolicy, statuses.

svclab runs one workload per pod (the first container's command in its sandbox: command.py, or
the built-in servers of every container's ports), so every container of a pod shares one run:
it starts, it ends (the process exits, the kernel's OOM killer kills it over its memory limit,
the runtime socket kills a built-in server: exit 137 as SIGKILL), and the restartPolicy
decides (Always: restart; OnFailure: restart unless it exited 0; Never: the pod ends Failed or
Succeeded). Restarts back off as upstream's kubelet does: the first at once, then 10 s doubling
to 5 min while they keep failing (the container waits in CrashLoopBackOff), from the start
again after 10 min without a failure. Each restart counts in
status.containerStatuses[].restartCount; state says how the container is now (running,
waiting, or terminated when it is not restarted) and lastState how its previous run ended
(terminated: exit code, reason Completed, Error or OOMKilled).
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
OOM_KILLED = "OOMKilled"


def should_restart(policy: str, exit_code: int) -> bool:
    policy = policy or "Always"
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def exit_code_of(returncode: int) -> int:
    """Popen's returncode (-9 for a signal) as a runtime reports it (128 + signal)."""
    return 128 - returncode if returncode < 0 else returncode


def termination(exit_code: int, started_at: str, oom_limit: str | None = None) -> pb.ContainerStateTerminated:
    """Kubernetes' terminated state of a run: OOMKilled when the kernel killed a process of it for
    its memory limit (oom_limit: that limit; as containerd reports it), else Completed or Error."""
    state = pb.ContainerStateTerminated(exit_code=exit_code, started_at=started_at, finished_at=now_rfc3339())
    if exit_code > 128:
        state.signal = exit_code - 128
    if oom_limit is not None:
        state.reason = OOM_KILLED
        state.message = f"the container exceeded its memory limit of {oom_limit}; exit code {exit_code}"
    else:
        state.reason = "Completed" if exit_code == 0 else "Error"
        state.message = f"command exited {exit_code}"
    return state


@dataclass
class ContainerRun:
    """The current and last run of a pod's containers, and its restart back-off."""

    restarts: int = 0
    started_at: str = ""
    terminated: pb.ContainerStateTerminated | None = None  # the run that ended, until restarted
    last_terminated: pb.ContainerStateTerminated | None = None  # the run before the current one
    waiting: str = ""  # CrashLoopBackOff while waiting for a restart
    waiting_message: str = ""
    backoff: float = 0.0  # the delay before the next restart; 0: at once
    last_failure: float | None = None  # monotonic
    exit_code: int | None = None  # set when the workload exited (a built-in server killed), until restarted
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self) -> None:
        self.started_at, self.exit_code, self.waiting, self.waiting_message = now_rfc3339(), None, "", ""
        if self.terminated is not None:
            self.last_terminated, self.terminated = self.terminated, None

    def exited(self, ended: pb.ContainerStateTerminated) -> None:
        self.terminated, self.started_at, self.exit_code = ended, "", ended.exit_code

    def restarting(self, delay: float, container: str, pod: pb.Pod) -> None:
        """Waiting for a restart in `delay` s: CrashLoopBackOff (upstream's words) unless at once;
        the run that ended becomes lastState."""
        self.last_terminated, self.terminated = self.terminated, None
        if delay:
            self.waiting = CRASH_LOOP
            self.waiting_message = (f"back-off {delay:.0f}s restarting failed container={container} "
                                    f"pod={pod.metadata.name}_{pod.metadata.namespace}({pod.metadata.uid})")

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
            elif self.terminated is not None:
                status.state.terminated.CopyFrom(self.terminated)
            else:
                status.state.waiting.reason = self.waiting or "ContainerCreating"
                status.state.waiting.message = self.waiting_message
            if self.last_terminated is not None:
                status.last_state.terminated.CopyFrom(self.last_terminated)
            out.append(status)
        return out

    def carry_over(self, pod: pb.Pod) -> None:
        """Keep the restart count and last termination a pod had (its kubelet was restarted)."""
        self.restarts = max((s.restart_count for s in pod.status.container_statuses), default=0)
        last = next((s.last_state.terminated for s in pod.status.container_statuses
                     if s.last_state.HasField("terminated")), None)
        if last is not None:
            self.last_terminated = pb.ContainerStateTerminated()
            self.last_terminated.CopyFrom(last)


def watch_exit(proc: subprocess.Popen, on_exit: Callable[[], None]) -> None:
    """Call on_exit (in the event loop) as soon as the process ends, without a thread: a pidfd."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(proc.pid)

    def readable() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        on_exit()

    loop.add_reader(fd, readable)
