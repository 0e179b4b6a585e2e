"""A node's kube-proxy read from outside: its mode, its rules and its metrics.

`svclab rules` prints `rules()`; scenarios read both to judge whether every node's
kube-proxy applied a change (testbed/scenario/convergence.py). Reading the rules runs the
backend's dump (iptables-save / nft list) in the node's namespace; the metrics come from
the node's own /metrics endpoint (its --metrics-address), asked from inside the node.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from testbed import naming
from testbed.cluster.processes import ProcessTable, Recorded
from testbed.node.namespaces import entered_netns
from testbed.proxy import backends

DEFAULT_MODE = "iptables"  # kube-proxy's default

# metric samples (their exposition names) that say whether a change is applied
LAST_SYNC = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
ENDPOINT_CHANGES = "kubeproxy_sync_proxy_rules_endpoint_changes_total"
ENDPOINTS_PENDING = "kubeproxy_sync_proxy_rules_endpoint_changes_pending"
SERVICES_PENDING = "kubeproxy_sync_proxy_rules_service_changes_pending"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name with its labels: value} (labels as `name{k="v"}`)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@dataclass(frozen=True)
class NodeProxy:
    cluster: str
    state_dir: Path
    node: str

    @property
    def netns(self) -> str:
        return naming.node_netns(self.cluster, self.node)

    def exists(self) -> bool:
        return Path(naming.netns_path(self.netns)).exists()

    def recorded(self) -> Recorded | None:
        return ProcessTable(Path(self.state_dir)).load().get(f"kube-proxy-{self.node}")

    def mode(self) -> str:
        recorded = self.recorded()
        return (recorded.flag("--proxy-mode") if recorded else None) or DEFAULT_MODE

    def rules(self) -> str:
        """What the node's kube-proxy programmed, as the kernel holds it (backends.Unsupported for a
        mode this machine cannot run, kernel.RulesFailed when the dump fails)."""
        backend = backends.create(self.mode(), backends.NodeSettings(self.node))
        with entered_netns(self.netns):  # the dump's commands run in the node's namespace
            return backend.dump()

    def metrics(self, timeout: float = 2.0) -> dict[str, float]:
        """Its /metrics, parsed (OSError when it does not answer: stopped, restarting, partitioned)."""
        recorded = self.recorded()
        address = recorded.flag("--metrics-address") if recorded else None
        if not address:
            raise OSError(f"kube-proxy-{self.node} has no metrics address on record")
        with entered_netns(self.netns):  # the socket is opened in the node's namespace
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as answer:
                return parse_metrics(answer.read().decode())
