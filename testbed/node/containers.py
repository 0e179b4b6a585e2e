"""`command:` containers: started in their sandbox (node/sandbox.py) inside their pod's cgroup
(node/cgroups.py), and how they ended (Completed, Error, OOMKilled) as Kubernetes words it."""

from __future__ import annotations

import grp
import logging
import marshal
import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from testbed import naming
from testbed.api import quantity
from testbed.api.meta import now_rfc3339
from testbed.api.v1 import api_pb2 as pb
from testbed.node import cgroups
from testbed.paths import DEFAULT_STATE_ROOT

log = logging.getLogger("svclab.kubelet")

SANDBOX = str(Path(__file__).with_name("sandbox.py"))
USER, GROUP = "nobody", "nogroup"
PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class CommandContainer:
    process: subprocess.Popen
    cgroup: cgroups.PodCgroup | None
    started_at: str
    memory_limit: str = ""

    def exited(self) -> bool:
        return self.process.poll() is not None

    def termination(self) -> pb.ContainerStateTerminated:
        """Kubernetes' terminated state: OOMKilled when the kernel killed a process of the pod
        for its memory limit (as containerd reports it), else Completed or Error."""
        code = self.process.returncode
        if code is not None and code < 0:
            code = 128 - code  # killed before the sandbox could say
        state = pb.ContainerStateTerminated(exit_code=code or 0, started_at=self.started_at,
                                            finished_at=now_rfc3339())
        if code is not None and code > 128:
            state.signal = code - 128
        if self.cgroup is not None and self.cgroup.oom_kills():
            state.reason = "OOMKilled"
            state.message = f"the container exceeded its memory limit of {self.memory_limit}; exit code {code}"
        else:
            state.reason = "Completed" if code == 0 else "Error"
            state.message = f"command exited {code}"
        return state


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
    """The container's command, unprivileged, in its own namespaces and its pod's cgroup."""
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
    return CommandContainer(process, cgroup, now_rfc3339(), container.resources.limits.get("memory", ""))
