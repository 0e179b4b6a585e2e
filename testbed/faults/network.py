"""Network faults on a running cluster: partition, loss, bandwidth, delay, link down/up/flap.

Each action checks every argument first (a bad one raises FaultError naming the field and
nothing changes), records the fault in faults.json with what undoing it takes, then changes
the kernel state of the hosts' namespaces (nft.py, shaping.py, links.py) and returns the
Fault at once: nothing here waits for an effect. `heal` (heal.py) undoes them.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from testbed.cluster.config import parse_duration
from testbed.faults import links, nft, shaping
from testbed.faults.state import Changes, Fault, FaultStore
from testbed.faults.target import FaultError, FaultTarget, Host
from testbed.scenario.units import Bandwidth

MAX_FLAPS = 1000


def _store(cluster: FaultTarget) -> FaultStore:
    return FaultStore(cluster.faults_file)


def _applying(cluster: FaultTarget, fault: Fault, apply: Callable[[Fault], None],
              undo: Callable[[FaultTarget, Fault], None]) -> Fault:
    """Record the fault, then apply it; if applying fails, undo what was done and forget it."""
    with _store(cluster).changing() as changes:
        changes.add(fault)
        try:
            apply(fault)
        except BaseException:
            undo(cluster, fault)
            changes.remove(fault)
            raise
    return fault


def _replace_older(cluster: FaultTarget, kind: str, host: str, undo: Callable[[FaultTarget, Fault], None]) -> None:
    """A new loss or bandwidth on a host replaces the one it had."""
    with _store(cluster).changing() as changes:
        for old in changes.find(kind, target=host):
            undo(cluster, old)
            changes.remove(old)


# ---- partition ---------------------------------------------------------------------------------

def _groups(cluster: FaultTarget, groups: object) -> list[list[Host]]:
    if not isinstance(groups, (list, tuple)) or len(groups) < 2:
        raise FaultError("groups", "needs at least two groups of hosts, e.g. [[client], [node2]]")
    seen: set[str] = set()
    out = []
    for i, group in enumerate(groups):
        if not isinstance(group, (list, tuple)) or not group:
            raise FaultError(f"groups[{i}]", "must be a non-empty list of hosts")
        hosts = []
        for j, name in enumerate(group):
            host = cluster.host(name, field=f"groups[{i}][{j}]")
            if host.name in seen:
                raise FaultError(f"groups[{i}][{j}]", f"{host.name} is in two groups")
            seen.add(host.name)
            hosts.append(host)
        out.append(hosts)
    return out


def _partition_sides(groups: list[list[Host]], direction: str) -> dict[Host, nft.PartitionSide]:
    """What each host blocks: both ways, every group from every other; one-way, the first group
    sends nothing to the second (only replies to the second's connections) and the second takes
    nothing from the first but those replies (which also catches what the load balancer NATs)."""
    sides = {}
    if direction == "one-way":
        first, second = groups
        peers_of_first = tuple(a for h in second for a in h.addresses)
        peers_of_second = tuple(a for h in first for a in h.addresses)
        for host in first:
            sides[host] = nft.PartitionSide(host.links, peers_of_first, False, True, True)
        for host in second:
            sides[host] = nft.PartitionSide(host.links, peers_of_second, True, False, True)
        return sides
    for i, group in enumerate(groups):
        others = tuple(a for j, g in enumerate(groups) if j != i for h in g for a in h.addresses)
        for host in group:
            sides[host] = nft.PartitionSide(host.links, others, True, True, False)
    return sides


def partition(cluster: FaultTarget, groups: list[list[str]], direction: str = "both", mode: str = "drop") -> Fault:
    """Cut groups of hosts (node1.., client, gw) apart. both: nothing passes between any two
    groups, established connections included; one-way (two groups): the first cannot open
    connections to the second or send it anything but replies. mode: drop, or reject (TCP RST,
    ICMP host unreachable)."""
    if direction not in nft.DIRECTIONS:
        raise FaultError("direction", f"unknown direction {direction!r} (both, one-way)")
    if mode not in nft.MODES:
        raise FaultError("mode", f"unknown mode {mode!r} (drop, reject)")
    resolved = _groups(cluster, groups)
    if direction == "one-way" and len(resolved) != 2:
        raise FaultError("groups", "a one-way partition takes exactly two groups (from, to)")
    sides = _partition_sides(resolved, direction)
    names = [[h.name for h in g] for g in resolved]
    fault = Fault("partition", {"groups": names, "direction": direction, "mode": mode},
                  undo={"hosts": {h.name: h.netns for h in sides}},
                  summary=f"partition {' | '.join(','.join(g) for g in names)} ({direction}, {mode})")

    def apply(f: Fault) -> None:
        for host, side in sides.items():
            nft.apply(host.netns, nft.partition_script(cluster.cluster, f.id, side, mode))

    return _applying(cluster, fault, apply, undo_partition)


def undo_partition(cluster: FaultTarget, fault: Fault) -> None:
    for netns in fault.undo["hosts"].values():
        nft.delete(netns, cluster.cluster, "inet", nft.partition_chains(fault.id), [f"{fault.id}-peers"])


# ---- loss, bandwidth, delay ---------------------------------------------------------------------

def _percent(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise FaultError("percent", f"must be a number above 0 and at most 100, not {value!r}")
    return float(value)


def loss(cluster: FaultTarget, target: str, percent: float) -> Fault:
    """Drop `percent` % of the packets on the host's links, each way (a round trip through the
    host is lost with 1 - (1 - p)^2); replaces a loss the host had."""
    h = cluster.host(target)
    value = _percent(percent)
    _replace_older(cluster, "loss", h.name, undo_loss)
    fault = Fault("loss", {"target": h.name, "percent": value}, undo={"netns": h.netns, "links": list(h.links)},
                  summary=f"loss {value:g}% on {h.name} ({', '.join(h.links)}, both ways)")
    return _applying(cluster, fault, lambda f: nft.apply(h.netns, nft.loss_script(cluster.cluster, f.id, h.links, value)),
                     undo_loss)


def undo_loss(cluster: FaultTarget, fault: Fault) -> None:
    nft.delete(fault.undo["netns"], cluster.cluster, "netdev", nft.loss_chains(fault.id, tuple(fault.undo["links"])))


def _no_shaping(cluster: FaultTarget, host: str, kind: str) -> None:
    """Bandwidth and delay both own the links' root qdisc: one at a time per host."""
    other = "delay" if kind == "bandwidth" else "bandwidth"
    held = [f for f in _store(cluster).load() if f.kind == other and f.params.get("target") == host]
    if held:
        raise FaultError("target", f"{host} has a {other} fault ({held[0].id}): heal it first (one qdisc per link)")


