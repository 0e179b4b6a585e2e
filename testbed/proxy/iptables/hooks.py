"""Hook rules: the jumps into kube-proxy's chains, which a restore document cannot write.

`hook_rules()` lists the jumps from the built-in chains (PREROUTING, OUTPUT, ...) into ours,
which an applier ensures one by one (`check_argv()` then `insert_argv()`), as upstream does
with `iptables -C` / `-I`, because a restore document can't add to a built-in chain without
rewriting it. Apply the document first: it creates the chains the hooks jump to.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Iterable

from testbed.proxy import kernel

from testbed.proxy.iptables.names import (KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_POSTROUTING,
                                          KUBE_PROXY_FIREWALL, KUBE_SERVICES)


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


def hook(table: str, chain: str, target: str, comment: str, *extra: str) -> HookRule:
    return HookRule(table, chain, (*extra, "-m", "comment", "--comment", comment, "-j", target))


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
_HOOKS = (
    hook("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", *_NEW),
    hook("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", *_NEW),
    hook("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    hook("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", *_NEW),
    hook("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", *_NEW),
    hook("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    hook("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    hook("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    hook("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", *_NEW),
    hook("filter", "INPUT", KUBE_FIREWALL, "kubernetes localhost nodeports firewall"),  # kubelet's, uncommented
    hook("filter", "OUTPUT", KUBE_FIREWALL, "kubernetes localhost nodeports firewall"),
    hook("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    hook("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    hook("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)


def hook_rules() -> list[HookRule]:
    """The jumps from built-in chains, in upstream's order. Ensure each (check, else insert at
    position 1) in this order on every full sync; on cleanup, delete them."""
    return list(_HOOKS)


def ensure_hooks(rules: Iterable[HookRule]) -> None:
    """Make each jump exist (creating its target chain if need be), as upstream does before a
    restore. One iptables-save per table tells what is there already (the usual case): a full
    sync on every node at once must stay cheap (20 nodes share 2 cores here)."""
    rules = list(rules)
    saved = {table: kernel.run(["iptables-save", "-t", table]) for table in {r.table for r in rules}}
    for rule in rules:
        if rule.in_saved(saved[rule.table]):
            continue
        target = rule.args[-1]
        if f"\n:{target} " not in saved[rule.table]:
            subprocess.run(["iptables", "-w", "-t", rule.table, "-N", target], capture_output=True)
        kernel.run(["iptables", "-w", *rule.insert_argv()])


def delete_hooks(rules: Iterable[HookRule]) -> None:
    """Remove the jumps (those that are there): cleanup."""
    for rule in rules:
        subprocess.run(["iptables", "-w", *rule.delete_argv()], capture_output=True)
