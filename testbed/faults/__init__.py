"""Fault injection on a running cluster: the actions a scenario's timeline takes, usable by hand
(`svclab fault ...`). Every action is a function taking the cluster (a FaultTarget) first; it
checks its arguments (FaultError names the bad field, nothing changed), does its work and
returns a Fault at once, without waiting for an effect. Faults that stay in force are recorded
in the cluster's faults.json (Fault.id set) until undone. docs/faults.md describes each one.
"""

from testbed.faults.dns import dns_error
from testbed.faults.heal import heal, leftovers, list_faults
from testbed.faults.network import bandwidth, delay, link_down, link_flap, link_up, loss, partition
from testbed.faults.nodes import (
    ALL_COMPONENTS, component_kill, component_start, component_stop, node_crash, node_freeze, node_recover,
    node_thaw,
)
from testbed.faults.pods import pod_kill
from testbed.faults.proxy import flush_conntrack, flush_rules
from testbed.faults.shaping import netem_available
from testbed.faults.state import Fault
from testbed.faults.target import FaultError, FaultTarget

__all__ = [
    "ALL_COMPONENTS", "Fault", "FaultError", "FaultTarget", "bandwidth", "component_kill", "component_start",
    "component_stop", "delay", "dns_error", "flush_conntrack", "flush_rules", "heal", "leftovers", "link_down",
    "link_flap", "link_up", "list_faults", "loss", "netem_available", "node_crash", "node_freeze", "node_recover",
    "node_thaw", "partition", "pod_kill",
]
