"""What a job row holds as its input: references only.

At submit (queue or sync) the Gateway turns the fal input into a :class:`JobInput`: ``data:`` URIs are decoded
once and written to storage under the job's own key (``inputs/<owner>/<request_id>/image.png``), links to files
in our own storage are resolved to their keys after checking the caller may use them (its own uploads, its own
results), and every other URL stays a URL (fetched later, through the SSRF guard). The Preprocessor reads the keys
in ``stored`` directly; it never turns a client's URL into a storage key itself, so a client cannot name another
tenant's objects.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.contracts import JobInput
from deployments.storage import Storage, keys
from guarded_fetch import FetchLimits, InputField, decode_data_uri
from pipeline.media.errors import MediaError
from pipeline.schema import StableAvatarInput

INPUT_FIELDS: tuple[InputField, ...] = ("image_url", "audio_url")
MAX_URL_CHARS = 16 * 1024  # a URL kept in the row (data: URIs are stored instead)
_NAMES = {"image_url": "image", "audio_url": "audio"}
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/jpg": "jpg", "image/webp": "webp",
               "image/gif": "gif", "image/bmp": "bmp", "audio/wav": "wav", "audio/x-wav": "wav",
               "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mp4": "m4a",
               "audio/x-m4a": "m4a", "audio/aac": "aac", "audio/ogg": "ogg", "audio/flac": "flac",
               "audio/webm": "webm", "video/mp4": "mp4"}


class InputNotUsable(MediaError):
    """A link to our storage that this key may not use (another key's upload, a job it does not own)."""

    error_type = "file_not_found"


def input_key(owner: str, request_id: str, field: InputField, media_type: str) -> str:
    ext = _EXTENSIONS.get(media_type) or (mimetypes.guess_extension(media_type) or ".bin").lstrip(".")
    return keys.input_key(owner, request_id, _NAMES[field], ext)


def _media_type(data_uri: str) -> str:
    header = data_uri.strip()[5:].partition(",")[0]
    media_type = header.split(";")[0].strip().lower()
    return media_type if media_type.count("/") == 1 and len(media_type) <= 100 else "application/octet-stream"


async def build_job_input(request: StableAvatarInput, owner: str, request_id: str, storage: Storage,
                          limits: FetchLimits, run: Callable[..., Awaitable[Any]],
                          owns_job: Callable[[str], Awaitable[bool]]) -> tuple[JobInput, list[str]]:
    """The row input and the keys written for it (``input_keys``: retention deletes them; so must the caller if
    the row is never created). ``run(fn, *args)`` runs blocking work off the event loop; ``owns_job(id)`` says
    whether the caller owns that job. Raises ``InputError`` naming the field (422/413)."""
    body, stored, written = request.model_dump(), {}, []
    try:
        for field in INPUT_FIELDS:
            url = str(body[field]).strip()
            if url[:5].lower() == "data:":
                media_type = _media_type(url)
                data = await run(decode_data_uri, url, field, limits.max_bytes(field))
                if not data:
                    raise MediaError(f"{field} is empty (0 bytes)", field=field)
                key = input_key(owner, request_id, field, media_type)
                await run(storage.put_bytes, key, data, media_type)
                written.append(key)
                stored[field] = key
                body[field] = f"data:{media_type} ({len(data)} bytes, stored with the job)"
                continue
            key = await run(storage.key_for_url, url)
            if key is not None:
                if not await _may_use(key, owner, owns_job):
                    raise InputNotUsable("the file this URL names was not found (or belongs to another API key)",
                                         field=field)
                stored[field] = key
            elif len(url) > MAX_URL_CHARS:
                raise MediaError(f"{field} is a URL of {len(url)} characters (limit {MAX_URL_CHARS}); upload the "
                                 "file or send a data: URI", field=field)
    except BaseException:
        for key in written:
            await run(storage.delete, key)
        raise
    return JobInput(request=body, stored=stored), written


async def _may_use(key: str, owner: str, owns_job: Callable[[str], Awaitable[bool]]) -> bool:
    if key.startswith(keys.uploads_prefix(keys.owner_segment(owner))):
        return True
    result_of = keys.result_request_id(key)
    return result_of is not None and await owns_job(result_of)
