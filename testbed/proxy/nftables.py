"""Render a ProxyState to nftables, shaped like upstream kube-proxy's nftables mode.

`render()` returns ONE `nft -f` script (one transaction) for the table `ip kube-proxy`, which
kube-proxy owns alone, and a `Programmed` record of what the kernel holds once it is applied;
pass that record back as `previous` next time. The backend (nftables_backend.py) applies it.

Objects (pkg/proxy/nftables/proxier.go):
  base chains   filter-prerouting-pre-dnat / filter-output-pre-dnat (priority dstnat-10 = -110:
                LoadBalancer source ranges, before DNAT), filter-input / filter-forward /
                filter-output (priority filter = 0: Services without (local) endpoints, invalid
                ClusterIP ports, after DNAT), nat-prerouting / nat-output (dstnat) -> `services`,
                nat-postrouting (srcnat) -> `masquerading`
  maps          service-ips, no-endpoint-services, firewall-ips (ipv4_addr . inet_proto .
                inet_service : verdict), service-nodeports, no-endpoint-nodeports (inet_proto .
                inet_service : verdict); sets cluster-ips, nodeport-ips (only when NodePorts are
                limited to some addresses)
  per Service   service-/local-/external-/firewall-<HASH8>-ns/svc/proto/port chains,
  port          affinity-<HASH8>-ns/svc/proto/port__ip/port sets (ClientIP)
  svclab's      hairpin-endpoints set (ipv4_addr . ipv4_addr), see "Endpoints"

Endpoints. Upstream gives every endpoint a chain (endpoint-…: hairpin masquerade mark,
affinity update, DNAT) and jumps there from the service chain. Here the service chain holds
one rule per endpoint that does the affinity update and the DNAT itself, and hairpin traffic
(a pod DNATed to itself) is recognised after DNAT, in `masquerading`, by
`ct status dnat ip saddr . ip daddr @hairpin-endpoints` (one element `ip . ip` per local
endpoint: only this node's pods send through this node's rules). Same behaviour, no endpoint
chains: the kernel re-validates every chain reachable from the base chains on each commit
that adds a jump or a DNAT (below), and 50,000 endpoint chains made that walk 156 ms of every
partial sync at 10,000 Services x 5 endpoints (54 ms without them); the first load also drops
from 6.8 s to 2.3 s.

Balancing. Upstream writes `numgen random mod N vmap { 0 : goto endpoint-…, … }` in every
service chain. With nft 1.0.6 on this kernel (6.18) every such anonymous map is a kernel set,
and the kernel names each new anonymous set by scanning all the table's sets: loading 4,000
Services x 5 endpoints takes ~30 s, 10,000 minutes (quadratic). Named per-Service maps are looked
up by name in a list (~21 s at 10,000, still growing faster than linearly), and one shared map
keyed by `numgen … offset K` makes the kernel walk the whole map for every rule that references
it (~25 s at 4,000). What stays linear is rules without sets, so a chain of up to `cascade_max`
endpoints balances like iptables' statistic rules: endpoint i of n is taken with
`numgen random mod (n-i) == 0 … dnat to …`, the last one unconditionally. Each endpoint is
chosen with probability exactly 1/n (up to numgen's own rounding), as upstream's map does; a
new connection evaluates at most n-1 numgens. Above `cascade_max` endpoints (and no affinity)
one `dnat to numgen random mod N map { i : ip . port }` is written (O(1) per packet; such
Services are few, so their sets stay cheap). `python -m bench.kube_proxy --shapes` measures
the shapes.

Transactions. nft 1.0.6 lists every chain of the table before running any `add rule`,
`add element` or `delete` command (~0.2-0.3 s at 60,000 chains; `delete element` also lists the
set: ~0.7-1.1 s at 10,000 Services), but lists nothing for `add chain NAME { rules }`,
`add set/map NAME { decl ; elements = { … } }`, `flush chain` and `flush set/map`. So rules are
written as chain blocks and elements as set declarations (the objects upstream's knftables
transactions write with `add rule` / `add element`), and a partial sync deletes nothing:
- full sync (`changed=None`): create the table, `flush table` (rules only; affinity sets keep
  their entries), flush the dispatch maps, then write everything and delete what is stale. If
  nothing is known about the kernel (`previous=None`: process start, or after a failed sync)
  the table is replaced atomically instead (`add table; delete table; add table …`).
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

Deviations from upstream on purpose: no endpoint chains and the cascade (above); chain blocks and element declarations
instead of `add rule` / `add element`; removals by rewriting a set or map; stale chain deletion
batched (above); the first sync replaces the table (upstream keeps it, and its affinity
entries, across restarts); IPv4 only; no `cluster-ips-check` drop of unallocated ClusterIPs
unless `service_cidrs` is given (the backend is not told the Service CIDR). The base chains are
upstream's current ones: its earlier filter-input/forward/output at dstnat-10 would check for
endpoints before DNAT, and so drop the node's own short-circuited traffic to a Local Service.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import ipaddress
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Collection, Iterable, Iterator, NamedTuple

from testbed.proxy.model import (FAULT_ANNOTATION, MISSING_CHAIN, Endpoint, ProxyState, ServicePort,
                                 ServicePortName, plan_traffic)

FAMILY = "ip"
TABLE = "kube-proxy"
_T = f"{FAMILY} {TABLE}"  # how the script names the table

# Top-level chains.
SERVICES = "services"
MASQUERADING = "masquerading"
MARK_MASQ = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"
FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"

# Sets and maps.
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
HAIRPIN_ENDPOINTS = "hairpin-endpoints"  # svclab's: see "Endpoints" in the module doc

_IP_PROTO_PORT = "ipv4_addr . inet_proto . inet_service : verdict"
_PROTO_PORT = "inet_proto . inet_service : verdict"
# name -> (kind, declaration), in upstream's order; nodeport-ips is declared only when used
CONTAINERS: dict[str, tuple[str, str]] = {
    CLUSTER_IPS: ("set", 'type ipv4_addr ; comment "Active ClusterIPs"'),
    NODEPORT_IPS: ("set", 'type ipv4_addr ; comment "IPs that accept NodePort traffic"'),
    FIREWALL_IPS: ("map", f'type {_IP_PROTO_PORT} ; comment "destinations that are subject to LoadBalancerSourceRanges"'),
    NO_ENDPOINT_NODEPORTS: ("map", f'type {_PROTO_PORT} ; comment "vmap to drop or reject packets to service nodeports '
                                   'with no endpoints"'),
    NO_ENDPOINT_SERVICES: ("map", f'type {_IP_PROTO_PORT} ; comment "vmap to drop or reject packets to services with '
                                  'no endpoints"'),
    SERVICE_IPS: ("map", f'type {_IP_PROTO_PORT} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"'),
    SERVICE_NODEPORTS: ("map", f'type {_PROTO_PORT} ; comment "NodePort traffic"'),
    HAIRPIN_ENDPOINTS: ("set", 'type ipv4_addr . ipv4_addr ; comment "local endpoints as (source . destination): '
                               'a pod reaching itself through a Service"'),
}

# (name, type, hook, priority) as upstream: filtering that must see the Service address
# (source ranges) runs before DNAT, the endpoint checks after it.
BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
# (from base chain, to chain, match) as upstream's nftablesJumpChains
JUMPS = (
    ("filter-prerouting-pre-dnat", FIREWALL_CHECK, "ct state new"),
    ("filter-output-pre-dnat", FIREWALL_CHECK, "ct state new"),
    ("filter-forward", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-forward", CLUSTER_IPS_CHECK, "ct state new"),
    ("filter-input", NODEPORT_ENDPOINTS_CHECK, "ct state new"),
    ("filter-input", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-output", SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-output", CLUSTER_IPS_CHECK, "ct state new"),
    ("nat-prerouting", SERVICES, ""),
    ("nat-output", SERVICES, ""),
    ("nat-postrouting", MASQUERADING, ""),
)
TOP_CHAINS = (SERVICES, MASQUERADING, MARK_MASQ, REJECT_CHAIN, FIREWALL_CHECK, SERVICE_ENDPOINTS_CHECK,
              NODEPORT_ENDPOINTS_CHECK, CLUSTER_IPS_CHECK)

MASQ_MARK = "0x4000"  # upstream's default --masquerade-bit 14
CASCADE_MAX = 32  # up to this many endpoints: numgen rules; above: upstream's anonymous vmap
GC_THRESHOLD = 1000  # stale chains a partial sync may leave for later before it deletes them
NAME_LENGTH_MAX = 256  # knftables.NameLengthMax
_BASE_LENGTH_MAX = NAME_LENGTH_MAX - 16  # upstream's chainNameBaseLengthMax


@dataclass(frozen=True)
class Config:
    """What the renderer needs to know about the node, besides the ProxyState.

    cluster_cidr: the cluster's pod CIDR (upstream's local-traffic detector): traffic to a
      ClusterIP from outside it is masqueraded, pods reaching a Local-policy external address
      are short-circuited. Without it neither rule is written (as upstream).
    node_ips: the node's addresses; a LoadBalancer IP's source ranges that hold one of them
      also admit the LoadBalancer IPs themselves (the node reaching its own LB IP).
    nodeport_addresses: limit NodePorts to these node addresses (the nodeport-ips set);
      empty: every local address but 127.0.0.0/8 (`fib daddr type local`), upstream's default.
    service_cidrs: drop traffic to unallocated addresses of these ranges (cluster-ips-check).
    masquerade_all: masquerade all traffic to ClusterIPs.
    cascade_max: most endpoints balanced by numgen rules; more use a vmap (see the module doc).
    gc_threshold: stale chains a partial sync may leave flushed but undeleted.
    """

    cluster_cidr: str | None = None
    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    service_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    cascade_max: int = CASCADE_MAX
    gc_threshold: int = GC_THRESHOLD


class Element(NamedTuple):
    """One element of a set or verdict map."""

    container: str  # set or map name
    key: str  # "10.96.0.1 . tcp . 80", "tcp . 30080", "10.96.0.1"
    value: str = ""  # verdict ("goto service-…", "drop"); "" in a set
    comment: str = ""  # upstream comments the no-endpoint elements with the ServicePortName

    def text(self) -> str:
        comment = f' comment "{self.comment}"' if self.comment else ""
        return f"{self.key}{comment} : {self.value}" if self.value else f"{self.key}{comment}"


class ServiceRules(NamedTuple):
    """Everything one ServicePort programs."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]  # (chain, rules); a chain only jumps to earlier ones
    sets: tuple[tuple[str, int], ...]  # ClientIP affinity sets: (name, timeout seconds)
    elements: tuple[Element, ...]

    @property
    def rule_count(self) -> int:
        return sum(len(rules) for _, rules in self.chains)


