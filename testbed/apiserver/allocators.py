"""ClusterIP and NodePort allocation, as the Kubernetes API server does it.

Dynamic ClusterIPs come from the upper part of the service CIDR first, keeping
the lower band (1/16 of the range, between 16 and 256 addresses) for Services
that ask for a fixed IP, like cluster DNS at .10 (KEP-3070).
"""

from __future__ import annotations

import ipaddress
import random

from testbed.api.errors import RangeFull


class AllocationError(ValueError):
    """A requested value can't be had; the text completes "Invalid value: X: ..."."""


class ClusterIPAllocator:
    def __init__(self, cidr: str, rng: random.Random | None = None) -> None:
        self.network = ipaddress.ip_network(cidr, strict=True)
        if self.network.version != 4:
            raise ValueError("only IPv4 service CIDRs are supported")
        base = int(self.network.network_address)
        self._first = base + 1  # network and broadcast addresses are never handed out
        self._last = int(self.network.broadcast_address) - 1
        if self._last < self._first:
            raise ValueError(f"service CIDR {cidr} is too small")
        size = self._last - self._first + 1
        self._lower_band_end = self._first + min(max(16, size // 16), 256) - 1
        self._used: set[int] = set()
        self._used_lower = 0
        self._rng = rng or random.Random()

    @property
    def size(self) -> int:
        return self._last - self._first + 1

    def nth(self, n: int) -> str:
        """The n-th usable address (1 = 10.96.0.1 for 10.96.0.0/12)."""
        return str(ipaddress.ip_address(self._first + n - 1))

    def allocate(self, requested: str = "") -> str:
        if requested:
            try:
                addr = int(ipaddress.IPv4Address(requested))
            except ValueError:
                raise AllocationError("must be a valid IP address") from None
            if not self._first <= addr <= self._last:
                raise AllocationError(
                    f"failed to allocate IP {requested}: the provided IP ({requested}) is not in the "
                    f"valid range. The range of valid IPs is {self.network}"
                )
            if addr in self._used:
                raise AllocationError(f"failed to allocate IP {requested}: provided IP is already allocated")
            self._mark(addr)
            return requested
        upper = (self._lower_band_end + 1, self._last)
        lower = (self._first, min(self._lower_band_end, self._last))
        for low, high in (upper, lower):
            addr = self._pick(low, high)
            if addr is not None:
                self._mark(addr)
                return str(ipaddress.IPv4Address(addr))
        raise RangeFull("Internal error occurred: failed to allocate a serviceIP: range is full")

    def _pick(self, low: int, high: int) -> int | None:
        if high < low:
            return None
        span = high - low + 1
        if self._count_in(low, high) >= span:
            return None
        start = self._rng.randrange(span)
        for i in range(span):  # linear probe from a random offset, like upstream's bitmap
            addr = low + (start + i) % span
            if addr not in self._used:
                return addr
        return None

    def _count_in(self, low: int, high: int) -> int:
        lower = self._used_lower
        return lower if high <= self._lower_band_end else len(self._used) - lower

    def _mark(self, addr: int) -> None:
        if addr not in self._used:
            self._used.add(addr)
            self._used_lower += addr <= self._lower_band_end

    def release(self, ip: str) -> None:
        try:
            addr = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return
        if addr in self._used:
            self._used.discard(addr)
            self._used_lower -= addr <= self._lower_band_end

    def contains(self, ip: str) -> bool:
        try:
            return ipaddress.IPv4Address(ip) in self.network
        except ValueError:
            return False


class PortAllocator:
    def __init__(self, low: int, high: int, rng: random.Random | None = None) -> None:
        if not 0 < low <= high <= 65535:
            raise ValueError(f"invalid port range {low}-{high}")
        self.low, self.high = low, high
        self._used: set[int] = set()
        self._rng = rng or random.Random()

    @classmethod
    def parse(cls, text: str) -> "PortAllocator":
        try:
            low, high = (int(x) for x in text.split("-"))
        except ValueError:
            raise ValueError(f"invalid port range {text!r}: want A-B, like 30000-32767") from None
        return cls(low, high)

    def allocate(self, requested: int = 0) -> int:
        if requested:
            if not self.low <= requested <= self.high:
                raise AllocationError(
                    "provided port is not in the valid range. "
                    f"The range of valid ports is {self.low}-{self.high}"
                )
            if requested in self._used:
                raise AllocationError("provided port is already allocated")
            self._used.add(requested)
            return requested
        span = self.high - self.low + 1
        if len(self._used) >= span:
            raise RangeFull("Internal error occurred: failed to allocate a nodePort: range is full")
        start = self._rng.randrange(span)
        for i in range(span):
            port = self.low + (start + i) % span
            if port not in self._used:
                self._used.add(port)
                return port
        raise RangeFull("Internal error occurred: failed to allocate a nodePort: range is full")

    def release(self, port: int) -> None:
        self._used.discard(port)
