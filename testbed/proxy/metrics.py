"""kube-proxy's metrics (named as upstream's) and its /metrics and /healthz endpoints."""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from testbed.client import metrics as client_metrics


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
        )
        self.network_programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "From a change seen by the EndpointSlice controller (the slice's last-change-trigger-time) "
            "to this node's rules reflecting it", registry=r,
            buckets=(0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                     0.75, 1, 2, 5, 10, 30, 60),
        )
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=r)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", registry=r)
        self.rules = Gauge("kubeproxy_sync_proxy_rules_iptables_total",
                           "Rules (iptables) or elements (nftables) programmed", ["table"], registry=r)
        self.sync_errors = Counter("kubeproxy_sync_proxy_rules_errors",
                                   "Syncs that failed to apply rules", registry=r)
        self.partial_syncs = Counter("kubeproxy_sync_proxy_rules_partial_syncs", "Partial syncs", registry=r)
        self.full_syncs = Counter("kubeproxy_sync_full_proxy_rules", "Full syncs", registry=r)
        self.endpoint_changes_pending = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                              "Pending endpoint changes", registry=r)
        self.service_changes_pending = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                             "Pending service changes", registry=r)
        self.endpoint_changes_total = Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                              "Endpoint changes seen", registry=r)
        self.services_failed = Gauge("kubeproxy_services_failed_to_sync",
                                     "Service ports whose rules could not be applied", registry=r)
        self.service_failed = Gauge("svclab_kubeproxy_service_rules_failed",
                                    "1 for each Service port whose rules the kernel refused: left out until "
                                    "it changes or the next full sync", ["service"], registry=r)
        self.canary_resyncs = Counter("kubeproxy_canary_resyncs",
                                      "Full resyncs forced because the canary chain disappeared", registry=r)

    def exposition(self) -> bytes:
        """kube-proxy's metrics and the shared ones (informer handler errors, testbed.client.metrics)."""
        return generate_latest(self.registry) + client_metrics.exposition()


class HealthState:
    """What /healthz reports: healthy while syncs keep happening (upstream's proxy healthz)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last_updated = 0.0
        self.last_queued = 0.0
        self.last_error = ""  # why the last sync failed; "" after a sync that succeeded

    def queued(self) -> None:
        if self.last_queued <= self.last_updated:
            self.last_queued = time.time()

    def updated(self) -> None:
        self.last_updated = time.time()
        self.last_error = ""

    def failed(self, error: str) -> None:
        self.last_error = error[:500]

    def healthy(self, now: float) -> bool:
        if self.last_updated == 0.0:
            return False
        # unhealthy only when a requested sync is overdue
        return not (self.last_queued > self.last_updated and now - self.last_queued > self.timeout)

    def answer(self) -> tuple[int, bytes]:
        now = time.time()
        body = json.dumps({
            "lastUpdated": _iso(self.last_updated), "currentTime": _iso(now),
            "nodeEligible": True,
            "lastSyncError": self.last_error,  # svclab's: "" when the last sync succeeded
        }).encode()
        return (200 if self.healthy(now) else 503), body


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def metrics_handler(metrics: ProxyMetrics, health: HealthState, mode: str = ""):
    def handle(_method: str, path: str, _client) -> tuple[int, str, bytes]:
        if path.startswith("/proxyMode"):  # upstream serves the mode here too
            return 200, "text/plain", mode.encode()
        if path.startswith("/metrics"):
            return 200, CONTENT_TYPE_LATEST, metrics.exposition()
        if path.startswith("/healthz") or path.startswith("/livez"):
            status, body = health.answer()
            return status, "application/json", body
        return 404, "text/plain", b"404 page not found\n"
    return handle
