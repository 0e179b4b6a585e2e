"""Small helpers over object metadata shared by the server and its clients."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


# On an EndpointSlice: the Service it belongs to (upstream's discovery.LabelServiceName).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# On an EndpointSlice: when the change it reflects happened (upstream's
# endpoints.kubernetes.io/last-change-trigger-time, RFC 3339 with fractions); kube-proxy
# measures its network programming latency from it.
LAST_CHANGE_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_precise(seconds: float) -> str:
    """A Unix time as RFC 3339 with microseconds (upstream's RFC3339Nano, to the microsecond)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float | None:
    """Unix time of an RFC 3339 timestamp (with or without fractions); None if it is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def copy_of(obj: M) -> M:
    out = type(obj)()
    out.CopyFrom(obj)
    return out
