"""Debian's Mininet, imported without its process- and machine-wide side effects, and
recognising the shells Mininet starts for its nodes (by argv, for clean-up after kill -9).

Mininet hazards, and what svclab does about them:

* ``Mininet()`` runs ``Mininet.init()`` -> ``fixLimits()``, which writes root-namespace and
  global sysctls (``net.ipv4.tcp_rmem``/``tcp_wmem`` unconditionally,
  ``net.core.{r,w}mem_max``, ``netdev_max_backlog``, ``neigh.default.gc_thresh*``,
  ``route.max_size``, ``fs.file-max``, ``kernel.pty.max``). We raise only our own process's
  rlimits and mark Mininet initialised, so it never runs.
* Importing ``mininet.log`` calls ``logging.setLoggerClass(MininetLogger)``: every logger
  made later in the process would get its own stderr handler. We restore the class.
* ``ensureRoot()`` and ``OVSSwitch.setup()`` call ``sys.exit(1)``; net.py checks root and
  ovsdb first and raises instead.
* Not used here, and not to be used by callers: ``Mininet.iperf()`` runs ``killall -9
  iperf`` (machine-wide: pids are not namespaced), terms (``makeTerms``/``stopXterms``)
  run ``pkill -9 -f mnexec.*socat``, ``addNAT()``/``nodelib.NAT`` flush the root
  iptables and set its ip_forward, ``LinuxBridge`` sets ``bridge-nf-call-*``,
  ``CPULimitedHost`` mounts cgroups, the default controller writes ``/tmp/c0.log``.
  ``Node.popen(..., shell=True)`` needs ``$SHELL``.
* Left as is (harmless): each switch's ``Intf('lo')`` runs ``ifconfig lo up`` in the root
  namespace (a no-op: lo is up), and ``OVSSwitch.start`` puts ``--if-exists del-br <own
  name>`` before ``add-br`` (own names only; start() refuses when they exist).
* ``Mininet.stop()`` is not used: it costs two shell round trips per link. net.py
  deletes the bridges, hangs up the shells, unmounts the namespaces (the kernel removes
  their veth pairs in one batch) and deletes by name whatever is left.
* Mininet's ``mn -c`` is never used: it deletes every OVS bridge on the machine, kills
  processes by name and removes /tmp/*.log.
"""

from __future__ import annotations

import logging
import re
import resource
from typing import Any

from testbed.cluster.procfs import cmdline, pids
from testbed.cluster.topo import Names

#: Mininet's node shell: ``bash --norc --noediting -is mininet:<Mininet name>``.
SHELL_ARGV = ["bash", "--norc", "--noediting", "-is"]


def is_mininet_shell(pid: int, node_name: str) -> bool:
    """Does pid still run Mininet's shell for node_name?

    Mininet starts ``mnexec -cd[n] env PS1=<DEL> bash --norc --noediting -is mininet:<name>``;
    mnexec and env exec, so the pid shows the bash argv (or, for an instant, one of the
    two launchers in front of it).
    """
    argv = cmdline(pid)
    tail = SHELL_ARGV + ["mininet:" + node_name]
    if argv == tail:
        return True
    if argv[-len(tail):] != tail:
        return False
    head = argv[: -len(tail)]
    if head[-2:] == ["env", "PS1=\x7f"]:
        head = head[:-2]
    return head == [] or (len(head) == 2 and head[0] == "mnexec" and re.fullmatch(r"-[a-z]+", head[1]) is not None)


def mininet_shells(cluster: str) -> dict[str, int]:
    """Running Mininet shells of the cluster found by argv: {mininet node name: pid}."""
    pattern = Names.shell_name_re(cluster)
    found: dict[str, int] = {}
    for pid in pids():
        argv = cmdline(pid)
        if len(argv) == 5 and argv[:4] == SHELL_ARGV and argv[4].startswith("mininet:"):
            name = argv[4][len("mininet:") :]
            if pattern.match(name):
                found[name] = pid
    return found


_mininet: dict[str, Any] = {}


def _raise_own_rlimits() -> None:
    """What Mininet.init() needs of fixLimits(), for this process only (ptys and pipes per host)."""
    for limit, want in ((resource.RLIMIT_NOFILE, 16384), (resource.RLIMIT_NPROC, 8192)):
        soft, hard = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and soft < want:
            new_hard = hard if hard == resource.RLIM_INFINITY or hard >= want else want
            try:
                resource.setrlimit(limit, (want, new_hard))
            except (ValueError, OSError):
                pass


def mininet_classes() -> dict[str, Any]:
    """Mininet, Host, OVSSwitch and the Link class that net.py builds with."""
    if _mininet:
        return _mininet
    logger_class = logging.getLoggerClass()
    try:
        from mininet.link import Link
        from mininet.net import Mininet
        from mininet.node import Host, OVSSwitch
    finally:
        logging.setLoggerClass(logger_class)  # mininet.log sets MininetLogger process-wide

    if not Mininet.inited:
        _raise_own_rlimits()  # instead of Mininet.init(): ensureRoot() + fixLimits() (global sysctls)
        Mininet.inited = True

    class RootPortLink(Link):
        """A veth whose first end is a bridge port in the root namespace.

        Both ends are created where they live (never a host-side name in the root
        namespace); the root end gets no IPv6 link-local and no ARP before it is up.
        """

        @classmethod
        def makeIntfPair(cls, intfname1, intfname2, addr1=None, addr2=None, node1=None, node2=None,
                         deleteIntfs=True):  # noqa: N802 (Mininet's API)
            assert node1 is not None and node2 is not None and not node1.inNamespace
            out = node1.cmd(
                f"ip link add name {intfname1} address {addr1} type veth peer name {intfname2} "
                f"address {addr2} netns {node2.pid} && ip link set dev {intfname1} addrgenmode none arp off up"
            )
            if out.strip():
                raise RuntimeError(f"creating veth {intfname1}/{intfname2} failed: {out.strip()}")

    _mininet.update(Mininet=Mininet, Host=Host, OVSSwitch=OVSSwitch, Link=RootPortLink)
    return _mininet

