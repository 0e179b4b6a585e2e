"""The iptables backend: renders with proxy.iptables, applies with one iptables-restore.

As upstream: the jumps from the built-in chains are ensured on every full
sync; each sync is one `iptables-restore --noflush --counters` document; a
canary chain in the mangle, nat and filter tables (KUBE-PROXY-CANARY) tells when
someone deleted the tables' chains behind kube-proxy's back, and forces a full
resync. Beyond upstream, a flush that keeps the chains (`iptables -t nat -F`)
is noticed too: KUBE-MARK-MASQ (nat) and KUBE-FORWARD (filter) always hold
rules. With iptables-nft (the nf_tables variant, as here) these are netlink
questions of ~1 ms (proxy/nfnetlink.py); with iptables-legacy, `iptables -S` runs.
"""

from __future__ import annotations

import logging
import subprocess

from testbed.proxy import iptables, kernel, nfnetlink
from testbed.proxy.backends import NodeSettings
from testbed.proxy.iptables import hooks
from testbed.proxy.model import ProxyState, ServicePortName

log = logging.getLogger("svclab.kube-proxy")

CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")
NEVER_EMPTY = (("nat", iptables.KUBE_MARK_MASQ), ("filter", iptables.KUBE_FORWARD))


def localhost_nodeports(settings: NodeSettings) -> bool:
    """Whether NodePorts answer on 127.0.0.0/8: the flag, and NodePorts on every local address or
    on a loopback one (upstream: NodePortAddresses.ContainsIPv4Loopback)."""
    addresses = settings.nodeport_addresses
    return settings.localhost_nodeports and (not addresses or any(a.startswith("127.") for a in addresses))


def uses_nf_tables() -> bool:
    return "nf_tables" in subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout


class IptablesBackend:
    name = "iptables"

    def __init__(self, settings: NodeSettings) -> None:
        self.config = iptables.Config(cluster_cidr=settings.cluster_cidr or None, node_ips=settings.node_ips,
                                      nodeport_addresses=settings.nodeport_addresses,
                                      masquerade_all=settings.masquerade_all,
                                      localhost_nodeports=localhost_nodeports(settings))
        self.node_name = settings.node_name
        self._programmed: iptables.Programmed | None = None
        self._canary_ok = False
        self._nf_tables: bool | None = None  # iptables-nft: probe by netlink (found out at first use)
        self._rule_counts: dict[tuple[str, str], int] = {}  # (table, chain) -> rules, as last written

    def needs_full_sync(self) -> bool:
        """True until a full sync succeeded, and when our chains were deleted or flushed under us."""
        if not self._canary_ok:
            return True
        if self._nf_tables is None:
            self._nf_tables = uses_nf_tables()
        if self._nf_tables:
            gone = not all(nfnetlink.chain_exists(t, CANARY) for t in CANARY_TABLES)
            emptied = any(nfnetlink.chain_rule_count(t, c) == 0 for t, c in NEVER_EMPTY)
        else:
            gone = not all(kernel.succeeds(["iptables", "-w", "-t", t, "-S", CANARY, "1"]) for t in CANARY_TABLES)
            emptied = any(not kernel.succeeds(["iptables", "-w", "-t", t, "-S", c, "1"]) for t, c in NEVER_EMPTY)
        if gone or emptied:
            log.warning("%s: resyncing in full", f"canary chain {CANARY} is gone" if gone else
                        "the tables were flushed (KUBE-MARK-MASQ / KUBE-FORWARD are empty)")
            self._canary_ok = False
        return gone or emptied

    def sync(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        """Apply the state; returns the number of rules programmed per table."""
        full = changed is None
        if full:
            if self.config.localhost_nodeports:
                kernel.enable_route_localnet()
            self._ensure_hooks()
        result = iptables.render(state, changed, self._programmed, self.config)
        if result.document:
            try:
                kernel.run(["iptables-restore", "-w", *iptables.RESTORE_FLAGS], result.document)
            except kernel.RulesFailed:
                # A large document is several transactions: some may have landed. Learn what the
                # kernel has now, so the next (full) sync deletes what is stale.
                self._programmed = iptables.Programmed.from_kernel(kernel.run(["iptables-save", "-t", "nat"]))
                raise
        self._programmed = result.programmed
        if full:
            self._ensure_canary()
        self._rule_counts.update(_rules_per_chain(result.document))
        for chain in result.deleted:
            self._rule_counts.pop(("nat", chain), None)
        totals: dict[str, int] = {}
        for (table, _), count in self._rule_counts.items():
            totals[table] = totals.get(table, 0) + count
        return totals

    def check(self, state: ProxyState) -> None:
        """Raise kernel.RulesFailed if the state's full ruleset does not load (into a scratch
        namespace: nothing here changes)."""
        document = iptables.render(state, None, None, self.config).document
        kernel.check_in_scratch_netns(["iptables-restore", "-w", *iptables.RESTORE_FLAGS], document)

    def _ensure_hooks(self) -> None:
        hooks.ensure_hooks(iptables.hook_rules())

    def _ensure_canary(self) -> None:
        doc = "".join(f"*{table}\n:{CANARY} - [0:0]\nCOMMIT\n" for table in CANARY_TABLES)
        kernel.run(["iptables-restore", "-w", "--noflush"], doc)
        self._canary_ok = True

    def dump(self) -> str:
        """What this node's kube-proxy programmed: its chains in the nat and filter tables."""
        out = []
        for table in ("nat", "filter"):
            saved = kernel.run(["iptables-save", "-t", table])
            lines = [l for l in saved.splitlines() if l.startswith(("*", "COMMIT")) or "KUBE-" in l]
            out += lines
        return "\n".join(out) + "\n"

    def cleanup(self) -> None:
        """Remove every rule and chain this backend made (upstream's CleanupLeftovers)."""
        hooks.delete_hooks(iptables.hook_rules())
        for table in ("nat", "filter", "mangle"):
            saved = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
            chains = [l[1:].split()[0] for l in saved.splitlines() if l.startswith(":KUBE-")]
            if chains:
                doc = [f"*{table}"] + [f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT", ""]
                subprocess.run(["iptables-restore", "-w", "--noflush"], input="\n".join(doc), text=True,
                               capture_output=True)


def _rules_per_chain(document: str) -> dict[tuple[str, str], int]:
    """Rules per chain for the chains a restore document (re)writes."""
    counts: dict[tuple[str, str], int] = {}
    table = ""
    for line in document.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            key = (table, line.split(None, 2)[1])
            counts[key] = counts.get(key, 0) + 1
    return counts
