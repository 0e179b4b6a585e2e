"""IPVS mode: the kernel support check. The IPVS backend itself runs in the stock-kernel VM."""

from __future__ import annotations

from pathlib import Path


class KernelLacksIpvs(RuntimeError):
    pass


def check_kernel() -> None:
    if not Path("/proc/net/ip_vs").exists():
        raise KernelLacksIpvs(
            "--proxy-mode ipvs: this kernel has no IPVS (CONFIG_IP_VS; /proc/net/ip_vs is missing). "
            "Use --proxy-mode iptables or nftables, or run svclab in the stock-kernel VM "
            "(the Vagrant lab, or vng with linux-image-amd64; see README)."
        )
