"""Deleting stale UDP conntrack entries, as upstream does after endpoint changes.

A UDP "connection" toward an endpoint that is gone stays in conntrack and keeps
being DNAT'ed to the dead address (the flow blackholes) until it times out;
kube-proxy deletes those entries when an endpoint of a UDP Service goes away.
"""

from __future__ import annotations

import logging
import subprocess

log = logging.getLogger("svclab.kube-proxy")


def delete_udp_flows(service_ip: str | None, node_port: int | None, endpoint_ip: str) -> int:
    """Delete UDP entries to service_ip (or any local address on node_port) DNAT'ed to endpoint_ip."""
    argv = ["conntrack", "-D", "-p", "udp", "--dst-nat", endpoint_ip]
    if service_ip:
        argv += ["--orig-dst", service_ip]
    if node_port:
        argv += ["--orig-port-dst", str(node_port)]
    result = subprocess.run(argv, capture_output=True, text=True)
    # conntrack exits 1 with "0 flow entries have been deleted" when none matched
    deleted = 0
    for line in (result.stderr + result.stdout).splitlines():
        if "flow entries have been deleted" in line:
            deleted = int(line.split()[-6]) if line.split()[-6].isdigit() else 0
    if result.returncode not in (0, 1):
        log.warning("%s failed: %s", " ".join(argv), result.stderr.strip())
    return deleted
