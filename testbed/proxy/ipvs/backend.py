"""The IPVS backend: virtual services, kube-ipvs0 and ipsets over netlink; a fixed iptables document.

A full sync (the first, after a failure, or when needs_full_sync() found our state flushed)
reads what the kernel holds (virtual services and their real servers, the sets' members, the
addresses of kube-ipvs0) and makes it what the state wants: what a previous kube-proxy left is
kept where it is right (established connections and persistence survive a restart). A partial
sync diffs each changed ServicePort's plan against the one last applied and touches only that:
its virtual services and real servers, and the set members and addresses whose reference count
rises from or falls to zero (a pod port several Services share, or the ClusterIP of a Service's
several ports). The iptables document is written on full syncs and when it changes.

needs_full_sync() asks netlink: kube-ipvs0 exists, a virtual service we made is still there,
KUBE-CLUSTER-IP exists, and KUBE-MARK-MASQ (nat) / KUBE-FORWARD (filter) still hold rules.
"""

from __future__ import annotations

import logging
import subprocess
from collections import Counter
from typing import Iterable

from testbed.proxy import kernel, nfnetlink
from testbed.proxy.backends import NodeSettings, Unsupported
from testbed.proxy.iptables import hooks
from testbed.proxy.iptables.backend import uses_nf_tables
from testbed.proxy.ipvs import names, rules
from testbed.proxy.ipvs.desired import ServicePlan, SetEntry, VirtualServer, VirtualService, plan_service
from testbed.proxy.ipvs.drain import Drainer
from testbed.proxy.ipvs.kernel import Netlink, ensure_sysctls, members_by_set
from testbed.proxy.ipvs.scratch import check_in_scratch, dump_all
from testbed.proxy.model import ProxyState, ServicePortName

log = logging.getLogger("svclab.kube-proxy")


