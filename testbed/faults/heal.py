"""Listing and healing faults, and what `svclab down`/`clean` do about them.

heal() undoes the network faults (partition, loss, bandwidth, delay, link down/flap, dns-error)
newest first, then sweeps every host for fault tables and qdiscs a crashed command may have
left. Component, node and freeze faults have their own way back (component_start,
node_recover, node_thaw); heal names it when asked for one of them by id.
"""

from __future__ import annotations

import os
from typing import Callable

from testbed import naming
from testbed.faults import dns, network, nft, shaping
from testbed.faults.state import Fault, FaultStore
from testbed.faults.target import HOST_LINKS, DEFAULT_LINKS, FaultError, FaultTarget

UNDO: dict[str, Callable[[FaultTarget, Fault], None]] = {**network.UNDO, "dns-error": dns.undo_dns_error}
WAY_BACK = {"component-stop": "component-start", "node-crash": "node-recover", "node-freeze": "node-thaw"}


def list_faults(cluster: FaultTarget) -> list[Fault]:
    """The faults in force, oldest first."""
    cluster.topology()  # FaultError if the cluster is not running
    return FaultStore(cluster.faults_file).load()


def heal(cluster: FaultTarget, ids: list[str] | None = None) -> list[Fault]:
    """Undo the network faults (all, or those with these ids); returns what was undone."""
    cluster.topology()  # FaultError if the cluster is not running
    with FaultStore(cluster.faults_file).changing() as changes:
        if ids:
            known = {f.id: f for f in changes.faults}
            for i, fault_id in enumerate(ids):
                if fault_id not in known:
                    raise FaultError(f"ids[{i}]", f"no active fault {fault_id!r} (`svclab fault list`)")
                if not known[fault_id].network:
                    kind = known[fault_id].kind
                    raise FaultError(f"ids[{i}]", f"{fault_id} is a {kind}: undo it with {WAY_BACK[kind]}")
            chosen = [known[i] for i in ids]
        else:
            chosen = [f for f in changes.faults if f.network]
        failed = []
        for fault in reversed(chosen):
            try:
                UNDO[fault.kind](cluster, fault)
            except (OSError, RuntimeError, ValueError) as exc:  # the others are healed all the same
                failed.append(f"{fault.id} {fault.kind}: {exc}")
                continue
            changes.remove(fault)
    if not ids:
        sweep(cluster)
    if failed:
        raise RuntimeError("could not undo " + "; ".join(failed) + " (still recorded: heal again)")
    return chosen


def _host_netns(cluster: FaultTarget) -> dict[str, str]:
    """The hosts whose namespaces exist now (host -> netns)."""
    hosts = {}
    for host in cluster.host_names():
        netns = naming.node_netns(cluster.cluster, host)
        if os.path.exists(naming.netns_path(netns)):
            hosts[host] = netns
    return hosts


def sweep(cluster: FaultTarget) -> None:
    """Remove every fault table and shaping qdisc of the cluster's hosts, recorded or not."""
    for host, netns in _host_netns(cluster).items():
        if nft.list_tables(netns, cluster.cluster):
            nft.delete_tables(netns, cluster.cluster)
        links = HOST_LINKS.get(host, DEFAULT_LINKS)
        if shaping.qdiscs(netns, links):
            shaping.unshape(netns, cluster.cluster, links)


def leftovers(cluster: FaultTarget) -> list[str]:
    """Fault state present in the hosts now: tables, qdiscs (empty once healed)."""
    found = []
    for host, netns in _host_netns(cluster).items():
        found += [f"{host}: table {t}" for t in nft.list_tables(netns, cluster.cluster)]
        found += [f"{host}: qdisc {q}" for q in shaping.qdiscs(netns, HOST_LINKS.get(host, DEFAULT_LINKS))]
    return found
