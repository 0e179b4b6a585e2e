"""The os-ken app: thin glue between the edge bridge, the table feed and the Balancer.

It programs state (rules and select groups) and is on no connection's path: the switch
balances, tracks and NATs every connection itself, so it keeps doing so while this app
or the cloud-controller restarts. On (re)connecting it reads the switch's rules and
groups back (flow stats, group descriptions) and changes only what the table no longer
wants. os-ken's native hub runs handlers and the table feed in threads: one lock guards
the Balancer and the datapath. An error the switch reports is logged loudly (it means a
half-programmed switch); `svclab up` shows it in lb-controller.log.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.lib import hub
from os_ken.ofproto import ofproto_v1_3

from controller import flows, osken_messages
from controller.balancer import Balancer
from controller.flows import Change, DataPath, Group, Rule
from testbed.cloud.lb_table import Table

log = logging.getLogger("svclab.lb")


@dataclass(frozen=True)
class Settings:
    table_socket: str  # the cloud-controller's feed
    gw_port: int
    gw_mac: str
    ct_zone: int


class LoadBalancerApp(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]
    settings: Settings | None = None  # set by controller.launch before os-ken instantiates the app

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        assert s is not None, "controller.launch sets LoadBalancerApp.settings"
        self.balancer = Balancer(DataPath(s.gw_port, s.gw_mac, s.ct_zone))
        self.lock = threading.RLock()
        self.dp = None
        self.synced = False
        self._rules: list[Rule] | None = None  # read back from the switch, until synced
        self._groups: list[Group] | None = None
        self._pending = 0  # stats replies still to come
        hub.spawn(self._feed, raise_error=True)

    # ---- table feed ------------------------------------------------------------------------
    def _feed(self) -> None:
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(self.settings.table_socket)
                    log.info("connected to the cloud-controller at %s", self.settings.table_socket)
                    for line in sock.makefile("rb"):
                        self._on_table(Table.loads(line))
                log.info("the cloud-controller closed the table feed; reconnecting")
            except OSError as exc:
                log.debug("table feed: %s", exc)
            time.sleep(0.2)

    def _on_table(self, table: Table) -> None:
        with self.lock:
            if self.synced:
                self._send(self.balancer.set_table(table))
            else:
                self.balancer.table = table
                self._try_sync()
            log.info("table: %s", ", ".join(f"{lb.ip} ({lb.service}) -> {list(lb.backends)}"
                                            for lb in table.lbs) or "empty")

    def _try_sync(self) -> None:
        if self.dp is None or self.synced or self._pending or self.balancer.table is None:
            return
        self._send(self.balancer.switch_connected(self._rules or [], self._groups or []))
        self.synced, self._rules, self._groups = True, None, None

    # ---- switch ----------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _switch_features(self, ev) -> None:
        dp = ev.msg.datapath
        ofp, parser = dp.ofproto, dp.ofproto_parser
        with self.lock:
            self.dp, self.synced, self._rules, self._groups, self._pending = dp, False, [], [], 2
        dp.send_msg(parser.OFPFlowStatsRequest(dp, table_id=ofp.OFPTT_ALL, cookie=flows.MARK << 32,
                                               cookie_mask=flows.OURS_MASK))
        dp.send_msg(parser.OFPGroupDescStatsRequest(dp))
        log.info("switch %016x connected", dp.id)

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, MAIN_DISPATCHER)
    def _flow_stats(self, ev) -> None:
        self._stats_reply(ev.msg, lambda: self._rules.extend(osken_messages.rule_of(s) for s in ev.msg.body))

    @set_ev_cls(ofp_event.EventOFPGroupDescStatsReply, MAIN_DISPATCHER)
    def _group_desc(self, ev) -> None:
        self._stats_reply(ev.msg, lambda: self._groups.extend(osken_messages.group_of(g) for g in ev.msg.body))

    def _stats_reply(self, msg, collect) -> None:
        with self.lock:
            if self.synced or msg.datapath is not self.dp or self._rules is None:
                return
            collect()
            if not msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE:
                self._pending -= 1
                self._try_sync()

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _switch_gone(self, ev) -> None:
        with self.lock:
            if ev.datapath is self.dp:
                self.dp, self.synced, self._rules, self._groups = None, False, None, None
                log.info("switch disconnected")

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev) -> None:
        """No rule sends anything here: a packet-in means the pipeline is wrong (tests look for this line)."""
        log.error("unexpected packet-in from port %s (%d bytes)", ev.msg.match.get("in_port"), len(ev.msg.data))

    @set_ev_cls(ofp_event.EventOFPErrorMsg, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _error(self, ev) -> None:
        msg = ev.msg
        log.error("the switch refused a message: type %d code %d: %s", msg.type, msg.code, bytes(msg.data[:64]).hex())

    def _send(self, changes: list[Change]) -> None:
        if self.dp is None:
            return
        for change in changes:
            self.dp.send_msg(osken_messages.message(self.dp, change))
