"""A request between the pipeline's stages: its resolved parameters (:class:`GenerationParams`) and what ``prepare``
hands to the window-steps and ``finish`` (:class:`PreparedRequest`). Apart from the models, so that the
Orchestrator, which only passes a prepared request on, loads no model library for it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.schema import AccelerationLevel, AspectRatio
from pipeline.windows import FPS, WindowPlan

if TYPE_CHECKING:
    from pipeline.denoise import RequestConditioning

LATENT_CHANNELS = 16
VAE_SPATIAL = 8
PATCH = 2


@dataclass
class GenerationParams:
    """One request's resolved parameters (the fal input minus the URLs)."""

    prompt: str
    aspect_ratio: AspectRatio = "auto"
    guidance_scale: float = 5.0
    audio_guidance_scale: float = 4.0
    num_inference_steps: int = 50
    seed: int | None = None
    acceleration: AccelerationLevel | None = None  # None: the pipeline settings' default


@dataclass
class PreparedRequest:
    """Output of ``prepare``: the conditioning for the window-steps plus what ``finish`` needs."""

    request_id: str
    seed: int
    width: int
    height: int
    plan: WindowPlan
    conditioning: RequestConditioning | None
    audio_bytes: bytes  # the original audio, muxed into the mp4
    audio_seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # human-readable progress lines from preprocessing
    input_bytes: int = 0  # bytes of image + audio as received
    acceleration: AccelerationLevel = "none"  # the request's step-cache level, resolved

    def without_conditioning(self) -> PreparedRequest:
        """A light copy for the decode stage, which needs the geometry and the audio but not the tensors."""
        return dataclasses.replace(self, conditioning=None, timings=dict(self.timings))

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return (1, LATENT_CHANNELS, self.plan.latent_frames, self.height // VAE_SPATIAL, self.width // VAE_SPATIAL)


def video_seconds(prepared: PreparedRequest) -> float:
    """The video's exact duration: its frames at :data:`FPS` (what the serial path cuts the audio to)."""
    return prepared.plan.output_frames / FPS