_EMPTY = ServiceRules((), (), ())


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


# ------------------------------------------------------------------ names


def hash_and_truncate(name: str) -> str:
    """"HASH8-name": the first 8 characters of base32(sha256(name)), then the name, cut to fit
    (upstream's hashAndTruncate). 8 base32 characters are the first 5 bytes of the digest."""
    digest = hashlib.sha256(name.encode()).digest()
    name = base64.b32encode(digest[:5]).decode() + "-" + name
    if len(name) > _BASE_LENGTH_MAX:
        name = name[:_BASE_LENGTH_MAX - 3] + "..."
    return name


class ServiceNames(NamedTuple):
    text: str  # "ns/svc:port", for comments
    proto: str  # "tcp"
    base: str  # "HASH8-ns/svc/tcp/port" (upstream's servicePortChainNameBase)
    cluster: str  # service-…: Cluster policy endpoints
    local: str  # local-…: Local policy endpoints
    external: str  # external-…: NodePort, external IPs, LoadBalancer IPs
    firewall: str  # firewall-…: loadBalancerSourceRanges


@lru_cache(maxsize=1 << 16)
def service_names(name: ServicePortName) -> ServiceNames:
    proto = name.protocol.lower()
    base = hash_and_truncate(f"{name.namespace}/{name.name}/{proto}/{name.port_name}")
    return ServiceNames(str(name), proto, base, "service-" + base, "local-" + base, "external-" + base,
                        "firewall-" + base)


