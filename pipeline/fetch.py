"""The hardened fetcher for ``image_url``/``audio_url``: untrusted URLs in, bounded bytes out.

Requests come from anyone who can reach the service, so a URL is hostile until proven otherwise:

* **Schemes**: ``http``, ``https``, ``data:`` (base64 or percent-encoded) and ``s3://bucket/key`` for buckets the
  operator listed. ``file:``, ``gopher:``, ``ftp:``, bare paths, ... are refused before any I/O.
* **Addresses (SSRF)**: the host is resolved once; if any resolved address is loopback, private, link-local
  (cloud metadata at 169.254.169.254), CGNAT, multicast, reserved, unspecified, or an IPv6 form embedding one of
  those (IPv4-mapped/compatible, 6to4, Teredo, NAT64), the URL is refused. The socket then connects to the checked
  address itself, never to the name, so a DNS answer that changes between check and connect (DNS rebinding) has
  nowhere to go. TLS still verifies the certificate for the hostname (SNI), and the ``Host`` header is the
  original one. Every redirect hop is parsed, resolved and checked the same way.
* **Cost**: connect/idle/total timeouts (a watchdog shuts the socket at the total deadline, so a server dripping
  one byte per second cannot hold a worker), bodies are streamed with the size limit enforced while reading, and
  no decompression is ever requested (``Accept-Encoding: identity``).

Errors are :class:`~pipeline.media.errors.MediaError` subclasses naming the field, with an HTTP ``status_code``
hint (413 too large, 422 otherwise). Messages never echo secrets: URLs are shown without user info or query
string and truncated; data URIs are shown as their media type only. The type of the content is not taken from
headers; :mod:`pipeline.media.validate` sniffs the bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from pipeline.media.errors import MediaError

InputField = Literal["image_url", "audio_url"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MIB = 1024 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "stable-avatar-serve/0.1 (+input fetcher)"
_CHUNK = 256 * 1024
_MAX_SHOWN = 100
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Characters left alone when re-quoting a request path (RFC 3986 reserved + unreserved + '%').
_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"


class FetchLimits(BaseModel):
    """Size and time limits of one input fetch (the ``inputs.fetch`` block of the app arguments)."""

    model_config = ConfigDict(extra="forbid")

    max_image_bytes: int = Field(20 * MIB, ge=1, description="largest image_url body (also for data: URIs)")
    max_audio_bytes: int = Field(200 * MIB, ge=1, description="largest audio_url body (also for data: URIs)")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="DNS resolution and TCP/TLS connect")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="longest silence while reading")
    total_timeout_s: float = Field(60.0, gt=0, le=3600, description="whole fetch, redirects included")
    max_redirects: int = Field(3, ge=0, le=10)

    def max_bytes(self, field: str) -> int:
        return self.max_audio_bytes if field == "audio_url" else self.max_image_bytes


# -- errors ---------------------------------------------------------------------------------------------------


class FetchError(MediaError):
    """An input URL could not be fetched.

    ``status_code`` is the HTTP status the API answers with; ``error_type`` is the machine-readable ``type`` of
    the fal ``detail`` entry (fal's names where fal has one, e.g. ``file_too_large``).
    """

    status_code: int = 422
    error_type: str = "file_download_error"


class InputTooLargeError(FetchError):
    status_code = 413
    error_type = "file_too_large"


class FetchTimeoutError(FetchError):
    error_type = "file_download_timeout"


class UnsupportedURLError(FetchError):
    error_type = "url_not_allowed"


class BlockedAddressError(FetchError):
    error_type = "url_not_allowed"


class InvalidDataURIError(FetchError):
    error_type = "invalid_data_uri"


class AddressRefused(ValueError):
    """The guard refused a host (private address, unresolvable name); raised without a request field."""


# -- the address guard ----------------------------------------------------------------------------------------


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
                subject = "the URL" if _is_ip_literal(host) else f"the URL's host {_short(host, 60)}"
                raise AddressRefused(f"{subject} resolves to {_describe(ip)}, which is not allowed")
            if all(r.sockaddr != sockaddr for r in resolved):
                resolved.append(ResolvedAddress(family, tuple(sockaddr), ip))
        if not resolved:
            raise AddressRefused(f"the host {_short(host, 60)} has no IPv4/IPv6 address")
        return resolved

    def check_url(self, url: str, timeout_s: float = 5.0) -> None:
        """Refuse (``ValueError``) a URL that is not http(s) or whose host resolves to a non-allowed address."""
        target = _parse_http_url(url)
        self.resolve(target.host, target.port, timeout_s)


def check_webhook_url(url: str, guard: AddressGuard) -> None:
    """Refuse a ``fal_webhook`` target the service must not call (private address, other scheme): ValueError.

    The check resolves the host now; the sender should connect the same way as :func:`fetch_input` (resolve
    with :meth:`AddressGuard.resolve` and connect to the checked address) so DNS cannot change in between.
    """
    try:
        guard.check_url(url)
    except ValueError as exc:
        raise ValueError(f"fal_webhook {_display(url)} is not allowed: {exc}") from None


def _describe(ip: IPAddress) -> str:
    """``a loopback address (::ffff:127.0.0.1)``: the reason with its article, the address readable."""
    reason = blocked_reason(ip) or "public"
    article = "an" if reason[0] in "aeiou" else "a"
    shown = f"::ffff:{ip.ipv4_mapped}" if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else str(ip)
    return f"{article} {reason} address ({shown})"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


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

    if _is_ip_literal(host):
        work()
    else:
        worker = threading.Thread(target=work, name="fetch-resolve", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise AddressRefused(f"resolving the host {_short(host, 60)} took longer than {timeout_s:g} s")
    if "error" in outcome:
        raise AddressRefused(f"the host {_short(host, 60)} could not be resolved")
    return outcome["infos"]  # type: ignore[return-value]


# -- URLs and messages ----------------------------------------------------------------------------------------


def _short(text: str, limit: int = _MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _display(url: str) -> str:
    """A URL safe to show: no user info, no query string (presigned signatures), at most ~100 characters."""
    url = url.strip()
    if url[:5].lower() == "data:":
        media_type = url[5:].split(",", 1)[0].split(";", 1)[0][:40]
        return f"data:{media_type or 'text/plain'} URI ({len(url)} characters)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return _short(url.split("?", 1)[0], 60)
    if not parts.scheme or not parts.netloc:
        return _short(url.split("?", 1)[0], _MAX_SHOWN)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    shown = f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")
    return _short(shown)


@dataclass(frozen=True)
class HttpTarget:
    scheme: str
    host: str  # lower-case, IDNA-encoded, without brackets
    port: int
    request_path: str
    host_header: str


def _parse_http_url(url: str) -> HttpTarget:
    """Split an http(s) URL; ``ValueError`` with a client-facing reason if it is not one we can fetch."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"it is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"the scheme {scheme + ':' if scheme else '(none)'} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URLs with credentials (user:password@) are not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("the URL has no host")
    if not _is_ip_literal(host):
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("the URL's host name is not valid") from None
        if not all(c.isalnum() or c in "-._" for c in host):
            raise ValueError("the URL's host name is not valid")
    default_port = 443 if scheme == "https" else 80
    port = port or default_port
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    return HttpTarget(scheme, host, port, path, host_header)


# -- data: URIs -----------------------------------------------------------------------------------------------


def decode_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """Decode an RFC 2397 ``data:`` URI, refusing oversized payloads before decoding them."""
    header, sep, payload = uri.strip()[5:].partition(",")
    if not sep:
        raise InvalidDataURIError(f"{field} is a malformed data: URI (no comma before the data)", field=field)
    params = [p.strip().lower() for p in header.split(";")]
    too_large = InputTooLargeError(
        f"{field} is too large: the data: URI holds more than the limit of {_size(max_bytes)}", field=field
    )
    if params[-1] == "base64":
        if "%" in payload:  # some clients URL-encode the base64 text (%2B, %3D)
            payload = unquote_to_bytes(payload).decode("latin-1")
        if len(payload) > (max_bytes // 3 * 4 + 8) * 1.1:  # cheap bound before copying (allows line breaks)
            raise too_large
        compact = "".join(payload.split())  # no copy when there is no whitespace
        if len(compact) // 4 * 3 - 2 > max_bytes:
            raise too_large
        if len(compact) % 4 == 1:
            raise InvalidDataURIError(f"{field} is a malformed data: URI (invalid base64 length)", field=field)
        try:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidDataURIError(f"{field} is a malformed data: URI (invalid base64)", field=field) from None
    else:
        if len(payload) > 3 * max_bytes + 3:  # every byte takes 1 to 3 characters
            raise too_large
        try:
            data = unquote_to_bytes(payload)
        except ValueError:
            raise InvalidDataURIError(f"{field} is a malformed data: URI", field=field) from None
    if len(data) > max_bytes:
        raise too_large
    return data


def _size(n: int) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n} bytes"


# -- HTTP -----------------------------------------------------------------------------------------------------


class _Watchdog:
    """Shuts the socket down at the total deadline, so a blocked read returns whatever the server does."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.expired = False
        self._sock = sock
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # the fd itself, also under an SSLSocket

    def cancel(self) -> None:
        self._timer.cancel()


@dataclass
class _Hop:
    """Outcome of one request: a body, or where a redirect points."""

    body: bytes | None = None
    location: str | None = None


class _Fetcher:
    """One fetch of an http(s) URL: redirects, deadline and limits shared by all hops."""

    def __init__(self, field: str, limits: FetchLimits, guard: AddressGuard) -> None:
        self.field, self.limits, self.guard = field, limits, guard
        self.max_bytes = limits.max_bytes(field)
        self.deadline = time.monotonic() + limits.total_timeout_s

    def error(self, message: str, kind: type[FetchError] = FetchError) -> FetchError:
        return kind(f"{self.field} {message}", field=self.field)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timeout()
        return left

    def timeout(self) -> FetchTimeoutError:
        return self.error(f"could not be downloaded within {self.limits.total_timeout_s:g} s "
                          "(the server is too slow)", FetchTimeoutError)

    def run(self, url: str) -> bytes:
        current = url
        for _hop in range(self.limits.max_redirects + 1):
            try:
                target = _parse_http_url(current)
            except ValueError as exc:
                kind = UnsupportedURLError if "scheme" in str(exc) else FetchError
                where = "" if current is url else f" (redirected to {_display(current)})"
                raise self.error(f"cannot be fetched{where}: {exc}", kind) from None
            hop = self.request(target, "" if current is url else f" (redirected to {_display(current)})")
            if hop.body is not None:
                return hop.body
            current = urljoin(current, hop.location or "")
        raise self.error(f"was redirected more than {self.limits.max_redirects} times")

    def request(self, target: HttpTarget, where: str) -> _Hop:
        try:
            addresses = self.guard.resolve(target.host, target.port,
                                           min(self.limits.connect_timeout_s, self.remaining()))
        except AddressRefused as exc:
            raise self.error(f"cannot be fetched{where}: {exc}", BlockedAddressError) from None
        sock = self.connect(target, addresses)
        watchdog = _Watchdog(sock, self.deadline - time.monotonic())
        try:
            if target.scheme == "https":
                sock = self.wrap_tls(sock, target)
            hop = self.exchange(sock, target)
            if watchdog.expired:  # the socket was shut under a read that then looked like a normal EOF
                raise self.timeout()
            return hop
        except FetchError:
            if watchdog.expired:
                raise self.timeout() from None
            raise
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.expired or time.monotonic() >= self.deadline:
                raise self.timeout() from None
            if isinstance(exc, TimeoutError):
                raise self.error(f"could not be downloaded: {target.host_header} sent nothing for "
                                 f"{self.limits.read_timeout_s:g} s", FetchTimeoutError) from None
            reason = "the server sent an invalid HTTP response" if isinstance(exc, http.client.HTTPException) \
                else f"the connection failed ({type(exc).__name__})"
            raise self.error(f"could not be downloaded from {target.host_header}: {reason}") from None
        except ValueError:  # http.client refusing a request line or header it considers unsafe
            raise self.error("cannot be fetched: the URL is not valid") from None
        finally:
            watchdog.cancel()
            sock.close()

    def connect(self, target: HttpTarget, addresses: list[ResolvedAddress]) -> socket.socket:
        """Connect to the first reachable *checked* address (never to the name: no second resolution)."""
        try:
            return connect_checked(addresses, lambda: min(self.limits.connect_timeout_s, self.remaining()))
        except OSError as exc:
            failure = exc
        if time.monotonic() >= self.deadline:
            raise self.timeout()
        what = "timed out" if isinstance(failure, TimeoutError) else \
            "was refused" if isinstance(failure, ConnectionRefusedError) else "failed"
        raise self.error(f"could not be downloaded: connecting to {target.host_header} {what}")

    def wrap_tls(self, sock: socket.socket, target: HttpTarget) -> ssl.SSLSocket:
        context = ssl.create_default_context()
        try:
            return context.wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or "verification failed"
            raise self.error(f"could not be downloaded: the TLS certificate of {target.host_header} is not "
                             f"valid ({reason})") from None
        except ssl.SSLError:
            raise self.error(f"could not be downloaded: the TLS handshake with {target.host_header} "
                             "failed") from None

    def exchange(self, sock: socket.socket, target: HttpTarget) -> _Hop:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=self.limits.read_timeout_s)
        conn.sock = sock  # already connected to the checked address (and TLS-wrapped): no connect() by name
        try:
            sock.settimeout(min(self.limits.read_timeout_s, self.remaining()))
            conn.putrequest("GET", target.request_path, skip_host=True, skip_accept_encoding=True)
            for name, value in (("Host", target.host_header), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                                ("Accept-Encoding", "identity"), ("Connection", "close")):
                conn.putheader(name, value)
            conn.endheaders()
            response = conn.getresponse()
            try:
                return self.read_response(sock, target, response)
            finally:
                response.close()
        finally:
            conn.close()  # also releases the socket's makefile() reference, so the fd closes now

    def read_response(self, sock: socket.socket, target: HttpTarget, response: http.client.HTTPResponse) -> _Hop:
        if response.status in REDIRECT_STATUSES:
            location = response.getheader("location")
            if not location:
                raise self.error(f"could not be downloaded: HTTP {response.status} redirect without a Location")
            return _Hop(location=location.strip())
        if response.status != 200:
            reason = _short(response.reason or "", 40)
            raise self.error(f"could not be downloaded: {target.host_header} answered HTTP {response.status} "
                             f"{reason}".rstrip())
        return _Hop(body=self.read_body(sock, response))

    def read_body(self, sock: socket.socket, response: http.client.HTTPResponse) -> bytes:
        """Stream the body, stopping at ``max_bytes + 1`` whatever Content-Length says.

        A declared length above the limit is refused before reading. A declared length is also the message
        framing (HTTP/1.1), so a server claiming 10 bytes yields at most 10 bytes; without one we read to EOF.
        """
        declared = response.length
        if declared is not None and declared > self.max_bytes:
            raise self.error(f"is too large: the server declares {declared} bytes, more than the limit of "
                             f"{_size(self.max_bytes)}", InputTooLargeError)
        body = bytearray()
        while True:
            sock.settimeout(min(self.limits.read_timeout_s, self.remaining()))
            chunk = response.read1(min(_CHUNK, self.max_bytes + 1 - len(body)))
            if not chunk:
                break
            body += chunk
            if len(body) > self.max_bytes:
                raise self.error(f"is too large: more than the limit of {_size(self.max_bytes)}",
                                 InputTooLargeError)
        self.remaining()
        if declared is not None and response.length:
            raise self.error(f"could not be downloaded: the connection closed after {len(body)} of "
                             f"{declared} bytes")
        return bytes(body)


def connect_checked(addresses: list[ResolvedAddress], timeout_s: Callable[[], float]) -> socket.socket:
    """A TCP socket to the first reachable address of ``addresses`` (from :meth:`AddressGuard.resolve`).

    Connecting to the checked ``sockaddr`` itself, never to the name, is what pins DNS: a resolver answering
    differently a second time is never asked. Raises the last ``OSError``.
    """
    failure: OSError = OSError("no address to connect to")
    for address in addresses:
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        sock.settimeout(timeout_s())
        try:
            sock.connect(address.sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
    raise failure


class PinnedHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose ``connect()`` goes to addresses the guard already checked (TLS: SNI and
    certificate verification for the hostname). For webhooks: ``conn.request("POST", path, body, headers)``."""

    def __init__(self, target: HttpTarget, addresses: list[ResolvedAddress], timeout_s: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout_s)
        self.default_port = 443 if target.scheme == "https" else 80  # Host header without the default port
        self._target, self._addresses = target, addresses

    def connect(self) -> None:
        sock = connect_checked(self._addresses, lambda: float(self.timeout))  # type: ignore[arg-type]
        if self._target.scheme == "https":
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._target.host)
            except OSError:
                sock.close()
                raise
        self.sock = sock


