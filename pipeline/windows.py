"""Sliding windows over the latent time axis, and the overlap fusion between them (reference §3.3, §3.6).

Two window policies:

* ``full`` (default): every window is a full 21-latent-frame window with a time-aligned 81-frame audio slice. The
  audio is padded with silence so that the last window is full too, and the extra latent frames are dropped before
  decoding. This uses the same number of windows (and the same compute: upstream pads its short last window to a
  full token sequence anyway) but never squeezes the last window's audio into 21 slots, and it handles short audio
  (under 85 frames, where upstream produces zeros or loops forever) with one full, padded window.
* ``upstream``: the original loop, bit for bit: the last window starts on the regular stride and is shorter, its
  audio runs to the end of the clip. Needs at least 22 latent frames (85 video frames), like upstream does in practice.

The fusion is the same left fold for both: at step 0 later windows overwrite the overlap, at later steps overlap
frame j of a window blends ``w_j·new + (1−w_j)·previous window``; every window result is rounded through bf16 on
write, as upstream does unconditionally.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.media.rates import FPS, SAMPLE_RATE
from pipeline.settings import WeightScheme, WindowPolicy

WINDOW_LATENT_FRAMES = 21  # 81 video frames: the length StableAvatar was trained on
TEMPORAL_COMPRESSION = 4
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640


@dataclass(frozen=True)
class Window:
    """One window: latent frames ``[start, end)`` and the audio samples ``[audio_start, audio_end)`` it hears."""

    index: int
    start: int
    end: int
    previous_end: int  # end of the window before it (the fusion reads pred_latents[previous_end - overlap:])
    audio_start: int
    audio_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WindowPlan:
    """Everything the loop and the decoder need to know about one request's geometry."""

    policy: WindowPolicy
    overlap: int
    latent_frames: int  # T of the latent that is denoised
    decoded_latent_frames: int  # leading latent frames that are decoded
    output_frames: int  # video frames written (decoded frames are trimmed to this)
    padded_audio_samples: int  # audio length after silence padding (>= the real length)
    audio_window_frames: int
    windows: tuple[Window, ...]

    @property
    def num_windows(self) -> int:
        return len(self.windows)


def _check_overlap(overlap: int) -> None:
    if not 2 <= overlap <= WINDOW_LATENT_FRAMES - 1:
        raise ValueError(f"overlap must be between 2 and {WINDOW_LATENT_FRAMES - 1} latent frames, got {overlap}")


def latent_frames_for(video_frames: int) -> int:
    """Fewest latent frames whose decode covers ``video_frames`` (the causal VAE gives 4·(T−1)+1 frames)."""
    return math.ceil((max(video_frames, 1) - 1) / TEMPORAL_COMPRESSION) + 1


def plan_windows(
    num_audio_samples: int,
    overlap: int,
    policy: WindowPolicy = "full",
    audio_window_frames: int = 81,
) -> WindowPlan:
    """Lay out the windows for an audio clip of ``num_audio_samples`` at 16 kHz."""
    _check_overlap(overlap)
    if num_audio_samples <= 0:
        raise ValueError("audio is empty")
    stride = WINDOW_LATENT_FRAMES - overlap
    step_samples = TEMPORAL_COMPRESSION * SAMPLES_PER_FRAME  # 2560 audio samples per latent frame
    slice_samples = audio_window_frames * SAMPLES_PER_FRAME
    if policy == "upstream":
        video_frames = num_audio_samples // SAMPLES_PER_FRAME
        latent_frames = (video_frames - 1) // TEMPORAL_COMPRESSION + 1
        if latent_frames <= WINDOW_LATENT_FRAMES:
            raise ValueError(
                f"the upstream window policy needs more than {WINDOW_LATENT_FRAMES} latent frames "
                f"(audio of at least 85 frames, 3.4 s); got {latent_frames}"
            )
        windows, start, previous_end = [], 0, WINDOW_LATENT_FRAMES
        while True:
            end = min(start + WINDOW_LATENT_FRAMES, latent_frames)
            last = end == latent_frames
            audio_end = num_audio_samples if last else start * step_samples + slice_samples
            windows.append(Window(len(windows), start, end, previous_end, start * step_samples, audio_end))
            if last:
                break
            previous_end, start = end, start + stride
        return WindowPlan(
            policy, overlap, latent_frames, latent_frames, 4 * (latent_frames - 1) + 1,
            num_audio_samples, audio_window_frames, tuple(windows),
        )
    if policy != "full":
        raise ValueError(f"unknown window policy {policy!r}")
    output_frames = max(1, round(num_audio_samples / SAMPLES_PER_FRAME))
    decoded = latent_frames_for(output_frames)
    extra = max(0, decoded - WINDOW_LATENT_FRAMES)
    latent_frames = WINDOW_LATENT_FRAMES + stride * math.ceil(extra / stride)
    windows = []
    for index, start in enumerate(range(0, latent_frames - WINDOW_LATENT_FRAMES + 1, stride)):
        previous_end = WINDOW_LATENT_FRAMES if index == 0 else windows[-1].end
        audio_start = start * step_samples
        windows.append(Window(index, start, start + WINDOW_LATENT_FRAMES, previous_end, audio_start,
                              audio_start + slice_samples))
    padded = max(num_audio_samples, windows[-1].audio_end)
    return WindowPlan(policy, overlap, latent_frames, decoded, output_frames, padded, audio_window_frames,
                      tuple(windows))