@lru_cache(maxsize=1 << 18)
def affinity_set_name(name: ServicePortName, ip: str, port: int) -> str:
    """The ClientIP affinity set of one endpoint (upstream's servicePortEndpointAffinityNamePrefix
    + servicePortEndpointChainNameBase)."""
    base = hash_and_truncate(f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port_name}__{ip}/{port}")
    return "affinity-" + base


def _dnat(name: ServicePortName, ep: Endpoint) -> str:
    return f"meta l4proto {name.protocol.lower()} dnat to {ep.ip}:{ep.port}"


def is_service_chain(chain: str) -> bool:
    """Per-service chains have a "/" in their name; the top-level ones don't (as upstream)."""
    return "/" in chain


# ------------------------------------------------------------------ one ServicePort


@lru_cache(maxsize=4096)
def _cidr(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Network(text.strip(), strict=False))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _ipv4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        return None


class _Plan(NamedTuple):
    """Which of a ServicePort's chains exist and where each kind of traffic goes (upstream's
    locals of its per-service loop, computed once for the elements and the chains)."""

    names: ServiceNames
    cluster_eps: tuple[Endpoint, ...]
    local_eps: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]
    has_endpoints: bool  # some usable endpoint anywhere
    internal_chain: str  # where ClusterIP traffic goes (service- or local-)
    has_internal: bool
    external_policy_chain: str  # where external traffic ends up (service- or local-)
    has_external: bool
    uses_cluster_chain: bool
    uses_local_chain: bool
    uses_external_chain: bool  # whenever there are endpoints, for the short-circuit rules
    external_ips: list[str]
    lb_ips: list[str]
    ranges: list[str]  # loadBalancerSourceRanges, normalised

    @property
    def uses_firewall_chain(self) -> bool:
        return bool(self.lb_ips) and bool(self.ranges)

    @property
    def no_endpoint_verdict(self) -> str:
        """What the filter chains do to traffic that has no endpoint to go to: REJECT (connection
        refused at once) if the Service has none at all, DROP if only none for its Local policy."""
        return "drop" if self.has_endpoints else f"goto {REJECT_CHAIN}"