def pinned_connection(url: str, guard: AddressGuard, timeout_s: float = 10.0) -> tuple[PinnedHTTPConnection, str]:
    """``(connection, request path)`` for an http(s) URL whose host the guard allows (``ValueError`` if not).

    The host is resolved and checked here, once; the connection later connects to those addresses only.
    """
    target = _parse_http_url(url)
    addresses = guard.resolve(target.host, target.port, timeout_s)
    return PinnedHTTPConnection(target, addresses, timeout_s), target.request_path


# -- entry point ----------------------------------------------------------------------------------------------


def fetch_input(
    url: str,
    field: InputField,
    limits: FetchLimits,
    guard: AddressGuard,
    read_s3: Callable[[str, str], bytes] | None = None,
    s3_buckets: Collection[str] = (),
) -> bytes:
    """The bytes behind ``url`` (http, https, data:, or s3:// in ``s3_buckets`` through ``read_s3``).

    ``read_s3(bucket, key)`` should return at most ``limits.max_bytes(field) + 1`` bytes (anything longer is
    refused here) and raise ``KeyError`` for a missing object. Raises ``FetchError`` subclasses naming ``field``.
    """
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise FetchError(f"{field} is empty", field=field)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    max_bytes = limits.max_bytes(field)
    if scheme == "data":
        data = decode_data_uri(text, field, max_bytes)
    elif scheme in ("http", "https"):
        data = _Fetcher(field, limits, guard).run(text)
    elif scheme == "s3":
        data = _read_s3(text, field, read_s3, s3_buckets)
    else:
        shown = f"the scheme {scheme}:" if scheme and "/" not in scheme else "a local path"
        raise UnsupportedURLError(
            f"{field} must be an http(s) URL, a data: URI or an uploaded file; {shown} is not allowed",
            field=field,
        )
    if len(data) > max_bytes:
        raise InputTooLargeError(f"{field} is too large: more than the limit of {_size(max_bytes)}", field=field)
    if not data:
        raise FetchError(f"{field} is empty (0 bytes)", field=field)
    return data


def _read_s3(url: str, field: str, read_s3: Callable[[str, str], bytes] | None,
             buckets: Collection[str]) -> bytes:
    parts = urlsplit(url)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if not bucket or not key:
        raise FetchError(f"{field} is not a valid s3://bucket/key URL", field=field)
    if read_s3 is None or bucket not in buckets:
        raise UnsupportedURLError(
            f"{field} cannot be read: the S3 bucket {_short(bucket, 63)!r} is not one this service may read",
            field=field,
        )
    try:
        return read_s3(bucket, key)
    except MediaError:
        raise
    except KeyError:
        raise FetchError(f"{field} does not exist: {_display(url)}", field=field) from None
    except Exception as exc:  # noqa: BLE001 - any storage failure is this input's failure
        raise FetchError(f"{field} could not be read from S3 ({type(exc).__name__})", field=field) from None
