"""The contract between kube-proxy and its backends, and choosing a backend by mode.

kube-proxy (server.py) owns the watches, the change tracker and the bounded-frequency
runner; a backend owns one kind of kernel state. Every backend renders from the same
shared model (model.ProxyState) and implements `ProxyBackend`; each is constructed the
same way, from the node's settings alone, and does no I/O until its first call. A test
checks each implementation against this Protocol (as upstream's
`var _ proxy.Provider = &Proxier{}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from testbed.proxy.model import ProxyState, ServicePortName

#: Every mode kube-proxy accepts (--proxy-mode, the cluster config's kubeProxy.mode).
MODES = ("iptables", "nftables", "ipvs")
#: The modes svclab has a backend for.
IMPLEMENTED = ("iptables", "nftables", "ipvs")


class Unsupported(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeSettings:
    """What a backend knows about its node, from kube-proxy's flags and the node's namespace.

    cluster_cidr: the cluster's pod CIDR (upstream's local-traffic detector; None or "": none).
    node_ips: the node's addresses. nodeport_addresses: those of them that accept NodePorts
    (--nodeport-addresses resolved; empty: every local address).
    masquerade_all: masquerade every packet to a ClusterIP (--masquerade-all).
    service_cidrs: the cluster's Service ranges (--service-cidr): nftables mode drops traffic to
    their unallocated addresses (upstream's cluster-ips-check); iptables mode has no such drop.
    localhost_nodeports: NodePorts on 127.0.0.0/8 too, where nodeport_addresses allow them (empty,
    or holding a loopback address): iptables mode only (upstream's --iptables-localhost-nodeports),
    which sets route_localnet in the node's namespace; the other modes ignore it, as upstream.
    ipvs_scheduler: IPVS mode's --ipvs-scheduler ("": rr). ipvs_drain_timeout: seconds a removed
    IPVS real server may keep its connections before it is deleted.
    """

    node_name: str
    cluster_cidr: str | None = None
    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    service_cidrs: tuple[str, ...] = ()
    localhost_nodeports: bool = True
    ipvs_scheduler: str = ""
    ipvs_drain_timeout: float = 900.0


@runtime_checkable
class ProxyBackend(Protocol):
    """One kernel data plane for Services. All calls come from one thread at a time."""

    #: the mode this backend implements ("iptables", "nftables", ...)
    name: str

    def __init__(self, settings: NodeSettings) -> None: ...

    def needs_full_sync(self) -> bool:
        """True until a full sync succeeded, and when someone deleted or flushed our rules
        behind our back. Cheap (kube-proxy asks every second): netlink questions, not a dump."""
        ...

    def sync(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        """Make the kernel hold `state` in one atomic write where the kernel allows. changed=None:
        a full sync; else only these Service ports changed since the last successful sync.
        Returns the rules (or elements) programmed, per table, for kubeproxy_sync_proxy_rules_*.
        Raises kernel.RulesFailed if the kernel refused the write; the next sync is then full."""
        ...

    def check(self, state: ProxyState) -> None:
        """Raise kernel.RulesFailed if the state's full ruleset does not load; changes nothing
        here (loads into a scratch namespace). kube-proxy bisects with it to find bad Services."""
        ...

    def dump(self) -> str:
        """What this backend programmed, as the kernel holds it, in the kernel tools' own format
        (`svclab rules` prints it). A debugging aid: may take seconds at 10,000 Services."""
        ...

    def cleanup(self) -> None:
        """Remove everything this backend made (upstream's CleanupLeftovers)."""
        ...


def check_mode(mode: str, argv: list[str] | None = None) -> None:
    """Refuse, with the way out, a mode this kernel or this svclab cannot run. argv: the svclab
    command given, which the way out repeats (`svclab vm -- svclab <argv>`)."""
    if mode not in MODES:
        raise Unsupported(f"unknown proxy mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "ipvs":
        from testbed.proxy.ipvs import KernelLacksIpvs, check_kernel
        try:
            check_kernel(argv)
        except KernelLacksIpvs as exc:
            raise Unsupported(str(exc)) from None
    if mode not in IMPLEMENTED:
        raise Unsupported(f"--proxy-mode {mode} is not implemented yet; use --proxy-mode iptables")


def backend_class(mode: str) -> type[ProxyBackend]:
    """The backend class for `mode`, once this machine is known to run it (Unsupported if not)."""
    check_mode(mode)
    return implementation(mode)


def implementation(mode: str) -> type[ProxyBackend]:
    """The class that implements `mode`, whether or not this kernel can run it."""
    if mode == "nftables":
        from testbed.proxy.nftables.backend import NftablesBackend
        return NftablesBackend
    if mode == "ipvs":
        from testbed.proxy.ipvs.backend import IpvsBackend
        return IpvsBackend
    from testbed.proxy.iptables.backend import IptablesBackend
    return IptablesBackend


def create(mode: str, settings: NodeSettings) -> ProxyBackend:
    """The backend for `mode` (Unsupported if this machine or svclab cannot run it)."""
    return backend_class(mode)(settings)


def cleanup_all(node_name: str) -> list[str]:
    """Remove what each mode this kernel can run made in this namespace (upstream's
    `kube-proxy --cleanup`); returns the modes cleaned."""
    cleaned = []
    for mode in IMPLEMENTED:
        try:
            backend = create(mode, NodeSettings(node_name))
        except Unsupported:
            continue
        backend.cleanup()
        cleaned.append(mode)
    return cleaned
