"""The public schema of ``fal-ai/stable-avatar``: same field names, defaults and output shape as the hosted API.

``perturbation`` is accepted and validated but has no effect: the public StableAvatar code never reads it
(reference §6), so honouring it would mean inventing behaviour the model was not trained for.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

APP_ID = "fal-ai/stable-avatar"  # the hosted endpoint whose schema this mirrors; the default app id
AspectRatio = Literal["16:9", "1:1", "9:16", "auto"]
AccelerationLevel = Literal["none", "regular", "high"]  # as fal's other endpoints name their speed-ups

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
RANDOM_SEED_LIMIT = 2**32  # seeds the server picks lie in [0, 2**32), as fal's do


class StableAvatarInput(BaseModel):
    """Request body of ``fal-ai/stable-avatar``."""

    model_config = ConfigDict(extra="ignore")

    image_url: str = Field(
        ..., min_length=1, max_length=50_000_000,
        description="URL (http/https/data/s3 or an uploaded file) of the reference portrait image.",
    )
    audio_url: str = Field(
        ..., min_length=1, max_length=300_000_000,
        description="URL (http/https/data/s3 or an uploaded file) of the speech audio that drives the video.",
    )
    prompt: str = Field(
        ..., min_length=1, max_length=MAX_PROMPT_CHARS,
        description="Text prompt, e.g. '[first frame]-[behaviour]-[background]'.",
    )
    aspect_ratio: AspectRatio = Field(
        "auto",
        description="Output aspect: 16:9 (832x480), 9:16 (480x832), 1:1 (512x512) or auto (nearest to the image).",
    )
    guidance_scale: float = Field(5.0, ge=0.0, le=20.0, description="Text guidance scale.")
    audio_guidance_scale: float = Field(4.0, ge=0.0, le=20.0, description="Audio guidance scale.")
    num_inference_steps: int = Field(50, ge=1, le=100, description="Number of denoising steps.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; random when omitted.")
    acceleration: AccelerationLevel | None = Field(
        None,
        description="Step cache (TeaCache rule): 'none' computes every step (output as without it), 'regular' and "
        "'high' reuse a step's residual while the input barely changes (faster, slightly different video). "
        "Omitted: the service's default level ('none' unless configured).",
    )
    perturbation: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Accepted for compatibility; has no effect (the public StableAvatar code never reads it).",
    )


class File(BaseModel):
    """A generated file, as fal returns it."""

    url: str
    content_type: str = "video/mp4"
    file_name: str
    file_size: int


class StableAvatarOutput(BaseModel):
    """Response body of ``fal-ai/stable-avatar``: the video plus the seed actually used."""

    video: File
    seed: int


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or one the server picks (then the output reports it, as fal's does)."""
    return random.SystemRandom().randrange(RANDOM_SEED_LIMIT) if seed is None else int(seed)
