"""Step cache on the tiny preset: DiT forwards computed vs skipped per acceleration setting, side by side.

The tiny preset has RANDOM weights: its time embedder moves the modulated input e0 by 0.2-0.5 per step, far outside
the range TeaCache's 1.3B polynomial was fitted on (it peaks at 0.079 and is negative past 0.102). So the fractions
below are only a smoke figure of the mechanism, not the speed-up of the real model:

* with the fitted-range guard (default) every step is computed at every level on tiny;
* without the guard (TeaCache as published) the polynomial is negative there and everything after the first steps
  is skipped.

The real model's plan comes from ``bench/bench_gpu.py`` with ``--preset stableavatar-1.3b --checkpoints DIR``.
Each row: the plan (C computed, . skipped), unit and row forwards computed / skipped (from the runner's counters),
denoise wall time, and max |d| of the final latents against ``none``.

    python bench/bench_step_cache.py [--steps 20 50] [--seconds 5] [--json bench/results/step_cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOKE_NOTE = ("tiny preset, RANDOM weights: skip fractions are a smoke figure of the mechanism only, not the "
              "real model's speed-up (its e0 moves 0.2-0.5 per step, outside TeaCache's fitted range); "
              "denoise_s is wall time on a shared 2-core machine: noisy")


def run(steps_list: list[int], seconds: float, split_rows: bool) -> dict:
    import torch

    from bench.bench_inprocess import speech_like_audio
    from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
    from pipeline.loading import load_models
    from pipeline.presets import get_preset
    from pipeline.schedule import sigma_schedule
    from pipeline.step_cache import StepCacheSettings, fitted_range_limit

    torch.set_num_threads(1)
    models = load_models(get_preset("tiny"))
    rows, distances = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio.wav"
        speech_like_audio(seconds, audio)
        for steps in steps_list:
            e0 = models.transformer.timestep_modulation(sigma_schedule(steps).timesteps).double()
            moves = ((e0[1:] - e0[:-1]).abs().mean(dim=(1, 2)) / e0[:-1].abs().mean(dim=(1, 2))).tolist()
            distances[steps] = {"min": min(moves), "median": statistics.median(moves), "max": max(moves)}
            reference = None
            for guard in (True, False):
                for level in ("none", "regular", "high"):
                    if level == "none" and not guard:
                        continue
                    settings = PipelineSettings(split_guidance_rows=split_rows, acceleration=level,
                                                step_cache=StepCacheSettings(guard_fitted_range=guard))
                    pipeline = StableAvatarPipeline(models, settings)
                    prepared = pipeline.prepare(ROOT / "examples" / "portrait.png", audio,
                                                GenerationParams(prompt="a person talking", num_inference_steps=steps,
                                                                 seed=1))
                    executor = pipeline.in_process_executor(prepared)
                    plan = pipeline.step_cache_plan(prepared)
                    started = time.perf_counter()
                    latents = asyncio.run(pipeline.denoise(prepared, executor))
                    wall = time.perf_counter() - started
                    stats = executor.step_cache.stats
                    units = prepared.plan.num_windows * (3 if split_rows else 1) * steps
                    rows_per_unit = 1 if split_rows else 3
                    if level == "none":
                        reference = latents
                        computed, skipped = units, 0
                        row_computed, row_skipped = units * rows_per_unit, 0
                    else:
                        computed, skipped = stats.computed + stats.rebuilt, stats.reused + stats.rebuilt
                        row_computed, row_skipped = stats.row_forwards_computed, stats.row_forwards_skipped
                    rows.append({
                        "steps": steps, "level": level, "guard_fitted_range": guard if level != "none" else None,
                        "threshold": settings.step_cache.threshold(level) if level != "none" else None,
                        "always_compute_first": settings.step_cache.always_compute_first,
                        "plan": "".join("C" if c else "." for c in plan.compute) if plan else "C" * steps,
                        "windows": prepared.plan.num_windows, "units": units,
                        "unit_forwards_computed": computed, "unit_forwards_skipped": skipped,
                        "row_forwards_computed": row_computed, "row_forwards_skipped": row_skipped,
                        "skipped_fraction": round(row_skipped / (row_computed + row_skipped), 3),
                        "denoise_s": round(wall, 3),
                        "max_abs_diff_vs_none": float((latents - reference).abs().max()),
                    })
                    print(json.dumps(rows[-1]), flush=True)
    return {"note": SMOKE_NOTE, "preset": "tiny", "device": "cpu", "audio_s": seconds, "split_guidance_rows": split_rows,
            "fitted_range_limit": fitted_range_limit(StepCacheSettings().coefficients),
            "e0_relative_l1_per_step": distances, "rows": rows}


def table(result: dict) -> str:
    cols = ["steps", "level", "guard_fitted_range", "threshold", "plan", "unit_forwards_computed",
            "unit_forwards_skipped", "row_forwards_computed", "row_forwards_skipped", "skipped_fraction",
            "denoise_s", "max_abs_diff_vs_none"]
    lines = [f"NOTE: {result['note']}",
             f"{result['audio_s']:.0f} s clip, split_guidance_rows={result['split_guidance_rows']}; "
             f"fitted-range guard at e0 distance {result['fitted_range_limit']:.4f}; tiny e0 distance per step: "
             + ", ".join(f"{s} steps {d['min']:.3f}..{d['max']:.3f}" for s, d in
                         result["e0_relative_l1_per_step"].items()),
             " | ".join(cols)]
    for row in result["rows"]:
        lines.append(" | ".join(str(row[c]) for c in cols))
    lines.append(f"NOTE: {result['note']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--split-rows", action="store_true", help="three row units per window-step")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "step_cache.json")
    args = parser.parse_args()
    result = run(args.steps, args.seconds, args.split_rows)
    text = table(result)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    args.json.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
