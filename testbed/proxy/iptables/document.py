"""The iptables-restore document of a sync, and what the tables hold once it is applied.

Partial sync (upstream's default since 1.27): with `changed` a set of ServicePortNames, the
document rewrites only the per-service nat chains of the changed ServicePortNames, and the
top-level chains (nat KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING) and the filter table
only when their rules come out different from what was last written. Upstream rewrites the
top level on every sync; at 10,000 Services that is 10,000 rules and ~0.7 s of
iptables-restore here, for an endpoint change that never alters them (they change when a
Service gains its first or loses its last endpoint, or is added or removed). Other
per-service chains are not mentioned at all: in iptables-restore, a chain line
(`:KUBE-SVC-X - [0:0]`) flushes an existing chain even with --noflush, so "declared but not
flushed" does not exist. Rules may jump to an undeclared chain that already exists in the
kernel. `RenderResult.programmed` records what the tables hold once the document is applied
(every per-service chain, each ServicePortName's share of the top level); pass it back as
`previous` next time: only the changed ServicePortNames are rendered again, and the chains no
longer wanted are declared (flushed) and deleted with -X. If a restore fails, the kernel and
`programmed` disagree: render the next sync in full, from `Programmed.from_kernel()` over
`iptables-save -t nat`, as upstream does after a failed sync. Someone flushing the tables
behind kube-proxy's back is the canary's job (backend.py): it forces a full sync.

iptables-nft and large documents (iptables 1.8.9, the version here). With --noflush, the nft
backend records every chain a document names (each rule's chain and jump target) in a sorted
linked list (cache_chain_list_insert in nft-cache.c): each name costs a walk over the names
already listed that sort before it, so one big nat transaction is quadratic. Measured here
(user CPU of iptables-restore): 2,000 Services x 5 endpoints in one nat COMMIT, 9.3 s (1,000:
2.3 s; 10,000 did not finish in 15 minutes); the same without --noflush, 0.6 s. Two things
keep it near linear, neither changes what the kernel ends up with:
- The top-level jump rules (KUBE-SERVICES, KUBE-NODEPORTS) are written in descending order of
  their target chain, so each new name sorts first and costs one step. Upstream's order there
  is Go's random map order, so no order is promised. A one-Service partial sync on top of
  10,000 Services: 2.0 s -> 0.17 s of iptables-restore user CPU.
- Config.section_chains: when a document rewrites more per-service chains than that (a full
  sync at scale), they go into several `*nat ... COMMIT` sections of about that many chains,
  before the final `*nat` section that rewrites the top-level chains and deletes stale ones.
  Each section is a transaction; the chains they write are new or already-live chains replaced
  by their new content, so every intermediate state is a consistent mix of old and new
  Services, and traffic switches to new Services in the final section, as with one COMMIT.
  10,000 Services, sections of 500 chains: ~3 s user + ~4 s sys. 0 keeps one nat COMMIT.
  If a section fails, the earlier ones stay applied: recover with a full sync as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, NamedTuple

from testbed.proxy.iptables.names import (FILTER_CHAINS, KUBE_FIREWALL, KUBE_MARK_MASQ, MASQ_MARK, NAT_CHAINS, Config,
                                          service_chains_in)
from testbed.proxy.iptables.services import ServiceTop, _Output, _Renderer
from testbed.proxy.model import Endpoint, ProxyState, ServicePortName


@dataclass(frozen=True)
class Programmed:
    """What the tables hold once a render is applied: the `previous` of the next render.

    tops: each ServicePortName's top-level rules and chains, so a partial sync renders only the
      changed ones; nat_top / filter_top: the top-level rules as last written, so a partial sync
      leaves those chains alone when they come out the same (see "Partial sync").
    """

    tops: dict[ServicePortName, ServiceTop]
    chains: frozenset[str]  # every per-service nat chain present
    comments: bool  # per-endpoint comments were written (not upstream's largeClusterMode)
    nat_top: tuple[str, ...]
    filter_top: tuple[str, ...]
    known: bool = True  # False: only `chains` is known (read back after a failed restore)

    @classmethod
    def from_kernel(cls, save_output: str) -> "Programmed":
        """After a failed restore: the per-service chains `iptables-save -t nat` shows, nothing
        else known, so the next render is full and deletes what is stale."""
        return cls({}, frozenset(service_chains_in(save_output)), False, (), (), known=False)


class RenderResult(NamedTuple):
    document: str  # the iptables-restore input; "" when nothing needs writing
    programmed: Programmed  # the tables once applied: next render's previous
    deleted: frozenset[str]  # stale per-service chains this document deletes (-X)
    full: bool  # every per-service chain was rewritten

    @property
    def chains(self) -> frozenset[str]:
        """Per-service nat chains present once the document is applied."""
        return self.programmed.chains


def _sections(out: _Output, limit: int) -> list[str]:
    """The per-service chains as `*nat ... COMMIT` sections of about `limit` chains each, a
    Service's chains always in the same section (see Config.section_chains). The first also
    writes KUBE-MARK-MASQ, which they jump to: it may not exist yet."""
    lines = ["*nat", ":KUBE-MARK-MASQ - [0:0]", f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"]
    chain_start = rule_start = 0
    for n, (chain_end, rule_end) in enumerate(out.ends):
        if chain_end - chain_start < limit and n + 1 < len(out.ends):
            continue
        if lines[-1] == "COMMIT":
            lines.append("*nat")
        lines += out.nat_chains[chain_start:chain_end]
        lines += out.nat_rules[rule_start:rule_end]
        lines.append("COMMIT")
        chain_start, rule_start = chain_end, rule_end
    return lines


def render(state: ProxyState, changed: Collection[ServicePortName] | None = None,
           previous: Programmed | None = None, config: Config = Config()) -> RenderResult:
    """The iptables-restore document for `state`.

    changed=None: a full sync, every chain is (re)written. Otherwise only the per-service chains
    of the given ServicePortNames are, and the top-level chains and the filter table only if
    their rules changed; that needs `previous` (the `programmed` of the last render that was
    applied), and without it the sync is full. Chains in `previous` no longer wanted are
    deleted.
    """
    services = state.services
    endpoints = state.endpoints
    total = sum(len(endpoints.get(name, ())) for name in services)
    comments = total <= config.large_cluster_endpoints  # upstream's largeClusterMode, inverted
    full = changed is None or previous is None or not previous.known or previous.comments != comments
    renderer = _Renderer(config, comments)
    out = _Output()
    if full:
        tops, wanted, stale = _render_all(state, previous, renderer, out)
    else:
        tops, wanted, stale = _render_changed(state, changed, previous, renderer, out)
    top = _TopLevel.of(tops)
    programmed = Programmed(tops, wanted, comments, top.nat_top, top.filter_top)
    write_nat_top = full or top.nat_top != previous.nat_top
    write_filter = full or top.filter_top != previous.filter_top
    if not (write_nat_top or write_filter or stale or out.nat_chains):
        return RenderResult("", programmed, frozenset(), False)
    lines = _document(out, top, stale, config, full, write_filter, write_nat_top)
    return RenderResult("\n".join(lines), programmed, frozenset(stale), full)


_Rendered = tuple[dict[ServicePortName, ServiceTop], frozenset[str], list[str]]  # (tops, wanted chains, stale)


def _render_all(state: ProxyState, previous: Programmed | None, renderer: _Renderer, out: _Output) -> _Rendered:
    """A full sync: every ServicePort's chains into `out`."""
    services, endpoints = state.services, state.endpoints
    empty: tuple[Endpoint, ...] = ()
    tops = {name: renderer.service(services[name], endpoints.get(name, empty), out) for name in sorted(services)}
    wanted = frozenset().union(*(top.chains for top in tops.values()))
    stale = sorted((previous.chains if previous else frozenset()) - wanted)
    return tops, wanted, stale


