"""`command:` containers: started in their sandbox (node/sandbox.py) inside their pod's cgroup
(node/cgroups.py), and how each run ended (containers.termination: Completed, Error, OOMKilled).

The pod's cgroup lives as long as the pod: every run of its command (a restart per
restartPolicy) is placed in the same group, and a run counts as OOMKilled when the group's OOM
kill counter grew during it."""

from __future__ import annotations

import asyncio
import grp
import logging
import marshal
import os
import pwd
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testbed import naming
from testbed.api import quantity
from testbed.api.v1 import api_pb2 as pb
from testbed.node import cgroups, containers
from testbed.paths import DEFAULT_STATE_ROOT

log = logging.getLogger("svclab.kubelet")

SANDBOX = str(Path(__file__).with_name("sandbox.py"))
USER, GROUP = "nobody", "nogroup"
PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class CommandContainer:
    """One run of a pod's command: the sandbox process (the kubelet's child) and its cgroup."""

    process: subprocess.Popen
    cgroup: cgroups.PodCgroup | None
    memory_limit: str = ""
    oom_kills_before: int = 0  # the group's OOM kills when this run started

    def exit_code(self) -> int | None:
        code = self.process.poll()
        return None if code is None else containers.exit_code_of(code)

    def termination(self, started_at: str) -> pb.ContainerStateTerminated:
        """How this run ended; OOMKilled when the kernel killed a process of the pod for its limit."""
        code = self.exit_code()
        oom = self.cgroup is not None and self.cgroup.oom_kills() > self.oom_kills_before
        return containers.termination(code or 0, started_at, (self.memory_limit or "?") if oom else None)

    def kill(self) -> None:
        """SIGKILL, as a runtime kills a container: the sandbox's process group, and with the
        sandbox its init (PR_SET_PDEATHSIG), and with init every process of the pod's PID namespace."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """The pod goes: SIGTERM (the sandbox forwards it to the command), SIGKILL after 5 s, then
        the pod's cgroup is removed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 5)
            except asyncio.TimeoutError:
                os.killpg(self.process.pid, signal.SIGKILL)
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.remove)


def limits_of(resources: pb.ResourceRequirements) -> cgroups.Limits:
    def quantity_of(values, name: str, convert):
        return convert(values[name]) if name in values else None

    return cgroups.Limits(
        cpu_limit_millicores=quantity_of(resources.limits, "cpu", quantity.millicores),
        cpu_request_millicores=quantity_of(resources.requests, "cpu", quantity.millicores),
        memory_limit_bytes=quantity_of(resources.limits, "memory", quantity.byte_count),
    )


@dataclass(frozen=True)
class SandboxPaths:
    """What a pod must not see of the machine: svclab's state, namespaces and other pods' files."""

    state_dir: Path

    def hidden(self) -> list[str]:
        return sorted({str(DEFAULT_STATE_ROOT), str(self.state_dir), str(naming.NETNS_DIR), "/etc/netns"})


def start(pod: pb.Pod, container: pb.Container, netns: str, log_path: Path, paths: SandboxPaths,
          hierarchies: cgroups.Hierarchies | None, cluster: str, node_name: str) -> CommandContainer:
    """The container's command, unprivileged, in its own namespaces and its pod's cgroup (made, or
    emptied of what an earlier run left, with the container's limits)."""
    cgroup = None
    if hierarchies is not None:
        cgroup = cgroups.PodCgroup(hierarchies, cluster, pod.metadata.uid)
        cgroup.create(limits_of(container.resources))
    ready_read, ready_write = os.pipe()
    config = {
        "netns": naming.netns_path(netns),
        "hostname": pod.metadata.name,
        "resolv_conf": str(Path("/etc/netns") / netns / "resolv.conf"),
        "hide": paths.hidden(),
        "uid": pwd.getpwnam(USER).pw_uid,
        "gid": grp.getgrnam(GROUP).gr_gid,
        "argv": list(container.command) + list(container.args),
        "env": {"PATH": PATH, "HOME": "/tmp", "HOSTNAME": pod.metadata.name[:63], "POD_NAME": pod.metadata.name,
                "POD_NAMESPACE": pod.metadata.namespace, "NODE_NAME": node_name},
    }
    try:
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", SANDBOX, str(ready_read)], pass_fds=(ready_read,),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
            )
    finally:
        os.close(ready_read)
    try:
        if cgroup is not None:
            cgroup.add(process.pid)
        os.write(ready_write, marshal.dumps(config))  # placed: the sandbox may go on
    except OSError:
        process.kill()
        process.wait()
        if cgroup is not None:
            cgroup.remove()
        raise
    finally:
        os.close(ready_write)
    return CommandContainer(process, cgroup, container.resources.limits.get("memory", ""),
                            cgroup.oom_kills() if cgroup is not None else 0)
