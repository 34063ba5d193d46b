"""Resolve an ``image_url``/``audio_url`` given to the CLI or the in-process pipeline into bytes.

Accepts local paths, ``file://``-less absolute/relative paths, ``http(s)://`` URLs and ``data:`` URIs. The hardened
fetcher of the service (SSRF guard, streaming limits) wraps this for untrusted input.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.media.errors import MediaError

DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0


def decode_data_uri(uri: str, field: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError("malformed data URI (no comma)", field=field)
    try:
        if header.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"malformed data URI ({exc})", field=field) from None


def read_source(ref: str | Path, field: str, max_bytes: int = DEFAULT_MAX_BYTES,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """Read a path, http(s) URL or data URI; errors are ``MediaError`` naming ``field``."""
    text = str(ref)
    if text.startswith("data:"):
        data = decode_data_uri(text, field)
    elif text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=timeout_s) as response:  # noqa: S310 (scheme checked above)
                data = response.read(max_bytes + 1)
        except OSError as exc:
            raise MediaError(f"could not download {text}: {exc}", field=field) from None
    elif "://" in text:
        raise MediaError(f"unsupported URL scheme in {text!r}", field=field)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise MediaError(f"file not found: {path}", field=field)
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise MediaError(f"larger than the limit of {max_bytes} bytes", field=field)
    if not data:
        raise MediaError("empty input", field=field)
    return data
