"""What the deployments hand each other, typed: the one module both sides of every call import.

    Gateway --JobInput (row input)--> jobs database --> Orchestrator --> Preprocessor / Denoiser / Postprocessor
    Orchestrator --PostprocessResult<-- Postprocessor;  runner --StoredResult--> jobs database --> Gateway, webhooks

No Ray and no model library here: the Gateway imports it. Denoiser calls are routed by ``(request_id, key)``: a
unit's :class:`UnitKey` (its place in its step and its job's remaining work), or an ``int`` slot that names a
replica by rank (:func:`rank_slot`: freeing, stats); the Orchestrator computes them and the Denoisers' router and
queue read them. Postprocessor segments travel as :class:`SegmentVideo`.
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


@dataclass(frozen=True)
class SegmentVideo:
    """What a Postprocessor's ``finish_segment`` made: segment ``index``'s video-only H.264 mp4 of ``frames`` frames,
    as a uint8 numpy array (it stays in the object store, owned by the Orchestrator that called, and is read in
    place by ``stitch``; no numpy import here, the Gateway imports this module)."""

    index: int
    frames: int
    data: Any
    decode_encode_s: float
    replica: str = ""


# -- Denoiser routing: every Denoiser call starts with (request_id, key) -------------------------------------
OFFSET_RANGE = 1 << 16  # request offsets lie in [0, 65536): any replica count up to that sees them spread


@dataclass(frozen=True)
class UnitKey:
    """A unit's routing key: ``index`` of the ``units`` of its step places it (rendezvous hashing with a load cap,
    :mod:`deployments.workers.placement`); ``remaining`` (guidance rows its job still runs, this step's included)
    orders it on the replica, shortest remaining first, and tells the router which other jobs go before it;
    ``continues``: the job sends another step after this one, so the replica may hold itself briefly for the job's
    next unit (:mod:`deployments.workers.unit_queue`) and the router keeps counting the job as load;
    ``detour``: go that many replicas past the placed one in id order (a unit that overran its replica, which hangs
    but is still live, is sent to the next one)."""

    index: int
    units: int
    remaining: int = 0
    continues: bool = False
    detour: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.units:
            raise ValueError(f"unit {self.index} of a step of {self.units} units")
        if self.remaining < 0:
            raise ValueError(f"remaining work must not be negative, got {self.remaining}")
        if self.detour < 0:
            raise ValueError(f"a detour must not be negative, got {self.detour}")


def request_offset(request_id: str) -> int:
    """The request's rank offset: a hash that is the same in every process (Python's ``hash`` is salted)."""
    return zlib.crc32(request_id.encode()) % OFFSET_RANGE


def rank_slot(request_id: str, rank: int) -> int:
    """The ``int`` slot that reaches the replica of rank ``offset(request) + rank`` (mod the live count) among the
    live ones sorted by id: ``max_replicas`` consecutive ranks reach every replica of any set of up to that many."""
    return request_offset(request_id) + rank
