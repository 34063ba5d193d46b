"""Long videos in segments: decode + encode on this machine and on Postprocessor replicas through Serve (issue 20).

Four parts (``--parts``; all by default):

* ``decode`` ((b) of the issue): the real decoder in one process, segments against the serial path. Per case, the
  serial path (``StableAvatarPipeline.finish``) and the segment plans for several Postprocessor replica counts, run
  here one segment after another: the audio track (``encode_audio_track``, which the Orchestrator runs while the
  segments decode), each segment's decode + encode (``finish_segment``) and the stitch (``stitch_segments``), each
  warm-up on its own against its model (``DecoderReach.warm_up_cost``, in latents'
  worth of serial decoding), the largest difference of any pixel between the segments' frames and the serial frames
  (uint8 levels), and the stitched file's frame count and durations against the serial file's. Cases:

  - ``tiny``: the tiny preset's Wan VAE (the real decoder's layout, base_dim 4, random weights) at 48x80, 60 s
    (quick: 20 s on 4 segments, the only case);
  - ``simulated-realsize``: the benchmarks' stand-in VAE (bench/simulated.py) at 480x832, 30 s: real frame sizes
    through ffmpeg, near-free decoding;
  - ``wan-real-widths`` (full run only): the real Wan2.1 VAE's widths (random weights) at small sizes (the reach is
    temporal, the frame size only sets the cost): the reach measured by perturbing one latent (8x8 pixels), one
    segment past the reach after the full warm-up and after shorter ones against the serial stream (16x16), and the
    full warm-up's cost against its model (32x32).

* ``replicas`` ((a)): decode + encode of a 60 s and a 600 s video on 1, 2, 4 and 8 Postprocessor replicas through
  real Serve, with the ``simulated-decoder`` preset (``bench/simulated.py``: a VAE decoder that sleeps
  ``SIMULATED_FRAME_S`` per frame, as a decoder on its own GPU would take that long, at 64x64 so x264 costs
  little): the Orchestrator's own finish stage (``SegmentedFinish.finish``) run from a caller replica, latents put
  once, segments on the replicas, stitched and uploaded. ``efficiency_vs_ideal`` = (frames x frame time / n) / wall.
* ``post_cpu`` (what (a) cannot show on a shared box): the CPU seconds of the Serve parts' work without the
  simulated decoder's sleep, in one process: each segment of a video cut for 8 replicas (decode at 64x64 + x264),
  the audio track's AAC encode (the Orchestrator's, beside the segments), the stitch (stream copies), beside the
  serial path; and from them the efficiency 8 replicas would reach with a core each and nothing else running
  (``estimate_8``: ideal / (the longer of the slowest segment's frames x frame time + its CPU and the audio track's
  CPU, + the stitch's CPU); ``estimate_8_audio_in_stitch``: the same parts with the AAC encode after the segments,
  in the stitch, as a stitch that encodes the audio itself would have it).
* ``end_to_end`` ((c)): a 60 s video through the whole service (Gateway to result, the ``simulated-decoder-dit``
  preset, 4 Denoisers), once with one Postprocessor (the serial post path) and once with 8 (segmented), same run.

    python bench/bench_segments.py           # -> bench/results/segments.{json,txt}
    python bench/bench_segments.py --quick   # under 10 minutes; the last line is JSON with
                                             # post_efficiency_vs_ideal_8 and max_pixel_diff

In the ``decode`` part, the "parallel estimate" is the longer of the slowest segment and the audio track, plus the stitch:
what n replicas would take with nothing else competing. Everything runs on a shared 2-core box, so timings are noisy (each row records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench.simulated  # noqa: E402  (registers the simulated-realsize preset)
from bench import segments_serve  # noqa: E402
from bench.simulated import SIMULATED_FRAME_S  # noqa: E402
from bench.stats import load_average  # noqa: E402
from pipeline.generator import PreparedRequest, StableAvatarPipeline, stitch_segments, video_seconds  # noqa: E402
from pipeline.loading import load_models  # noqa: E402
from pipeline.media.audio_track import encode_audio_track  # noqa: E402
from pipeline.media.stitch import read_video_packets  # noqa: E402
from pipeline.media.video import probe_media  # noqa: E402
from pipeline.models.vae import StreamingVaeDecoder, decoder_reach  # noqa: E402
from pipeline.presets import get_preset, register_preset  # noqa: E402
from pipeline.segment_plan import DecoderReach, LatentSegment, first_frame, plan_segments  # noqa: E402
from pipeline.windows import SAMPLE_RATE, plan_windows  # noqa: E402
from testing.media import synthetic_speech  # noqa: E402

NOISE_NOTE = ("segments run one after another in one process on a shared 2-core CPU box; timings are noisy (load "
              "average recorded per row); the parallel estimate assumes n idle replicas")


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    width: int
    height: int
    seconds: float
    replicas: tuple[int, ...]
    min_segment_latents: int
    threads: int  # torch threads: the tiny presets pin 1; the real widths use both cores


def request(case: Case, workdir: Path) -> PreparedRequest:
    audio = synthetic_speech(workdir / f"{case.name}.wav", case.seconds)
    plan = plan_windows(round(case.seconds * SAMPLE_RATE), overlap=10)
    return PreparedRequest(request_id=case.name, seed=0, width=case.width, height=case.height, plan=plan,
                           conditioning=None, audio_bytes=audio.read_bytes(), audio_seconds=case.seconds)


def whole(prepared: PreparedRequest, reach: DecoderReach) -> LatentSegment:
    plan = prepared.plan
    (segment,) = plan_segments(plan.decoded_latent_frames, 1, 2, reach, plan.output_frames)
    return segment


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ffmpeg): the work done, whatever else ran."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def timed_cpu(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``, its wall time and its CPU time (this process and the children it waited for)."""
    cpu = cpu_seconds()
    value, wall = timed(fn)
    return value, wall, cpu_seconds() - cpu


