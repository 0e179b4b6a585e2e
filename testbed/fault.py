"""Failure injection by annotation, for labs and tests (a documented test hook).

`svclab.io/fault: handler-error` on an object makes every component that handles it
raise InjectedFault while handling it; `handler-error:kubelet,scheduler` only those
components (deployment, scheduler, endpointslice, nodeipam, garbagecollector, kubelet,
kube-proxy, cloud-controller). Removing the annotation ends the fault: the next retry
succeeds. kube-proxy's own fault, `invalid-rules`, is described in docs/kube-proxy.md.
"""

from __future__ import annotations

from google.protobuf.message import Message

FAULT_ANNOTATION = "svclab.io/fault"
HANDLER_ERROR = "handler-error"


class InjectedFault(RuntimeError):
    """Raised where a component handles an object annotated with a handler-error fault."""


def check(obj: Message | None, component: str) -> None:
    """Raise InjectedFault if obj asks for a handler error in this component."""
    if obj is None:
        return
    value = obj.metadata.annotations.get(FAULT_ANNOTATION, "")
    kind, _, targets = value.partition(":")
    if kind.strip() != HANDLER_ERROR:
        return
    if targets and component not in {t.strip() for t in targets.split(",")}:
        return
    raise InjectedFault(f"{FAULT_ANNOTATION}: {value} ({component})")
