"""Choosing a kube-proxy backend by mode; each renders from the same model."""

from __future__ import annotations

IMPLEMENTED = ("iptables", "nftables")


class Unsupported(RuntimeError):
    pass


def check_mode(mode: str) -> None:
    """Refuse, with the way out, a mode this kernel or this svclab cannot run."""
    if mode == "ipvs":
        from testbed.proxy.ipvs import KernelLacksIpvs, check_kernel
        try:
            check_kernel()
        except KernelLacksIpvs as exc:
            raise Unsupported(str(exc)) from None
    if mode not in IMPLEMENTED:
        raise Unsupported(f"--proxy-mode {mode} is not implemented yet; use --proxy-mode iptables")


def create(mode: str, cluster_cidr: str, node_name: str, node_ips: tuple[str, ...] = (),
           nodeport_addresses: tuple[str, ...] = ()):
    """The backend for `mode`; node_ips: the node's addresses, nodeport_addresses: those of
    them that accept NodePorts (empty: all)."""
    check_mode(mode)
    if mode == "nftables":
        from testbed.proxy import nftables
        from testbed.proxy.nftables_backend import NftablesBackend
        config = nftables.Config(cluster_cidr=cluster_cidr or None, node_ips=node_ips,
                                 nodeport_addresses=nodeport_addresses)
        return NftablesBackend(cluster_cidr, node_name, node_ips, config)
    from testbed.proxy.iptables_backend import IptablesBackend
    return IptablesBackend(cluster_cidr, node_name, node_ips, nodeport_addresses)
