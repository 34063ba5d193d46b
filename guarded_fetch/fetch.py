"""The entry point: the bytes behind an ``image_url``/``audio_url`` (http, https, data:, allow-listed s3://)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from urllib.parse import urlsplit

from guarded_fetch.addresses import AddressGuard
from guarded_fetch.data_uri import decode_data_uri
from guarded_fetch.errors import FetchError, InputError, InputTooLargeError, UnsupportedURLError
from guarded_fetch.http import HttpFetcher
from guarded_fetch.limits import FetchLimits, InputField, human_size
from guarded_fetch.urls import display_url, short


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
        data = HttpFetcher(field, limits, guard).run(text)
    elif scheme == "s3":
        data = _read_s3(text, field, read_s3, s3_buckets)
    else:
        shown = f"the scheme {scheme}:" if scheme and "/" not in scheme else "a local path"
        raise UnsupportedURLError(
            f"{field} must be an http(s) URL, a data: URI or an uploaded file; {shown} is not allowed",
            field=field,
        )
    if len(data) > max_bytes:
        raise InputTooLargeError(f"{field} is too large: more than the limit of {human_size(max_bytes)}", field=field)
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
            f"{field} cannot be read: the S3 bucket {short(bucket, 63)!r} is not one this service may read",
            field=field,
        )
    try:
        return read_s3(bucket, key)
    except InputError:
        raise
    except KeyError:
        raise FetchError(f"{field} does not exist: {display_url(url)}", field=field) from None
    except Exception as exc:  # noqa: BLE001 - any storage failure is this input's failure
        raise FetchError(f"{field} could not be read from S3 ({type(exc).__name__})", field=field) from None
