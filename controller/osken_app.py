"""The os-ken app: thin glue between the edge bridge, the table feed and the Balancer.

Each handler looks things up, asks the Balancer, and sends the rules it returns.
os-ken's native hub runs handlers and the table feed in threads: one lock guards
the Balancer and the datapath. An unexpected error stops the process (loudly)
rather than leaving a half-programmed switch; `svclab up` shows it in lb-controller.log.
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
from os_ken.lib.packet import ipv4, packet, tcp, udp
from os_ken.ofproto import ofproto_v1_3

from controller import flows, osken_messages
from controller.balancer import Balancer, Change
from testbed.cloud.lb_table import Table

log = logging.getLogger("svclab.lb")


@dataclass(frozen=True)
class Settings:
    table_socket: str  # the cloud-controller's feed
    gw_port: int
    gw_mac: str
    idle_timeout: int = 60


class LoadBalancerApp(app_manager.OSKenApp):
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]
    settings: Settings | None = None  # set by controller.launch before os-ken instantiates the app

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        assert s is not None, "controller.launch sets LoadBalancerApp.settings"
        self.balancer = Balancer(s.gw_port, s.gw_mac, s.idle_timeout)
        self.lock = threading.RLock()
        self.dp = None
        self.synced = False
        self._stats: list[tuple[int, dict, tuple]] | None = None
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
        if self.dp is not None and self._stats is not None and self.balancer.table is not None and not self.synced:
            self._send(self.balancer.switch_connected(self._stats))
            self.synced = True

    # ---- switch ----------------------------------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _switch_features(self, ev) -> None:
        dp = ev.msg.datapath
        with self.lock:
            self.dp, self.synced, self._stats = dp, False, []
            self._send(flows.base_rules())
        parser = dp.ofproto_parser
        dp.send_msg(parser.OFPFlowStatsRequest(dp, cookie=flows.MARK << 32, cookie_mask=flows.OURS_MASK))
        log.info("switch %016x connected", dp.id)

    @set_ev_cls(ofp_event.EventOFPFlowStatsReply, MAIN_DISPATCHER)
    def _flow_stats(self, ev) -> None:
        msg = ev.msg
        with self.lock:
            if self._stats is None or msg.datapath is not self.dp:
                return
            for stat in msg.body:
                self._stats.append((stat.cookie, osken_messages.match_dict(stat.match), osken_messages.actions_of(stat.instructions)))
            if not msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE:
                self._try_sync()

    @set_ev_cls(ofp_event.EventOFPStateChange, DEAD_DISPATCHER)
    def _switch_gone(self, ev) -> None:
        with self.lock:
            if ev.datapath is self.dp:
                self.dp, self.synced, self._stats = None, False, None
                log.info("switch disconnected")

    @set_ev_cls(ofp_event.EventOFPPacketIn, MAIN_DISPATCHER)
    def _packet_in(self, ev) -> None:
        msg = ev.msg
        pkt = packet.Packet(msg.data)
        ip = pkt.get_protocol(ipv4.ipv4)
        l4 = pkt.get_protocol(tcp.tcp) or pkt.get_protocol(udp.udp)
        if ip is None or l4 is None:
            return
        in_port = msg.match["in_port"]
        with self.lock:
            if not self.synced or msg.datapath is not self.dp:
                return  # the client retries; rules come with the sync
            changes, conn = self.balancer.new_packet(in_port, ip.proto, ip.src, l4.src_port, ip.dst, l4.dst_port)
            self._send(changes)
            if conn is not None:
                log.info("%s:%d -> %s:%d to node %s:%d", conn.client, conn.client_port, conn.external_ip, conn.port,
                         conn.node, conn.node_port)
                dp = self.dp
                ofp, parser = dp.ofproto, dp.ofproto_parser
                # back through the table: the connection's rule, just installed, forwards it
                dp.send_msg(parser.OFPPacketOut(dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=in_port,
                                                actions=[parser.OFPActionOutput(ofp.OFPP_TABLE)], data=msg.data))

    @set_ev_cls(ofp_event.EventOFPFlowRemoved, MAIN_DISPATCHER)
    def _flow_removed(self, ev) -> None:
        with self.lock:
            self.balancer.flow_removed(ev.msg.cookie, osken_messages.match_dict(ev.msg.match))

    def _send(self, changes: list[Change]) -> None:
        if self.dp is None:
            return
        for change in changes:
            self.dp.send_msg(osken_messages.message(self.dp, change))


