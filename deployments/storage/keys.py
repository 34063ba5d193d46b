"""The object-key layout: every prefix the service writes under, in one place.

    uploads/<owner>/<random>/<name>             files uploaded through the storage routes (the caller's own)
    inputs/<owner>/<request_id>/<field>.<ext>   a job's ``data:`` inputs, stored at submit
    results/<request_id>/e<epoch>/output.mp4    a job's video: one folder per claim (epoch), so two runners of
                                                one job never overwrite each other's object
    checkpoints/<request_id>/e<epoch>/s<step>/latents.pt
                                                a job's latent checkpoint after <step> steps: one object per write,
                                                so a runner that lost its lease never overwrites (or deletes) the
                                                object the row names

Retention counts each kind by its first segment (:func:`object_kind`). ``owner`` is the API key's owner id; an
open server's owner ``""`` writes under ``public``.
"""

from __future__ import annotations

import uuid
from typing import Literal

ObjectKind = Literal["uploads", "inputs", "results", "checkpoints"]
OBJECT_KINDS: tuple[ObjectKind, ...] = ("uploads", "inputs", "results", "checkpoints")
# The embedded SQLite jobs database's file name in a local storage root (it lives beside the objects).
LOCAL_JOBS_DATABASE = "jobs.sqlite3"
OPEN_OWNER_SEGMENT = "public"


def owner_segment(owner: str) -> str:
    """The key segment of an owner (the open server's ``""`` is ``public``)."""
    return owner or OPEN_OWNER_SEGMENT


def uploads_prefix(owner_seg: str) -> str:
    """Where ``owner_seg``'s uploads live (a segment from :func:`owner_segment`); uploads are written only here."""
    return f"uploads/{owner_seg}/"


def upload_key(owner_seg: str, file_name: str) -> str:
    """A fresh key for an upload of ``owner_seg`` named ``file_name`` (one plain, already sanitised segment)."""
    return f"{uploads_prefix(owner_seg)}{uuid.uuid4().hex}/{file_name}"


def is_upload_key_of(key: str, owner_seg: str) -> bool:
    """Whether ``key`` is exactly one upload of ``owner_seg`` (``uploads/<owner>/<random>/<name>``)."""
    return key.startswith(uploads_prefix(owner_seg)) and key.count("/") == 3


def input_key(owner: str, request_id: str, name: str, ext: str) -> str:
    return f"inputs/{owner_segment(owner)}/{request_id}/{name}.{ext}"


def result_key(request_id: str, epoch: int) -> str:
    return f"results/{request_id}/e{epoch}/output.mp4"


def checkpoint_key(request_id: str, epoch: int, step: int) -> str:
    """The key of the checkpoint written under ``epoch`` after ``step`` steps (a key of its own per write)."""
    return f"checkpoints/{request_id}/e{epoch}/s{step}/latents.pt"


def result_request_id(key: str) -> str | None:
    """The request id of a result object key (``results/<id>/...``), else None."""
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "results" else None


def object_kind(key: str) -> ObjectKind | None:
    """The kind of a storage key, by its first segment (``results/...`` -> ``results``); None outside the layout."""
    head = key.split("/", 1)[0]
    return head if head in OBJECT_KINDS else None  # type: ignore[return-value]