def _render_changed(state: ProxyState, changed: Collection[ServicePortName], previous: Programmed,
                    renderer: _Renderer, out: _Output) -> _Rendered:
    """A partial sync: the changed ServicePorts' chains into `out` (unless they came out the same)."""
    services, endpoints = state.services, state.endpoints
    empty: tuple[Endpoint, ...] = ()
    tops = dict(previous.tops)
    gone: set[str] = set()
    for name in sorted(changed):
        old = tops.pop(name, None)
        if name in services:
            tops[name] = renderer.service(services[name], endpoints.get(name, empty), out, old)
        if old is not None:
            gone |= old.chains - (tops[name].chains if name in tops else frozenset())
    stale = sorted(gone)
    wanted = (previous.chains - gone) | frozenset().union(*(tops[n].chains for n in changed if n in tops))
    return tops, wanted, stale


class _TopLevel(NamedTuple):
    """The top-level rules of every ServicePort, in the order they are written."""

    service_jumps: list[tuple[str, str]]  # nat KUBE-SERVICES (target, rule)
    nodeport_jumps: list[tuple[str, str]]  # nat KUBE-NODEPORTS (target, rule)
    nat_top: tuple[str, ...]
    filter_top: tuple[str, ...]

    @classmethod
    def of(cls, tops: dict[ServicePortName, ServiceTop]) -> "_TopLevel":
        # Jumps ordered by target, descending: see "iptables-nft and large documents" above.
        ordered = [tops[name] for name in sorted(tops)]
        service_jumps = sorted((jump for top in ordered for jump in top.services), reverse=True)
        nodeport_jumps = sorted((jump for top in ordered for jump in top.nodeports), reverse=True)
        nat_top = tuple(rule for _, rule in service_jumps) + tuple(rule for _, rule in nodeport_jumps)
        filter_top = tuple(rule for top in ordered for rule in top.filter_rules)
        return cls(service_jumps, nodeport_jumps, nat_top, filter_top)


