"""Open vSwitch and the datapath: is OVS up, which bridges exist, kernel or userspace datapath."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path


def run(argv: list[str], input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)


def root_interfaces() -> set[str]:
    """Interface names in this process's network namespace (netlink, no fork)."""
    return {name for _, name in socket.if_nameindex()}


def ovs_ok() -> bool:
    try:
        return run(["ovs-vsctl", "-t", "2", "show"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ovs_bridges() -> list[str] | None:
    try:
        res = run(["ovs-vsctl", "-t", "5", "list-br"], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.split()

def genl_family_exists(family: str) -> bool:
    """Ask generic netlink whether a family (e.g. ovs_datapath) is registered."""
    NETLINK_GENERIC, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME = 16, 0x10, 3, 2
    NLM_F_REQUEST, NLMSG_ERROR = 1, 2
    name = family.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), CTRL_ATTR_FAMILY_NAME) + name
    attr += b"\0" * (-len(attr) % 4)
    payload = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + attr
    msg = struct.pack("=IHHII", 16 + len(payload), GENL_ID_CTRL, NLM_F_REQUEST, 1, 0) + payload
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
            sock.settimeout(2)
            sock.send(msg)
            data = sock.recv(65536)
    except OSError:
        return False
    _, msg_type, _, _, _ = struct.unpack_from("=IHHII", data)
    if msg_type == NLMSG_ERROR:
        return struct.unpack_from("=i", data, 16)[0] == 0
    return msg_type == GENL_ID_CTRL


def detect_datapath() -> str:
    """'kernel' if the Open vSwitch kernel datapath is available, else 'user'."""
    if Path("/sys/module/openvswitch").exists() or genl_family_exists("ovs_datapath"):
        return "kernel"
    return "user"

