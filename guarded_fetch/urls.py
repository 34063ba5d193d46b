"""Parsing http(s) URLs for the fetcher, and showing URLs in messages without their secrets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

MAX_SHOWN = 100
# Characters left alone when re-quoting a request path (RFC 3986 reserved + unreserved + '%').
_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def short(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def display_url(url: str) -> str:
    """A URL safe to show: no user info, no query string (presigned signatures), at most ~100 characters."""
    url = url.strip()
    if url[:5].lower() == "data:":
        media_type = url[5:].split(",", 1)[0].split(";", 1)[0][:40]
        return f"data:{media_type or 'text/plain'} URI ({len(url)} characters)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return short(url.split("?", 1)[0], 60)
    if not parts.scheme or not parts.netloc:
        return short(url.split("?", 1)[0], MAX_SHOWN)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    shown = f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")
    return short(shown)


@dataclass(frozen=True)
class HttpTarget:
    scheme: str
    host: str  # lower-case, IDNA-encoded, without brackets
    port: int
    request_path: str
    host_header: str


def parse_http_url(url: str) -> HttpTarget:
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
    if not is_ip_literal(host):
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
