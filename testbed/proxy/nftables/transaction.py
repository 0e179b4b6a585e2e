"""The `nft -f` script of a sync (one transaction), and what the table holds once it is applied.

Transactions. nft 1.0.6 lists every chain of the table before running any `add rule`,
`add element` or `delete` command (~0.2-0.3 s at 60,000 chains; `delete element` also lists the
set: ~0.7-1.1 s at 10,000 Services), but lists nothing for `add chain NAME { rules }`,
`add set/map NAME { decl ; elements = { … } }`, `flush chain` and `flush set/map`. So rules are
written as chain blocks and elements as set declarations (the objects upstream's knftables
transactions write with `add rule` / `add element`), and a partial sync deletes nothing:
- full sync (`changed=None`): create the table, `flush table` (rules only; affinity sets keep
  their entries), flush the dispatch maps, then write everything and delete what is stale. If
  nothing is known about the kernel (`previous=None`: after a failed sync) the table is
  replaced atomically instead (`add table; delete table; add table …`). At process start the
  backend passes what a previous kube-proxy left (its chains and sets) as `previous`.
- partial sync: for the changed ServicePortNames only, rewrite (flush + block) the chains whose
  rules differ from what was programmed, add the new chains, sets and elements, and flush the
  chains that went away. A set or map that loses an element, or where one changes value, is
  rewritten whole (flush, add all its elements): ~0.1 s for 10,000 cluster IPs, against ~0.7 s
  for one `delete element`. Stale chains and affinity sets are deleted at the next full sync,
  or once `gc_threshold` of them piled up (or a set must be replaced at once), as upstream
  defers stale chain deletion (its staleChains).

Every commit that adds a jump, goto or DNAT makes the kernel (6.18, which does not remember
what it validated) re-validate the whole table from each base chain, and nat-prerouting and
nat-output both reach every Service: ~55 ms at 10,000 Services x 5 endpoints on the test
machine, whatever the transaction's size (~156 ms with upstream's endpoint chains). That
walk, not nft or this renderer, is a partial sync's cost at scale.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator, NamedTuple

from testbed.proxy.model import Endpoint, ProxyState, ServicePortName
from testbed.proxy.nftables.names import (BASE_CHAINS, CLUSTER_IPS, CLUSTER_IPS_CHECK, CONTAINERS, FIREWALL_CHECK,
                                          FIREWALL_IPS, HAIRPIN_ENDPOINTS, JUMPS, MARK_MASQ, MASQ_MARK, MASQUERADING,
                                          NO_ENDPOINT_NODEPORTS, NO_ENDPOINT_SERVICES, NODEPORT_ENDPOINTS_CHECK,
                                          NODEPORT_IPS, REJECT_CHAIN, SERVICE_ENDPOINTS_CHECK, SERVICE_IPS,
                                          SERVICE_NODEPORTS, SERVICES, TOP_CHAINS, Config, _T, _cidr, _ipv4)
from testbed.proxy.nftables.services import _EMPTY, Element, ServiceRules, _ServiceRenderer


@dataclass(frozen=True)
class Programmed:
    """What the table holds once a render is applied: the `previous` of the next render.

    services: what each ServicePortName programmed (its chain names and rules, sets, elements).
    elements: container -> key -> the Element each owner wants; the kernel holds the smallest
      owner's (two Services claiming one external IP and port is a conflict upstream resolves
      by iteration order; here it is deterministic).
    sets: every affinity set in the kernel -> its timeout; stale_sets / stale_chains: the ones
      no Service uses any more, flushed (chains) and waiting to be deleted.
    """

    services: dict[ServicePortName, ServiceRules] = field(default_factory=dict)
    elements: dict[str, dict[str, dict[ServicePortName, Element]]] = field(default_factory=dict)
    sets: dict[str, int] = field(default_factory=dict)
    stale_chains: frozenset[str] = frozenset()
    stale_sets: frozenset[str] = frozenset()
    rules: int = 0  # rules in the table
    static_rules: int = 0

    def chains(self) -> set[str]:
        """Every chain some Service uses (stale ones aside)."""
        return {chain for objects in self.services.values() for chain, _ in objects.chains}

    def kernel_elements(self, container: str) -> list[Element]:
        """The elements the kernel holds in one set or map."""
        return _kernel_elements(self.elements, container)

    @property
    def element_count(self) -> int:
        return sum(len(keys) for keys in self.elements.values())


class RenderResult(NamedTuple):
    script: str  # the `nft -f` input: one transaction
    programmed: Programmed  # the table once applied: next render's previous
    full: bool
    deleted_chains: frozenset[str]  # chains this script deletes
    deleted_sets: frozenset[str]

    @property
    def counts(self) -> dict[str, int]:
        """Rules and elements in the table once applied (the backend's sync() result)."""
        return {"kube-proxy": self.programmed.rules, "kube-proxy elements": self.programmed.element_count}


# ------------------------------------------------------------------ the script


def _block(chain: str, rules: Iterable[str]) -> str:
    """`add chain` with its rules: nft needs no listing of the table for this form."""
    body = "".join(f"\t{rule}\n" for rule in rules)
    return f"add chain {_T} {chain} {{\n{body}}}" if body else f"add chain {_T} {chain}"


def _container(name: str, elements: Iterable[Element] = ()) -> str:
    kind, declaration = CONTAINERS[name]
    texts = [e.text() for e in elements]
    if not texts:
        return f"add {kind} {_T} {name} {{ {declaration} ; }}"
    body = ",\n".join(f"\t{t}" for t in texts)
    return f"add {kind} {_T} {name} {{ {declaration} ; elements = {{\n{body}\n}} ; }}"


def _affinity_set(name: str, timeout: int) -> str:
    return f"add set {_T} {name} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"


def _containers(config: Config) -> list[str]:
    return [name for name in CONTAINERS if name != NODEPORT_IPS or config.nodeport_addresses]


def _static(config: Config) -> tuple[list[str], list[str], int]:
    """(declarations, chain blocks, rule count) of what does not depend on Services."""
    declare = [f"add chain {_T} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
               for name, kind, hook, prio in BASE_CHAINS]
    declare += [f"add chain {_T} {name}" for name in TOP_CHAINS if name != REJECT_CHAIN]
    declare.append(f'add chain {_T} {REJECT_CHAIN} {{ comment "helper for @{NO_ENDPOINT_SERVICES} / '
                   f'@{NO_ENDPOINT_NODEPORTS}" ; }}')
    declare += [_container(name) for name in _containers(config)]
    rules: dict[str, list[str]] = {}
    for base, target, match in JUMPS:
        rules.setdefault(base, []).append(f"{match} jump {target}".strip())
    if config.nodeport_addresses:
        nodeports = f"ip daddr @{NODEPORT_IPS}"
        nodeport_check = nodeports
    else:
        nodeports = "fib daddr type local ip daddr != 127.0.0.0/8"
        nodeport_check = "ip daddr != 127.0.0.0/8"  # filter-input: the destination is local already
    rules[SERVICES] = [f"ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                       f"{nodeports} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"]
    rules[MASQUERADING] = [f"ct status dnat ip saddr . ip daddr @{HAIRPIN_ENDPOINTS} jump {MARK_MASQ}",
                           f"mark and {MASQ_MARK} == 0 return", f"mark set mark xor {MASQ_MARK}",
                           "masquerade fully-random"]
    rules[MARK_MASQ] = [f"mark set mark or {MASQ_MARK}"]
    rules[REJECT_CHAIN] = ["reject"]
    rules[FIREWALL_CHECK] = [f"ip daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"]
    rules[SERVICE_ENDPOINTS_CHECK] = [f"ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"]
    rules[NODEPORT_ENDPOINTS_CHECK] = [f"{nodeport_check} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"]
    rules[CLUSTER_IPS_CHECK] = [f'ip daddr @{CLUSTER_IPS} reject comment "Reject traffic to invalid ports of ClusterIPs"']
    cidrs = [c for c in map(_cidr, config.service_cidrs) if c]
    if cidrs:
        rules[CLUSTER_IPS_CHECK].append(f'ip daddr {{ {", ".join(cidrs)} }} drop comment "Drop traffic to unallocated '
                                        f'ClusterIPs"')
    blocks = [_block(chain, chain_rules) for chain, chain_rules in rules.items()]
    if config.nodeport_addresses:
        addresses = [Element(NODEPORT_IPS, ip) for ip in map(_ipv4, config.nodeport_addresses) if ip]
        blocks.append(_container(NODEPORT_IPS, addresses))
    return declare, blocks, sum(len(r) for r in rules.values())


def _kernel_element(owners: dict[ServicePortName, Element]) -> Element:
    return owners[min(owners)] if len(owners) > 1 else next(iter(owners.values()))


def _kernel_elements(index: dict[str, dict[str, dict[ServicePortName, Element]]], container: str) -> list[Element]:
    return [_kernel_element(owners) for owners in index.get(container, {}).values()]


def render(state: ProxyState, changed: Collection[ServicePortName] | None = None,
           previous: Programmed | None = None, config: Config = Config()) -> RenderResult:
    """The `nft -f` script that brings the table to `state`.

    changed=None: a full sync. Otherwise only the chains, sets and elements of the given
    ServicePortNames are rewritten; that needs `previous` (the `programmed` of the last render
    that was applied), and without it the sync is full. previous=None on a full sync: the
    kernel's content is unknown, the table is replaced.
    """
    renderer = _ServiceRenderer(config)
    with _gc_paused():
        if changed is None or previous is None:
            return _render_full(state, previous, config, renderer)
        return _render_partial(state, frozenset(changed), previous, config, renderer)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Rendering makes hundreds of thousands of small tuples and strings and no reference cycle;
    Python's cyclic collector would re-scan the growing heap many times meanwhile (~40 % of a
    10,000-Service render), so it is paused for the render (process-wide, ~1 s at most)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _render_full(state: ProxyState, previous: Programmed | None, config: Config,
                 renderer: _ServiceRenderer) -> RenderResult:
    declare, static_blocks, static_rules = _static(config)
    services: dict[ServicePortName, ServiceRules] = {}
    index: dict[str, dict[str, dict[ServicePortName, Element]]] = {}
    sets: dict[str, int] = {}
    set_lines: list[str] = []
    chain_blocks: list[str] = []
    rules = static_rules
    endpoints = state.endpoints
    empty: tuple[Endpoint, ...] = ()
    for name in sorted(state.services):
        objects = renderer.render(state.services[name], endpoints.get(name, empty))
        services[name] = objects
        for set_name, timeout in objects.sets:
            sets[set_name] = timeout
            set_lines.append(_affinity_set(set_name, timeout))
        for chain, chain_rules in objects.chains:
            chain_blocks.append(_block(chain, chain_rules))
            rules += len(chain_rules)
        for element in objects.elements:
            index.setdefault(element.container, {}).setdefault(element.key, {})[name] = element

    lines: list[str] = []
    deleted_chains: frozenset[str] = frozenset()
    deleted_sets: frozenset[str] = frozenset()
    if previous is None:  # unknown content: replace the table in the same transaction
        lines += [f"add table {_T}", f"delete table {_T}", f'add table {_T} {{ comment "rules for kube-proxy" ; }}']
        lines += declare
    else:
        lines += [f'add table {_T} {{ comment "rules for kube-proxy" ; }}', f"flush table {_T}"]
        lines += declare
        lines += [f"flush {CONTAINERS[name][0]} {_T} {name}" for name in _containers(config)]
        # affinity sets no Service uses, or whose timeout changed (nothing references them now)
        deleted_sets = frozenset(s for s, timeout in previous.sets.items() if sets.get(s) != timeout)
        lines += [f"delete set {_T} {s}" for s in sorted(deleted_sets)]
        wanted = {chain for objects in services.values() for chain, _ in objects.chains}
        deleted_chains = frozenset((previous.chains() | previous.stale_chains) - wanted)
    lines += static_blocks
    lines += set_lines
    lines += chain_blocks
    programmed = Programmed(services, index, sets, frozenset(), frozenset(), rules, static_rules)
    lines += [_container(name, programmed.kernel_elements(name)) for name in CONTAINERS if index.get(name)]
    lines += [f"delete chain {_T} {chain}" for chain in sorted(deleted_chains)]
    return RenderResult("\n".join(lines) + "\n", programmed, True, deleted_chains, deleted_sets)


def _render_partial(state: ProxyState, changed: frozenset[ServicePortName], previous: Programmed,
                    config: Config, renderer: _ServiceRenderer) -> RenderResult:
    sync = _PartialSync(previous, config)
    empty: tuple[Endpoint, ...] = ()
    for name in sorted(changed):
        sp = state.services.get(name)
        sync.service(name, renderer.render(sp, state.endpoints.get(name, empty)) if sp is not None else _EMPTY)
    return sync.result()


class _PartialSync:
    """One partial sync: what each changed ServicePort needs written (its affinity sets, chains
    and elements), then the kernel-element diff, then the script. Starts from `previous` and
    copies what it changes, so `previous` stays as it was."""

    def __init__(self, previous: Programmed, config: Config) -> None:
        self.previous = previous
        self.config = config
        self.services = dict(previous.services)
        self.index = dict(previous.elements)  # the containers this sync touches are copied before changed
        self.copied: set[str] = set()
        self.sets = dict(previous.sets)
        self.stale_chains = set(previous.stale_chains)
        self.stale_sets = set(previous.stale_sets)
        self.rules = previous.rules
        self.flush: list[str] = []  # existing chains rewritten, and chains gone stale
        self.blocks: list[str] = []
        self.set_lines: list[str] = []
        self.replaced_sets: set[str] = set()
        self.touched: set[tuple[str, str]] = set()

    def service(self, name: ServicePortName, new: ServiceRules) -> None:
        """Record what one changed ServicePort now programs (`_EMPTY`: it is gone)."""
        old = self.services.get(name, _EMPTY)
        if new == old:
            return
        if new is _EMPTY:
            del self.services[name]
        else:
            self.services[name] = new
        self.rules += new.rule_count - old.rule_count
        rewrite_all = self._sets(old, new)
        self._chains(old, new, rewrite_all)
        self._elements(name, old, new)

    def _sets(self, old: ServiceRules, new: ServiceRules) -> bool:
        """Affinity sets: new ones added, a changed timeout means delete and add again (then
        True: the chains are rewritten too)."""
        rewrite_all = False
        for set_name, timeout in new.sets:
            known = self.sets.get(set_name)
            if known is not None and known != timeout:
                self.replaced_sets.add(set_name)
                rewrite_all = True  # every rule naming the set must let go of it first
            self.sets[set_name] = timeout
            self.stale_sets.discard(set_name)
            self.set_lines.append(_affinity_set(set_name, timeout))
        new_set_names = {s for s, _ in new.sets}
        self.stale_sets.update(s for s, _ in old.sets if s not in new_set_names)
        return rewrite_all

    def _chains(self, old: ServiceRules, new: ServiceRules, rewrite_all: bool) -> None:
        """Chains: rewrite those whose rules differ; flush those that went away."""
        stale_chains = self.stale_chains
        old_chains = dict(old.chains)
        for chain, chain_rules in new.chains:
            existed = chain in old_chains or chain in stale_chains
            stale_chains.discard(chain)
            if existed and old_chains.get(chain) == chain_rules and not rewrite_all:
                continue
            if existed:
                self.flush.append(chain)
            self.blocks.append(_block(chain, chain_rules))
        new_chain_names = {chain for chain, _ in new.chains}
        for chain in old_chains:
            if chain not in new_chain_names:
                self.flush.append(chain)
                stale_chains.add(chain)

    def _elements(self, name: ServicePortName, old: ServiceRules, new: ServiceRules) -> None:
        """Elements: re-index this Service's wants."""
        old_elements = {(e.container, e.key): e for e in old.elements}
        new_elements = {(e.container, e.key): e for e in new.elements}
        for k in old_elements.keys() | new_elements.keys():
            if old_elements.get(k) == new_elements.get(k):
                continue
            container, key = k
            keys = self._keys(container)
            owners = dict(keys.get(key, {}))
            if k in new_elements:
                owners[name] = new_elements[k]
            else:
                owners.pop(name, None)
            if owners:
                keys[key] = owners
            else:
                keys.pop(key, None)
            self.touched.add(k)

    def _keys(self, container: str) -> dict[str, dict[ServicePortName, Element]]:
        """The index of one container, copied the first time this sync changes it."""
        if container not in self.copied:
            self.index[container] = dict(self.index.get(container, {}))
            self.copied.add(container)
        return self.index[container]

    def _kernel_diff(self) -> tuple[set[str], dict[str, list[Element]]]:
        """What the kernel holds for each touched key, before and after: (containers to rewrite,
        elements to add). An element that goes away or changes value has its whole set or map
        rewritten (flush, then add all): with nft 1.0.6 that is cheaper than `delete element`,
        which makes nft list every chain and the set first."""
        rewrite: set[str] = set()
        adds: dict[str, list[Element]] = {}
        for container, key in sorted(self.touched):
            before = self.previous.elements.get(container, {}).get(key)
            after = self.index.get(container, {}).get(key)
            was = _kernel_element(before) if before else None
            now = _kernel_element(after) if after else None
            if was == now:
                continue
            if was is not None:
                rewrite.add(container)
            elif now is not None:
                adds.setdefault(container, []).append(now)
        return rewrite, adds

    def _element_lines(self) -> list[str]:
        rewrite, adds = self._kernel_diff()
        lines: list[str] = []
        for container in CONTAINERS:
            if container in rewrite:
                lines.append(f"flush {CONTAINERS[container][0]} {_T} {container}")
                elements = _kernel_elements(self.index, container)
                if elements:
                    lines.append(_container(container, elements))
            elif container in adds:
                lines.append(_container(container, adds[container]))
        return lines

    def result(self) -> RenderResult:
        """The script: flushes, set and chain blocks, elements; deletions only when collecting."""
        # Deleting anything makes nft list every chain first: stale chains and sets wait for a full
        # sync, unless a set must be replaced now or too many piled up.
        collect = bool(self.replaced_sets) or len(self.stale_chains) >= self.config.gc_threshold
        programmed_sets = self.sets
        lines = [f"flush chain {_T} {chain}" for chain in self.flush]  # no `add table`: if it is gone, fail
        deleted_sets: set[str] = set()
        if collect:
            deleted_sets = self.stale_sets | self.replaced_sets
            lines += [f"delete set {_T} {s}" for s in sorted(deleted_sets)]
            programmed_sets = {s: t for s, t in self.sets.items() if s not in self.stale_sets}
            self.stale_sets = set()
        lines += self.set_lines
        lines += self.blocks
        lines += self._element_lines()
        deleted_chains: frozenset[str] = frozenset()
        if collect:
            deleted_chains = frozenset(self.stale_chains)
            lines += [f"delete chain {_T} {chain}" for chain in sorted(self.stale_chains)]
            self.stale_chains = set()
        programmed = Programmed(self.services, self.index, programmed_sets, frozenset(self.stale_chains),
                                frozenset(self.stale_sets), self.rules, self.previous.static_rules)
        script = "\n".join(lines) + "\n" if lines else ""
        return RenderResult(script, programmed, False, deleted_chains, frozenset(deleted_sets))
