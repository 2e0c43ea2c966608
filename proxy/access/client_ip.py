"""Whose address a request comes from, behind zero or more trusted front proxies.

`TRUSTED_PROXIES` says which `X-Forwarded-For` entries to believe:
- a number N: exactly N front proxies (nginx, Caddy, Cloudflare...) each append one entry; the
  client is the Nth entry from the right. Whatever the client itself sent sits to the left and
  is never read.
- a list of CIDRs: the peer and each entry from the right are skipped while they are inside one
  of them; the first address outside is the client.
- empty (the default): off a Space, nothing is believed (the socket peer is the client). On a
  Space (SPACE_ID or SYSTEM=spaces), the Space's front proxy, which connects from a private
  network, is the one trusted hop: `10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10,
  fc00::/7`. A client connecting straight to the app (no front proxy) cannot choose its address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Where a Hugging Face Space's front proxy connects from (its private cluster network).
SPACE_FRONT_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
MAX_FORWARDED_ENTRIES = 32  # a longer header is not from any real chain of proxies
MAX_IP_CHARS = 64


class TrustedProxies:
    """Picks the client's address from the peer and X-Forwarded-For. Pure and cheap."""

    def __init__(self, hops: int = 0, networks: Iterable[str] = ()) -> None:
        self.hops = hops
        self.networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)
        self._masks = tuple((net.version, int(net.network_address), int(net.netmask)) for net in self.networks)

    @classmethod
    def parse(cls, setting: str, *, on_space: bool) -> TrustedProxies:
        """From the TRUSTED_PROXIES setting (validated in proxy/config.py)."""
        value = setting.strip()
        if not value:
            return cls(networks=SPACE_FRONT_NETWORKS) if on_space else cls()
        if value.isdigit():
            return cls(hops=int(value))
        return cls(networks=[part for part in value.replace(" ", ",").split(",") if part.strip()])

    def client_of(self, peer: str, forwarded: str | None) -> str:
        """The client's address: `peer` unless trusted proxies vouch for an X-Forwarded-For entry."""
        if not forwarded or not (self.hops or self._masks):
            return peer
        entries = forwarded.rsplit(",", MAX_FORWARDED_ENTRIES)[-MAX_FORWARDED_ENTRIES:]
        if self.hops:
            # N proxies appended N entries; the last one the first proxy appended is the client.
            for entry in entries[max(len(entries) - self.hops, 0) :]:
                entry = entry.strip()
                if entry:
                    return entry[:MAX_IP_CHARS]
            return peer
        if not self._trusted(peer):
            return peer
        entry = ""
        for raw in reversed(entries):
            entry = raw.strip()
            if entry and not self._trusted(entry):
                return entry[:MAX_IP_CHARS]
        return entry[:MAX_IP_CHARS] or peer

    def _trusted(self, address: str) -> bool:
        """Whether `address` is inside a trusted network. On every request's path, so done with
        inet_pton and integer masks (the ipaddress module is ten times slower)."""
        parsed = _packed(address)
        if parsed is None:
            return False
        family, value = parsed
        return any(version == family and value & mask == network for version, network, mask in self._masks)


def _packed(address: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer); an IPv4-mapped IPv6 address counts as IPv4."""
    try:
        if ":" not in address:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except (OSError, ValueError):
        return None
    if packed[:12] == _V4_MAPPED:
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


_V4_MAPPED = bytes(10) + b"\xff\xff"


def valid_setting(value: str) -> str:
    """Raise ValueError unless `value` is empty, a number of hops, or a list of CIDRs."""
    value = value.strip()
    if not value or value.isdigit():
        return value
    for part in value.replace(" ", ",").split(","):
        if part.strip():
            try:
                ipaddress.ip_network(part.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{part.strip()!r} is neither a number of proxy hops nor a CIDR") from None
    return value
