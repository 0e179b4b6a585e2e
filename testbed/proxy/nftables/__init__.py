"""Render a ProxyState to nftables, shaped like upstream kube-proxy's nftables mode.

`render()` returns ONE `nft -f` script (one transaction) for the table `ip kube-proxy`, which
kube-proxy owns alone, and a `Programmed` record of what the kernel holds once it is applied;
pass that record back as `previous` next time. The backend (backend.py) applies it.

Modules:
  names.py        the table's chains, sets and maps, per-service names (hashing), Config
  services.py     one ServicePort's chains, affinity sets and elements ("Endpoints", "Balancing")
  transaction.py  the full and partial scripts, Programmed, RenderResult ("Transactions")
  backend.py      NftablesBackend: applies the scripts, notices a table changed behind its back

Deviations from upstream on purpose: no endpoint chains and the cascade (services.py); chain
blocks and element declarations instead of `add rule` / `add element`; removals by rewriting a
set or map; stale chain deletion batched (transaction.py); the first sync replaces the table
(upstream keeps it, and its affinity entries, across restarts); IPv4 only; the
`cluster-ips-check` drop of unallocated ClusterIPs covers `service_cidrs` (kube-proxy's
--service-cidr, which the cluster sets to its service subnet) where upstream reads the
ServiceCIDR objects. The base chains are upstream's current ones: its earlier
filter-input/forward/output at dstnat-10 would check for endpoints before DNAT, and so drop the
node's own short-circuited traffic to a Local Service.
"""

from testbed.proxy.nftables.names import (BASE_CHAINS, CLUSTER_IPS_CHECK, FAMILY, FIREWALL_CHECK, MARK_MASQ,
                                          MASQUERADING, NAME_LENGTH_MAX, NODEPORT_ENDPOINTS_CHECK, REJECT_CHAIN,
                                          SERVICES, TABLE, TOP_CHAINS, Config, ServiceNames, affinity_set_name,
                                          hash_and_truncate, is_service_chain, service_names)
from testbed.proxy.nftables.services import _ServiceRenderer
from testbed.proxy.nftables.transaction import Programmed, render

# What callers (kube-proxy's backend, tests, bench) use as `nft.<name>`.
__all__ = [
    "BASE_CHAINS", "CLUSTER_IPS_CHECK", "FAMILY", "FIREWALL_CHECK", "MARK_MASQ", "MASQUERADING", "NAME_LENGTH_MAX",
    "NODEPORT_ENDPOINTS_CHECK", "REJECT_CHAIN", "SERVICES", "TABLE", "TOP_CHAINS", "Config", "Programmed",
    "ServiceNames", "_ServiceRenderer", "affinity_set_name", "hash_and_truncate", "is_service_chain", "render",
    "service_names",
]
