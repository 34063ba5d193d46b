"""Errors of the guarded fetcher: every one names the request field it concerns.

:class:`InputError` is the base of every "this input cannot be used" error in the project (the pipeline's media
errors subclass it), so the service maps all of them to one 4xx answer naming the field. ``str(error)`` is a
short sentence for the client; diagnostics that may hold paths or secrets go to ``error.detail`` (logs only).
"""

from __future__ import annotations


class InputError(ValueError):
    """A request input could not be used. ``field`` names the request field ("image_url"/"audio_url")."""

    field: str = "input"
    status_code: int = 422  # 413 too large, 415 unsupported type, 422 otherwise (subclasses override)
    error_type: str | None = None  # fal-style ``type`` of the detail entry

    def __init__(self, message: str, *, field: str | None = None, detail: str = ""):
        super().__init__(message)
        if field is not None:
            self.field = field
        self.message = message
        self.detail = detail


class FetchError(InputError):
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
