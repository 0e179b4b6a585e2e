"""External IPs for LoadBalancer Services: one pool, lowest free address first, requests honoured if free."""

from __future__ import annotations

import ipaddress

Key = tuple[str, str]  # (namespace, name)


def parse_pool(text: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """'A-B' -> (A, B); ValueError names what is wrong."""
    try:
        low, high = (ipaddress.IPv4Address(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"invalid pool {text!r}: want A-B, like 203.0.113.100-203.0.113.199") from None
    if low > high:
        raise ValueError(f"invalid pool {text!r}: {low} comes after {high}")
    return low, high


class Pool:
    def __init__(self, text: str) -> None:
        self.text = text
        self.low, self.high = parse_pool(text)
        self.owner: dict[str, Key] = {}  # ip -> service
        self.held: dict[Key, str] = {}  # service -> ip

    def __contains__(self, ip: str) -> bool:
        try:
            return self.low <= ipaddress.IPv4Address(ip) <= self.high
        except ValueError:
            return False

    @property
    def size(self) -> int:
        return int(self.high) - int(self.low) + 1

    def allocate(self, key: Key, requested: str = "") -> tuple[str | None, str]:
        """The IP `key` holds after this call, or None and why not (for `svclab describe`)."""
        current = self.held.get(key)
        if current is not None and (not requested or requested == current):
            return current, ""
        if requested:
            if requested not in self:
                return self._refuse(key, f"loadBalancerIP {requested} is not in the pool {self.text}")
            owner = self.owner.get(requested)
            if owner is not None and owner != key:
                return self._refuse(key, f"loadBalancerIP {requested} is in use by {owner[0]}/{owner[1]}")
            self.release(key)
            self._take(key, requested)
            return requested, ""
        for value in range(int(self.low), int(self.high) + 1):
            ip = str(ipaddress.IPv4Address(value))
            if ip not in self.owner:
                self._take(key, ip)
                return ip, ""
        return None, f"no free IP in the pool {self.text} (all {self.size} in use)"

    def adopt(self, key: Key, ip: str) -> bool:
        """Take back an IP a Service's status already shows (after a restart); False if not ours to give."""
        if ip not in self or self.owner.get(ip, key) != key or key in self.held:
            return False
        self._take(key, ip)
        return True

    def release(self, key: Key) -> str | None:
        ip = self.held.pop(key, None)
        if ip is not None:
            del self.owner[ip]
        return ip

    def _take(self, key: Key, ip: str) -> None:
        self.owner[ip] = key
        self.held[key] = ip

    def _refuse(self, key: Key, reason: str) -> tuple[None, str]:
        self.release(key)
        return None, reason
