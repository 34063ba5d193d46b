"""The pipeline's service settings (not part of the fal schema), importable without torch.

The Gateway validates the application's configuration with them, and a replica that never runs a model should
not pay for importing torch, diffusers and transformers (seconds of CPU and hundreds of MiB per process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.schema import AccelerationLevel

WindowPolicy = Literal["full", "upstream"]
WeightScheme = Literal["uniform", "log"]
OffloadKind = Literal["none", "model", "block"]
TextEncoderDevice = Literal["auto", "cpu"]

# The memory modes: ``full`` alone, or one offload mode and/or ``fp8_weights`` joined by '+'.
MEMORY_MODES: tuple[str, ...] = ("full", "model_offload", "block_offload", "fp8_weights")
OFFLOAD_MODES: dict[str, OffloadKind] = {"model_offload": "model", "block_offload": "block"}
# Peak GPU memory (GB = 1e9 bytes) of a 5 s 480x832 clip in one process, per mode: estimated by
# bench/memory_estimate.py (bench/results/memory_estimate.txt; docs/gpu.md), until the device kit measures them.
MEMORY_MODE_PEAKS_GB: dict[str, float] = {
    "full": 26.0, "fp8_weights": 19.7, "model_offload": 11.5, "model_offload+fp8_weights": 8.9,
    "block_offload": 8.3, "block_offload+fp8_weights": 8.3,
}

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

    model_config = ConfigDict(extra="forbid")

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


def parse_memory_mode(value: str | list[str] | tuple[str, ...]) -> str:
    """``'block_offload+fp8_weights'`` (or a list of names) -> the canonical mode string (offload first). Raises
    ``ValueError`` for an unknown name or a combination that cannot work."""
    parts = value.split("+") if isinstance(value, str) else list(value)
    names = [str(p).strip() for p in parts if str(p).strip()]
    unknown = [n for n in names if n not in MEMORY_MODES]
    if not names or unknown:
        raise ValueError(f"unknown memory mode {'+'.join(unknown) or value!r}; choose {', '.join(MEMORY_MODES)}, "
                         "or an offload mode plus fp8_weights (e.g. block_offload+fp8_weights)")
    if len(set(names)) != len(names):
        raise ValueError(f"memory mode {value!r} names a mode twice")
    if "full" in names and len(names) > 1:
        raise ValueError("memory mode 'full' (everything resident, no fp8) combines with nothing")
    offloads = [n for n in names if n in OFFLOAD_MODES]
    if len(offloads) > 1:
        raise ValueError("memory modes model_offload and block_offload exclude each other: choose one "
                         "(block_offload already offloads the other models whole)")
    return "+".join(sorted(names, key=MEMORY_MODES.index))


BLOCK_OFFLOAD_OPTIONS: tuple[str, ...] = ("blocks_per_group", "use_stream", "offload_dir")


class MemorySettings(BaseModel):
    """Where the models' weights live on a card too small for all of them (``pipeline.memory`` applies this).

    * ``full``: every model resident on the device (fastest; ``MEMORY_MODE_PEAKS_GB`` has each mode's peak).
    * ``model_offload``: models live in host memory; each is moved to the device while it works (T5/CLIP/wav2vec
      -> DiT -> VAE) and moved back after its stage.
    * ``block_offload``: the DiT's and T5's blocks stream from host memory one group at a time (diffusers' group
      offloading, CUDA streams where available); CLIP, wav2vec and the VAE are offloaded whole as above.
    * ``fp8_weights``: the DiT's and T5's weights are stored in float8 e4m3 and cast to the compute dtype layer by
      layer (diffusers' layerwise casting); alone or with an offload mode (``block_offload+fp8_weights``). Storage
      only: it needs no fp8 hardware, and changes the output slightly (weights rounded to 3 mantissa bits).
    """

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("full", description="full, model_offload, block_offload, fp8_weights, or an offload mode "
                                          "+fp8_weights")
    text_encoder_device: TextEncoderDevice = Field(
        "auto", description="'cpu': keep and run T5 on the CPU (saves its 11.4 GB of device memory; the prompt "
                            "cache makes a repeated prompt free); 'auto': the models' device")
    blocks_per_group: int = Field(1, ge=1, le=30, description="block_offload: transformer blocks moved together")
    use_stream: bool | None = Field(
        None, description="block_offload: prefetch the next block on a CUDA stream while one computes (None: on "
                          "CUDA devices; true on the CPU is an error)")
    offload_dir: Path | None = Field(
        None, description="block_offload: keep offloaded blocks in files under this folder instead of host memory "
                          "(hosts with little RAM; slower)")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> str:
        if not isinstance(value, (str, list, tuple)):
            raise ValueError(f"memory mode must be a string or a list of names, got {type(value).__name__}")
        return parse_memory_mode(value)

    @model_validator(mode="after")
    def _combination(self) -> MemorySettings:
        if self.offload != "block":  # by value, not by presence: a dumped and re-read settings object must pass
            given = {name for name in BLOCK_OFFLOAD_OPTIONS
                     if getattr(self, name) != type(self).model_fields[name].default}
            if given:
                raise ValueError(f"{', '.join(sorted(given))} only apply to block_offload (mode is {self.mode!r})")
        if self.use_stream and self.blocks_per_group != 1:
            raise ValueError("use_stream prefetches one block at a time: set blocks_per_group to 1")
        return self

    @property
    def offload(self) -> OffloadKind:
        return next((OFFLOAD_MODES[n] for n in self.mode.split("+") if n in OFFLOAD_MODES), "none")

    @property
    def fp8_weights(self) -> bool:
        return "fp8_weights" in self.mode.split("+")


class PipelineSettings(BaseModel):
    """Knobs that are not part of the fal schema (service configuration, not per request)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt knob (memory_mode:) must not fall back to a default

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
    memory: MemorySettings = Field(default_factory=MemorySettings)
    prompt_cache_bytes: int = Field(
        64 << 20, ge=0, description="Bytes of T5 prompt embeddings kept per process (LRU by prompt text; 0: off).")
    reference_cache_bytes: int = Field(
        256 << 20, ge=0, description="Bytes of reference-image conditioning (VAE latents and CLIP tokens) kept per "
        "process (LRU by the resized image's pixels; 0: off).")
