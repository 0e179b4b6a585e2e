"""IPVS mode: kube-proxy's third backend, shaped like upstream's pkg/proxy/ipvs.

Every ClusterIP, external IP and LoadBalancer IP is an address of the dummy interface
kube-ipvs0 (so the node accepts packets for it); each IP:port is one IPVS virtual service whose
real servers are the endpoints (DNAT happens in IPVS, not in iptables); ClientIP affinity is IPVS
persistence. What IPVS cannot do (masquerade, hairpin, NodePort and Local policy, source ranges)
is a small fixed set of iptables rules matching ipsets, whose members change, not the rules.

Modules:
  names.py    the dummy device, schedulers, ipsets, chains and hook jumps (upstream's tables)
  desired.py  pure: one ServicePort -> its virtual services, ipset entries and bound addresses
  rules.py    the fixed iptables-restore document
  kernel.py   IPVS, the dummy device and ipsets over netlink (pyroute2), and sysctls
  drain.py    graceful termination: removed real servers at weight 0 until their connections end
  backend.py  IpvsBackend: partial and full syncs, repair, dump, cleanup
"""

from __future__ import annotations

from pathlib import Path


class KernelLacksIpvs(RuntimeError):
    pass


def way_out(argv: list[str] | None = None) -> str:
    """The command that runs the same thing in the stock-kernel VM (`svclab vm`)."""
    rest = " ".join(argv) if argv else "up --proxy-mode ipvs ..."
    return f"svclab vm -- svclab {rest}"


def check_kernel(argv: list[str] | None = None) -> None:
    """Refuse, with the way out, a kernel without IPVS. argv: the svclab command given (to
    repeat it in the way out)."""
    if not Path("/proc/net/ip_vs").exists():
        raise KernelLacksIpvs(
            "--proxy-mode ipvs: this kernel has no IPVS (CONFIG_IP_VS; /proc/net/ip_vs is missing). "
            f"Run it in the stock-kernel VM: `{way_out(argv)}`; "
            "or use --proxy-mode iptables or nftables here."
        )
