"""The address guard (SSRF): which hosts the fetcher and the webhook sender may contact.

A host is resolved once; if any resolved address is loopback, private, link-local (cloud metadata at
169.254.169.254), CGNAT, multicast, reserved, unspecified, or an IPv6 form embedding one of those
(IPv4-mapped/compatible, 6to4, Teredo, NAT64), it is refused. Callers connect to the checked addresses, never to
the name again, so DNS rebinding has nowhere to go.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from guarded_fetch.errors import AddressRefused
from guarded_fetch.urls import display_url, is_ip_literal, parse_http_url, short

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class ResolvedAddress:
    """One checked address of a host, ready for ``socket.connect``."""

    family: int
    sockaddr: tuple
    ip: IPAddress


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo client, NAT64), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted ("loopback", "private", ...), or None for a public unicast address."""
    inner = _embedded_ipv4(ip)
    if inner is not None and (reason := blocked_reason(inner)):
        return reason
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("non-global", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


class AddressGuard:
    """Decides which hosts the fetcher (and webhooks) may contact.

    ``allow_private_hosts`` lists exceptions to the private-address rule: hostnames (``minio.internal``: every
    address it resolves to is allowed), IPs (``127.0.0.2``) or CIDRs (``10.1.0.0/16``). Public addresses are
    always allowed. Entries are validated here, so a typo fails at deploy time.
    """

    def __init__(self, allow_private_hosts: Iterable[str] = ()) -> None:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in allow_private_hosts:
            text = str(entry).strip().lower().rstrip(".").removeprefix("[").removesuffix("]")
            if not text:
                raise ValueError("allow_private_hosts entries must not be empty")
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if not all(c.isalnum() or c in "-._" for c in text) or text.startswith(("-", ".")):
                raise ValueError(f"allow_private_hosts entry {entry!r} is neither a hostname, an IP nor a CIDR")
            names.add(text)
        self.names = frozenset(names)
        self.networks = tuple(networks)

    @classmethod
    def permissive(cls) -> AddressGuard:
        """Allows every address: for the CLI, where the person typing the URL owns the machine."""
        return cls(["0.0.0.0/0", "::/0"])

    def is_allowed(self, host: str, ip: IPAddress) -> bool:
        if blocked_reason(ip) is None or host.lower().rstrip(".") in self.names:
            return True
        candidates = [ip] + ([inner] if (inner := _embedded_ipv4(ip)) is not None else [])
        return any(c.version == net.version and c in net for c in candidates for net in self.networks)

    def resolve(self, host: str, port: int, timeout_s: float) -> list[ResolvedAddress]:
        """Resolve ``host`` once and check every address; raise ``AddressRefused`` if any is not allowed.

        Refusing when *any* address is private (not only the first) closes the trick of a name with one public
        and one private record. The caller connects to the returned addresses, never to the name again.
        """
        infos = _getaddrinfo(host, port, timeout_s)
        resolved: list[ResolvedAddress] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self.is_allowed(host, ip):
                subject = "the URL" if is_ip_literal(host) else f"the URL's host {short(host, 60)}"
                raise AddressRefused(f"{subject} resolves to {_describe(ip)}, which is not allowed")
            if all(r.sockaddr != sockaddr for r in resolved):
                resolved.append(ResolvedAddress(family, tuple(sockaddr), ip))
        if not resolved:
            raise AddressRefused(f"the host {short(host, 60)} has no IPv4/IPv6 address")
        return resolved

    def check_url(self, url: str, timeout_s: float = 5.0) -> None:
        """Refuse (``ValueError``) a URL that is not http(s) or whose host resolves to a non-allowed address."""
        target = parse_http_url(url)
        self.resolve(target.host, target.port, timeout_s)


def check_webhook_url(url: str, guard: AddressGuard) -> None:
    """Refuse a ``fal_webhook`` target the service must not call (private address, other scheme): ValueError.

    The check resolves the host now; the sender should connect the same way as :func:`fetch_input` (resolve
    with :meth:`AddressGuard.resolve` and connect to the checked address) so DNS cannot change in between.
    """
    try:
        guard.check_url(url)
    except ValueError as exc:
        raise ValueError(f"fal_webhook {display_url(url)} is not allowed: {exc}") from None


def _describe(ip: IPAddress) -> str:
    """``a loopback address (::ffff:127.0.0.1)``: the reason with its article, the address readable."""
    reason = blocked_reason(ip) or "public"
    article = "an" if reason[0] in "aeiou" else "a"
    shown = f"::ffff:{ip.ipv4_mapped}" if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else str(ip)
    return f"{article} {reason} address ({shown})"


def _getaddrinfo(host: str, port: int, timeout_s: float) -> list:
    """``socket.getaddrinfo`` bounded in time (the resolver has no timeout of its own).

    Numeric hosts in any form (``2130706433``, ``0x7f.1``, ``::ffff:7f00:1``) are normalised by the C library
    here, without a DNS query; names run in a daemon thread that is abandoned if the resolver hangs.
    """
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            outcome["error"] = exc

    if is_ip_literal(host):
        work()
    else:
        worker = threading.Thread(target=work, name="fetch-resolve", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise AddressRefused(f"resolving the host {short(host, 60)} took longer than {timeout_s:g} s")
    if "error" in outcome:
        raise AddressRefused(f"the host {short(host, 60)} could not be resolved")
    return outcome["infos"]  # type: ignore[return-value]