class IpvsBackend:
    name = "ipvs"

    def __init__(self, settings: NodeSettings) -> None:
        scheduler = settings.ipvs_scheduler or names.DEFAULT_SCHEDULER
        if scheduler not in names.SCHEDULERS:
            raise Unsupported(f"--ipvs-scheduler {scheduler!r}: use one of {', '.join(names.SCHEDULERS)}")
        self.scheduler = scheduler
        self.settings = settings
        self.drainer = Drainer(settings.ipvs_drain_timeout)
        self._synced = False
        self._plans: dict[ServicePortName, ServicePlan] = {}
        self._entries: Counter[SetEntry] = Counter()
        self._bound: Counter[str] = Counter()
        self._services: dict[VirtualServer, VirtualService] = {}
        self._document = ""
        self._nodeport_ips: tuple[str, ...] = settings.nodeport_addresses
        self._dummy = 0
        self._nf_tables: bool | None = None

    # ---------------------------------------------------------------- the contract

    def needs_full_sync(self) -> bool:
        if not self._synced:
            return True
        with Netlink() as nl:
            sentinel = next(iter(self._services), None)
            why = ("kube-ipvs0 is gone" if nl.dummy_index() is None else
                   f"virtual service {sentinel} is gone" if sentinel and not nl.has_service(sentinel) else
                   "ipset KUBE-CLUSTER-IP is gone" if not nl.has_set(names.CLUSTER_IP.name) else
                   "the iptables chains were flushed" if self._chains_flushed() else "")
            if not why:
                self.drainer.process(nl)
        if why:
            log.warning("ipvs: %s: resyncing in full", why)
            self._synced = False
        return bool(why)

    def sync(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        full = changed is None or not self._synced
        self._synced = False  # until this write succeeded
        with Netlink() as nl:
            if full:
                self._full(nl, state)
            else:
                for name in changed:
                    self._partial(nl, name, state)
                self._write_document()
            self.drainer.process(nl)
        self._synced = True
        return self._counts()

    def check(self, state: ProxyState) -> None:
        """Raise kernel.RulesFailed if the kernel refuses these virtual services (loaded by
        ipvsadm into a scratch namespace: nothing here changes)."""
        nodeport_ips = self._nodeport_ips or ("172.31.255.254",)
        plans = [self._plan(state, name, nodeport_ips) for name in state.services]
        check_in_scratch([v for plan in plans for v in plan.services])

    def dump(self) -> str:
        return dump_all()

    def cleanup(self) -> None:
        """Remove every virtual service, kube-ipvs0, our chains and hooks, then our ipsets
        (upstream's CleanupLeftovers; sets go last: rules refer to them)."""
        with Netlink() as nl:
            if nl.has_ipvs():
                nl.flush_ipvs()
            nl.delete_dummy()
            hooks.delete_hooks(names.HOOKS)
            saved = {t: subprocess.run(["iptables-save", "-t", t], capture_output=True, text=True).stdout
                     for t in ("filter", "nat")}
            document = rules.cleanup_document(saved)
            if document:
                kernel.run(["iptables-restore", "-w", "--noflush"], document)
            nl.destroy_sets()
        self.__init__(self.settings)

    # ---------------------------------------------------------------- syncs

    def _plan(self, state: ProxyState, name: ServicePortName, nodeport_ips: tuple[str, ...]) -> ServicePlan:
        node_ips = self.settings.node_ips or nodeport_ips
        return plan_service(state.services[name], state.endpoints_of(name), self.scheduler, nodeport_ips, node_ips)

    def _full(self, nl: Netlink, state: ProxyState) -> None:
        ensure_sysctls()
        nl.ensure_sets()
        self._dummy = nl.ensure_dummy()
        if not self.settings.nodeport_addresses:
            self._nodeport_ips = nl.node_addresses()
        self._plans = {name: self._plan(state, name, self._nodeport_ips) for name in state.services}
        self._entries = Counter(e for plan in self._plans.values() for e in plan.entries)
        self._bound = Counter(a for plan in self._plans.values() for a in plan.bound)
        self._services = {v.key: v for plan in self._plans.values() for v in plan.services}
        self._reconcile_services(nl)
        self._reconcile_sets(nl)
        present = nl.bound(self._dummy)
        for address in sorted(self._bound.keys() - present):
            nl.bind(self._dummy, address)
        for address in sorted(present - self._bound.keys()):
            nl.unbind(self._dummy, address)
        self._document = ""
        self._write_document()
        hooks.ensure_hooks(names.HOOKS)

    def _reconcile_services(self, nl: Netlink) -> None:
        present = nl.services()
        for key, wanted in self._services.items():
            have = present.get(key)
            if have != wanted.settings:
                nl.put_service(wanted, exists=have is not None)
            servers = nl.real_servers(key) if have is not None else {}
            for addr in wanted.dests:
                rs = servers.get(addr)
                if rs is None or rs.weight != 1:
                    self.drainer.revive(key, addr)
                    nl.put_dest(key, addr, 1, exists=rs is not None)
            for addr, rs in servers.items():
                if addr not in wanted.dests:
                    self.drainer.drain(nl, key, addr, rs.weight)
        for key in present.keys() - self._services.keys():
            nl.delete_service(key)
            self.drainer.forget(key)

    def _reconcile_sets(self, nl: Netlink) -> None:
        for name, wanted in members_by_set(self._entries).items():
            present = nl.set_members(name)
            for fields in wanted - present:
                nl.add_entry((name, fields))
            for fields in present - wanted:
                nl.delete_entry((name, fields))

    def _partial(self, nl: Netlink, name: ServicePortName, state: ProxyState) -> None:
        old = self._plans.pop(name, None)
        new = self._plan(state, name, self._nodeport_ips) if name in state.services else None
        before = {v.key: v for v in old.services} if old else {}
        after = {v.key: v for v in new.services} if new else {}
        for key, wanted in after.items():
            self._put_service(nl, before.get(key), wanted)
            self._services[key] = wanted
        for key in before.keys() - after.keys():
            nl.delete_service(key)
            self.drainer.forget(key)
            self._services.pop(key, None)
        self._count(nl, self._entries, old.entries if old else (), new.entries if new else (),
                    nl.add_entry, nl.delete_entry)
        self._count(nl, self._bound, old.bound if old else (), new.bound if new else (),
                    lambda a: nl.bind(self._dummy, a), lambda a: nl.unbind(self._dummy, a))
        if new is not None:
            self._plans[name] = new

    def _put_service(self, nl: Netlink, old: VirtualService | None, new: VirtualService) -> None:
        if old is None or old.settings != new.settings:
            nl.put_service(new, exists=old is not None)
        old_dests = set(old.dests) if old else set()
        for addr in new.dests:
            if addr not in old_dests:
                revived = self.drainer.revive(new.key, addr)
                nl.put_dest(new.key, addr, 1, exists=revived)
        for addr in old_dests - set(new.dests):
            self.drainer.drain(nl, new.key, addr)

    @staticmethod
    def _count(nl: Netlink, counts: Counter, old: Iterable, new: Iterable, add, delete) -> None:
        """Reference-counted members: add at 0 -> 1, delete at 1 -> 0."""
        old, new = set(old), set(new)
        for item in new - old:
            counts[item] += 1
            if counts[item] == 1:
                add(item)
        for item in old - new:
            counts[item] -= 1
            if counts[item] <= 0:
                del counts[item]
                delete(item)

    def _write_document(self) -> None:
        no_access = [vs for plan in self._plans.values() for vs in plan.no_node_access]
        document = rules.render(self.settings.cluster_cidr or None, no_access)
        if document != self._document:
            kernel.run(["iptables-restore", "-w", *rules.RESTORE_FLAGS], document)
            self._document = document

    def _chains_flushed(self) -> bool:
        if self._nf_tables is None:
            self._nf_tables = uses_nf_tables()
        never_empty = (("nat", names.KUBE_MARK_MASQ), ("filter", names.KUBE_FORWARD))
        if self._nf_tables:
            return any(nfnetlink.chain_rule_count(t, c) == 0 for t, c in never_empty)
        return any(not kernel.succeeds(["iptables", "-w", "-t", t, "-S", c, "1"]) for t, c in never_empty)

    def _counts(self) -> dict[str, int]:
        lines = self._document.splitlines()
        filter_end = lines.index("COMMIT") if "COMMIT" in lines else 0
        return {
            "ipvs": len(self._services),
            "ipvs-real-servers": sum(len(v.dests) for v in self._services.values()),
            "ipset": len(self._entries),
            "filter": sum(1 for line in lines[:filter_end] if line.startswith("-A ")),
            "nat": sum(1 for line in lines[filter_end:] if line.startswith("-A ")),
        }
