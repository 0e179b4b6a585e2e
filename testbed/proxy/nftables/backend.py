"""The nftables backend: renders with proxy.nftables, applies each sync with one `nft -f`.

It keeps what it programmed (nftables.Programmed) to compute the next partial sync, and
forgets it when a write fails or the table changed behind its back. A sync that knows nothing
(a new process, or after such a failure) takes over the table as the kernel holds it, as
upstream's full syncs do: it lists the chains and sets, flushes and rewrites the table in place
and deletes what no Service uses, instead of replacing it, so a restart, or a Service whose
rules the kernel refuses, keeps the table, its chains and sets, and the affinity sets' entries
(ClientIP clients stay on their endpoint). After TAKEOVER_TRIES failed writes in a row the
table is replaced instead. needs_full_sync() asks the
kernel two small netlink questions (proxy/nfnetlink.py) instead of listing the table: is
`ip kube-proxy` still the table this backend made (its handle), and does mark-for-masquerade
still hold its rule (a `flush table` or `flush ruleset` by someone else empties it).
"""

from __future__ import annotations

import json
import logging
import subprocess

from testbed.proxy import kernel, nfnetlink
from testbed.proxy import nftables as nft
from testbed.proxy.backends import NodeSettings
from testbed.proxy.nftables.names import CONTAINERS
from testbed.proxy.model import ProxyState, ServicePortName

log = logging.getLogger("svclab.kube-proxy")

# Writes that may fail in a row before the table is replaced instead of taken over: a takeover
# keeps affinity entries, but an object in the table that clashes with ours (a set of another
# type under our name) would make every takeover fail.
TAKEOVER_TRIES = 2


class NftablesBackend:
    name = "nftables"

    def __init__(self, settings: NodeSettings) -> None:
        self.config = nft.Config(cluster_cidr=settings.cluster_cidr or None, node_ips=settings.node_ips,
                                 nodeport_addresses=settings.nodeport_addresses,
                                 masquerade_all=settings.masquerade_all, service_cidrs=settings.service_cidrs)
        self.node_name = settings.node_name
        self._programmed: nft.Programmed | None = None  # None: the kernel's content is unknown
        self._table_handle: int | None = None
        self._failed_writes = 0  # in a row; see sync()
        self.last_script = ""  # the last script applied or attempted (for logs and tests)

    def needs_full_sync(self) -> bool:
        """True until a full sync succeeded, and when the table was deleted, replaced or flushed."""
        if self._programmed is None:
            return True
        handle = nfnetlink.table_handle(nft.TABLE)
        if handle != self._table_handle:
            log.warning("table %s %s is %s: resyncing in full", nft.FAMILY, nft.TABLE,
                        "gone" if handle is None else "not the one this kube-proxy made")
            self._programmed = None
            return True
        if nfnetlink.chain_rule_count(nft.TABLE, nft.MARK_MASQ) == 0:
            log.warning("table %s %s was flushed: resyncing in full", nft.FAMILY, nft.TABLE)
            self._programmed = None
            return True
        return False

    def sync(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        """Apply the state (changed=None: in full); returns the rules and elements in the table."""
        previous = self._programmed
        if previous is None:  # unknown content: take over what the kernel holds, as found
            previous = self._left_by_a_previous_kube_proxy() if self._failed_writes < TAKEOVER_TRIES else None
            changed = None
        result = nft.render(state, changed, previous, self.config)
        self.last_script = result.script
        if result.script:  # a partial sync of changes that cancel out writes nothing
            self._programmed = None  # unknown until the write succeeded
            try:
                kernel.run(["nft", "-f", "-"], result.script)
            except kernel.RulesFailed:
                self._failed_writes += 1
                raise
        self._failed_writes = 0
        self._programmed = result.programmed
        if result.full:
            self._table_handle = nfnetlink.table_handle(nft.TABLE)
        return result.counts

    def _left_by_a_previous_kube_proxy(self) -> nft.Programmed | None:
        """The table's chains and affinity sets as a previous kube-proxy left them, as a full
        sync's `previous` (which flushes what is there and deletes what is stale); None if
        there is no table."""
        if nfnetlink.table_handle(nft.TABLE) is None:
            return None
        listed = json.loads(kernel.run(["nft", "-j", "list", "chains", nft.FAMILY]))["nftables"]
        chains = {c["chain"]["name"] for c in listed if "chain" in c and c["chain"]["table"] == nft.TABLE}
        listed = json.loads(kernel.run(["nft", "-j", "list", "sets", "table", nft.FAMILY, nft.TABLE]))["nftables"]
        sets = {s["set"]["name"]: s["set"].get("timeout", 0) for s in listed
                if "set" in s and s["set"]["name"] not in CONTAINERS}
        static = {name for name, *_ in nft.BASE_CHAINS} | set(nft.TOP_CHAINS)
        log.info("table %s %s: taking over %d chains and %d affinity sets", nft.FAMILY, nft.TABLE,
                 len(chains - static), len(sets))
        return nft.Programmed(sets=sets, stale_chains=frozenset(chains - static))

    def check(self, state: ProxyState) -> None:
        """Raise kernel.RulesFailed if the state's full ruleset does not load (into a scratch
        namespace: nothing here changes)."""
        kernel.check_in_scratch_netns(["nft", "-f", "-"], nft.render(state, None, None, self.config).script)

    def dump(self) -> str:
        """The table as the kernel holds it, "" if there is none (seconds at 10,000 Services:
        a debugging aid)."""
        try:
            return kernel.run(["nft", "list", "table", nft.FAMILY, nft.TABLE])
        except kernel.RulesFailed as exc:
            if "No such file or directory" in exc.output:
                return ""
            raise

    def cleanup(self) -> None:
        """Delete the table and everything in it (upstream's CleanupLeftovers)."""
        done = subprocess.run(["nft", "delete", "table", nft.FAMILY, nft.TABLE], capture_output=True, text=True)
        if done.returncode != 0 and "No such file or directory" not in done.stderr:
            raise kernel.RulesFailed(done.args, done.returncode, done.stderr)
        self._programmed = None
        self._table_handle = None
