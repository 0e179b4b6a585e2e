"""A host's links taken down and brought back, inside the host's namespace.

`ip link set eth0 down` in the host: nothing leaves or arrives on that link (the switch end
stays up, as when a machine's NIC goes down). Taking a device down makes the kernel drop every
route through it, and bringing it up restores only the connected ones, so down() saves the
host's routes over the link and up() puts them back (the gw route to the external subnet, the
service CIDR's, the pod CIDRs of the other nodes that the kubelet added).
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from testbed.node import podnet

MAIN_TABLE = 254
_ROUTE_ATTRS = {"RTA_DST": "dst", "RTA_GATEWAY": "gateway", "RTA_PREFSRC": "prefsrc", "RTA_PRIORITY": "priority"}


def _indexes(ipr: IPRoute, links: tuple[str, ...]) -> dict[int, str]:
    found = {}
    for link in links:
        index = ipr.link_lookup(ifname=link)
        if index:
            found[index[0]] = link
    return found


def _saved(msg: Any, link: str) -> dict[str, Any]:
    route: dict[str, Any] = {"link": link, "dst_len": msg["dst_len"], "proto": msg["proto"], "scope": msg["scope"]}
    for attr, key in _ROUTE_ATTRS.items():
        value = msg.get_attr(attr)
        if value is not None:
            route[key] = value
    return route


def down(netns: str, links: tuple[str, ...]) -> list[dict[str, Any]]:
    """Take the links down; returns the routes through them, for up()."""
    with podnet.entered_netns(netns), IPRoute() as ipr:
        indexes = _indexes(ipr, links)
        routes = [_saved(msg, indexes[msg.get_attr("RTA_OIF")])
                  for msg in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
                  if msg.get_attr("RTA_OIF") in indexes]
        for index in indexes:
            ipr.link("set", index=index, state="down")
    return routes


def up(netns: str, links: tuple[str, ...], routes: list[dict[str, Any]]) -> None:
    """Bring the links up and put back the routes down() saved (those the kernel did not)."""
    with podnet.entered_netns(netns), IPRoute() as ipr:
        indexes = {name: index for index, name in _indexes(ipr, links).items()}
        for index in indexes.values():
            ipr.link("set", index=index, state="up")
        for route in sorted(routes, key=lambda r: -r["scope"]):  # connected ones before those via a gateway
            if route["link"] not in indexes:
                continue
            spec = {k: v for k, v in route.items() if k not in ("link", "dst_len")}
            spec["dst"] = f"{route.get('dst', '0.0.0.0')}/{route['dst_len']}"
            try:
                ipr.route("replace", oif=indexes[route["link"]], table=MAIN_TABLE, **spec)
            except NetlinkError as exc:
                raise RuntimeError(f"restoring route {spec} in {netns}: {exc}") from exc


def state(netns: str, links: tuple[str, ...]) -> dict[str, bool]:
    """{link: administratively up}."""
    with podnet.entered_netns(netns), IPRoute() as ipr:
        return {name: bool(ipr.get_links(index)[0]["flags"] & 1) for index, name in _indexes(ipr, links).items()}
