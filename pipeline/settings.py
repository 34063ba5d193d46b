"""The pipeline's service settings (not part of the fal schema), importable without torch.

The Gateway validates the application's configuration with them, and a replica that never runs a model should
not pay for importing torch, diffusers and transformers (seconds of CPU and hundreds of MiB per process).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pipeline.schema import AccelerationLevel

WindowPolicy = Literal["full", "upstream"]
WeightScheme = Literal["uniform", "log"]

# Wan's default negative prompt, hard-coded by StableAvatar's inference.py and fal's fork.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"  # noqa: RUF001
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"  # noqa: RUF001
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"  # noqa: RUF001
)

# TeaCache4Wan2.1 (use_ret_steps, 1.3B): rescale polynomial of the e0 relative L1 distance, highest power first
# (sources: ``pipeline.step_cache``).
WAN21_1P3B_E0_COEFFICIENTS: tuple[float, ...] = (
    -5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02,
)


class StepCacheSettings(BaseModel):
    """Thresholds of the acceleration levels and the runner's memory bound (service configuration)."""

    regular_threshold: float = Field(0.05, ge=0, le=1, description="TeaCache threshold of 'regular' (0: no skip).")
    high_threshold: float = Field(0.10, ge=0, le=1, description="TeaCache threshold of 'high' (0: no skip).")
    always_compute_first: int = Field(5, ge=1, le=100, description="Leading steps that are always computed.")
    coefficients: tuple[float, ...] = Field(
        WAN21_1P3B_E0_COEFFICIENTS, min_length=1, description="Rescale polynomial, highest power first.")
    guard_fitted_range: bool = Field(
        True, description="Compute a step whose e0 distance is past the polynomial's first local maximum.")
    max_entries: int = Field(256, ge=1, description="Residuals kept per runner (LRU beyond).")
    max_bytes: int = Field(8 << 30, ge=1, description="Bytes of residuals kept per runner (LRU beyond).")

    def threshold(self, level: AccelerationLevel) -> float:
        if level == "regular":
            return self.regular_threshold
        if level == "high":
            return self.high_threshold
        raise ValueError(f"acceleration level {level!r} has no step cache threshold")


class PipelineSettings(BaseModel):
    """Knobs that are not part of the fal schema (service configuration, not per request)."""

    overlap: int = Field(10, ge=2, le=20, description="Latent frames shared by neighbouring windows (fal: 10).")
    window_policy: WindowPolicy = Field("full", description="'full' (default) or 'upstream' (bit parity).")
    audio_window_frames: int = Field(
        81, ge=81, le=84, description="Video frames of audio per window: 81 as trained; 84 is upstream HEAD.",
    )
    weight_scheme: WeightScheme = "uniform"
    negative_prompt: str = NEGATIVE_PROMPT
    decode_chunk_latents: int = Field(4, ge=1, le=64, description="Latent frames per streaming VAE decode chunk.")
    split_guidance_rows: bool = Field(
        False, description="Run the three guidance rows of a window-step as separate units (3·K units per step).")
    acceleration: AccelerationLevel = Field(
        "none", description="Step-cache level of requests that do not choose one: none, regular, high.")
    step_cache: StepCacheSettings = Field(default_factory=StepCacheSettings)
    compile: bool = Field(False, description="torch.compile the DiT's repeated blocks.")
