"""Synchronous rtnetlink on a plain socket: pyroute2 only encodes and decodes the messages.

No event loop per request. pyroute2 0.9's IPRoute runs each call through asyncio (~0.3 ms
a request here, ~0.8 ms to open a handle) and silently opens a new socket, in whatever
namespace the thread is in, for each thread that uses a handle. Here pyroute2 only encodes
and decodes the messages (ifinfmsg, ifaddrmsg, rtmsg); `_Rtnl` sends them on a plain
NETLINK_ROUTE socket and reads the ack, under a lock, so one node handle serves any thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from testbed.node.namespaces import PodNetworkError, _fail

_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_CAPPED = 0x100
_NLM_F_ACK_TLVS = 0x200
_NLMSGERR_ATTR_MSG = 1
_NETLINK_TIMEOUT = 10.0


class _Rtnl:
    """Synchronous rtnetlink on one raw socket, bound to the namespace the thread is in when
    it is made; pyroute2 encodes requests and decodes replies."""

    def __init__(self, what: str) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        except OSError as e:
            raise _fail(e.errno, f"{what}: open a netlink socket") from None
        try:
            sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)  # the kernel's own error text
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)  # acks without a copy of the request
            sock.bind((0, 0))
            sock.settimeout(_NETLINK_TIMEOUT)  # a lost answer becomes an error, not a hung kubelet
        except OSError as e:
            sock.close()
            raise _fail(e.errno, f"{what}: set up a netlink socket") from None
        self._sock = sock
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "_Rtnl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg: nlmsg, msg_type: int, flags: int, what: str,
                reply: type[nlmsg] | None = None, dump: bool = False) -> list[nlmsg]:
        """Send msg; return the decoded replies (if reply is given) once acked or, for a dump,
        done. A kernel error raises PodNetworkError naming `what`."""
        if dump:  # NLM_F_DUMP is two bits, one of them NLM_F_EXCL's: never test flags for it
            flags |= NLM_F_DUMP
        with self._lock:
            self._seq += 1
            seq = self._seq
            header = msg["header"]
            header["type"] = msg_type
            header["flags"] = NLM_F_REQUEST | flags | (0 if dump else NLM_F_ACK)
            header["sequence_number"] = seq
            msg.encode()
            try:
                self._sock.sendto(bytes(msg.data[: header["length"]]), (0, 0))
            except OSError as e:
                raise _fail(e.errno, f"{what}: netlink send") from None
            replies: list[nlmsg] = []
            while True:
                try:
                    data = self._sock.recv(65536)
                except TimeoutError:
                    raise _fail(errno.ETIMEDOUT, f"{what}: no netlink answer in {_NETLINK_TIMEOUT:.0f} s") from None
                except OSError as e:
                    raise _fail(e.errno, f"{what}: netlink receive") from None
                offset = 0
                while offset + 16 <= len(data):
                    length, mtype, mflags, mseq, _ = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        break
                    if mseq == seq:
                        if mtype == _NLMSG_ERROR or mtype == _NLMSG_DONE:
                            err = -struct.unpack_from("=i", data, offset + 16)[0] if length >= 20 else 0
                            if err:
                                raise self._error(err, data, offset, length, mflags, mtype, what)
                            return replies
                        if reply is not None:
                            replies.append(reply(data, offset=offset, length=length))
                            replies[-1].decode()
                    offset += (length + 3) & ~3

    @staticmethod
    def _error(err: int, data: bytes, offset: int, length: int, mflags: int, mtype: int,
               what: str) -> PodNetworkError:
        text = ""
        if mtype == _NLMSG_ERROR and mflags & _NLM_F_ACK_TLVS and mflags & _NLM_F_CAPPED:
            pos, end = offset + 16 + 4 + 16, offset + length  # error code, then the request's header
            while pos + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x3FFF == _NLMSGERR_ATTR_MSG:
                    text = bytes(data[pos + 4: pos + alen]).split(b"\0", 1)[0].decode(errors="replace")
                pos += (alen + 3) & ~3
        return PodNetworkError(err, f"{what}: {os.strerror(err)}" + (f" (kernel: {text})" if text else ""))


def _link(index: int = 0, up: bool = False, attrs: list | None = None) -> ifinfmsg:
    msg = ifinfmsg()
    msg["index"] = index
    if up:
        msg["flags"] = IFF_UP
        msg["change"] = IFF_UP
    msg["attrs"] = attrs or []
    return msg

