"""What the deployments hand each other, typed: the one module both sides of every call import.

    Gateway --JobInput (row input)--> jobs database --> Orchestrator --> Preprocessor / Denoiser / Postprocessor
    Orchestrator --PostprocessResult<-- Postprocessor;  runner --StoredResult--> jobs database --> Gateway, webhooks

No Ray and no model library here: the Gateway imports it. Denoiser calls are routed by ``(request_id, slot)``
(:func:`unit_slot`), which the Orchestrator computes and the Denoisers' router reads.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, Field

from guarded_fetch import InputField
from pipeline.schema import StableAvatarInput


class JobCancelled(Exception):
    """The job's cancellation was requested (seen at a heartbeat or a step report); a sync caller gets fal's
    cancelled answer."""


class JobInput(BaseModel):
    """A job row's ``input``: the fal input (``data:`` URIs replaced by a short note) and the storage keys that
    stand for some of its fields (the job's own stored inputs, the caller's uploads, its earlier results)."""

    request: dict[str, Any]
    stored: dict[InputField, str] = Field(default_factory=dict)

    def model(self) -> StableAvatarInput:
        return StableAvatarInput.model_validate(self.request)


class LinkMaker(Protocol):
    def url(self, key: str, expires_s: int | None = None, filename: str | None = None) -> str: ...


class StoredVideo(BaseModel):
    """The result video as a row keeps it: a storage key, never a URL (links are made when read)."""

    key: str
    content_type: str = "video/mp4"
    file_name: str = "output.mp4"
    file_size: int


class StoredResult(BaseModel):
    """A job's result as its row keeps it (the fal output with the video as a storage key)."""

    video: StoredVideo
    seed: int

    def public(self, storage: LinkMaker, expires_s: int | None = None) -> dict[str, Any]:
        """The fal output (``{"video": File, "seed"}``) with a fresh link to the video, valid ``expires_s``
        (default: the storage's ``url_expiry_s``)."""
        video = self.video.model_dump(exclude={"key"})
        video["url"] = storage.url(self.video.key, expires_s=expires_s, filename=self.video.file_name)
        return {"video": video, "seed": self.seed}


@dataclass(frozen=True)
class PostprocessResult:
    """What the Postprocessor's ``finish`` wrote: the video under ``key`` (``file_size`` bytes, ``frames``)."""

    key: str
    file_size: int
    frames: int
    encode_s: float


# -- Denoiser routing: every Denoiser call starts with (request_id, slot) -----------------------------------
OFFSET_RANGE = 1 << 16  # request offsets lie in [0, 65536): any replica count up to that sees them spread


def request_offset(request_id: str) -> int:
    """The request's placement offset: a hash that is the same in every process (Python's ``hash`` is salted)."""
    return zlib.crc32(request_id.encode()) % OFFSET_RANGE


def unit_slot(request_id: str, index: int) -> int:
    """The slot of unit ``index`` of a step (its position in the step's list of units)."""
    return request_offset(request_id) + index
