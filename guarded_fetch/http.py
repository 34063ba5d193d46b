"""HTTP(S) through the guard: one fetch with redirects, deadlines and a streaming size limit, and pinned
connections for the webhook sender.

Connect/idle/total timeouts (a watchdog shuts the socket at the total deadline, so a server dripping one byte
per second cannot hold a worker), bodies streamed with the size limit enforced while reading, no decompression
ever requested (``Accept-Encoding: identity``). TLS verifies the certificate for the hostname (SNI) and the
``Host`` header is the original one.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

from guarded_fetch.addresses import AddressGuard, ResolvedAddress
from guarded_fetch.errors import (
    AddressRefused,
    BlockedAddressError,
    FetchError,
    FetchTimeoutError,
    InputTooLargeError,
    UnsupportedURLError,
)
from guarded_fetch.limits import FetchLimits, human_size
from guarded_fetch.urls import HttpTarget, display_url, parse_http_url, short

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "stable-avatar-serve/0.1 (+input fetcher)"
_CHUNK = 256 * 1024


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


class HttpFetcher:
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
                target = parse_http_url(current)
            except ValueError as exc:
                kind = UnsupportedURLError if "scheme" in str(exc) else FetchError
                where = "" if current is url else f" (redirected to {display_url(current)})"
                raise self.error(f"cannot be fetched{where}: {exc}", kind) from None
            hop = self.request(target, "" if current is url else f" (redirected to {display_url(current)})")
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
            reason = short(response.reason or "", 40)
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
                             f"{human_size(self.max_bytes)}", InputTooLargeError)
        body = bytearray()
        while True:
            sock.settimeout(min(self.limits.read_timeout_s, self.remaining()))
            chunk = response.read1(min(_CHUNK, self.max_bytes + 1 - len(body)))
            if not chunk:
                break
            body += chunk
            if len(body) > self.max_bytes:
                raise self.error(f"is too large: more than the limit of {human_size(self.max_bytes)}",
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
    target = parse_http_url(url)
    addresses = guard.resolve(target.host, target.port, timeout_s)
    return PinnedHTTPConnection(target, addresses, timeout_s), target.request_path
