"""A running cluster's API as a scenario run reads it, from synchronous code.

The runner plays its timeline in plain Python (sleeps, subprocesses, the fault library);
`Live` keeps one ApiClient on an event loop thread of its own, and `call()` runs a
coroutine there from any thread (the main loop, convergence watches, rules reads).
`PodBook` remembers every pod the run has seen, so that assertions can still name pods
that are gone by the end (a deleted pod, the pods of a crashed node).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, TypeVar

from testbed.api.meta import SERVICE_NAME_LABEL
from testbed.api.selectors import labels_match, parse_label_selector
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.paths import StateDir

T = TypeVar("T")
DEFAULT_NAMESPACE = "default"
CALL_TIMEOUT = 15.0


def split_name(text: str) -> tuple[str, str]:
    """"frontend-lb" -> ("default", "frontend-lb"); "kube-system/kube-dns" -> ("kube-system", "kube-dns")."""
    namespace, sep, name = text.partition("/")
    return (namespace, name) if sep else (DEFAULT_NAMESPACE, text)


def is_ready(obj: pb.Pod | pb.Node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in obj.status.conditions)


def active(pod: pb.Pod) -> bool:
    return not pod.metadata.deletion_timestamp


def node_ip(node: pb.Node) -> str:
    return next((a.address for a in node.status.addresses if a.type == "InternalIP"), "")


def ready_endpoints(slices: Iterable[pb.EndpointSlice]) -> list[str]:
    """"ip:port" of every ready endpoint of a Service's slices (one per address and port)."""
    out = []
    for eps in slices:
        for endpoint in eps.endpoints:
            if endpoint.conditions.ready:
                out += [f"{address}:{port.port}" for address in endpoint.addresses for port in eps.ports]
    return sorted(set(out))


def ready_addresses(slices: Iterable[pb.EndpointSlice]) -> list[str]:
    return sorted({a for eps in slices for e in eps.endpoints if e.conditions.ready for a in e.addresses})


class Live:
    """`with Live(state) as live: live.call(lambda client: client.list("Pod", "default"))`."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scenario-api", daemon=True)
        self._client: ApiClient | None = None

    def __enter__(self) -> "Live":
        self._thread.start()
        self._client = self._submit(self._open(), CALL_TIMEOUT)
        return self

    def __exit__(self, *_exc) -> None:
        try:
            self._submit(self._close(), 10)
        except Exception:  # the API server may be gone already; the loop goes anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _open(self) -> ApiClient:
        return ApiClient.for_state_dir(self.state)

    async def _close(self) -> None:
        """Close the client, then end what it left running (its write stream's tasks)."""
        if self._client is not None:
            await asyncio.wait_for(self._client.close(), 5)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _submit(self, coro: Awaitable[T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[ApiClient], Awaitable[T]], timeout: float = CALL_TIMEOUT) -> T:
        """fn(client) run to completion on the API thread (ApiError and the like raised here;
        TimeoutError after timeout s, the call cancelled)."""
        return self._submit(asyncio.wait_for(fn(self._client), timeout), timeout + 1)

    # ---- reads the runner needs ------------------------------------------------------------------

    def list(self, kind: str, namespace: str = DEFAULT_NAMESPACE, selector: str = "", fields: str = "",
             timeout: float = CALL_TIMEOUT) -> list:
        return self.call(lambda c: c.list(kind, namespace, selector, fields), timeout)[0]

    def get(self, kind: str, name: str, namespace: str = DEFAULT_NAMESPACE):
        return self.call(lambda c: c.get(kind, name, namespace))

    def service(self, text: str) -> pb.Service:
        namespace, name = split_name(text)
        return self.get("Service", name, namespace)

    def slices(self, service: str) -> list[pb.EndpointSlice]:
        namespace, name = split_name(service)
        return self.list("EndpointSlice", namespace, f"{SERVICE_NAME_LABEL}={name}")

    def ready_pods(self, selector: str, namespace: str = DEFAULT_NAMESPACE) -> list[pb.Pod]:
        """Ready pods matching a label selector, not being deleted, by name."""
        pods = self.list("Pod", namespace, selector)
        return sorted((p for p in pods if active(p) and is_ready(p)), key=lambda p: p.metadata.name)

    def nodes(self) -> list[pb.Node]:
        return sorted(self.list("Node", ""), key=lambda n: n.metadata.name)


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    ip: str
    node: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, pod: pb.Pod) -> "PodInfo":
        return cls(pod.metadata.name, pod.metadata.namespace, pod.status.pod_ip, pod.spec.node_name,
                   tuple(sorted(pod.metadata.labels.items())))

    def to_json(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "ip": self.ip, "node": self.node}


class PodBook:
    """Every pod seen during the run, by name (the last address and node it had)."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self._lock = threading.Lock()

    def add(self, pods: Iterable[pb.Pod]) -> list[PodInfo]:
        infos = [PodInfo.of(p) for p in pods]
        with self._lock:
            for info in infos:
                old = self.pods.get((info.namespace, info.name))
                keep_ip = info.ip or (old.ip if old else "")
                keep_node = info.node or (old.node if old else "")
                self.pods[(info.namespace, info.name)] = PodInfo(info.name, info.namespace, keep_ip, keep_node,
                                                                 info.labels)
        return infos

    def snapshot(self, live: Live, timeout: float = 2.0) -> None:
        self.add(live.list("Pod", "", timeout=timeout))

    def matching(self, selector: str, namespace: str = DEFAULT_NAMESPACE) -> list[PodInfo]:
        requirements = parse_label_selector(selector)
        with self._lock:
            return sorted((p for (ns, _), p in self.pods.items() if ns == namespace and
                           labels_match(requirements, dict(p.labels))), key=lambda p: p.name)

    def on_node(self, node: str) -> list[PodInfo]:
        with self._lock:
            return sorted((p for p in self.pods.values() if p.node == node), key=lambda p: p.name)

    def named(self, name: str, namespace: str = DEFAULT_NAMESPACE) -> PodInfo | None:
        with self._lock:
            return self.pods.get((namespace, name))
