"""Render a ProxyState to iptables rules shaped like upstream kube-proxy's iptables mode.

`render()` returns ONE iptables-restore document (`*filter ... COMMIT *nat ... COMMIT`) to feed
to `iptables-restore --noflush --counters` (RESTORE_FLAGS) in the node's network namespace.
`hook_rules()` lists the jumps from the built-in chains (PREROUTING, OUTPUT, ...) into ours,
which an applier ensures one by one (`check_argv()` then `insert_argv()`), as upstream does
with `iptables -C` / `-I`, because a restore document can't add to a built-in chain without
rewriting it. Apply the document first: it creates the chains the hooks jump to.

Modules:
  names.py     the chains ("Chains"), per-service and per-endpoint chain names (hashing), Config
  hooks.py     HookRule, hook_rules(): the jumps from the built-in chains
  services.py  one ServicePort's own nat chains and its share of the top-level chains
  document.py  the full and partial documents, Programmed, RenderResult ("Partial sync",
               "iptables-nft and large documents")
  backend.py   IptablesBackend: applies the documents, the canary, cleanup
"""

from testbed.proxy.iptables.document import Programmed, render
from testbed.proxy.iptables.hooks import HookRule, hook_rules
from testbed.proxy.iptables.names import (FILTER_CHAINS, KUBE_FORWARD, KUBE_MARK_MASQ, NAT_CHAINS, RESTORE_FLAGS, Config,
                                          ServiceChains, endpoint_chain, is_service_chain, service_chains,
                                          service_chains_in)

# What callers (kube-proxy's backend, `svclab rules`, tests, bench) use as `iptables.<name>`.
__all__ = [
    "FILTER_CHAINS", "KUBE_FORWARD", "KUBE_MARK_MASQ", "NAT_CHAINS", "RESTORE_FLAGS", "Config", "HookRule",
    "Programmed", "ServiceChains", "endpoint_chain", "hook_rules", "is_service_chain", "render", "service_chains",
    "service_chains_in",
]
