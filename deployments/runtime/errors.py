"""Map exceptions (raised here or inside another deployment) to fal-style HTTP error bodies."""

from __future__ import annotations

from typing import Any

from guarded_fetch import InputError


def root_cause(exc: BaseException) -> BaseException:
    """Unwrap Ray's ``RayTaskError`` (which carries the remote exception as ``cause``)."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 8:
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc


def validation_detail(field: str, message: str, kind: str = "value_error") -> list[dict[str, Any]]:
    """fal's (FastAPI's) 422 ``detail`` list format."""
    return [{"loc": ["body", field], "msg": message, "type": kind}]


# The statuses an InputError may ask for with its ``status_code`` hint.
_MEDIA_STATUSES = frozenset({413, 415, 422})


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for an exception; client errors are 4xx with the field named, the rest 500.

    Media and fetch errors carry a ``status_code`` hint (413 too large, 415 unsupported type, 422 otherwise)
    and an ``error_type`` for the detail's ``type`` (fal's names: ``file_too_large``, ``image_too_small``, ...);
    any other status falls back to 422, so a bad hint can never turn a client error into a 2xx or 5xx.
    """
    cause = root_cause(exc)
    if isinstance(cause, InputError):
        status = cause.status_code if cause.status_code in _MEDIA_STATUSES else 422
        kind = cause.error_type or "value_error"
        return status, {"detail": validation_detail(cause.field, str(cause), kind)}
    return 500, {"detail": f"internal error ({type(cause).__name__}); see the server logs"}
