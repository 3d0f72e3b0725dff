"""Which addresses the fetcher may connect to: public ones, unless the config allows more.

Private, loopback, link-local (cloud metadata at 169.254.169.254), CGNAT and reserved
ranges are refused, and so is any IPv6 form that carries such an IPv4 address. The
resolver applies the same rule, so a name that re-resolves to a private address between
the check and the connect (DNS rebinding) is refused as well.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver


class BlockedAddress(OSError):
    pass


NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    value = int(ip)
    if any(ip in net for net in NAT64_PREFIXES):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (deprecated IPv4-compatible); not :: or ::1
        return ipaddress.IPv4Address(value)
    return None


@dataclass
class AddressGuard:
    allow_private: bool = False
    allowed: list = field(default_factory=list)

    @classmethod
    def from_limits(cls, limits) -> AddressGuard:
        """From a fetch.FetchLimits: its allow_private and allowed_networks."""
        return cls(limits.allow_private, [ipaddress.ip_network(n, strict=False)
                                          for n in limits.allowed_networks])

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.version == 6:
            # An IPv6 address that carries an IPv4 one is judged by the IPv4 address it
            # reaches: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64, 6to4, Teredo.
            ip = embedded_ipv4(ip) or ip
        if any(ip in net for net in self.allowed):
            return True
        if self.allow_private:
            return True
        # is_global is False for private, loopback, link-local (cloud metadata
        # at 169.254.169.254 and fd00:ec2::254), CGNAT, reserved ranges.
        return ip.is_global and not ip.is_multicast

    def check_ip(self, host: str) -> bool:
        """True if host is an IP literal (and allowed); raises if refused."""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        if not self.allows(host.strip("[]")):
            raise BlockedAddress(f"{host} is a private or reserved address")
        return True


class GuardedResolver(AbstractResolver):
    def __init__(self, guard: AddressGuard):
        self._guard = guard
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        bad = [i["host"] for i in infos if not self._guard.allows(i["host"])]
        if bad:
            raise BlockedAddress(f"{host} resolves to private or reserved address {bad[0]}")
        return infos

    async def close(self) -> None:
        await self._inner.close()
