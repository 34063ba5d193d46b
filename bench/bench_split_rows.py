"""Split guidance rows vs the batch-3 forward: how far apart, in fp32 and bf16 (tiny preset, CPU).

Two measurements per dtype:

* the noise prediction of one window-step: each row run alone (batch 1) against the same row of the batch-3
  forward, max |d| per row, at a few steps;
* the final latents of a whole clip denoised with split rows against batch 3: max |d|, relative to the latents' max,
  and the fraction of elements that differ (the fused latents are rounded to bf16 on write, so in fp32 a 1e-6
  prediction difference shows up as a few whole bf16-ulp flips).

The tiny preset zero-initialises ``k_vocal``/``v_vocal`` (as upstream does before its checkpoint is loaded), so its
audio rows equal its null-audio row; the ``live audio`` variant re-draws them from a fixed seed so the adapter's
path through the row split is measured too. The bf16 variant runs the GPU's dtype path on the CPU (bf16 DiT with
fp32-kept modules, bf16 sampling state). Real-size numbers come from ``bench/bench_gpu.py``.

    python bench/bench_split_rows.py [--steps 10] [--seconds 5] [--json bench/results/split_rows.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_audio_live(transformer, seed: int = 7) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in transformer.blocks:
            for layer in (block.attn2.k_vocal, block.attn2.v_vocal):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.weight.shape[1] ** 0.5)


def measure(dtype_name: str, live_audio: bool, steps: int, seconds: float, audio_path: Path) -> dict:
    import torch

    from pipeline.denoise import WindowStep
    from pipeline.generator import GenerationParams, PipelineSettings, StableAvatarPipeline
    from pipeline.loading import load_models
    from pipeline.presets import get_preset

    models = load_models(get_preset("tiny"))
    if live_audio:
        make_audio_live(models.transformer)
    if dtype_name == "bf16":
        models.transformer.to_inference_dtype(torch.bfloat16)
        models.state_dtype = torch.bfloat16
    params = GenerationParams(prompt="a person talking", num_inference_steps=steps, seed=1)
    batch3 = StableAvatarPipeline(models)
    split = StableAvatarPipeline(models, PipelineSettings(split_guidance_rows=True))
    prepared = batch3.prepare(ROOT / "examples" / "portrait.png", audio_path, params)
    cond, denoiser = prepared.conditioning, batch3.window_denoiser
    latents = batch3.initial_latents(prepared)
    window = prepared.plan.windows[-1]
    x = latents[:, :, window.start:window.end]
    per_step = []
    for step in sorted({0, steps // 2, steps - 1}):
        with torch.no_grad():
            (rows3,) = models.transformer(**denoiser.model_inputs(cond, window.index, step, x, (0, 1, 2)),
                                          return_dict=False)
        rows1 = torch.cat([denoiser(cond, WindowStep(window.index, step, x, rows=(r,))) for r in range(3)])
        rows3 = rows3.to(rows1.dtype)
        per_step.append({
            "step": step,
            "max_abs_diff_per_row": [float((rows1[r].float() - rows3[r].float()).abs().max()) for r in range(3)],
            "max_abs_prediction": float(rows3.float().abs().max()),
            "audio_row_vs_null_row": float((rows3[1].float() - rows3[0].float()).abs().max()),
            "text_row_vs_audio_row": float((rows3[2].float() - rows3[1].float()).abs().max()),
        })
    reference = asyncio.run(batch3.denoise(prepared))
    ours = asyncio.run(split.denoise(prepared))
    difference = (ours.float() - reference.float()).abs()
    return {
        "dtype": dtype_name, "audio_branch": "live (re-drawn)" if live_audio else "preset (zero k/v_vocal)",
        "steps": steps, "audio_s": seconds, "windows": prepared.plan.num_windows,
        "noise_prediction": per_step,
        "noise_prediction_max_abs_diff": max(max(s["max_abs_diff_per_row"]) for s in per_step),
        "final_latents_max_abs_diff": float(difference.max()),
        "final_latents_fraction_differing": float((difference > 0).float().mean()),
        "final_latents_max_abs": float(reference.float().abs().max()),
        "final_latents_max_abs_diff_relative": float(difference.max() / reference.float().abs().max()),
    }


def main() -> None:
    import torch

    from bench.bench_inprocess import speech_like_audio

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "split_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio.wav"
        speech_like_audio(args.seconds, audio)
        for dtype_name in ("fp32", "bf16"):
            for live in (False, True):
                rows.append(measure(dtype_name, live, args.steps, args.seconds, audio))
                print(json.dumps(rows[-1]), flush=True)
    cols = ["dtype", "audio_branch", "noise_prediction_max_abs_diff", "final_latents_max_abs_diff",
            "final_latents_max_abs_diff_relative", "final_latents_fraction_differing", "final_latents_max_abs"]
    lines = [f"split guidance rows vs batch 3: tiny preset, CPU, {args.seconds:.0f} s clip "
             f"({rows[0]['windows']} windows), {args.steps} steps; prediction |d| is per row, batch 1 vs 3",
             " | ".join(cols)]
    lines += [" | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols) for row in rows]
    text = "\n".join(lines)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    args.json.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
