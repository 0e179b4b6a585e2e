"""Render a ProxyState to iptables rules shaped like upstream kube-proxy's iptables mode.

`render()` returns ONE iptables-restore document (`*filter ... COMMIT *nat ... COMMIT`) to feed
to `iptables-restore --noflush --counters` (RESTORE_FLAGS) in the node's network namespace.
`hook_rules()` lists the jumps from the built-in chains (PREROUTING, OUTPUT, ...) into ours,
which an applier ensures one by one (`check_argv()` then `insert_argv()`), as upstream does
with `iptables -C` / `-I`, because a restore document can't add to a built-in chain without
rewriting it. Apply the document first: it creates the chains the hooks jump to.

Chains (pkg/proxy/iptables/proxier.go):
  filter  KUBE-SERVICES (REJECT Services without endpoints), KUBE-EXTERNAL-SERVICES (REJECT /
          DROP external traffic without usable endpoints), KUBE-FORWARD, KUBE-NODEPORTS
          (health-check node ports), KUBE-PROXY-FIREWALL (loadBalancerSourceRanges drops)
  nat     KUBE-SERVICES -> KUBE-SVC-/KUBE-SVL-/KUBE-EXT-/KUBE-FW-<hash> -> KUBE-SEP-<hash>
          (DNAT), KUBE-NODEPORTS, KUBE-MARK-MASQ, KUBE-POSTROUTING (MASQUERADE marked packets)

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
behind kube-proxy's back is the canary's job (iptables_backend.py): it forces a full sync.

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

Chain names are precomputed once per ServicePortName and per endpoint (LRU caches), and rules
are written as f-strings into lists joined once, so 10,000 Services with 5 endpoints each
render in well under a second.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, NamedTuple

from testbed.proxy.model import (FAULT_ANNOTATION, MISSING_CHAIN, Endpoint, ProxyState, ServicePort,
                                 ServicePortName, plan_traffic)

# Top-level chains.
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"  # an empty chain in mangle, nat and filter; gone = flushed

FILTER_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")

MASQ_MARK = "0x4000"  # upstream's default --iptables-masquerade-bit 14
RESTORE_FLAGS = ("--noflush", "--counters")  # iptables-restore flags for every sync, as upstream
LARGE_CLUSTER_ENDPOINTS = 1000  # above this many endpoints, per-endpoint comments are dropped
SECTION_CHAINS = 500  # per-service chains per nat COMMIT in large documents (Config.section_chains)


@dataclass(frozen=True)
class Config:
    """What the renderer needs to know about the node, besides the ProxyState.

    cluster_cidr: the pod CIDR of the whole cluster (upstream's --cluster-cidr local-traffic
      detector). With it, traffic to a ClusterIP from outside the pod network is masqueraded
      (`! -s CIDR` in KUBE-SVC) and pods reaching a Local-policy external address are
      short-circuited to all endpoints. Without it, neither rule is written (as upstream).
    node_ips: the node's addresses: the loadBalancerSourceRanges check of whether the node
      itself may reach the LoadBalancer IP.
    nodeport_addresses: the node addresses that accept NodePorts (--nodeport-addresses, resolved
      to this node's IPs); empty: every local address (`-m addrtype --dst-type LOCAL`, upstream's
      default).
    masquerade_all: masquerade all traffic to ClusterIPs (--masquerade-all).
    random_fully: add --random-fully to MASQUERADE (upstream does when iptables supports it).
    large_cluster_endpoints: above this many endpoints in all, per-endpoint comments are left
      out (upstream's largeClusterMode, 1000).
    section_chains: split the per-service chains into nat sections of about this many chains
      when a document writes more than that (see "iptables-nft and large documents"); 0: never.
    """

    cluster_cidr: str | None = None
    node_ips: tuple[str, ...] = ()
    nodeport_addresses: tuple[str, ...] = ()
    masquerade_all: bool = False
    random_fully: bool = False
    large_cluster_endpoints: int = LARGE_CLUSTER_ENDPOINTS
    section_chains: int = SECTION_CHAINS


class ServiceTop(NamedTuple):
    """One ServicePort's share of the top-level chains, and the per-service chains it uses."""

    services: tuple[tuple[str, str], ...]  # nat KUBE-SERVICES (target, rule)
    nodeports: tuple[tuple[str, str], ...]  # nat KUBE-NODEPORTS (target, rule)
    filter_rules: tuple[str, ...]
    chains: frozenset[str]  # its per-service nat chains
    digest: bytes = b""  # of its per-service chains' lines, to skip rewriting them unchanged


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


@dataclass(frozen=True)
class HookRule:
    """A jump from a built-in chain into one of ours, prepended once (upstream's iptablesJumpChains)."""

    table: str
    chain: str
    args: tuple[str, ...]

    def check_argv(self) -> list[str]:
        """iptables arguments that exit 0 iff the rule is there (`iptables -w` + these)."""
        return ["-t", self.table, "-C", self.chain, *self.args]

    def insert_argv(self) -> list[str]:
        return ["-t", self.table, "-I", self.chain, "1", *self.args]

    def delete_argv(self) -> list[str]:
        return ["-t", self.table, "-D", self.chain, *self.args]

    def in_saved(self, saved: str) -> bool:
        """Whether `iptables-save -t <table>` output holds this jump (its chain, comment, target)."""
        comment, target = self.args[-3], self.args[-1]
        return any(line.startswith(f"-A {self.chain} ") and line.endswith(f" -j {target}")
                   and (f'--comment "{comment}"' in line or f"--comment {comment} " in line)
                   for line in saved.splitlines())


def _hook(table: str, chain: str, target: str, comment: str, *extra: str) -> HookRule:
    return HookRule(table, chain, (*extra, "-m", "comment", "--comment", comment, "-j", target))


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
_HOOKS = (
    _hook("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", *_NEW),
    _hook("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", *_NEW),
    _hook("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    _hook("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", *_NEW),
    _hook("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", *_NEW),
    _hook("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    _hook("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    _hook("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    _hook("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    _hook("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    _hook("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    _hook("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)


def hook_rules() -> list[HookRule]:
    """The jumps from built-in chains, in upstream's order. Ensure each (check, else insert at
    position 1) in this order on every full sync; on cleanup, delete them."""
    return list(_HOOKS)


# ------------------------------------------------------------------ chain names


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # standard base32 alphabet
_B32_PAIRS = [_B32[i >> 5] + _B32[i & 31] for i in range(1024)]  # 10 bits -> 2 characters


def _hash16(text: str) -> str:
    """base32(sha256(text))[:16]: the first 16 characters encode the first 10 bytes (80 bits).
    A table of character pairs does it 5x faster than base64.b32encode (pure Python in 3.11)."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    t = _B32_PAIRS
    return (t[n >> 70] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
            + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023])


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """base32(sha256("ns/svc:port" + "tcp"))[:16], upstream's portProtoHash."""
    return _hash16(service_port_name + protocol)


@lru_cache(maxsize=1 << 18)
def endpoint_chain(service_port_name: str, protocol: str, addr: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of a ServicePortName ("ns/svc:port", "tcp")."""
    return "KUBE-SEP-" + _hash16(service_port_name + protocol + addr)


class ServiceChains(NamedTuple):
    """Everything about a ServicePortName the rules spell out, computed once."""

    text: str  # "ns/svc:port"
    proto: str  # "tcp"
    svc: str  # KUBE-SVC-…: Cluster policy endpoints
    svl: str  # KUBE-SVL-…: Local policy endpoints
    ext: str  # KUBE-EXT-…: entry for NodePort / external IPs / LoadBalancer IPs
    fw: str  # KUBE-FW-…: loadBalancerSourceRanges


@lru_cache(maxsize=1 << 16)
def service_chains(name: ServicePortName) -> ServiceChains:
    text, proto = str(name), name.protocol.lower()
    h = port_proto_hash(text, proto)
    return ServiceChains(text, proto, "KUBE-SVC-" + h, "KUBE-SVL-" + h, "KUBE-EXT-" + h, "KUBE-FW-" + h)


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def service_chains_in(save_output: str) -> set[str]:
    """The per-service chains an `iptables-save -t nat` dump declares (to repair after a failure)."""
    return {
        line[1:].split(" ", 1)[0]
        for line in save_output.splitlines()
        if line.startswith(":KUBE-") and is_service_chain(line[1:])
    }


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
    empty: tuple[Endpoint, ...] = ()
    if full:
        tops = {name: renderer.service(services[name], endpoints.get(name, empty), out) for name in sorted(services)}
        wanted = frozenset().union(*(top.chains for top in tops.values()))
        stale = sorted((previous.chains if previous else frozenset()) - wanted)
    else:
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

    # Jumps ordered by target, descending: see "iptables-nft and large documents" above.
    ordered = [tops[name] for name in sorted(tops)]
    service_jumps = sorted((jump for top in ordered for jump in top.services), reverse=True)
    nodeport_jumps = sorted((jump for top in ordered for jump in top.nodeports), reverse=True)
    nat_top = tuple(rule for _, rule in service_jumps) + tuple(rule for _, rule in nodeport_jumps)
    filter_top = tuple(rule for top in ordered for rule in top.filter_rules)
    programmed = Programmed(tops, wanted, comments, nat_top, filter_top)
    write_nat_top = full or nat_top != previous.nat_top
    write_filter = full or filter_top != previous.filter_top
    if not (write_nat_top or write_filter or stale or out.nat_chains):
        return RenderResult("", programmed, frozenset(), False)

    sectioned = bool(config.section_chains) and len(out.nat_chains) > config.section_chains
    mark = MASQ_MARK
    masquerade = "-j MASQUERADE --random-fully" if config.random_fully else "-j MASQUERADE"
    lines: list[str] = []
    if write_filter:
        lines.append("*filter")
        lines += [f":{chain} - [0:0]" for chain in FILTER_CHAINS]
        lines += filter_top
        lines += [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} '
            "-j ACCEPT",
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack '
            "--ctstate RELATED,ESTABLISHED -j ACCEPT",
            "COMMIT",
        ]
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
        lines += [
            f"-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark}",
            f'-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" {masquerade}',
        ]
        if full and not sectioned:
            lines.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark}")
        lines += [rule for _, rule in service_jumps]
        destinations = [f"-d {ip}" for ip in config.nodeport_addresses] or ["-m addrtype --dst-type LOCAL"]
        lines += [f'-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                  f'last rule in this chain" {destination} -j KUBE-NODEPORTS' for destination in destinations]
        lines += [rule for _, rule in nodeport_jumps]
    if not sectioned:
        lines += out.nat_rules
    lines += [f"-X {chain}" for chain in stale]
    lines += ["COMMIT", ""]
    return RenderResult("\n".join(lines), programmed, frozenset(stale), full)
