"""RFC 2397 ``data:`` URIs, decoded with the size limit checked before any copy."""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote_to_bytes

from guarded_fetch.errors import InputTooLargeError, InvalidDataURIError
from guarded_fetch.limits import human_size


def decode_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """Decode an RFC 2397 ``data:`` URI, refusing oversized payloads before decoding them."""
    header, sep, payload = uri.strip()[5:].partition(",")
    if not sep:
        raise InvalidDataURIError(f"{field} is a malformed data: URI (no comma before the data)", field=field)
    params = [p.strip().lower() for p in header.split(";")]
    too_large = InputTooLargeError(
        f"{field} is too large: the data: URI holds more than the limit of {human_size(max_bytes)}", field=field
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