def bandwidth(cluster: FaultTarget, target: str, rate: str | Bandwidth) -> Fault:
    """Limit the host's links to `rate` (tc units: 1mbit, 500kbit), each way (tbf; ifb for the
    ingress); replaces a bandwidth the host had."""
    h = cluster.host(target)
    bits = shaping.parse_rate(rate)
    _no_shaping(cluster, h.name, "bandwidth")
    _replace_older(cluster, "bandwidth", h.name, undo_shaping)
    fault = Fault("bandwidth", {"target": h.name, "rate": str(rate), "bitsPerSecond": bits},
                  undo={"netns": h.netns, "links": list(h.links)},
                  summary=f"bandwidth {rate} on {h.name} ({', '.join(h.links)}, both ways)")
    return _applying(cluster, fault, lambda f: shaping.shape(h.netns, cluster.cluster, h.links, bits), undo_shaping)


def undo_shaping(cluster: FaultTarget, fault: Fault) -> None:
    shaping.unshape(fault.undo["netns"], cluster.cluster, tuple(fault.undo["links"]))


def _duration_ms(value: object, field: str) -> float:
    try:
        seconds = parse_duration(value)
    except (TypeError, ValueError):
        raise FaultError(field, f"invalid duration {value!r} (e.g. 100ms, 1s)") from None
    if not 0 <= seconds <= 60:
        raise FaultError(field, f"must be between 0 and 60 s, not {value!r}")
    return round(seconds * 1000, 3)


def delay(cluster: FaultTarget, target: str, delay: str | float, jitter: str | float = "0ms") -> Fault:
    """Delay what leaves the host's links by `delay` (+- `jitter`) with netem; FaultError naming
    where it works if this kernel has no sch_netem (it has not here)."""
    h = cluster.host(target)
    delay_ms, jitter_ms = _duration_ms(delay, "delay"), _duration_ms(jitter, "jitter")
    if not shaping.netem_available():
        raise FaultError("delay", shaping.NETEM_ADVICE)
    _no_shaping(cluster, h.name, "delay")
    _replace_older(cluster, "delay", h.name, undo_shaping)
    fault = Fault("delay", {"target": h.name, "delayMs": delay_ms, "jitterMs": jitter_ms},
                  undo={"netns": h.netns, "links": list(h.links)},
                  summary=f"delay {delay_ms:g} ms (jitter {jitter_ms:g} ms) on what {h.name} sends")
    return _applying(cluster, fault, lambda f: shaping.add_delay(h.netns, h.links, delay_ms, jitter_ms),
                     undo_shaping)


