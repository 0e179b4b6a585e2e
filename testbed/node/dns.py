"""Cluster DNS, as kube-dns / CoreDNS's kubernetes plugin answers:

- `<svc>.<ns>.svc.<domain>` A: the ClusterIP; for a headless Service, the
  addresses of its ready endpoints.
- `_<port>._<proto>.<svc>.<ns>.svc.<domain>` SRV for each named port.
- Names under the cluster domain that do not exist: NXDOMAIN (with the zone's
  SOA, so resolvers cache the answer); a name that exists but has no record of
  the asked type: an empty NOERROR answer, so AAAA lookups do not hide A records.
- Anything else: NXDOMAIN; nothing is forwarded outside the testbed.

The kubelet serves this from a pod of the `coredns` Deployment (image
svclab/coredns) in kube-system, behind the kube-dns Service at 10.96.0.10,
over UDP and TCP port 53.

Failure injection (`svclab fault dns-error`): the coredns Deployment's annotation
`svclab.io/dns-error`, a JSON list of rules `{"id", "names", "rcode"}`, makes the
server answer SERVFAIL or NXDOMAIN for every name matching a rule's glob (the whole
name or its first label), as a CoreDNS reconfigured through its ConfigMap would;
the servers watch the Deployment, so a change applies at once and the annotation's
removal ends it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import struct
from typing import Callable, ContextManager

from dnslib import QTYPE, RCODE, RR, SOA, SRV, A, DNSRecord

from testbed.api.meta import SERVICE_NAME_LABEL
from testbed.api.v1 import api_pb2 as pb
from testbed.client.client import ApiClient
from testbed.client.informer import Informer
from testbed.node.workload import open_listener

DNS_IMAGE = "svclab/coredns"
TTL = 5
DNS_NAMESPACE, DNS_DEPLOYMENT = "kube-system", "coredns"
DNS_ERROR_ANNOTATION = "svclab.io/dns-error"
DNS_ERROR_RCODES = ("SERVFAIL", "NXDOMAIN")

log = logging.getLogger("svclab.dns")


def parse_dns_errors(value: str) -> list[dict[str, str]]:
    """The rules of a dns-error annotation; ValueError naming what is wrong."""
    rules = json.loads(value) if value else []
    if not isinstance(rules, list):
        raise ValueError("must be a JSON list of rules")
    for rule in rules:
        if not isinstance(rule, dict) or not isinstance(rule.get("names"), str) or not rule["names"]:
            raise ValueError(f"rule {rule!r}: needs a non-empty names glob")
        if rule.get("rcode") not in DNS_ERROR_RCODES:
            raise ValueError(f"rule {rule!r}: rcode must be one of {', '.join(DNS_ERROR_RCODES)}")
    return rules


def matching_rule(rules: list[dict[str, str]], name: str) -> dict[str, str] | None:
    """The first rule whose glob matches the name (lower case, no trailing dot) or its first label."""
    first = name.split(".", 1)[0]
    return next((r for r in rules if fnmatch.fnmatchcase(name, r["names"].lower())
                 or fnmatch.fnmatchcase(first, r["names"].lower())), None)


class ClusterRecords:
    """Services and EndpointSlices, kept current by informers, and the answers they give."""

    def __init__(self, client: ApiClient, domain: str = "cluster.local") -> None:
        self.domain = domain.strip(".")
        self.services = Informer(client, "Service")
        self.slices = Informer(client, "EndpointSlice")
        self.config = Informer(client, "Deployment", namespace=DNS_NAMESPACE,
                               field_selector=f"metadata.name={DNS_DEPLOYMENT}")
        self.config.on_change(self._on_config)
        self.error_rules: list[dict[str, str]] = []
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(i.run()) for i in (self.services, self.slices, self.config)]
        for informer in (self.services, self.slices, self.config):
            await informer.synced.wait()

    def _on_config(self, _type: str, _old: pb.Deployment | None, new: pb.Deployment | None) -> None:
        value = new.metadata.annotations.get(DNS_ERROR_ANNOTATION, "") if new is not None else ""
        try:
            rules = parse_dns_errors(value)
        except ValueError as exc:
            log.error("ignoring %s: %s", DNS_ERROR_ANNOTATION, exc)
            rules = []
        if rules != self.error_rules:
            log.info("dns-error rules: %s", rules or "none")
        self.error_rules = rules

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _service(self, labels: list[str]) -> pb.Service | None:
        # labels: [svc, ns, "svc"] after the domain is stripped
        if len(labels) != 3 or labels[2] != "svc":
            return None
        return self.services.get(labels[1], labels[0])

    def _ready_addresses(self, svc: pb.Service) -> list[str]:
        out = []
        for eps in self.slices.items():
            if (eps.metadata.namespace == svc.metadata.namespace
                    and eps.metadata.labels.get(SERVICE_NAME_LABEL) == svc.metadata.name):
                for ep in eps.endpoints:
                    if not ep.conditions.HasField("ready") or ep.conditions.ready:
                        out += list(ep.addresses)
        return sorted(set(out))

    def answer(self, request: DNSRecord) -> DNSRecord:
        reply = request.reply()
        reply.header.ra = 0
        q = request.q
        name = str(q.qname).rstrip(".").lower()
        zone = self.domain
        rule = matching_rule(self.error_rules, name) if self.error_rules else None
        if rule is not None:
            reply.header.rcode = getattr(RCODE, rule["rcode"])
            return reply
        if not (name == zone or name.endswith("." + zone)):
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        labels = name[: -len(zone)].rstrip(".").split(".") if name != zone else []
        found = self._lookup(labels, q.qtype, reply, str(q.qname))
        if not found:
            reply.header.rcode = RCODE.NXDOMAIN
        if not reply.rr:
            reply.add_auth(RR(zone + ".", QTYPE.SOA, ttl=TTL, rdata=SOA(
                f"ns.dns.{zone}.", f"hostmaster.{zone}.", (1, 7200, 1800, 86400, TTL))))
        return reply

    def _lookup(self, labels: list[str], qtype: int, reply: DNSRecord, qname: str) -> bool:
        """Add the answers for `labels` (the name less the domain); False if the name does not exist."""
        if labels and labels[0].startswith("_") and len(labels) == 5:
            port_label, proto_label, *rest = labels
            svc = self._service(rest)
            if svc is None:
                return False
            target = f"{svc.metadata.name}.{svc.metadata.namespace}.svc.{self.domain}."
            ports = [p for p in svc.spec.ports
                     if p.name and "_" + p.name == port_label and "_" + p.protocol.lower() == proto_label]
            if not ports:
                return False
            if qtype in (QTYPE.SRV, QTYPE.ANY):
                for p in ports:
                    reply.add_answer(RR(qname, QTYPE.SRV, ttl=TTL, rdata=SRV(0, 100, p.port, target)))
            return True
        svc = self._service(labels)
        if svc is None:
            return self._is_branch(labels)
        if qtype in (QTYPE.A, QTYPE.ANY):
            addresses = self._ready_addresses(svc) if svc.spec.cluster_ip == "None" else [svc.spec.cluster_ip]
            for address in addresses:
                reply.add_answer(RR(qname, QTYPE.A, ttl=TTL, rdata=A(address)))
        return True

    def _is_branch(self, labels: list[str]) -> bool:
        """Names above a Service (`svc.<domain>`, `<ns>.svc.<domain>`) exist, with no records."""
        if labels == [] or labels == ["svc"]:
            return True
        if len(labels) == 2 and labels[1] == "svc":
            return any(s.metadata.namespace == labels[0] for s in self.services.items())
        return False


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, records: ClusterRecords) -> None:
        self.records = records

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        reply = _reply(self.records, data)
        if reply is not None:
            self.transport.sendto(reply, addr)


def _reply(records: ClusterRecords, data: bytes) -> bytes | None:
    try:
        request = DNSRecord.parse(data)
    except Exception:  # not DNS: drop it, as a server does
        return None
    return records.answer(request).pack()


async def _tcp(records: ClusterRecords, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = _reply(records, await reader.readexactly(size))
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class DnsServer:
    """DNS on port 53 (UDP and TCP) inside one pod, answering from shared ClusterRecords."""

    def __init__(self, records: ClusterRecords, port: int = 53) -> None:
        self.records = records
        self.port = port
        self._closers: list[Callable[[], None]] = []

    async def start(self, in_pod_netns: Callable[[], ContextManager]) -> None:
        await self.records.start()
        with in_pod_netns():
            udp, tcp = open_listener("UDP", self.port), open_listener("TCP", self.port)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.records), sock=udp)
        server = await asyncio.start_server(lambda r, w: _tcp(self.records, r, w), sock=tcp)
        self._closers += [transport.close, server.close]

    def stop(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
