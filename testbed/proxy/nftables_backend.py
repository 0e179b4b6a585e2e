"""The nftables backend: renders with proxy.nftables, applies each sync with one `nft -f`.

It keeps what it programmed (nftables.Programmed) to compute the next partial sync, and
forgets it when a write fails, so the next sync replaces the table. needs_full_sync() asks the
kernel two small netlink questions (~1 ms whatever the table's size) instead of listing the
table (`nft list table` takes seconds at 10,000 Services): is `ip kube-proxy` still the table
this backend made (its handle), and does mark-for-masquerade still hold its rule (a `flush
table` or `flush ruleset` by someone else empties it).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import subprocess

from testbed.proxy import kernel
from testbed.proxy import nftables as nft
from testbed.proxy.model import ProxyState, ServicePortName

log = logging.getLogger("svclab.kube-proxy")


class NftablesBackend:
    name = "nftables"

    def __init__(self, cluster_cidr: str, node_name: str, node_ips: tuple[str, ...] = (),
                 config: nft.Config | None = None) -> None:
        self.config = config or nft.Config(cluster_cidr=cluster_cidr or None, node_ips=node_ips)
        self.node_name = node_name
        self._programmed: nft.Programmed | None = None  # None: the kernel's content is unknown
        self._table_handle: int | None = None
        self.last_script = ""  # the last script applied or attempted (for logs and tests)

    def needs_full_sync(self) -> bool:
        """True until a full sync succeeded, and when the table was deleted, replaced or flushed."""
        if self._programmed is None:
            return True
        handle = table_handle()
        if handle != self._table_handle:
            log.warning("table %s %s is %s: resyncing in full", nft.FAMILY, nft.TABLE,
                        "gone" if handle is None else "not the one this kube-proxy made")
            self._programmed = None
            return True
        if chain_rule_count(nft.MARK_MASQ) == 0:
            log.warning("table %s %s was flushed: resyncing in full", nft.FAMILY, nft.TABLE)
            self._programmed = None
            return True
        return False

    def sync(self, state: ProxyState, changed: set[ServicePortName] | None) -> dict[str, int]:
        """Apply the state (changed=None: in full); returns the rules and elements in the table."""
        result = nft.render(state, changed, self._programmed, self.config)
        self.last_script = result.script
        if result.script:  # a partial sync of changes that cancel out writes nothing
            self._programmed = None  # unknown until the write succeeded
            kernel.run(["nft", "-f", "-"], result.script)
        self._programmed = result.programmed
        if result.full:
            self._table_handle = table_handle()
        return result.counts

    def check(self, state: ProxyState) -> None:
        """Raise kernel.RulesFailed if the state's full ruleset does not load (into a scratch
        namespace: nothing here changes)."""
        kernel.check_in_scratch_netns(["nft", "-f", "-"], nft.render(state, None, None, self.config).script)

    def dump(self) -> str:
        """The table as the kernel holds it (seconds at 10,000 Services: a debugging aid)."""
        return kernel.run(["nft", "list", "table", nft.FAMILY, nft.TABLE])

    def cleanup(self) -> None:
        """Delete the table and everything in it (upstream's CleanupLeftovers)."""
        done = subprocess.run(["nft", "delete", "table", nft.FAMILY, nft.TABLE], capture_output=True, text=True)
        if done.returncode != 0 and "No such file or directory" not in done.stderr:
            raise kernel.RulesFailed(done.args, done.returncode, done.stderr)
        self._programmed = None
        self._table_handle = None


# ------------------------------------------------------------------ nfnetlink probes

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE, _NFT_MSG_GETTABLE = 0, 1
_NFT_MSG_NEWRULE, _NFT_MSG_GETRULE = 6, 7
_NFTA_TABLE_NAME, _NFTA_TABLE_HANDLE = 1, 4
_NFTA_RULE_TABLE, _NFTA_RULE_CHAIN = 1, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFPROTO_IPV4 = 2


def _attr(kind: int, value: str) -> bytes:
    data = value.encode() + b"\0"
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _ask(msg_type: int, flags: int, attrs: bytes) -> list[tuple[int, bytes]]:
    """Send one nftables request in the calling thread's network namespace; the replies
    (type, payload after the nfgenmsg) up to the ack or the end of the dump."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        body = struct.pack("=BBH", _NFPROTO_IPV4, 0, 0) + attrs
        sock.send(struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_NFTABLES << 8) | msg_type,
                              _NLM_F_REQUEST | flags, 1, 0) + body)
        replies = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, offset)
                payload = data[offset + 16:offset + length]
                offset += (length + 3) & ~3
                if kind == _NLMSG_DONE:
                    return replies
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return replies
                replies.append((kind & 0xFF, payload[4:]))


def _attrs(payload: bytes) -> dict[int, bytes]:
    out, offset = {}, 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        out[kind & 0x7FFF] = payload[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def table_handle(table: str = nft.TABLE) -> int | None:
    """The kernel's handle of `ip <table>` (new each time the table is made), None if absent."""
    try:
        replies = _ask(_NFT_MSG_GETTABLE, _NLM_F_ACK, _attr(_NFTA_TABLE_NAME, table))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    for kind, payload in replies:
        if kind == _NFT_MSG_NEWTABLE:
            raw = _attrs(payload).get(_NFTA_TABLE_HANDLE)
            if raw is not None:
                return struct.unpack(">Q", raw)[0]
    return None


def chain_rule_count(chain: str, table: str = nft.TABLE) -> int:
    """How many rules one chain of `ip <table>` holds (0 if it is missing)."""
    try:
        replies = _ask(_NFT_MSG_GETRULE, _NLM_F_DUMP,
                       _attr(_NFTA_RULE_TABLE, table) + _attr(_NFTA_RULE_CHAIN, chain))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return 0
        raise
    return sum(1 for kind, _ in replies if kind == _NFT_MSG_NEWRULE)
