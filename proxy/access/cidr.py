"""IP address ranges (CIDRs): parsing, and membership in time that does not grow with the list."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """The address `text` names (an IPv4-mapped IPv6 address as IPv4), or None if it names none."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_cidrs(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Each entry an address or a range (`10.0.0.0/8`, `2001:db8::/32`); raises ValueError naming a bad one."""
    networks = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"'{entry[:60]}' is not an IP address or CIDR range") from None
    return networks


class CidrSet:
    """A set of ranges. `ip in cidrs` costs one dictionary lookup per distinct prefix length
    (at most 33 for IPv4 and 129 for IPv6), however many ranges the set holds."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks = parse_cidrs(entries)
        self._by_length: dict[tuple[int, int], set[int]] = {}
        for net in self.networks:
            bits = net.max_prefixlen
            key = (net.version, net.prefixlen)
            self._by_length.setdefault(key, set()).add(int(net.network_address) >> (bits - net.prefixlen))
        self._lengths = sorted(self._by_length)

    @property
    def entries(self) -> list[str]:
        return [str(net) for net in self.networks]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)

    def __contains__(self, address: object) -> bool:
        ip = parse_ip(address) if isinstance(address, str) else address
        if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        value, bits = int(ip), ip.max_prefixlen
        for version, length in self._lengths:
            if version == ip.version and (value >> (bits - length)) in self._by_length[(version, length)]:
                return True
        return False


def split_list(raw: str) -> list[str]:
    """A comma-, space- or newline-separated list, blanks dropped."""
    return [part for part in raw.replace("\n", ",").replace(" ", ",").split(",") if part.strip()]
