"""One ServicePort's chains, affinity sets and map elements (upstream's per-service loop body).

Endpoints. Upstream gives every endpoint a chain (endpoint-…: hairpin masquerade mark,
affinity update, DNAT) and jumps there from the service chain. Here the service chain holds
one rule per endpoint that does the affinity update and the DNAT itself, and hairpin traffic
(a pod DNATed to itself) is recognised after DNAT, in `masquerading`, by
`ct status dnat ip saddr . ip daddr @hairpin-endpoints` (one element `ip . ip` per local
endpoint: only this node's pods send through this node's rules). Same behaviour, no endpoint
chains: the kernel re-validates every chain reachable from the base chains on each commit
that adds a jump or a DNAT (see transaction.py), and 50,000 endpoint chains made that walk 156 ms of every
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
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, NamedTuple

from testbed.proxy.model import FAULT_ANNOTATION, MISSING_CHAIN, Endpoint, ServicePort, ServicePortName, plan_traffic
from testbed.proxy.nftables.names import (CLUSTER_IPS, FIREWALL_IPS, HAIRPIN_ENDPOINTS, MARK_MASQ, NO_ENDPOINT_NODEPORTS,
                                          NO_ENDPOINT_SERVICES, REJECT_CHAIN, SERVICE_IPS, SERVICE_NODEPORTS, Config,
                                          ServiceNames, _cidr, _ipv4, affinity_set_name, service_names)


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


def _dnat(name: ServicePortName, ep: Endpoint) -> str:
    return f"meta l4proto {name.protocol.lower()} dnat to {ep.ip}:{ep.port}"


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

