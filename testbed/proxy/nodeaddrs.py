"""The node's own addresses, as kube-proxy finds them in the network namespace it runs in."""

from __future__ import annotations

import ipaddress
from typing import Iterable

from pyroute2 import IPRoute


def local_ipv4_addresses() -> tuple[str, ...]:
    """Every IPv4 address of this namespace but loopback ones, sorted."""
    with IPRoute() as ipr:
        addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)}
    return tuple(sorted((a for a in addresses if a and not ipaddress.IPv4Address(a).is_loopback),
                        key=ipaddress.IPv4Address))


def parse_cidrs(text: str) -> tuple[str, ...]:
    """--nodeport-addresses: comma-separated CIDRs; ValueError naming the bad one."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            out.append(str(ipaddress.IPv4Network(item, strict=False)))
        except ValueError:
            raise ValueError(f"--nodeport-addresses: {item!r} is not an IPv4 CIDR") from None
    return tuple(out)


def within(addresses: Iterable[str], cidrs: Iterable[str]) -> tuple[str, ...]:
    """The addresses inside any of the CIDRs (upstream's NodePortAddresses.GetNodeIPs)."""
    networks = [ipaddress.IPv4Network(c) for c in cidrs]
    return tuple(a for a in addresses if any(ipaddress.IPv4Address(a) in n for n in networks))
