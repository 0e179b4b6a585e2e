"""Names of what a cluster creates on the machine, all derived from the cluster's name.

Every network namespace is /run/netns/<cluster>-<something>; pods' files live
under the cluster's state directory. `svclab clean` finds a cluster's leftovers
by these names alone.
"""

from __future__ import annotations

import hashlib


def node_netns(cluster: str, host: str) -> str:
    return f"{cluster}-{host}"


def pod_netns(cluster: str, pod_uid: str) -> str:
    return f"{cluster}-pod-{pod_uid.replace('-', '')[:12]}"


def pod_host_ifname(pod_uid: str) -> str:
    """The node end of a pod's veth: unique within its node, at most 15 characters."""
    return "veth" + hashlib.sha256(pod_uid.encode()).hexdigest()[:8]


def pod_netns_prefix(cluster: str) -> str:
    return f"{cluster}-pod-"
