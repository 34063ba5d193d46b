"""The guarded fetcher: untrusted URLs in, bounded bytes out (the bottom package: it imports nothing of ours).

Requests come from anyone who can reach the service, so a URL is hostile until proven otherwise:

* **Schemes**: ``http``, ``https``, ``data:`` (base64 or percent-encoded) and ``s3://bucket/key`` for buckets the
  operator listed. ``file:``, ``gopher:``, ``ftp:``, bare paths, ... are refused before any I/O.
* **Addresses (SSRF)**: :mod:`guarded_fetch.addresses` resolves the host once and refuses private, loopback,
  link-local, ... addresses; the socket then connects to the checked address itself.
* **Cost**: :mod:`guarded_fetch.http` bounds time (connect, idle, total) and size (streamed, enforced while
  reading).

Errors are :class:`InputError` subclasses naming the field, with an HTTP ``status_code`` hint (413 too large, 422
otherwise). Messages never echo secrets: URLs are shown without user info or query string and truncated; data
URIs are shown as their media type only. The type of the content is not taken from headers: the pipeline's media
validation sniffs the bytes. Used by the CLI's inputs (``pipeline.inputs``), the Gateway (``data:`` inputs,
webhook targets), the Preprocessor (input URLs) and the webhook sender.
"""

from guarded_fetch.addresses import AddressGuard, ResolvedAddress, blocked_reason, check_webhook_url
from guarded_fetch.data_uri import decode_data_uri
from guarded_fetch.errors import (
    AddressRefused,
    BlockedAddressError,
    FetchError,
    FetchTimeoutError,
    InputError,
    InputTooLargeError,
    InvalidDataURIError,
    UnsupportedURLError,
)
from guarded_fetch.fetch import fetch_input
from guarded_fetch.http import PinnedHTTPConnection, connect_checked, pinned_connection
from guarded_fetch.limits import MIB, FetchLimits, InputField

__all__ = [
    "MIB", "AddressGuard", "AddressRefused", "BlockedAddressError", "FetchError", "FetchLimits",
    "FetchTimeoutError", "InputError", "InputField", "InputTooLargeError", "InvalidDataURIError",
    "PinnedHTTPConnection", "ResolvedAddress", "UnsupportedURLError", "blocked_reason", "check_webhook_url",
    "connect_checked", "decode_data_uri", "fetch_input", "pinned_connection",
]
