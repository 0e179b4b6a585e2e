"""Counters every component shares: work-queue retries and handler errors.

They live in one registry of their own; a component that serves /metrics (kube-proxy)
adds `exposition()` to its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

REGISTRY = CollectorRegistry()
RETRIES = Counter("workqueue_retries", "Total number of retries handled by workqueue",
                  ["name"], registry=REGISTRY)
SYNC_ERRORS = Counter("svclab_sync_errors", "Keys whose reconcile raised, by work queue",
                      ["name"], registry=REGISTRY)
HANDLER_ERRORS = Counter("svclab_informer_handler_errors", "Informer event handlers that raised, by kind",
                         ["kind"], registry=REGISTRY)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
