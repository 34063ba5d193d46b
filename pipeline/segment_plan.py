"""Segments of a video's latents, so that several Postprocessor replicas decode and encode one long video at once.

The Wan VAE decoder is causal with a finite reach: the frames of latent t depend on latents ``t - R .. t`` only
(R = 38 for the Wan2.1 decoder; :func:`pipeline.models.vae.decoder_reach` derives it from the architecture). A
segment that writes the frames of latents ``[start, end)`` therefore first decodes up to R latents before ``start``
only to fill the decoder's causal cache (its warm-up; their frames are thrown away), and then produces exactly the
frames the serial stream produces, bit for bit. docs/long-videos.md has the derivation, the costs and the stitching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.windows import TEMPORAL_COMPRESSION

# Shortest segment a plan makes, in latent frames. Every segment then has at least 5 frames, so x264 (B-frames,
# pyramid) gives each the same reordering delay and the joined stream's decode timestamps run on without a step back.
MIN_SEGMENT_LATENTS = 2


@dataclass(frozen=True)
class DecoderReach:
    """How far back each stage of the streaming decoder looks, in latent frames.

    The decoder is cut at its temporal upsamplers into stages running at 1, 2, 4 frames per latent. A warm-up runs
    stage ``k`` only for the last ``stage_latents[k]`` latents before the segment (non-increasing: the expensive
    full-resolution stages need the fewest). ``stage_cost[k]`` is stage ``k``'s share of decoding one latent (by
    multiply-adds), so a warm-up costs ``warm_up_cost`` latents' worth of decoding.
    """

    stage_latents: tuple[int, ...]
    stage_cost: tuple[float, ...]

    def __post_init__(self) -> None:
        latents, cost = self.stage_latents, self.stage_cost
        if not latents or len(latents) != len(cost):
            raise ValueError(f"one warm-up and one cost per stage, got {latents} and {cost}")
        if any(w < 1 for w in latents) or any(a < b for a, b in zip(latents, latents[1:], strict=False)):
            raise ValueError(f"stage warm-ups must be positive and non-increasing, got {latents}")
        if any(c < 0 for c in cost) or not math.isclose(sum(cost), 1.0, abs_tol=1e-6):
            raise ValueError(f"stage costs must be shares of one latent's decode (sum 1), got {cost}")

    @property
    def latents(self) -> int:
        """Latent frames a warm-up reads: the reach of the whole decoder."""
        return self.stage_latents[0]

    @property
    def warm_up_cost(self) -> float:
        """What a full warm-up costs, in latents' worth of decoding."""
        return sum(w * c for w, c in zip(self.stage_latents, self.stage_cost, strict=True))


def first_frame(latent: int) -> int:
    """Index of the first video frame latent ``latent`` decodes to (latent 0 gives frame 0, latent t>0 gives four)."""
    return 0 if latent == 0 else TEMPORAL_COMPRESSION * latent - (TEMPORAL_COMPRESSION - 1)


@dataclass(frozen=True)
class LatentSegment:
    """Writes video frames ``[frame_start, frame_end)``, the frames of latents ``[start, end)``, after decoding
    latents ``[warm_up_start, start)`` only to prime the decoder's causal cache."""

    index: int
    warm_up_start: int
    start: int
    end: int
    frame_start: int
    frame_end: int

    @property
    def warm_up(self) -> int:
        return self.start - self.warm_up_start

    @property
    def frames(self) -> int:
        return self.frame_end - self.frame_start

    @property
    def latents(self) -> slice:
        """The latent frames a segment's call needs (its warm-up and its own)."""
        return slice(self.warm_up_start, self.end)


def plan_segments(latent_frames: int, replicas: int, min_segment_latents: int, reach: DecoderReach,
                  output_frames: int | None = None) -> tuple[LatentSegment, ...]:
    """Cut ``latent_frames`` decoded latents into at most ``replicas`` segments of at least ``min_segment_latents``.

    The work is balanced, not the lengths: every segment but the first also decodes a warm-up, so the first is
    longer by ``reach.warm_up_cost`` latents. One segment (short videos, one replica) is the whole video with no
    warm-up: the serial path. ``output_frames`` (default: every decoded frame) trims the last latent's frames.
    """
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be at least 1, got {latent_frames}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if min_segment_latents < MIN_SEGMENT_LATENTS:
        raise ValueError(f"min_segment_latents must be at least {MIN_SEGMENT_LATENTS}, got {min_segment_latents}")
    decoded_frames = first_frame(latent_frames)
    if output_frames is None:
        output_frames = decoded_frames
    if not first_frame(latent_frames - 1) < output_frames <= decoded_frames:
        raise ValueError(f"{output_frames} output frames do not end in the last of {latent_frames} latent frames")
    cost = reach.warm_up_cost
    count = max(1, min(replicas, math.floor((latent_frames - cost) / min_segment_latents)))
    # Segment i > 0 costs its length plus a warm-up: the boundaries give each segment (T - cost) / n + cost of work.
    share = (latent_frames - cost) / count
    bounds = [0, *(math.floor(cost + i * share + 0.5) for i in range(1, count)), latent_frames]
    return tuple(
        LatentSegment(index=i, warm_up_start=max(0, start - reach.latents), start=start, end=end,
                      frame_start=first_frame(start), frame_end=min(first_frame(end), output_frames))
        for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False))
    )