# ---- links ------------------------------------------------------------------------------------

def _links_held(changes: Changes, host: str) -> list[Fault]:
    """Faults that keep the host's links down (link-down, node-crash)."""
    return changes.find("link-down", target=host) + changes.find("node-crash", node=host)


def link_down(cluster: FaultTarget, target: str) -> Fault:
    """Take the host's links down (inside its namespace) until link_up or heal."""
    h = cluster.host(target)
    with _store(cluster).changing() as changes:
        held = _links_held(changes, h.name)
        if held:
            raise FaultError("target", f"{h.name}'s links are down already ({held[0].id} {held[0].kind})")
        routes = links.down(h.netns, h.links)
        return changes.add(Fault("link-down", {"target": h.name}, summary=f"links of {h.name} down",
                                 undo={"netns": h.netns, "links": list(h.links), "routes": routes}))


def undo_link_down(cluster: FaultTarget, fault: Fault) -> None:
    links.up(fault.undo["netns"], tuple(fault.undo["links"]), fault.undo["routes"])


def link_up(cluster: FaultTarget, target: str) -> list[Fault]:
    """Bring the host's links back (and their routes); the link-down faults undone."""
    h = cluster.host(target)
    with _store(cluster).changing() as changes:
        undone = changes.find("link-down", target=h.name)
        for fault in undone:
            undo_link_down(cluster, fault)
            changes.remove(fault)
    return undone


def link_flap(cluster: FaultTarget, target: str, count: int = 3, interval: str | float = "1s",
              wait: bool = False) -> Fault:
    """Take the host's links down for `interval`, then up for `interval`, `count` times, on a
    thread (wait=True: return when done). heal stops it, links up."""
    h = cluster.host(target)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FLAPS:
        raise FaultError("count", f"must be a whole number from 1 to {MAX_FLAPS}, not {count!r}")
    seconds = _duration_ms(interval, "interval") / 1000
    if seconds <= 0:
        raise FaultError("interval", "must be above 0")
    with _store(cluster).changing() as changes:
        held = _links_held(changes, h.name) + changes.find("link-flap", target=h.name)
        if held:
            raise FaultError("target", f"{h.name}'s links are held already ({held[0].id} {held[0].kind})")
        fault = changes.add(Fault("link-flap", {"target": h.name, "count": count, "interval": seconds},
                                  undo={"netns": h.netns, "links": list(h.links), "routes": []},
                                  summary=f"links of {h.name} flapping {count} x {interval}"))
    thread = threading.Thread(target=_flap, args=(cluster, h, fault, count, seconds), name=f"flap-{h.name}")
    thread.start()
    if wait:
        thread.join()
    return fault


def _flap(cluster: FaultTarget, host: Host, fault: Fault, count: int, seconds: float) -> None:
    def still_wanted() -> bool:
        return any(f.id == fault.id for f in _store(cluster).load())

    try:
        for _ in range(count):
            if not still_wanted():
                return
            with _store(cluster).changing() as changes:  # routes recorded: heal can bring them back
                routes = links.down(host.netns, host.links)
                for f in changes.find("link-flap", target=host.name):
                    f.undo["routes"] = routes
            time.sleep(seconds)
            links.up(host.netns, host.links, routes)
            time.sleep(seconds)
    except (OSError, RuntimeError):
        return  # the cluster went away meanwhile
    finally:
        try:
            with _store(cluster).changing() as changes:
                changes.remove(fault)
        except OSError:
            pass


def undo_link_flap(cluster: FaultTarget, fault: Fault) -> None:
    links.up(fault.undo["netns"], tuple(fault.undo["links"]), fault.undo["routes"])


UNDO: dict[str, Callable[[FaultTarget, Fault], None]] = {
    "partition": undo_partition, "loss": undo_loss, "bandwidth": undo_shaping, "delay": undo_shaping,
    "link-down": undo_link_down, "link-flap": undo_link_flap,
}