class _ServiceRenderer:
    """Renders one ServicePort's chains, sets and elements (upstream's per-service loop body)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cidr = _cidr(config.cluster_cidr) if config.cluster_cidr else None
        self.if_local = f"ip saddr {cidr}" if cidr else ""
        self.if_not_local = f"ip saddr != {cidr}" if cidr else ""
        self.node_ips = [ipaddress.IPv4Address(ip) for ip in config.node_ips if _ipv4(ip)]
        self.cascade_max = max(1, config.cascade_max)

    def render(self, sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> ServiceRules:
        plan = self._plan(sp, endpoints)
        chains, sets = self._chains(sp, plan)
        return ServiceRules(chains, sets, self._elements(sp, plan))

    @staticmethod
    def _plan(sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> _Plan:
        names = service_names(sp.name)
        t = plan_traffic(sp, endpoints)
        cluster_eps, local_eps, reachable, has_endpoints = t.selection
        internal_chain = names.local if t.internal_local else names.cluster
        external_policy_chain = names.local if t.external_local else names.cluster
        return _Plan(
            names, cluster_eps, local_eps, reachable, has_endpoints, internal_chain, t.has_internal,
            external_policy_chain, t.has_external,
            uses_cluster_chain=t.uses_cluster,
            uses_local_chain=t.uses_local,
            uses_external_chain=t.uses_external,
            external_ips=[ip for ip in map(_ipv4, sp.external_ips) if ip],
            lb_ips=[ip for ip in map(_ipv4, sp.load_balancer_ips) if ip],
            ranges=[c for c in map(_cidr, sp.load_balancer_source_ranges) if c],
        )

    @staticmethod
    def _elements(sp: ServicePort, plan: _Plan) -> tuple[Element, ...]:
        """Dispatch (service-ips, service-nodeports, firewall-ips) and the filter side's
        no-endpoint-services / no-endpoint-nodeports, as upstream fills them."""
        names, proto, port, text = plan.names, plan.names.proto, sp.port, plan.names.text
        external = f"goto {names.external}"
        key = f"{sp.cluster_ip} . {proto} . {port}"
        elements = [Element(CLUSTER_IPS, sp.cluster_ip)]
        elements += [Element(HAIRPIN_ENDPOINTS, f"{ep.ip} . {ep.ip}") for ep in plan.reachable if ep.is_local]
        if plan.has_internal:
            elements.append(Element(SERVICE_IPS, key, f"goto {plan.internal_chain}"))
        else:
            elements.append(Element(NO_ENDPOINT_SERVICES, key, plan.no_endpoint_verdict, text))
        for ip in plan.external_ips:
            key = f"{ip} . {proto} . {port}"
            if plan.has_endpoints:
                elements.append(Element(SERVICE_IPS, key, external))
            if not plan.has_external:
                elements.append(Element(NO_ENDPOINT_SERVICES, key, plan.no_endpoint_verdict, text))
        for ip in plan.lb_ips:
            key = f"{ip} . {proto} . {port}"
            if plan.has_endpoints:
                elements.append(Element(SERVICE_IPS, key, external))
            if plan.uses_firewall_chain:
                elements.append(Element(FIREWALL_IPS, key, f"goto {names.firewall}"))
            if not plan.has_external:
                elements.append(Element(NO_ENDPOINT_SERVICES, key, plan.no_endpoint_verdict, text))
        if sp.node_port:
            key = f"{proto} . {sp.node_port}"
            if plan.has_endpoints:  # NodePorts bypass loadBalancerSourceRanges, as upstream
                elements.append(Element(SERVICE_NODEPORTS, key, external))
            if not plan.has_external:
                elements.append(Element(NO_ENDPOINT_NODEPORTS, key, plan.no_endpoint_verdict, text))
        return tuple(elements)

    def _chains(self, sp: ServicePort, plan: _Plan) -> tuple[tuple[tuple[str, tuple[str, ...]], ...],
                                                           tuple[tuple[str, int], ...]]:
        """(chains, affinity sets); each chain comes after the chains it jumps to."""
        names = plan.names
        timeout = sp.session_affinity_timeout
        sets = tuple((affinity_set_name(sp.name, ep.ip, ep.port), timeout) for ep in plan.reachable) \
            if timeout is not None else ()
        chains: list[tuple[str, tuple[str, ...]]] = []
        masquerade = ""
        if plan.has_internal:
            if self.config.masquerade_all:
                masquerade = f"ip daddr {sp.cluster_ip} jump {MARK_MASQ}"
            elif self.if_not_local:  # traffic from outside the cluster may have come via another node
                masquerade = f"ip daddr {sp.cluster_ip} {self.if_not_local} jump {MARK_MASQ}"
        for used, chain, eps in ((plan.uses_cluster_chain, names.cluster, plan.cluster_eps),
                                 (plan.uses_local_chain, names.local, plan.local_eps)):
            if used:
                rules = [masquerade] if masquerade and chain == plan.internal_chain else []
                rules += self._balance(sp, eps)
                chains.append((chain, tuple(rules)))
        if plan.uses_external_chain:
            if not sp.external_policy_local:  # endpoints may be on other nodes: masquerade
                rules = [f"jump {MARK_MASQ}"]
            else:  # keep the client's address, except for pods and the node itself
                rules = []
                if self.if_local:
                    rules.append(f'{self.if_local} goto {names.cluster} comment "short-circuit pod traffic"')
                rules.append(f'fib saddr type local jump {MARK_MASQ} comment "masquerade local traffic"')
                rules.append(f'fib saddr type local goto {names.cluster} comment "short-circuit local traffic"')
            if plan.has_external:
                rules.append(f"goto {plan.external_policy_chain}")
            chains.append((names.external, tuple(rules)))
        if sp.invalid_rule:
            chains.append(("fault-" + names.base, (f'goto {MISSING_CHAIN} comment "{FAULT_ANNOTATION}"',)))
        if plan.uses_firewall_chain:
            sources = list(plan.ranges)
            networks = [ipaddress.IPv4Network(c) for c in plan.ranges]
            if any(ip in net for ip in self.node_ips for net in networks):
                sources += plan.lb_ips  # the node reaching its own LB IP arrives from that IP
            chains.append((names.firewall, (f"ip saddr != {{ {', '.join(sources)} }} drop",)))
        return tuple(chains), sets

    def _balance(self, sp: ServicePort, eps: tuple[Endpoint, ...]) -> list[str]:
        """A policy chain's DNATs to its endpoints: affinity first, then a uniform random choice."""
        name, n = sp.name, len(eps)
        affinity = sp.session_affinity_timeout is not None
        if n > self.cascade_max and not affinity:  # O(1) per packet; such Services are few, their maps cheap
            choices = ", ".join(f"{i} : {ep.ip} . {ep.port}" for i, ep in enumerate(eps))
            return [f"meta l4proto {name.protocol.lower()} dnat to numgen random mod {n} map {{ {choices} }}"]
        sets = [affinity_set_name(name, ep.ip, ep.port) for ep in eps] if affinity else []
        # the endpoint taken remembers the client, as upstream's endpoint chain does
        updates = [f"update @{aff} {{ ip saddr }} " for aff in sets] or [""] * n
        rules = [f"ip saddr @{aff} {update}{_dnat(name, ep)}" for aff, update, ep in zip(sets, updates, eps)]
        for i, (update, ep) in enumerate(zip(updates, eps)):  # P(i) = prod_{j<i}(1 - 1/(n-j)) * 1/(n-i) = 1/n
            pick = f"numgen random mod {n - i} == 0 " if i < n - 1 else ""
            rules.append(f"{pick}{update}{_dnat(name, ep)}")
        return rules


