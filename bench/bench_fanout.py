"""Fan-out efficiency of the Ray executor, and the Ray path's per-window-step overhead.

1. One job of 24 windows x 10 steps through Denoiser replicas of the ``simulated`` preset (each window-step sleeps
   0.2 s and returns a deterministic tensor) on 1, 2, 4 and 8 replicas with fake GPUs. Prints wall time of the
   denoising loop and efficiency ``T1 / (N * TN)`` (target >= 0.85 at 8 replicas). The latents of every run must
   be identical to the 1-replica run.
2. The tiny preset: median milliseconds of one window-step in process vs through one Denoiser replica.

    python bench/bench_fanout.py [--json bench/results/fanout.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from bench.simulated import SIMULATED_STEP_S  # noqa: E402
from deployments.config import AppArgs  # noqa: E402
from deployments.denoiser import Denoiser  # noqa: E402
from deployments.ray_executor import RayDenoiserExecutor  # noqa: E402
from pipeline.denoise import WindowDenoiser, WindowStep, denoise  # noqa: E402
from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline  # noqa: E402
from pipeline.loading import load_models  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402
from tests.helpers import EXAMPLE_IMAGE, synthetic_speech  # noqa: E402

WINDOWS, STEPS = 24, 10


def prepare(preset: str, tmp: Path, windows: int, steps: int):
    """Conditioning for an audio clip that gives exactly ``windows`` windows at overlap 10."""
    settings = PipelineSettings()
    stride = 21 - settings.overlap
    latent_frames = 21 + stride * (windows - 1)
    seconds = (4 * (latent_frames - 1) + 1) / 25
    audio = synthetic_speech(tmp / f"{preset}.wav", seconds)
    pipeline = StableAvatarPipeline(load_models(get_preset(preset), ["vae", "text_encoder", "image_encoder",
                                                                    "audio_encoder"]), settings)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="bench", num_inference_steps=steps,
                                                                       seed=1))
    assert prepared.plan.num_windows == windows, prepared.plan.num_windows
    return pipeline, prepared


def deploy_denoisers(preset: str, replicas: int, max_ongoing: int = 1):
    args = AppArgs.model_validate({"preset": preset, "preset_modules": ["bench.simulated"], "device": "cpu", "denoiser": {
        "num_replicas": replicas, "num_gpus": 1, "max_ongoing_requests": max_ongoing}})
    return serve.run(Denoiser.options(**args.denoiser.serve_options()).bind(args), name=f"bench-{preset}",
                     route_prefix=None)


async def ray_denoise(handle, pipeline, prepared) -> tuple[float, torch.Tensor]:
    executor = RayDenoiserExecutor(handle, ray.put(prepared.conditioning), prepared.request_id, retries=0)
    started = time.perf_counter()
    latents = await denoise(prepared.plan, pipeline.initial_latents(prepared), prepared.conditioning.num_steps,
                            executor)
    return time.perf_counter() - started, latents


def fanout(tmp: Path, max_ongoing_values: tuple[int, ...], replica_counts: tuple[int, ...]) -> list[dict]:
    """``max_ongoing_requests`` 1 makes a waiting window-step poll the router with backoff (up to 0.5 s) until a
    replica frees up; 2 lets each replica hold the next window-step (it waits on the replica's GPU lock)."""
    pipeline, prepared = prepare("simulated", tmp, WINDOWS, STEPS)
    rows, reference = [], None
    ideal_t1 = WINDOWS * STEPS * SIMULATED_STEP_S
    for max_ongoing in max_ongoing_values:
        t1 = None
        for replicas in replica_counts:
            handle = deploy_denoisers("simulated", replicas, max_ongoing)
            wall, latents = asyncio.run(ray_denoise(handle, pipeline, prepared))
            serve.delete("bench-simulated")
            reference = latents if reference is None else reference
            t1 = wall if t1 is None else t1
            rows.append({"max_ongoing_requests": max_ongoing, "replicas": replicas, "wall_s": round(wall, 2),
                         "efficiency": round(t1 / (replicas * wall), 3),
                         "vs_ideal": round(ideal_t1 / (replicas * wall), 3),
                         "identical": bool(torch.equal(reference, latents))})
            print(rows[-1], flush=True)
    return rows


def overhead(tmp: Path, samples: int = 40) -> dict:
    pipeline, prepared = prepare("tiny", tmp, 2, 1)
    cond = prepared.conditioning
    denoiser = WindowDenoiser(load_models(get_preset("tiny"), ["transformer"]).transformer)
    latents = pipeline.initial_latents(prepared)
    work = [WindowStep(w.index, 0, latents[:, :, w.start:w.end]) for w in prepared.plan.windows]
    local = []
    for i in range(samples):
        started = time.perf_counter()
        denoiser(cond, work[i % len(work)])
        local.append(time.perf_counter() - started)
    handle = deploy_denoisers("tiny", 1)
    executor = RayDenoiserExecutor(handle, ray.put(cond), prepared.request_id, retries=0)
    asyncio.run(executor.run(work[:1]))  # warm the replica's conditioning cache

    async def timed() -> list[float]:
        out = []
        for i in range(samples):
            started = time.perf_counter()
            await executor.run([work[i % len(work)]])
            out.append(time.perf_counter() - started)
        return out

    remote = asyncio.run(timed())
    serve.delete("bench-tiny")
    in_process, via_ray = statistics.median(local) * 1000, statistics.median(remote) * 1000
    return {"in_process_ms": round(in_process, 2), "ray_ms": round(via_ray, 2),
            "overhead_ms": round(via_ray - in_process, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fanout.json")
    parser.add_argument("--max-ongoing", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8], help="first one is the baseline")
    args = parser.parse_args()
    import tempfile

    torch.set_num_threads(1)
    ray.init(num_cpus=4, num_gpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    with tempfile.TemporaryDirectory() as tmp:
        rows = fanout(Path(tmp), tuple(args.max_ongoing), tuple(args.replicas))
        cost = overhead(Path(tmp))
    serve.shutdown()
    ray.shutdown()
    print(f"\nfan-out: {WINDOWS} windows x {STEPS} steps, simulated Denoiser (0.2 s per window-step), fake GPUs")
    print("efficiency = T1 / (N * TN); vs ideal = (24 * 10 * 0.2 s) / (N * TN)")
    print(f"{'max_ongoing':>11} | {'replicas':>8} | {'wall s':>8} | {'efficiency':>10} | {'vs ideal':>8} | identical")
    for row in rows:
        print(f"{row['max_ongoing_requests']:>11} | {row['replicas']:>8} | {row['wall_s']:>8.2f} | "
              f"{row['efficiency']:>10.3f} | {row['vs_ideal']:>8.3f} | {row['identical']}")
    print(f"\nper window-step, tiny preset (median of 40): in process {cost['in_process_ms']:.1f} ms, "
          f"through one Denoiser replica {cost['ray_ms']:.1f} ms, Ray overhead {cost['overhead_ms']:.1f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"fanout": rows, "window_step": cost}, indent=1))


if __name__ == "__main__":
    main()
