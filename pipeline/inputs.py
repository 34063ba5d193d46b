"""Resolve an ``image_url``/``audio_url`` given to the CLI or the in-process pipeline into bytes.

Accepts local paths (without ``file://``), ``http(s)://`` URLs and ``data:`` URIs. URLs and data URIs go through
the same hardened fetcher as the service (:func:`guarded_fetch.fetch_input`: streaming size limit, timeouts,
checked redirects), but with a permissive address guard: the CLI runs for the machine's owner, who may point it
at a local file or a private server on purpose. The service never calls this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from guarded_fetch import AddressGuard, FetchLimits, InputField, fetch_input
from pipeline.media.errors import MediaError

DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
_TOTAL_TIMEOUT_S = 600.0


def read_source(ref: str | Path, field: str, max_bytes: int = DEFAULT_MAX_BYTES,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """Read a path, http(s) URL or data URI; errors are ``InputError`` (``MediaError``, ``FetchError``) naming ``field``."""
    text = str(ref)
    if text[:5].lower() == "data:" or text.lower().startswith(("http://", "https://")):
        limits = FetchLimits(max_image_bytes=max_bytes, max_audio_bytes=max_bytes, connect_timeout_s=timeout_s,
                             read_timeout_s=timeout_s, total_timeout_s=max(_TOTAL_TIMEOUT_S, timeout_s))
        return fetch_input(text, cast(InputField, field), limits, AddressGuard.permissive())
    if "://" in text:
        raise MediaError(f"unsupported URL scheme in {text[:100]!r}", field=field)
    path = Path(text).expanduser()
    if not path.is_file():
        raise MediaError(f"file not found: {path}", field=field)
    if path.stat().st_size > max_bytes:
        raise MediaError(f"larger than the limit of {max_bytes} bytes", field=field)
    data = path.read_bytes()
    if not data:
        raise MediaError("empty input", field=field)
    return data
