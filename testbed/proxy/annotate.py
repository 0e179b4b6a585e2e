"""`svclab rules`: a backend's dump with the Service port each chain serves."""

from __future__ import annotations

from google.protobuf.message import Message

from testbed.proxy import iptables
from testbed.proxy.model import build_service_ports


def chain_owners(services: list[Message]) -> dict[str, str]:
    """Per-service chain name -> "ns/name:port" for every port of every Service."""
    owners: dict[str, str] = {}
    for svc in services:
        for sp in build_service_ports(svc):
            chains = iptables.service_chains(sp.name)
            for chain in chains:
                if isinstance(chain, str) and chain.startswith("KUBE-"):
                    owners[chain] = str(sp.name)
    return owners


def annotate_iptables(saved: str, services: list[Message]) -> str:
    """Keep kube-proxy's lines of iptables-save output; add `# ns/name:port` to per-service chains."""
    owners = chain_owners(services)
    for line in saved.splitlines():  # a KUBE-SEP chain belongs to the Service whose chain jumps to it
        words = line.split()
        if line.startswith("-A KUBE-S") and len(words) > 2 and words[-1].startswith("KUBE-SEP-"):
            if words[1] in owners and words[-1] not in owners:
                owners[words[-1]] = owners[words[1]] + " endpoint"
    out = []
    for line in saved.splitlines():
        if not (line.startswith(("*", "COMMIT")) or "KUBE-" in line):
            continue
        if line.startswith(":KUBE-"):
            chain = line[1:].split()[0]
            owner = owners.get(chain)
            if owner:
                line = f"{line}  # {owner}"
        out.append(line)
    return "\n".join(out) + "\n"


def annotate(mode: str, dump: str, services: list[Message]) -> str:
    """A backend's dump for people: iptables chains get their Service; nftables chain names
    carry it already."""
    return annotate_iptables(dump, services) if mode == "iptables" else dump
