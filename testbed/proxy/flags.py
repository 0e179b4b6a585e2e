"""kube-proxy's command-line flags turned into the NodeSettings every backend is built from.

Pure (the caller finds the node's addresses): the command (testbed/cli/components.py) stays a
thin layer over it, and tests check each flag's meaning without starting kube-proxy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from testbed.proxy import nodeaddrs
from testbed.proxy.backends import NodeSettings
from testbed.proxy.ipvs.names import SCHEDULERS


class FlagError(ValueError):
    """A flag's value kube-proxy cannot run with; `option` names the flag."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


@dataclass(frozen=True)
class KubeProxyFlags:
    """The flags as given (strings as on the command line). cluster_cidr "": no local-traffic
    detector (upstream's no-op detector). service_cidr: the cluster's Service ranges."""

    node_name: str
    proxy_mode: str = "iptables"
    cluster_cidr: str = "10.244.0.0/16"
    nodeport_addresses: str = ""
    masquerade_all: bool = False
    service_cidr: str = ""
    localhost_nodeports: bool = True  # --iptables-localhost-nodeports
    ipvs_scheduler: str = ""  # "": rr


def node_settings(flags: KubeProxyFlags, addresses: tuple[str, ...]) -> NodeSettings:
    """NodeSettings for a node whose IPv4 addresses (loopback ones included) are `addresses`.
    Raises FlagError for a value kube-proxy cannot run with."""
    if flags.cluster_cidr:
        try:
            ipaddress.IPv4Network(flags.cluster_cidr, strict=False)
        except ValueError:
            raise FlagError("--cluster-cidr", f"{flags.cluster_cidr!r} is not an IPv4 CIDR ('' for none)") from None
    node_ips = tuple(a for a in addresses if not a.startswith("127."))
    localhost = flags.localhost_nodeports and flags.proxy_mode == "iptables"  # upstream: iptables mode only
    try:
        cidrs = nodeaddrs.parse_cidrs(flags.nodeport_addresses)
        nodeport_ips = nodeaddrs.nodeport_addresses(cidrs, addresses, allow_localhost=localhost)
    except ValueError as exc:
        raise FlagError("--nodeport-addresses", str(exc).removeprefix("--nodeport-addresses: ")) from None
    try:
        service = nodeaddrs.parse_cidrs(flags.service_cidr, "--service-cidr")
    except ValueError as exc:
        raise FlagError("--service-cidr", str(exc).removeprefix("--service-cidr: ")) from None
    if flags.proxy_mode == "ipvs" and flags.ipvs_scheduler and flags.ipvs_scheduler not in SCHEDULERS:
        # upstream validates it in IPVS mode only; the other modes never read it
        raise FlagError("--ipvs-scheduler", f"{flags.ipvs_scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    return NodeSettings(flags.node_name, cluster_cidr=flags.cluster_cidr or None, node_ips=node_ips,
                        nodeport_addresses=nodeport_ips, masquerade_all=flags.masquerade_all,
                        service_cidrs=service.ipv4, localhost_nodeports=localhost,
                        ipvs_scheduler=flags.ipvs_scheduler)
