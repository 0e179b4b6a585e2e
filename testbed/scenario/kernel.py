"""What the running kernel offers that some scenario actions need, read without root."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from testbed.proxy.ipvs import KernelLacksIpvs, check_kernel

WHERE_IT_WORKS = ("the stock-kernel VM: `svclab vm -- svclab run SCENARIO.yaml` here, or the Vagrant lab "
                  "(scenarios/README.md, \"Where delay works\")")


@dataclass(frozen=True)
class KernelFeatures:
    netem: bool  # sch_netem: delay and jitter
    ipvs: bool  # kube-proxy's ipvs mode

    @classmethod
    def detect(cls) -> "KernelFeatures":
        try:
            check_kernel()
            ipvs = True
        except KernelLacksIpvs:
            ipvs = False
        return cls(netem=_config_has("CONFIG_NET_SCH_NETEM", Path("/sys/module/sch_netem")), ipvs=ipvs)


def _config_has(option: str, loaded: Path) -> bool:
    """The kernel's build config says option is built in or a module; without a readable
    config, whether it is loaded; True when nothing can tell (the action then fails at run time)."""
    if loaded.exists():
        return True
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as config:
                text = config.read()
        except OSError:
            continue
        return f"\n{option}=y" in text or f"\n{option}=m" in text
    return True
