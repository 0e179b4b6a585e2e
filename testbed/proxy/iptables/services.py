"""One ServicePort's iptables rules: its own nat chains, and its share of the top-level chains.

Chain names are precomputed once per ServicePortName and per endpoint (LRU caches), and rules
are written as f-strings into lists joined once, so 10,000 Services with 5 endpoints each
render in well under a second.
"""

from __future__ import annotations

import hashlib
import ipaddress
from functools import lru_cache
from typing import NamedTuple

from testbed.proxy.iptables.names import Config, ServiceChains, endpoint_chain, service_chains
from testbed.proxy.model import FAULT_ANNOTATION, MISSING_CHAIN, Endpoint, ServicePort, plan_traffic


class ServiceTop(NamedTuple):
    """One ServicePort's share of the top-level chains, and the per-service chains it uses."""

    services: tuple[tuple[str, str], ...]  # nat KUBE-SERVICES (target, rule)
    nodeports: tuple[tuple[str, str], ...]  # nat KUBE-NODEPORTS (target, rule)
    filter_rules: tuple[str, ...]
    chains: frozenset[str]  # its per-service nat chains
    digest: bytes = b""  # of its per-service chains' lines, to skip rewriting them unchanged


@lru_cache(maxsize=256)
def _probability(n: int) -> str:
    return "%0.10f" % (1.0 / n)


# ------------------------------------------------------------------ rendering


class _Output:
    """The per-service nat chains one document writes (upstream's natChains/natRules)."""

    __slots__ = ("nat_chains", "nat_rules", "ends")

    def __init__(self) -> None:
        self.nat_chains: list[str] = []  # per-service chain lines written in this document
        self.nat_rules: list[str] = []  # per-service chain rules written in this document
        self.ends: list[tuple[int, int]] = []  # (len(nat_chains), len(nat_rules)) after each service written


class _Plan(NamedTuple):
    """Which chains one ServicePort uses and where its traffic goes (upstream's syncProxyRules loop)."""

    names: ServiceChains
    cluster: tuple[Endpoint, ...]  # endpoints of KUBE-SVC
    local: tuple[Endpoint, ...]  # endpoints of KUBE-SVL
    has_endpoints: bool  # anywhere in the cluster: else REJECT
    internal_chain: str  # where ClusterIP traffic goes: KUBE-SVC, or KUBE-SVL for internal policy Local
    has_internal: bool  # ClusterIP traffic has endpoints: else REJECT / DROP
    external_chain: str  # where external traffic ends up: KUBE-SVC, or KUBE-SVL for external policy Local
    has_external: bool  # external traffic has endpoints: else REJECT / DROP what is not short-circuited
    uses_svc: bool
    uses_svl: bool
    uses_ext: bool  # exists whenever there are endpoints, for the short-circuit rules of pods and the node
    uses_fw: bool
    seps: list[tuple[Endpoint, str]]  # every endpoint reachable from this node and its KUBE-SEP chain


