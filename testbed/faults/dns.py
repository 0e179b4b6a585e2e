"""dns-error: cluster DNS answers SERVFAIL or NXDOMAIN for matching names until healed.

Through the API, as a real cluster reconfigures CoreDNS (its ConfigMap): a rule is added to
the kube-system/coredns Deployment's `svclab.io/dns-error` annotation, which every DNS server
watches (testbed/node/dns.py); healing removes it. No pod restarts, nothing on the nodes.
"""

from __future__ import annotations

import json

from testbed.api.v1 import api_pb2 as pb
from testbed.faults import api
from testbed.faults.state import Fault, FaultStore
from testbed.faults.target import FaultError, FaultTarget
from testbed.node.dns import (DNS_DEPLOYMENT, DNS_ERROR_ANNOTATION, DNS_ERROR_RCODES, DNS_NAMESPACE,
                              parse_dns_errors)

MAX_GLOB = 253


def _set_rules(cluster: FaultTarget, change) -> None:
    def edit(deploy: pb.Deployment) -> None:
        annotations = deploy.metadata.annotations
        try:
            rules = parse_dns_errors(annotations.get(DNS_ERROR_ANNOTATION, ""))
        except ValueError:
            rules = []  # a hand-made bad value: replaced
        rules = change(rules)
        if rules:
            annotations[DNS_ERROR_ANNOTATION] = json.dumps(rules)
        else:
            annotations.pop(DNS_ERROR_ANNOTATION, None)

    api.call(cluster, lambda client: api.update_retrying(client, "Deployment", DNS_DEPLOYMENT, DNS_NAMESPACE, edit))


def dns_error(cluster: FaultTarget, names: str, rcode: str = "SERVFAIL") -> Fault:
    """Cluster DNS answers `rcode` for every name matching the glob `names` (the whole name, e.g.
    "*.default.svc.cluster.local", or its first label, e.g. "frontend-*") until healed."""
    if not isinstance(names, str) or not names.strip() or len(names) > MAX_GLOB or any(c.isspace() for c in names):
        raise FaultError("names", f"needs a name glob without spaces, e.g. 'frontend-*', not {names!r}")
    code = rcode.upper() if isinstance(rcode, str) else rcode
    if code not in DNS_ERROR_RCODES:
        raise FaultError("rcode", f"unknown rcode {rcode!r} ({', '.join(DNS_ERROR_RCODES)})")
    with FaultStore(cluster.faults_file).changing() as changes:
        fault = changes.add(Fault("dns-error", {"names": names, "rcode": code},
                                  summary=f"cluster DNS answers {code} for {names}"))
        try:
            _set_rules(cluster, lambda rules: [*rules, {"id": fault.id, "names": names.lower(), "rcode": code}])
        except BaseException:
            changes.remove(fault)
            raise
    return fault


def undo_dns_error(cluster: FaultTarget, fault: Fault) -> None:
    _set_rules(cluster, lambda rules: [r for r in rules if r.get("id") != fault.id])