def audio_track(prepared: PreparedRequest, workdir: Path) -> tuple[Path, float]:
    """The request's audio track, as the Orchestrator encodes it while the segments decode, and its CPU seconds."""
    source = workdir / f"{prepared.request_id}-audio"
    source.write_bytes(prepared.audio_bytes)
    track, _, cpu = timed_cpu(lambda: encode_audio_track(source, video_seconds(prepared),
                                                         workdir / f"{prepared.request_id}-audio.m4a"))
    return track, cpu


def durations(path: Path) -> dict[str, float]:
    info = probe_media(path)
    return {"format": float(info["format"]["duration"]),
            **{s["codec_type"]: float(s["duration"]) for s in info["streams"]}}


def decode_case(case: Case, workdir: Path) -> list[dict]:
    """The serial path, then the audio track and each replica count's segments one after another, then the
    stitch."""
    pipeline = StableAvatarPipeline(load_models(get_preset(case.preset), ["vae"]))
    torch.set_num_threads(case.threads)
    prepared = request(case, workdir)
    plan = prepared.plan
    latents = torch.randn(prepared.latent_shape, generator=torch.Generator().manual_seed(0))
    reach = pipeline.decoder_reach
    serial_frames = np.lib.format.open_memmap(workdir / f"{case.name}-serial.npy", mode="w+", dtype=np.uint8,
                                              shape=(plan.output_frames, case.height, case.width, 3))

    def decode_serial() -> None:
        at = 0
        for pixels in pipeline.segment_frames(whole(prepared, reach), latents):
            serial_frames[at:at + len(pixels)] = pixels
            at += len(pixels)

    _, serial_decode_s, serial_decode_cpu = timed_cpu(decode_serial)
    serial, serial_s, serial_cpu = timed_cpu(
        lambda: pipeline.finish(prepared, latents, workdir / f"{case.name}-serial.mp4"))
    serial_durations = durations(serial.path)
    latent_decode_cpu = serial_decode_cpu / plan.decoded_latent_frames
    track, track_cpu = audio_track(prepared, workdir)
    rows = []
    for replicas in case.replicas:
        segments = pipeline.plan_segments(prepared, replicas, case.min_segment_latents)
        files, segment_s, segment_cpu, warm_up_cpu, max_diff = [], [], [], [], 0
        for segment in segments:
            path = workdir / f"{case.name}-{replicas}-{segment.index}.mp4"
            result, wall, cpu = timed_cpu(lambda s=segment, p=path: pipeline.finish_segment(
                s, latents, case.width, case.height, p))
            files.append(result.path)
            segment_s.append(wall)
            segment_cpu.append(cpu)
            if segment.warm_up:
                decoder = StreamingVaeDecoder(pipeline.models.vae)
                before = latents[:, :, segment.warm_up_start:segment.start]
                warm_up_cpu.append(timed_cpu(lambda d=decoder, b=before: d.warm_up(b))[2])
                decoder.close()
            at = segment.frame_start
            for pixels in pipeline.segment_frames(segment, latents):
                diff = np.abs(pixels.astype(np.int16) - serial_frames[at:at + len(pixels)].astype(np.int16))
                max_diff = max(max_diff, int(diff.max()))
                at += len(pixels)
        out = workdir / f"{case.name}-{replicas}-stitched.mp4"
        stitched, stitch_s, stitch_cpu = timed_cpu(
            lambda s=segments, f=files, o=out: stitch_segments(prepared, s, f, track, o))
        frames = len(read_video_packets(stitched.path).packets)
        stitched_durations = durations(stitched.path)
        longest = max(*segment_cpu, track_cpu)  # the audio track is encoded beside the segments
        warm_up_mean = sum(warm_up_cpu) / len(warm_up_cpu) if warm_up_cpu else 0.0
        rows.append({
            "case": case.name, "preset": case.preset, "size": f"{case.width}x{case.height}",
            "video_s": case.seconds, "latents": plan.decoded_latent_frames, "replicas": replicas,
            "segments": len(segments), "lengths": [s.end - s.start for s in segments],
            "warm_ups": [s.warm_up for s in segments],
            "serial_s": round(serial_s, 2), "serial_cpu_s": round(serial_cpu, 2),
            "serial_decode_cpu_s": round(serial_decode_cpu, 2),
            "segment_s": [round(s, 2) for s in segment_s], "segment_cpu_s": [round(s, 2) for s in segment_cpu],
            "segments_cpu_s": round(sum(segment_cpu), 2), "audio_track_cpu_s": round(track_cpu, 2),
            "stitch_s": round(stitch_s, 2),
            "stitch_cpu_s": round(stitch_cpu, 2), "overhead": round(sum(segment_cpu) / serial_cpu - 1, 3),
            "parallel_estimate_cpu_s": round(longest + stitch_cpu, 2),
            "speedup_estimate": round(serial_cpu / (longest + stitch_cpu), 2),
            "warm_up_cpu_s": round(warm_up_mean, 3),
            "warm_up_latents_measured": round(warm_up_mean / latent_decode_cpu, 2) if warm_up_cpu else None,
            "warm_up_latents_model": round(reach.warm_up_cost, 2),
            "max_pixel_diff": max_diff, "frames": frames, "serial_frames": serial.frames,
            "file_size": stitched.file_size, "serial_file_size": serial.file_size,
            "durations": stitched_durations, "serial_durations": serial_durations,
            "same_frames_and_duration": frames == serial.frames and stitched_durations == serial_durations,
            "load_average": load_average(),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def perturbation_profile(vae: torch.nn.Module, latents: int = 44, perturbed: int = 2) -> list[float]:
    """Max |d| of each latent's frames (from ``perturbed`` on) when latent ``perturbed`` changes by +1 (at 1x1
    latent: the reach is temporal); the reach is the last latent with a nonzero entry, less ``perturbed``."""
    base = torch.randn(1, 16, latents, 1, 1, generator=torch.Generator().manual_seed(1))
    bumped = base.clone()
    bumped[:, :, perturbed] += 1.0

    def frames(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(StreamingVaeDecoder(vae).decode(x, clamp=False)), dim=2)

    diff = (frames(bumped) - frames(base)).abs().amax(dim=(0, 1, 3, 4))  # per frame
    return [float(diff[first_frame(t):first_frame(t + 1)].max()) for t in range(perturbed, latents)]


def shorter_warm_ups(reach: DecoderReach) -> list[tuple[int, ...]]:
    """Warm-ups cut below the reach: all stages capped at w, then one stage at a time (the last stage costs most)."""
    cuts = {tuple(min(w, s) for s in reach.stage_latents) for w in (8, 16, 24, 32, 36, reach.latents - 1)}
    for stage, full in enumerate(reach.stage_latents[1:], start=1):
        for w in range(max(1, full - 3), full):
            cuts.add(tuple(w if k == stage else s for k, s in enumerate(reach.stage_latents)))
    return sorted(cuts, key=lambda c: (c[0], c[1:]))


def warm_up_drift(vae: torch.nn.Module, height: int, width: int, start: int = 44, length: int = 4) -> list[dict]:
    """One segment of ``length`` latents at ``start`` after :func:`shorter_warm_ups` and the full one, against the
    serial stream: the largest float and uint8 differences of its frames, and the warm-up's modelled cost."""
    from pipeline.models.vae import frames_to_uint8

    reach = decoder_reach(vae)
    latents = torch.randn(1, 16, start + length, height // 8, width // 8, generator=torch.Generator().manual_seed(2))
    want = torch.cat(list(StreamingVaeDecoder(vae).decode(latents)), dim=2)[:, :, first_frame(start):]
    rows = []
    for stages in [*shorter_warm_ups(reach), reach.stage_latents]:
        cut = DecoderReach(stages, reach.stage_cost)
        decoder = StreamingVaeDecoder(vae)
        decoder.warm_up(latents[:, :, :start], cut)
        got = decoder.feed(latents[:, :, start:])
        levels = np.abs(frames_to_uint8(got).astype(np.int16) - frames_to_uint8(want).astype(np.int16)).max()
        rows.append({"stage_latents": list(cut.stage_latents), "max_abs_diff": float((got - want).abs().max()),
                     "max_pixel_diff": int(levels), "warm_up_latents_model": round(cut.warm_up_cost, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def warm_up_timing(vae: torch.nn.Module, height: int, width: int, repeats: int = 3) -> dict:
    """A full warm-up's CPU time in latents' worth of serial decoding: the best of ``repeats`` warm-ups against
    the median latent of a serial stream (the least disturbed figures on a shared machine)."""
    reach = decoder_reach(vae)
    latents = torch.randn(1, 16, reach.latents, height // 8, width // 8, generator=torch.Generator().manual_seed(3))
    decoder = StreamingVaeDecoder(vae)
    decoder.reset()
    decoder.feed(latents[:, :, :1])  # latent 0 is the stream's special start
    per_latent = sorted(timed_cpu(lambda t=t: decoder.feed(latents[:, :, t:t + 1]))[2] for t in range(1, 12))
    latent_cpu = per_latent[len(per_latent) // 2]
    warm_cpu = min(timed_cpu(lambda: StreamingVaeDecoder(vae).warm_up(latents[:, :, :reach.latents]))[2]
                   for _ in range(repeats))
    return {"size": f"{width}x{height}", "latent_cpu_s": round(latent_cpu, 3), "warm_up_cpu_s": round(warm_cpu, 3),
            "warm_up_latents_measured": round(warm_cpu / latent_cpu, 2),
            "warm_up_latents_model": round(reach.warm_up_cost, 2)}


def real_widths_part() -> dict:
    """The real Wan2.1 VAE architecture (random weights) at small sizes."""
    torch.set_num_threads(os.cpu_count() or 1)
    vae = load_models(get_preset("stableavatar-1.3b-random"), ["vae"]).vae
    reach = decoder_reach(vae)
    profile, reach_s = timed(lambda: perturbation_profile(vae))
    measured = max(d for d, v in enumerate(profile) if v > 0)
    drift = warm_up_drift(vae, 16, 16)
    timing = warm_up_timing(vae, 32, 32)
    return {"stage_latents": list(reach.stage_latents), "stage_cost": [round(c, 4) for c in reach.stage_cost],
            "warm_up_latents_model": round(reach.warm_up_cost, 2), "perturbation_reach": measured,
            "perturbation_max_abs_diff": [float(f"{v:.3g}") for v in profile], "perturbation_s": round(reach_s, 1),
            "drift": drift, "warm_up_timing": timing, "load_average": load_average()}


def decode_part(quick: bool, workdir: Path) -> tuple[dict, dict]:
    cases = [Case("tiny", "tiny", 48, 80, 20.0, (4,), 16, 1)] if quick else [  # quick: the pixel check only
        Case("tiny", "tiny", 48, 80, 60.0, (2, 4, 8), 16, 1),
        Case("simulated-realsize", "simulated-realsize", 480, 832, 30.0, (2, 4, 8), 16, 1),
    ]
    rows = [row for case in cases for row in decode_case(case, workdir)]
    tiny_profile = perturbation_profile(load_models(get_preset("tiny"), ["vae"]).vae)
    result: dict[str, Any] = {
        "rows": rows, "tiny_perturbation_max_abs_diff": [float(f"{v:.3g}") for v in tiny_profile],
        "tiny_perturbation_reach": max(d for d, v in enumerate(tiny_profile) if v > 0)}
    if not quick:
        result["wan_real_widths"] = real_widths_part()
    summary = {"max_pixel_diff": max(r["max_pixel_diff"] for r in rows),
               "stitched_like_serial": all(r["same_frames_and_duration"] for r in rows)}
    return result, summary


def post_cpu_row(pipeline: StableAvatarPipeline, seconds: float, workdir: Path) -> dict:
    """One video length cut for 8 replicas: each segment's CPU, the audio track's, the stitch's, the serial path's."""
    prepared = segments_serve.prepared_request(seconds, workdir)
    latents = torch.randn(prepared.latent_shape, generator=torch.Generator().manual_seed(0))
    segments = pipeline.plan_segments(prepared, 8, segments_serve.MIN_SEGMENT_LATENTS)
    track, track_cpu = audio_track(prepared, workdir)
    files, segment_cpu = [], []
    for segment in segments:
        path = workdir / f"cpu-{seconds:g}-{segment.index}.mp4"
        result, _, cpu = timed_cpu(lambda s=segment, p=path: pipeline.finish_segment(
            s, latents, segments_serve.SIZE, segments_serve.SIZE, p))
        files.append(result.path)
        segment_cpu.append(cpu)
    stitch_cpu = timed_cpu(lambda: stitch_segments(prepared, segments, files, track, workdir / "cpu-out.mp4"))[2]
    serial_cpu = timed_cpu(lambda: pipeline.finish(prepared, latents, workdir / "cpu-serial.mp4"))[2]
    frames = prepared.plan.output_frames
    ideal = frames * SIMULATED_FRAME_S / 8
    paths = [(s.frame_end - s.frame_start + 4 * s.warm_up) * SIMULATED_FRAME_S + c
             for s, c in zip(segments, segment_cpu, strict=True)]  # decoded frames (warm-up included) + CPU
    critical = max(*paths, track_cpu) + stitch_cpu  # the audio track is encoded while the segments decode
    audio_in_stitch = max(paths) + track_cpu + stitch_cpu  # the same parts, the AAC encode after the segments
    return {"video_s": seconds, "frames": frames, "segments": len(segments),
            "segment_cpu_s": [round(c, 2) for c in segment_cpu], "audio_track_cpu_s": round(track_cpu, 2),
            "stitch_cpu_s": round(stitch_cpu, 2), "serial_cpu_s": round(serial_cpu, 2), "ideal_8_s": round(ideal, 2),
            "critical_path_8_s": round(critical, 2), "estimate_8": round(ideal / critical, 3),
            "critical_path_8_audio_in_stitch_s": round(audio_in_stitch, 2),
            "estimate_8_audio_in_stitch": round(ideal / audio_in_stitch, 3), "load_average": load_average()}


def post_cpu_part(quick: bool, workdir: Path) -> tuple[dict, dict]:
    """The Serve parts' CPU work at 64x64 for 60 s and 600 s cut for 8 replicas, the decoder's sleep left out."""
    name = "simulated-decoder-nosleep"
    register_preset(bench.simulated.simulated_decoder_preset(frame_s=0.0, name=name))
    pipeline = StableAvatarPipeline(load_models(get_preset(name), ["vae"]))
    torch.set_num_threads(1)
    rows = []
    for seconds in (60.0, 600.0):
        rows.append(post_cpu_row(pipeline, seconds, workdir))
        print(json.dumps(rows[-1]), flush=True)
    return ({"rows": rows, "frame_s": SIMULATED_FRAME_S},
            {"post_efficiency_estimate_8_idle": rows[-1]["estimate_8"]})


PARTS: dict[str, Callable[..., tuple[dict, dict]]] = {
    "decode": decode_part, "replicas": segments_serve.replicas_part, "end_to_end": segments_serve.end_to_end_part,
    "post_cpu": post_cpu_part}
SERVE_PARTS = ("end_to_end", "replicas")  # run in one Ray cluster (segments_serve.serve_cluster)


def text_report(results: dict, meta: dict) -> str:
    lines = [f"segmented decode + encode vs serial ({meta['label']}; load average {meta['load_average_start']} at "
             f"the start, {meta['load_average_end']} at the end)"]
    if "decode" in results:
        lines += decode_report_lines(results, meta)
    lines += segments_serve.report_lines(results)
    if "post_cpu" in results:
        lines += post_cpu_report_lines(results["post_cpu"])
    return "\n".join(lines) + "\n"


def post_cpu_report_lines(post: dict) -> list[str]:
    lines = ["", f"CPU work of (a) without the decoder's sleep (64x64, cut for 8 replicas, one process); estimate at 8 = "
                 f"ideal / (the longer of the slowest segment's decoded frames x {post['frame_s']} s + its CPU and the "
                 "audio track's CPU, + the stitch's CPU), as with a core per replica and one for the Orchestrator and "
                 "nothing else running; \"audio in the stitch\": the same parts with the AAC encode after the "
                 "segments",
             "video s | segments | CPU s per segment | audio track CPU s | stitch CPU s | serial CPU s | ideal 8 s | "
             "critical path 8 s | estimate at 8 | audio in the stitch: critical path, estimate | load"]
    for r in post["rows"]:
        lines.append(f"{r['video_s']:>7g} | {r['segments']:>8} | {min(r['segment_cpu_s']):.2f}-{max(r['segment_cpu_s']):.2f}"
                     f"{'':>8} | {r['audio_track_cpu_s']:>17.2f} | {r['stitch_cpu_s']:>12.2f} | "
                     f"{r['serial_cpu_s']:>12.2f} | {r['ideal_8_s']:>9.2f} | {r['critical_path_8_s']:>17.2f} | "
                     f"{r['estimate_8']:>13.3f} | {r['critical_path_8_audio_in_stitch_s']:>34.2f}, "
                     f"{r['estimate_8_audio_in_stitch']:.3f} | {r['load_average'][0]}")
    return lines


def decode_report_lines(results: dict, meta: dict) -> list[str]:
    lines = ["", "(b) the real decoder, one segment after another in one process", meta["note"],
             "CPU s: this process and its ffmpeg children (the work, whatever else ran); speedup est.: serial CPU "
             "/ (the longer of the slowest segment and the audio track's encode, + stitch), as if each segment had its "
             "own idle replica and the Orchestrator a core; overhead: all segments' "
             "CPU against the serial path's", ""]
    lines.append("case               | size    | video s | latents | replicas | lengths (warm-ups)                 "
                 "     | serial CPU s (wall) | segments CPU s | slowest | stitch | speedup est. | overhead | "
                 "warm-up latents measured (model) | max pixel diff | frames | same frames+durations | size vs "
                 "serial | load")
    for r in results["decode"]["rows"]:
        cuts = " ".join(f"{n}({w})" for n, w in zip(r["lengths"], r["warm_ups"], strict=True))
        measured = "-" if r["warm_up_latents_measured"] is None else f"{r['warm_up_latents_measured']:.1f}"
        lines.append(
            f"{r['case']:<18} | {r['size']:<7} | {r['video_s']:>7g} | {r['latents']:>7} | {r['replicas']:>8} | "
            f"{cuts:<40} | {r['serial_cpu_s']:>10.1f} ({r['serial_s']:>6.1f}) | {r['segments_cpu_s']:>14.1f} | "
            f"{max(r['segment_cpu_s']):>7.1f} | {r['stitch_cpu_s']:>6.2f} | {r['speedup_estimate']:>12.2f} | "
            f"{r['overhead']:>+8.1%} | {measured:>25} ({r['warm_up_latents_model']:.1f}) | "
            f"{r['max_pixel_diff']:>14} | {r['frames']:>6} | {str(r['same_frames_and_duration']):>21} | "
            f"{r['file_size'] / r['serial_file_size'] - 1:>+14.2%} | {r['load_average'][0]}")
    profile = results["decode"]["tiny_perturbation_max_abs_diff"]
    lines += ["", f"tiny widths: perturbing one latent by +1 changes the frames of the next "
                  f"{results['decode']['tiny_perturbation_reach']} latents; max |d| of each latent's frames (8x8 "
                  "pixels), by distance: " + " ".join(f"{d}:{v:.2g}" for d, v in enumerate(profile))]
    real = results["decode"].get("wan_real_widths")
    if real:
        lines += ["", f"real Wan2.1 VAE widths (random weights): stage warm-ups {real['stage_latents']} "
                      f"latents, stage shares of a latent's decode {real['stage_cost']} (multiply-adds), full "
                      f"warm-up = {real['warm_up_latents_model']} latents' decode; perturbing one latent changes "
                      f"the frames of the next {real['perturbation_reach']} latents (load {real['load_average']})",
                  "max |d| of the frames of each latent after a latent perturbed by +1 (8x8 pixels), by distance: "
                  + " ".join(f"{d}:{v:.2g}" for d, v in enumerate(real["perturbation_max_abs_diff"])),
                  "a 4-latent segment at latent 44 (16x16 pixels) after shorter warm-ups and the full one, against "
                  "the serial stream:",
                  "warm-up latents (per stage)     | max |d| float | max pixel diff (uint8) | cost model (latents)"]
        for d in real["drift"]:
            lines.append(f"{str(d['stage_latents']):<31} | {d['max_abs_diff']:>13.3g} | {d['max_pixel_diff']:>22} | "
                         f"{d['warm_up_latents_model']:>20.1f}")
        t = real["warm_up_timing"]
        lines.append(f"full warm-up at {t['size']}: {t['warm_up_cpu_s']} CPU s (best of 3) against {t['latent_cpu_s']} "
                     f"CPU s per serially decoded latent (median): {t['warm_up_latents_measured']} latents' worth "
                     f"(model {t['warm_up_latents_model']})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 10 minutes: a 20 s tiny case for the pixel "
                        "check, no real-width part, 60 s on 1 and 8 and 600 s on 8 Postprocessors, the end-to-end "
                        "pair, the CPU work of 60 s and 600 s (post_cpu: the same in a full run)")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.txt (default: "
                        "bench/results/segments for a full run of every part; a quick or partial run writes nothing "
                        "unless given)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    meta = {"label": args.label or f"commit {commit}", "commit": commit, "quick": args.quick, "note": NOISE_NOTE,
            "cpus": os.cpu_count(), "machine": platform.machine(), "load_average_start": load_average()}
    results, summary = {}, {}
    local = [name for name in args.parts if name not in SERVE_PARTS]
    served = [name for name in args.parts if name in SERVE_PARTS]
    with tempfile.TemporaryDirectory(prefix="bench-segments-") as tmp:
        for name in local:
            results[name], part_summary = PARTS[name](args.quick, Path(tmp))
            summary.update(part_summary)
        if served:
            with segments_serve.serve_cluster() as cluster:
                for name in served:
                    results[name], part_summary = PARTS[name](args.quick, Path(tmp), cluster=cluster)
                    summary.update(part_summary)
    meta["load_average_end"] = load_average()
    report = text_report(results, meta)
    every_part = sorted(args.parts) == sorted(PARTS)
    out = args.out or (ROOT / "bench" / "results" / "segments" if every_part and not args.quick else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, **results}, indent=1)
                                            + "\n")
        out.with_suffix(".txt").write_text(report)
    print(report)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
