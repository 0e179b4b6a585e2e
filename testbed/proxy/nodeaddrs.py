"""The node's own addresses, as kube-proxy finds them in the network namespace it runs in, and
the CIDR lists of its flags (--nodeport-addresses, --service-cidr) resolved against them."""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable, NamedTuple

from pyroute2 import IPRoute

log = logging.getLogger("svclab.kube-proxy")


class Cidrs(NamedTuple):
    """A flag's CIDRs by family: svclab's kube-proxy is IPv4 only, so `other_family` (IPv6) is
    ignored, as upstream's IPv4 proxier ignores them (NewNodePortAddresses filters by family)."""

    ipv4: tuple[str, ...]
    other_family: tuple[str, ...]


def local_ipv4_addresses(loopback: bool = False) -> tuple[str, ...]:
    """Every IPv4 address of this namespace, sorted; loopback ones (127.0.0.0/8) only if asked."""
    with IPRoute() as ipr:
        addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}
    return tuple(sorted((a for a in addresses if a and (loopback or not ipaddress.IPv4Address(a).is_loopback)),
                        key=ipaddress.IPv4Address))


def parse_cidrs(text: str, option: str = "--nodeport-addresses") -> Cidrs:
    """Comma-separated CIDRs of either family; ValueError naming the option and the bad one."""
    ipv4, other = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not a CIDR") from None
        (ipv4 if network.version == 4 else other).append(str(network))
    return Cidrs(tuple(ipv4), tuple(other))


def within(addresses: Iterable[str], cidrs: Iterable[str]) -> tuple[str, ...]:
    """The addresses inside any of the CIDRs (upstream's NodePortAddresses.GetNodeIPs)."""
    networks = [ipaddress.IPv4Network(c) for c in cidrs]
    return tuple(a for a in addresses if any(ipaddress.IPv4Address(a) in n for n in networks))


def nodeport_addresses(cidrs: Cidrs, addresses: tuple[str, ...], allow_localhost: bool) -> tuple[str, ...]:
    """--nodeport-addresses resolved to the node addresses that take NodePorts; () for every
    local address (no IPv4 CIDR, or 0.0.0.0/0: upstream's matchAll). `addresses`: the node's
    IPv4 addresses, loopback ones included. A loopback match stays only if `allow_localhost`
    (iptables mode with --iptables-localhost-nodeports); else it is logged and left out, as
    upstream does. ValueError if none of the node's addresses remains."""
    for cidr in cidrs.other_family:
        log.warning("--nodeport-addresses: ignoring %s: not an IPv4 CIDR (this kube-proxy is IPv4 only)", cidr)
    if not cidrs.ipv4 or "0.0.0.0/0" in cidrs.ipv4:
        return ()
    matched = within(addresses, cidrs.ipv4)
    kept = tuple(a for a in matched if allow_localhost or not ipaddress.IPv4Address(a).is_loopback)
    for address in sorted(set(matched) - set(kept)):
        log.error("--nodeport-addresses includes localhost (%s), but localhost NodePorts are not supported "
                  "here (only in iptables mode with --iptables-localhost-nodeports): left out", address)
    if matched and not kept:
        raise ValueError(f"only localhost addresses ({', '.join(matched)}) are inside {','.join(cidrs.ipv4)}, "
                         "and localhost NodePorts are off")
    if not kept:
        raise ValueError(f"no address of this namespace ({', '.join(addresses) or 'none'}) is inside "
                         f"{','.join(cidrs.ipv4)}")
    return kept