def service_rules(sp: ServicePort, endpoints: Iterable[Endpoint], config: Config = Config()) -> ServiceRules:
    """What one ServicePort programs (chains, affinity sets, map elements)."""
    return _ServiceRenderer(config).render(sp, tuple(endpoints))


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
    services = dict(previous.services)
    index = dict(previous.elements)  # the containers this sync touches are copied before changed
    copied: set[str] = set()
    sets = dict(previous.sets)
    stale_chains = set(previous.stale_chains)
    stale_sets = set(previous.stale_sets)
    rules = previous.rules
    flush: list[str] = []  # existing chains rewritten, and chains gone stale
    blocks: list[str] = []
    set_lines: list[str] = []
    replaced_sets: set[str] = set()
    touched: set[tuple[str, str]] = set()
    empty: tuple[Endpoint, ...] = ()

    for name in sorted(changed):
        old = services.get(name, _EMPTY)
        sp = state.services.get(name)
        new = renderer.render(sp, state.endpoints.get(name, empty)) if sp is not None else _EMPTY
        if new == old:
            continue
        if new is _EMPTY:
            del services[name]
        else:
            services[name] = new
        rules += new.rule_count - old.rule_count

        # affinity sets: new ones added, a changed timeout means delete and add again
        rewrite_all = False
        for set_name, timeout in new.sets:
            known = sets.get(set_name)
            if known is not None and known != timeout:
                replaced_sets.add(set_name)
                rewrite_all = True  # every rule naming the set must let go of it first
            sets[set_name] = timeout
            stale_sets.discard(set_name)
            set_lines.append(_affinity_set(set_name, timeout))
        new_set_names = {s for s, _ in new.sets}
        stale_sets.update(s for s, _ in old.sets if s not in new_set_names)

        # chains: rewrite those whose rules differ; flush those that went away
        old_chains = dict(old.chains)
        for chain, chain_rules in new.chains:
            existed = chain in old_chains or chain in stale_chains
            stale_chains.discard(chain)
            if existed and old_chains.get(chain) == chain_rules and not rewrite_all:
                continue
            if existed:
                flush.append(chain)
            blocks.append(_block(chain, chain_rules))
        new_chain_names = {chain for chain, _ in new.chains}
        for chain in old_chains:
            if chain not in new_chain_names:
                flush.append(chain)
                stale_chains.add(chain)

        # elements: re-index this Service's wants
        old_elements = {(e.container, e.key): e for e in old.elements}
        new_elements = {(e.container, e.key): e for e in new.elements}
        for k in old_elements.keys() | new_elements.keys():
            if old_elements.get(k) == new_elements.get(k):
                continue
            container, key = k
            if container not in copied:
                index[container] = dict(index.get(container, {}))
                copied.add(container)
            keys = index[container]
            owners = dict(keys.get(key, {}))
            if k in new_elements:
                owners[name] = new_elements[k]
            else:
                owners.pop(name, None)
            if owners:
                keys[key] = owners
            else:
                keys.pop(key, None)
            touched.add(k)

    # What the kernel holds for each touched key, before and after. An element that goes away
    # or changes value has its whole set or map rewritten (flush, then add all): with nft 1.0.6
    # that is cheaper than `delete element`, which makes nft list every chain and the set first.
    rewrite: set[str] = set()
    adds: dict[str, list[Element]] = {}
    for container, key in sorted(touched):
        before = previous.elements.get(container, {}).get(key)
        after = index.get(container, {}).get(key)
        was = _kernel_element(before) if before else None
        now = _kernel_element(after) if after else None
        if was == now:
            continue
        if was is not None:
            rewrite.add(container)
        elif now is not None:
            adds.setdefault(container, []).append(now)

    # Deleting anything makes nft list every chain first: stale chains and sets wait for a full
    # sync, unless a set must be replaced now or too many piled up.
    gc = bool(replaced_sets) or len(stale_chains) >= config.gc_threshold
    programmed_sets = sets
    lines = [f"flush chain {_T} {chain}" for chain in flush]  # no `add table`: if it is gone, fail
    deleted_sets: set[str] = set()
    if gc:
        deleted_sets = stale_sets | replaced_sets
        lines += [f"delete set {_T} {s}" for s in sorted(deleted_sets)]
        programmed_sets = {s: t for s, t in sets.items() if s not in stale_sets}
        stale_sets = set()
    lines += set_lines
    lines += blocks
    for container in CONTAINERS:
        if container in rewrite:
            lines.append(f"flush {CONTAINERS[container][0]} {_T} {container}")
            elements = _kernel_elements(index, container)
            if elements:
                lines.append(_container(container, elements))
        elif container in adds:
            lines.append(_container(container, adds[container]))
    deleted_chains: frozenset[str] = frozenset()
    if gc:
        deleted_chains = frozenset(stale_chains)
        lines += [f"delete chain {_T} {chain}" for chain in sorted(stale_chains)]
        stale_chains = set()
    programmed = Programmed(services, index, programmed_sets, frozenset(stale_chains), frozenset(stale_sets), rules,
                            previous.static_rules)
    script = "\n".join(lines) + "\n" if lines else ""
    return RenderResult(script, programmed, False, deleted_chains, frozenset(deleted_sets))
