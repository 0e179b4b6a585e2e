"""pod-kill: a pod's containers die and its kubelet restarts them as its restartPolicy says.

A container with a command is a process in the pod's network namespace: it is SIGKILLed, as a
container runtime kills a container, whatever its kubelet is doing. A container without one is
the kubelet's built-in server (or cluster DNS) for that pod, served from the kubelet's own
process: the kubelet's runtime socket (<state>/nodes/<node>/runtime.sock) is asked to kill it.
Either way the kubelet sees the container exit (137, SIGKILL), counts a restart in the pod's
status.containerStatuses[].restartCount and starts it again in the same pod (same address).
"""

from __future__ import annotations

import json
import socket

from testbed import naming
from testbed.api.errors import NotFound
from testbed.api.v1 import api_pb2 as pb
from testbed.cluster import procfs
from testbed.faults import api
from testbed.faults.state import Fault
from testbed.faults.target import FaultError, FaultTarget
from testbed.node.runtime import SOCKET as RUNTIME_SOCKET


def runtime_socket(cluster: FaultTarget, node: str):
    return cluster.state.path / "nodes" / node / RUNTIME_SOCKET


def ask_runtime(cluster: FaultTarget, node: str, request: dict, timeout: float = 10.0) -> dict:
    """One request to a kubelet's runtime socket; FaultError if the kubelet does not answer."""
    path = runtime_socket(cluster, node)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(sock.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as exc:
        raise FaultError("pod", f"the kubelet of {node} does not answer on {path} ({exc}): is it running?") from None
    if not answer.get("ok"):
        raise FaultError("pod", answer.get("error", "the kubelet refused"))
    return answer


def pod_kill(cluster: FaultTarget, pod: str, namespace: str = "default") -> Fault:
    """Kill the pod's containers (SIGKILL); its kubelet restarts them per restartPolicy."""
    if not isinstance(pod, str) or not pod:
        raise FaultError("pod", "needs a pod name")

    async def get(client):
        try:
            return await client.get("Pod", pod, namespace)
        except NotFound:
            return None

    found: pb.Pod | None = api.call(cluster, get)
    if found is None:
        raise FaultError("pod", f'pod "{pod}" not found in namespace "{namespace}"')
    node = found.spec.node_name
    if not node or found.status.phase != "Running":
        raise FaultError("pod", f"pod {pod} is not running (phase {found.status.phase or 'Pending'})")
    params = {"pod": pod, "namespace": namespace, "node": node}
    if any(c.command for c in found.spec.containers):
        inode = procfs.ns_inode(naming.netns_path(naming.pod_netns(cluster.cluster, found.metadata.uid)))
        pids = [pid for pid in (procfs.processes_in_netns({inode}) if inode else []) if procfs.kill(pid)]
        if not pids:
            raise FaultError("pod", f"pod {pod} has no running container process (restarting already?)")
        return Fault("pod-kill", {**params, "pids": pids}, summary=f"pod {pod}: SIGKILL to {pids} on {node}")
    answer = ask_runtime(cluster, node, {"verb": "kill", "namespace": namespace, "name": pod})
    return Fault("pod-kill", {**params, "containers": answer["containers"]},
                 summary=f"pod {pod}: built-in container(s) {', '.join(answer['containers'])} killed on {node}")
