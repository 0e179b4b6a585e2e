"""The nftables rules of network faults, rendered as nft scripts (pure) and applied per host.

Every fault's rules live in the namespace of each host it touches, in tables named after the
cluster (``<cluster>-fault``), in chains and sets named after the fault (``f3-in``), so one
fault is undone by deleting its chains and every fault of a host by deleting the tables:

* loss: ``table netdev <c>-fault``, a chain on the ingress and one on the egress hook of each
  of the host's links (``numgen random mod 10000 < N drop``): the link loses packets both
  ways, ARP included. A drop at the egress hook is silent to UDP senders and a congestion
  signal to TCP, as a lossy wire (an inet postrouting drop would fail sendto() with EPERM).
* partition: ``table inet <c>-fault``, a set of the other side's addresses and chains on the
  input, forward and output hooks, so the host's own traffic and what it forwards for its pods
  are both cut. Incoming packets are matched by source before the reply's NAT is undone,
  outgoing ones by destination after DNAT: the addresses on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.faults.target import in_netns

DIRECTIONS = ("both", "one-way")
MODES = ("drop", "reject")
LOSS_SCALE = 10000  # numgen modulus: percentages to 0.01
PRIORITY = -10  # before anything of kube-proxy's (filter 0): our drops come first


def table_name(cluster: str) -> str:
    return f"{cluster}-fault"


@dataclass(frozen=True)
class PartitionSide:
    """What one host of a partition does about the other group's addresses (`peers`)."""

    links: tuple[str, ...]
    peers: tuple[str, ...]
    block_in: bool  # packets from the peers
    block_out: bool  # packets to the peers
    replies_pass: bool  # one-way: packets of connections the other side did not open pass


def _links(links: tuple[str, ...]) -> str:
    return "{ " + ", ".join(f'"{link}"' for link in links) + " }"


def _verdict(mode: str) -> list[str]:
    if mode == "reject":  # TCP RST, else ICMP host unreachable
        return ["meta l4proto tcp counter reject with tcp reset", "counter reject with icmpx type host-unreachable"]
    return ["counter drop"]


def loss_script(cluster: str, fault_id: str, links: tuple[str, ...], percent: float) -> str:
    table = f"netdev {table_name(cluster)}"
    threshold = round(percent * LOSS_SCALE / 100)
    lines = [f"add table {table}"]
    for link in links:
        for hook, side in (("ingress", "in"), ("egress", "out")):
            chain = f"{fault_id}-{side}-{link}"
            lines.append(f'add chain {table} {chain} {{ type filter hook {hook} device "{link}" priority -500; '
                         "policy accept; }")
            lines.append(f"add rule {table} {chain} numgen random mod {LOSS_SCALE} < {threshold} counter drop")
    return "\n".join(lines) + "\n"


def loss_chains(fault_id: str, links: tuple[str, ...]) -> list[str]:
    return [f"{fault_id}-{side}-{link}" for link in links for side in ("in", "out")]


def partition_script(cluster: str, fault_id: str, side: PartitionSide, mode: str) -> str:
    table = f"inet {table_name(cluster)}"
    peers = f"{fault_id}-peers"
    links = _links(side.links)
    lines = [f"add table {table}",
             f"add set {table} {peers} {{ type ipv4_addr; flags interval; }}",
             f"add element {table} {peers} {{ {', '.join(side.peers)} }}"]
    rules: dict[str, list[str]] = {"input": [], "forward": [], "output": []}
    replies = ["ct direction reply accept"] if side.replies_pass else []
    if side.block_in:
        match = f"iifname {links} ip saddr @{peers}"
        for hook in ("input", "forward"):
            rules[hook] += [f"{match} {rule}" for rule in replies + _verdict(mode)]
    if side.block_out:
        match = f"oifname {links} ip daddr @{peers}"
        # the RST or ICMP error a reject sends back is related to what it refused: let it out
        own = ["ct state related accept"] if mode == "reject" else []
        for hook in ("forward", "output"):
            rules[hook] += [f"{match} {rule}" for rule in own + replies + _verdict(mode)]
    for hook, hook_rules in rules.items():
        if hook_rules:
            chain = f"{fault_id}-{hook}"
            lines.append(f"add chain {table} {chain} {{ type filter hook {hook} priority {PRIORITY}; policy accept; }}")
            lines += [f"add rule {table} {chain} {rule}" for rule in hook_rules]
    return "\n".join(lines) + "\n"


def partition_chains(fault_id: str) -> list[str]:
    return [f"{fault_id}-{hook}" for hook in ("input", "forward", "output")]


def apply(netns: str, script: str) -> None:
    """One nft transaction in the host's namespace: all of the script or nothing."""
    in_netns(netns, ["nft", "-f", "-"], input=script)


def delete(netns: str, cluster: str, family: str, chains: list[str], sets: list[str] = ()) -> None:
    """Remove a fault's chains and sets (those that exist) from the host's table."""
    table = f"{family} {table_name(cluster)}"
    try:
        listed = in_netns(netns, ["nft", "-t", "list", "table", *table.split()])
    except RuntimeError:
        return  # no table: nothing of the fault is left
    present = [c for c in chains if f"chain {c} {{" in listed]
    present_sets = [s for s in sets if f"set {s} {{" in listed]
    lines = [f"flush chain {table} {c}\ndelete chain {table} {c}" for c in present]
    lines += [f"delete set {table} {s}" for s in present_sets]
    if lines:
        apply(netns, "\n".join(lines) + "\n")


def delete_tables(netns: str, cluster: str) -> None:
    """Every fault rule of the host (heal, down): both tables, if there."""
    for family in ("inet", "netdev"):
        try:
            in_netns(netns, ["nft", "delete", "table", family, table_name(cluster)])
        except RuntimeError:
            pass


def list_tables(netns: str, cluster: str) -> list[str]:
    """The fault tables the host holds now (for `svclab fault list` and the leak checks)."""
    out = in_netns(netns, ["nft", "list", "tables"])
    return [line.split(None, 1)[1] for line in out.splitlines()
            if line.startswith("table ") and line.endswith(f" {table_name(cluster)}")]