class _Renderer:
    def __init__(self, config: Config, comments: bool) -> None:
        self.config = config
        self.comments = comments
        cidr = config.cluster_cidr
        self.if_local = f"-s {cidr}" if cidr else ""
        self.if_not_local = f"! -s {cidr}" if cidr else ""
        self.node_ips = [ipaddress.ip_address(ip) for ip in config.node_ips]

    def service(self, sp: ServicePort, endpoints: tuple[Endpoint, ...], out: _Output,
                previous: ServiceTop | None = None) -> ServiceTop:
        """Write one ServicePort's own chains into `out`, unless they are the same as `previous`
        wrote; return its share of the top level."""
        plan = self._plan(sp, endpoints)
        chain_start, rule_start = len(out.nat_chains), len(out.nat_rules)
        self._chains(sp, plan, out.nat_chains, out.nat_rules)
        digest = hashlib.blake2b("\n".join(out.nat_chains[chain_start:] + out.nat_rules[rule_start:]).encode(),
                                 digest_size=16).digest()
        if previous is not None and previous.digest == digest:
            del out.nat_chains[chain_start:], out.nat_rules[rule_start:]
        else:
            out.ends.append((len(out.nat_chains), len(out.nat_rules)))
        names = plan.names
        chains = {chain for used, chain in ((plan.uses_ext, names.ext), (plan.uses_fw, names.fw),
                                            (plan.uses_svc, names.svc), (plan.uses_svl, names.svl)) if used}
        chains.update(chain for _, chain in plan.seps)
        return self._top_level(sp, plan)._replace(chains=frozenset(chains), digest=digest)

    @staticmethod
    def _plan(sp: ServicePort, endpoints: tuple[Endpoint, ...]) -> _Plan:
        names = service_chains(sp.name)
        t = plan_traffic(sp, endpoints)
        cluster, local, reachable, has_endpoints = t.selection
        internal_chain = names.svl if t.internal_local else names.svc
        external_chain = names.svl if t.external_local else names.svc
        return _Plan(
            names, cluster, local, has_endpoints, internal_chain, t.has_internal, external_chain, t.has_external,
            uses_svc=t.uses_cluster,
            uses_svl=t.uses_local,
            uses_ext=t.uses_external,
            uses_fw=has_endpoints and bool(sp.load_balancer_ips) and bool(sp.load_balancer_source_ranges),
            seps=[(ep, endpoint_chain(names.text, names.proto, ep.addr)) for ep in reachable],
        )

    @staticmethod
    def _top_level(sp: ServicePort, plan: _Plan) -> ServiceTop:
        """Its rules in the shared chains: nat KUBE-SERVICES / KUBE-NODEPORTS, and filter."""
        names = plan.names
        n, p = names.text, names.proto
        match = f"-m {p} -p {p}"
        dport = f"--dport {sp.port}"
        # What the filter table does to traffic that finds no endpoint: REJECT if the Service
        # has none at all (connection refused at once), DROP if only none for a Local policy.
        if not plan.has_endpoints:
            no_endpoints, target = f'-m comment --comment "{n} has no endpoints"', "REJECT"
        else:
            no_endpoints, target = f'-m comment --comment "{n} has no local endpoints"', "DROP"
        services: list[tuple[str, str]] = []
        nodeports: list[tuple[str, str]] = []
        filter_rules: list[str] = []

        if plan.has_internal:
            chain = plan.internal_chain
            services.append((chain, f'-A KUBE-SERVICES -m comment --comment "{n} cluster IP" {match} '
                                    f"-d {sp.cluster_ip} {dport} -j {chain}"))
        else:
            filter_rules.append(f"-A KUBE-SERVICES {no_endpoints} {match} -d {sp.cluster_ip} {dport} -j {target}")
        for ip in sp.external_ips:
            if plan.has_endpoints:
                services.append((names.ext, f'-A KUBE-SERVICES -m comment --comment "{n} external IP" {match} '
                                            f"-d {ip} {dport} -j {names.ext}"))
            if not plan.has_external:
                filter_rules.append(f"-A KUBE-EXTERNAL-SERVICES {no_endpoints} {match} -d {ip} {dport} -j {target}")
        lb_chain = names.fw if plan.uses_fw else names.ext
        for ip in sp.load_balancer_ips:
            if plan.has_endpoints:
                services.append((lb_chain, f'-A KUBE-SERVICES -m comment --comment "{n} loadbalancer IP" {match} '
                                           f"-d {ip} {dport} -j {lb_chain}"))
            if plan.uses_fw:
                filter_rules.append(f'-A KUBE-PROXY-FIREWALL -m comment --comment "{n} traffic not accepted by '
                                    f'{names.fw}" {match} -d {ip} {dport} -j DROP')
        if not plan.has_external:
            for ip in sp.load_balancer_ips:
                filter_rules.append(f"-A KUBE-EXTERNAL-SERVICES {no_endpoints} {match} -d {ip} {dport} -j {target}")
        if sp.node_port:
            if plan.has_endpoints:  # NodePorts are not subject to loadBalancerSourceRanges, as upstream
                nodeports.append((names.ext, f"-A KUBE-NODEPORTS -m comment --comment {n} {match} "
                                                 f"--dport {sp.node_port} -j {names.ext}"))
            if not plan.has_external:
                filter_rules.append(f"-A KUBE-EXTERNAL-SERVICES {no_endpoints} -m addrtype --dst-type LOCAL "
                                    f"{match} --dport {sp.node_port} -j {target}")
        if sp.invalid_rule:
            services.append((MISSING_CHAIN, f'-A KUBE-SERVICES -m comment --comment "{n} {FAULT_ANNOTATION}" {match} '
                                            f"-d {sp.cluster_ip} {dport} -j {MISSING_CHAIN}"))
        if sp.health_check_node_port:
            filter_rules.append(f'-A KUBE-NODEPORTS -m comment --comment "{n} health check node port" '
                                f"-m tcp -p tcp --dport {sp.health_check_node_port} -j ACCEPT")
        return ServiceTop(tuple(services), tuple(nodeports), tuple(filter_rules), frozenset())

    def _chains(self, sp: ServicePort, plan: _Plan, chains: list[str], rules: list[str]) -> None:
        """The ServicePort's own chains: KUBE-EXT, KUBE-FW, KUBE-SVC, KUBE-SVL, KUBE-SEP."""
        names = plan.names
        n, p = names.text, names.proto
        if plan.has_internal:
            match = f'-m comment --comment "{n} cluster IP" -m {p} -p {p} -d {sp.cluster_ip} --dport {sp.port}'
            if self.config.masquerade_all:
                rules.append(f"-A {plan.internal_chain} {match} -j KUBE-MARK-MASQ")
            elif self.if_not_local:  # off-cluster sources reaching a ClusterIP are masqueraded
                rules.append(f"-A {plan.internal_chain} {match} {self.if_not_local} -j KUBE-MARK-MASQ")
        if plan.uses_ext:
            ext = names.ext
            chains.append(f":{ext} - [0:0]")
            if not sp.external_policy_local:
                rules.append(f'-A {ext} -m comment --comment "masquerade traffic for {n} external destinations" '
                             "-j KUBE-MARK-MASQ")
            else:  # the client IP is kept, except for pods and the node itself: short-circuited to KUBE-SVC
                if self.if_local:
                    rules.append(f'-A {ext} -m comment --comment "pod traffic for {n} external destinations" '
                                 f"{self.if_local} -j {names.svc}")
                rules.append(f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {n} external '
                             f'destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ')
                rules.append(f'-A {ext} -m comment --comment "route LOCAL traffic for {n} external destinations" '
                             f"-m addrtype --src-type LOCAL -j {names.svc}")
            if plan.has_external:
                rules.append(f"-A {ext} -j {plan.external_chain}")
        if plan.uses_fw:
            self._firewall(sp, names, chains, rules)
        if plan.uses_svc:
            chains.append(f":{names.svc} - [0:0]")
            self._balance(sp, names, names.svc, plan.cluster, rules)
        if plan.uses_svl:
            chains.append(f":{names.svl} - [0:0]")
            self._balance(sp, names, names.svl, plan.local, rules)
        comment = f" -m comment --comment {n}" if self.comments else ""
        affinity = sp.session_affinity_timeout is not None
        for ep, chain in plan.seps:
            chains.append(f":{chain} - [0:0]")
            rules.append(f"-A {chain}{comment} -s {ep.ip} -j KUBE-MARK-MASQ")  # hairpin: a pod reaching itself
            recent = f" -m recent --name {chain} --set" if affinity else ""
            rules.append(f"-A {chain}{comment}{recent} -m {p} -p {p} -j DNAT --to-destination {ep.addr}")

    def _firewall(self, sp: ServicePort, names: ServiceChains, chains: list[str], rules: list[str]) -> None:
        fw, n = names.fw, names.text
        chains.append(f":{fw} - [0:0]")
        head = f'-A {fw} -m comment --comment "{n} loadbalancer IP"'
        allow_from_node = False
        for cidr in sp.load_balancer_source_ranges:
            rules.append(f"{head} -s {cidr} -j {names.ext}")
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                continue
            allow_from_node = allow_from_node or any(ip in network for ip in self.node_ips)
        if allow_from_node:  # a node reaching its own LB IP arrives from that IP
            for ip in sp.load_balancer_ips:
                rules.append(f"{head} -s {ip} -j {names.ext}")
        rules.append(f'-A {fw} -m comment --comment "other traffic to {n} will be dropped by KUBE-PROXY-FIREWALL"')

    def _balance(self, sp: ServicePort, names: ServiceChains, chain: str, endpoints: tuple[Endpoint, ...],
                 rules: list[str]) -> None:
        """Jumps from a KUBE-SVC/SVL chain to endpoints: affinity checks first, then random choice."""
        n, p = names.text, names.proto
        comments = self.comments
        targets = [(ep, endpoint_chain(n, p, ep.addr)) for ep in endpoints]
        if sp.session_affinity_timeout is not None:
            seconds = sp.session_affinity_timeout
            for ep, sep in targets:
                comment = f' -m comment --comment "{n} -> {ep.addr}"' if comments else ""
                rules.append(f"-A {chain}{comment} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}")
        last = len(targets) - 1
        for i, (ep, sep) in enumerate(targets):
            comment = f' -m comment --comment "{n} -> {ep.addr}"' if comments else ""
            if i < last:
                rules.append(f"-A {chain}{comment} -m statistic --mode random --probability "
                             f"{_probability(last + 1 - i)} -j {sep}")
            else:
                rules.append(f"-A {chain}{comment} -j {sep}")

