"""Client addresses: the one place that says what a peer's address is and which rules match it.

An IPv4 client reaching a dual-stack ``[::]`` listener shows up as ``::ffff:a.b.c.d``. Every rule
about client addresses (who may log in without TLS, whose connections and failed logins are
counted together) must see it as the IPv4 address it is, or ``127.0.0.0/8`` silently stops
covering local clients on one listener while it still does on another. So every rule takes the
address through :func:`client_ip` first. No I/O here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

ClientIP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# An IPv6 host normally gets a whole /64 (RFC 6177), so counting per /128 would let one client
# spread its guesses and connections over 2**64 addresses.
IPV6_LIMIT_PREFIX = 64


def client_ip(address: str | None) -> ClientIP | None:
    """The client's address as one rule sees it: zone index dropped, IPv4-mapped unwrapped;
    None when ``address`` is no IP address (a UNIX socket, a missing peer)."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(address: str | None) -> str | None:
    """:func:`client_ip` as text, for handing on (the IP popgate forwards upstream with IMAP ID,
    so the upstream's own per-IP rules see ``127.0.0.1``, not ``::ffff:127.0.0.1``)."""
    ip = client_ip(address)
    return str(ip) if ip is not None else None


def limit_key(address: str | None) -> str:
    """What connections and failed logins are counted under: the IPv4 address, or the IPv6
    /64 the address lies in. Peers without an IP address share one key."""
    ip = client_ip(address)
    if ip is None:
        return "-"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_LIMIT_PREFIX}", strict=False))
    return str(ip)


class Networks:
    """A set of networks from the configuration, matched against client addresses."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def __contains__(self, address: object) -> bool:
        ip = client_ip(address) if isinstance(address, str) or address is None else None
        if ip is None:
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)

    def __repr__(self) -> str:
        return f"Networks({[str(n) for n in self.networks]!r})"


def format_peer(host: str | None, port: int | str | None) -> str:
    """``host:port`` for logs, with an IPv6 host in brackets (``[::1]:4711``)."""
    shown = host or "?"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{shown}:{port if port is not None else '?'}"
