"""Traffic shaping on a host's links with tc: bandwidth (tbf) and delay (netem).

Everything stays inside the host's namespace. Bandwidth is shaped both ways: a tbf qdisc on
the egress of each link, and the link's ingress redirected (u32 + mirred, both in this kernel)
to an ifb device of the host whose egress has the same tbf. Delay needs sch_netem, which this
kernel lacks: delay() checks the kernel's config first, as scenario validation does, and says
where it works.
"""

from __future__ import annotations

from testbed.faults.target import FaultError, in_netns
from testbed.scenario.kernel import WHERE_IT_WORKS, KernelFeatures
from testbed.scenario.units import Bandwidth

MIN_RATE, MAX_RATE = 8_000, 10_000_000_000  # below a few frames per second tbf is useless; above, a no-op
TBF_LATENCY = "100ms"  # how long a packet may wait in the bucket before tbf drops it
MIN_BURST_BYTES = 4096  # at least a few full-size frames, whatever the rate
NETEM_ADVICE = f"delay and jitter need a kernel with sch_netem, which this one lacks; they work on {WHERE_IT_WORKS}"


def parse_rate(text: object, field: str = "rate") -> int:
    """tc's rate units (1mbit, 500kbit, 2mbps = bytes/s; a units.Bandwidth too) -> bits per second;
    FaultError naming `field`."""
    try:
        bits = Bandwidth.parse(text).bits_per_second
    except ValueError as exc:
        raise FaultError(field, str(exc)) from None
    if not MIN_RATE <= bits <= MAX_RATE:
        raise FaultError(field, f"rate {text!r} is out of range (8kbit to 10gbit)")
    return bits


def ifb_name(cluster: str, index: int) -> str:
    return f"{cluster}-ifb{index}"


def _tbf(rate_bits: int) -> str:
    burst = max(MIN_BURST_BYTES, rate_bits // 8 // 100)  # 10 ms worth of bytes
    return f"tbf rate {rate_bits}bit burst {burst} latency {TBF_LATENCY}"


def bandwidth_batch(cluster: str, links: tuple[str, ...], rate_bits: int) -> str:
    """The `tc -batch` lines that shape every link both ways (after bandwidth_undo of older ones)."""
    lines = []
    for index, link in enumerate(links):
        ifb = ifb_name(cluster, index)
        lines += [f"qdisc replace dev {link} root {_tbf(rate_bits)}",
                  f"qdisc replace dev {ifb} root {_tbf(rate_bits)}",
                  f"qdisc add dev {link} handle ffff: ingress",
                  f"filter add dev {link} parent ffff: protocol all u32 match u32 0 0 "
                  f"action mirred egress redirect dev {ifb}"]
    return "\n".join(lines) + "\n"


def shape(netns: str, cluster: str, links: tuple[str, ...], rate_bits: int) -> None:
    for index in range(len(links)):
        ifb = ifb_name(cluster, index)
        in_netns(netns, ["ip", "link", "add", ifb, "type", "ifb"])
        in_netns(netns, ["ip", "link", "set", ifb, "up"])
    in_netns(netns, ["tc", "-batch", "-"], input=bandwidth_batch(cluster, links, rate_bits))


def unshape(netns: str, cluster: str, links: tuple[str, ...]) -> None:
    """Remove every qdisc a bandwidth or delay fault put on the links, and the ifb devices."""
    for index, link in enumerate(links):
        for qdisc in ("root", "ingress"):
            try:
                in_netns(netns, ["tc", "qdisc", "del", "dev", link, qdisc])
            except RuntimeError:
                pass  # not there: the default qdisc is back already
        try:
            in_netns(netns, ["ip", "link", "del", ifb_name(cluster, index)])
        except RuntimeError:
            pass


def qdiscs(netns: str, links: tuple[str, ...]) -> list[str]:
    """The non-default qdiscs on the links (what shaping left, for list and leak checks)."""
    out = []
    for link in links:
        for line in in_netns(netns, ["tc", "qdisc", "show", "dev", link]).splitlines():
            kind = line.split()[1] if len(line.split()) > 1 else ""
            if kind in ("tbf", "netem", "ingress", "htb"):
                out.append(f"{link}: {line.strip()}")
    return out


def netem_available() -> bool:
    """What scenario validation reads too (the kernel's config, testbed/scenario/kernel.py)."""
    return KernelFeatures.detect().netem


def add_delay(netns: str, links: tuple[str, ...], delay_ms: float, jitter_ms: float) -> None:
    """netem on the egress of each link (once per round trip through the host)."""
    jitter = f" {jitter_ms}ms" if jitter_ms else ""
    batch = "".join(f"qdisc replace dev {link} root netem delay {delay_ms}ms{jitter}\n" for link in links)
    in_netns(netns, ["tc", "-batch", "-"], input=batch)
