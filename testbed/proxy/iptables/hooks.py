"""Hook rules: the jumps into kube-proxy's chains, which a restore document cannot write.

`hook_rules()` lists the jumps from the built-in chains (PREROUTING, OUTPUT, ...) into ours,
which an applier ensures one by one (`check_argv()` then `insert_argv()`), as upstream does
with `iptables -C` / `-I`, because a restore document can't add to a built-in chain without
rewriting it. Apply the document first: it creates the chains the hooks jump to.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    _hook("filter", "INPUT", KUBE_FIREWALL, "kubernetes localhost nodeports firewall"),  # kubelet's, uncommented
    _hook("filter", "OUTPUT", KUBE_FIREWALL, "kubernetes localhost nodeports firewall"),
    _hook("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    _hook("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    _hook("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)


def hook_rules() -> list[HookRule]:
    """The jumps from built-in chains, in upstream's order. Ensure each (check, else insert at
    position 1) in this order on every full sync; on cleanup, delete them."""
    return list(_HOOKS)