def _document(out: _Output, top: _TopLevel, stale: list[str], config: Config, full: bool, write_filter: bool,
              write_nat_top: bool) -> list[str]:
    """The document's lines: the filter table if it changed, the per-service nat chains (in
    sections if many), then the final nat section: top-level chains and stale deletions."""
    sectioned = bool(config.section_chains) and len(out.nat_chains) > config.section_chains
    lines: list[str] = []
    if write_filter:
        lines += _filter_table(top.filter_top, config)
    if sectioned:
        lines += _sections(out, config.section_chains)
    lines.append("*nat")
    if write_nat_top:
        # a sectioned document wrote KUBE-MARK-MASQ in its first section; a partial one finds it there
        lines += [f":{chain} - [0:0]" for chain in NAT_CHAINS if chain != KUBE_MARK_MASQ or (full and not sectioned)]
    if not sectioned:
        lines += out.nat_chains
    lines += [f":{chain} - [0:0]" for chain in stale]
    if write_nat_top:
        lines += _nat_top(top, config, mark_masq=full and not sectioned)
    if not sectioned:
        lines += out.nat_rules
    lines += [f"-X {chain}" for chain in stale]
    lines += ["COMMIT", ""]
    return lines


def _filter_table(filter_top: tuple[str, ...], config: Config) -> list[str]:
    mark = MASQ_MARK
    lines = ["*filter"]
    lines += [f":{chain} - [0:0]" for chain in FILTER_CHAINS]
    if config.localhost_nodeports:  # route_localnet is on: only DNAT may bring packets to 127.0.0.0/8
        lines.append(f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
                     "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
    lines += filter_top
    lines += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
        "-j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
        "--ctstate RELATED,ESTABLISHED -j ACCEPT",
        "COMMIT",
    ]
    return lines


def _nat_top(top: _TopLevel, config: Config, mark_masq: bool) -> list[str]:
    """The rules of the top-level nat chains (KUBE-POSTROUTING, KUBE-MARK-MASQ if `mark_masq`,
    KUBE-SERVICES, KUBE-NODEPORTS)."""
    mark = MASQ_MARK
    masquerade = "-j MASQUERADE --random-fully" if config.random_fully else "-j MASQUERADE"
    lines = [
        f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
        f'-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" {masquerade}',
    ]
    if mark_masq:
        lines.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")
    lines += [rule for _, rule in top.service_jumps]
    match_all = "-m addrtype --dst-type LOCAL" + ("" if config.localhost_nodeports else " ! -d 127.0.0.0/8")
    destinations = [f"-d {ip}" for ip in config.nodeport_addresses] or [match_all]
    lines += [f'-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
              f'last rule in this chain" {destination} -j KUBE-NODEPORTS' for destination in destinations]
    lines += [rule for _, rule in top.nodeport_jumps]
    return lines
