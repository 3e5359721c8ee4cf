"""Where a webhook may go: public addresses only, unless the operator trusts a host or a network.

A webhook is a request the relay makes on a user's behalf, from inside the operator's network:
without this check a user could make it reach the relay's own loopback services, the LAN, or a
cloud metadata endpoint (169.254.169.254). So a webhook's host is resolved and EVERY address it
resolves to must be public (:func:`refusal` is None), checked twice:

* when the rule is created (:meth:`WebhookPolicy.check_url`, synchronous: a literal address in
  any spelling, ``localhost`` names; and :meth:`WebhookPolicy.vet` with the resolver where the
  caller can wait for it: the REST route);
* at every delivery attempt (:meth:`WebhookPolicy.vet`), and the request then goes to the
  address that was vetted (the URL's host stays in ``Host`` and in TLS's SNI and certificate
  check), so a name that resolves to a public address at creation and to a private one later
  (DNS rebinding) gains nothing.

Refused: loopback, private (RFC 1918, ULA fc00::/7), shared (100.64/10), link-local (incl. the
metadata address), multicast, reserved, unspecified, documentation and benchmark ranges, and any
IPv6 address that embeds one of those IPv4 addresses (IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-compatible ``::a.b.c.d``, 6to4, Teredo, NAT64 ``64:ff9b::/96``). ``[alerts]``
``webhook_trusted_hosts`` (names, exact) and ``webhook_trusted_networks`` (CIDRs) let an operator
allow internal receivers on purpose.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Final

import attrs
import trio

from ..config import AlertsConfig

__all__ = ["WebhookPolicy", "WebhookRefused", "refusal", "literal_address", "webhook_policy", "IPAddress"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT: Final = ipaddress.IPv6Network("::/96")  # IPv4-compatible (deprecated), and :: and ::1
_SHARED: Final = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: not public either
_LEGACY_V4: Final = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)  # 2130706433, 0x7f.1, 127.1 ...


class WebhookRefused(Exception):
    """The webhook's target is not allowed; the message is safe to show to its owner."""


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (a packet to it may reach them)."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or (ip in _COMPAT and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def refusal(ip: IPAddress) -> str | None:
    """Why a webhook may not reach ``ip`` ("loopback", "private"...), or None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "link-local"
        if ip.ipv4_mapped is not None:  # the very IPv4 address, spelt in IPv6: judged as such
            why = refusal(ip.ipv4_mapped)
            return None if why is None else f"{why} (inside {ip})"
        for inner in _embedded_v4(ip):
            why = refusal(inner)
            if why is not None:
                return f"{why} (inside {ip})"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not public"
    return None


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an address if it spells one (any form the system resolver accepts), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        pass
    if _LEGACY_V4.match(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))  # 2130706433 is 127.0.0.1 to getaddrinfo
        except OSError:
            return None
    return None


@attrs.frozen
class WebhookPolicy:
    """The operator's exceptions to "public addresses only"; immutable (a reload makes a new one)."""

    trusted_hosts: frozenset[str] = frozenset()
    trusted_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, hosts: Iterable[str], networks: Iterable[str]) -> WebhookPolicy:
        """From config values; ValueError names a network that does not parse."""
        return cls(
            frozenset(h.lower().rstrip(".") for h in hosts),
            tuple(ipaddress.ip_network(n, strict=False) for n in networks),
        )

    def address_refusal(self, host: str, ip: IPAddress) -> str | None:
        """Why ``host`` may not be reached at ``ip`` (None: it may)."""
        if host.lower().rstrip(".") in self.trusted_hosts:
            return None
        if any(ip.version == net.version and ip in net for net in self.trusted_networks):
            return None
        return refusal(ip)

    def check_url_host(self, host: str) -> None:
        """The creation-time check that needs no resolver: literal addresses and ``localhost`` names."""
        ip = literal_address(host)
        if ip is None:
            name = host.lower().rstrip(".")
            if name == "localhost" or name.endswith(".localhost"):
                ip = ipaddress.IPv4Address("127.0.0.1")
            else:
                return
        why = self.address_refusal(host, ip)
        if why is not None:
            raise WebhookRefused(f"webhook host {host!r} is a {why} address; webhooks go to public addresses only")

    async def vet(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` and return its addresses, every one allowed, else :class:`WebhookRefused`.

        Raises OSError when the name does not resolve (a retryable failure for a delivery).
        """
        literal = literal_address(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
            addresses = []
            for *_, sockaddr in infos:
                ip = ipaddress.ip_address(sockaddr[0])
                if ip not in addresses:
                    addresses.append(ip)
            if not addresses:
                raise OSError(f"{host!r} resolved to no address")
        for ip in addresses:
            why = self.address_refusal(host, ip)
            if why is not None:
                raise WebhookRefused(
                    f"webhook host {host!r} resolves to {ip}, a {why} address; webhooks go to public addresses only"
                )
        return addresses


def webhook_policy(config: AlertsConfig) -> WebhookPolicy:
    """The policy of ``[alerts]`` (its networks were validated when the config was loaded)."""
    return WebhookPolicy.build(config.webhook_trusted_hosts, config.webhook_trusted_networks)