def fusion_weights(overlap: int, scheme: WeightScheme, dtype: torch.dtype) -> torch.Tensor:
    """Blend weights of the new window over the overlap: 0 at its first frame, 1 at its last."""
    if scheme == "uniform":
        weights = [j / (overlap - 1) for j in range(overlap)]
        return torch.tensor(weights, dtype=dtype)
    if scheme == "log":
        raw = torch.log1p(torch.linspace(0, 1, overlap) * (math.e - 1))
        return ((raw - raw.min()) / (raw.max() - raw.min())).to(dtype)
    raise ValueError(f"unknown overlap weight scheme {scheme!r}")


def fuse_step(
    previous: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    windows: Sequence[Window],
    step: int,
    overlap: int,
    scheme: WeightScheme = "uniform",
) -> torch.Tensor:
    """Combine the step's window outputs into the next latent (left fold in window order, as upstream).

    previous: [1, 16, T, h, w] state after the last step (only its shape and dtype are used: windows cover T).
    outputs[k]: [1, 16, L_k, h, w] window k's post-Euler latent.
    """
    fused = torch.zeros_like(previous)
    weights = fusion_weights(overlap, scheme, previous.dtype)
    for window, output in zip(windows, outputs, strict=True):
        _fold_window(fused, output, window, step, overlap, weights)
    return fused


def _fold_window(fused: torch.Tensor, output: torch.Tensor, window: Window, step: int, overlap: int,
                 weights: torch.Tensor) -> None:
    """One term of the left fold: blend the window's output with ``fused`` over the overlap, write its frames."""
    out = output.to(fused.dtype).clone()
    if window.start != 0 and step != 0:
        base = window.previous_end - overlap
        for j in range(overlap):
            out[:, :, j] = weights[j] * out[:, :, j] + (1 - weights[j]) * fused[:, :, base + j]
    fused[:, :, window.start:window.end] = out.to(torch.bfloat16).to(fused.dtype)


class StreamingFusion:
    """``fuse_step``'s left fold, done as window outputs arrive in any order: window k is folded into the new
    buffer as soon as windows 0..k-1 are, so only outputs that arrived ahead of their turn are held.

    The arithmetic is ``fuse_step``'s, term by term and in the same order, so the result is bit-identical. It
    never writes into ``previous`` (only its shape and dtype are used): the caller's units still read their slices
    of it (split guidance rows combine against it, the step cache keeps it as the anchor of skipped steps, a
    retried unit resends its slice).
    """

    def __init__(self, previous: torch.Tensor, windows: Sequence[Window], step: int, overlap: int,
                 scheme: WeightScheme = "uniform"):
        self.windows, self.step, self.overlap = list(windows), step, overlap
        self.fused = torch.zeros_like(previous)
        self.weights = fusion_weights(overlap, scheme, previous.dtype)
        self.pending: dict[int, torch.Tensor] = {}
        self.folded = 0
        self.most_held = 0  # the most outputs held at once, waiting for their turn (memory accounting)

    def add(self, k: int, output: torch.Tensor) -> None:
        """Window ``k``'s output; folds every window whose turn has come."""
        if k < self.folded or k in self.pending or not 0 <= k < len(self.windows):
            raise ValueError(f"window {k}'s output arrived twice (or is not a window of this step)")
        self.pending[k] = output
        self.most_held = max(self.most_held, len(self.pending))
        while self.folded in self.pending:
            k = self.folded
            _fold_window(self.fused, self.pending.pop(k), self.windows[k], self.step, self.overlap, self.weights)
            self.folded += 1

    def result(self) -> torch.Tensor:
        """The fused state; every window's output must have arrived."""
        if self.folded != len(self.windows):
            missing = [k for k in range(self.folded, len(self.windows)) if k not in self.pending]
            raise RuntimeError(f"step {self.step} is missing the outputs of windows {missing}")
        return self.fused
