"""Names of what a cluster creates on the machine, all derived from the cluster's name.

Cluster names are 1-8 characters ``[a-z][a-z0-9]*``, without ``-``: the name prefixes
bridge, interface and netns names (IFNAMSIZ allows 15 characters) and is separated from
the rest of them by ``-``, so cluster ``a`` owns ``a-*`` and never ``ab-*``. Every network
namespace is ``/run/netns/<cluster>-<something>``: nodes, the client and the router are
``<cluster>-<host>``, pods ``<cluster>-pod-<uid>``. `svclab clean` finds a cluster's
leftovers by these names alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MAX_NAME_LEN = 8
#: Where named network namespaces are mounted (as `ip netns` does).
NETNS_DIR = Path("/run/netns")

_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9]{0,%d}$" % (MAX_NAME_LEN - 1))


def check_cluster_name(name: object) -> str:
    """Return name if it is a valid cluster name, else raise ValueError."""
    if not isinstance(name, str) or not _CLUSTER_NAME.match(name):
        raise ValueError(
            f"invalid cluster name {name!r}: use 1-{MAX_NAME_LEN} characters, lower-case letters "
            "and digits, starting with a letter (no '-': it separates the cluster name in "
            "interface, bridge and netns names)"
        )
    return name


def netns_path(netns: str) -> str:
    """The bind mount of a named network namespace (usable with `ip netns exec <netns>`)."""
    return os.path.join(NETNS_DIR, netns)


def path_segment_problems(name: str) -> list[str]:
    """Why name can't be one segment of a path (client-go's rule for a resource name), [] if it can:
    a name used in /run/netns/<cluster>-<name> must not reach outside the cluster's names."""
    if not name:
        return ["may not be empty"]
    if name in (".", ".."):
        return [f"may not be '{name}'"]
    return [f"may not contain '{c}'" for c in "/%" if c in name]


def node_netns(cluster: str, host: str) -> str:
    """Named netns of a host of the cluster: node1.., client, gw."""
    return f"{cluster}-{host}"


def pod_netns_prefix(cluster: str) -> str:
    return f"{cluster}-pod-"


def pod_netns(cluster: str, pod_uid: str) -> str:
    return pod_netns_prefix(cluster) + pod_uid.replace("-", "")[:12]


def pod_host_ifname(pod_uid: str) -> str:
    """The node end of a pod's veth: unique within its node, at most 15 characters."""
    return "veth" + hashlib.sha256(pod_uid.encode()).hexdigest()[:8]


def cgroup_name(cluster: str) -> str:
    """The cgroup (in each hierarchy, under the kubelet's own) holding the cluster's pods: one
    child per pod, named by its uid."""
    return f"svclab-{cluster}"
