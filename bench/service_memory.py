"""Estimated GPU memory of the service on ONE card, per memory mode: each model deployment is its own process.

From ``bench/results/memory_estimate.json`` (``bench/memory_estimate.py``: exact weights, traced activations of a
5 s 480x832 clip) and the way the replicas keep memory:

* each deployment holds, at its peak, the weights its own models keep on the device (``full``: all of them;
  ``model_offload``/``block_offload``: the working model, or the DiT's and T5's resident groups) plus the largest
  activations of its stages: Preprocessor = audio, VAE encode, CLIP, T5; Denoiser = one DiT window; Postprocessor
  = the streaming VAE decode;
* PyTorch's caching allocator keeps what a process once reserved. Under an offload mode the Preprocessor and the
  Postprocessor give it back at the end of every ``prepare``/``finish`` (``MemoryPlacement.release`` empties the
  cache), the Denoiser never does (its DiT is never released between units); under ``full``/``fp8_weights``
  nobody does;
* so with two jobs at once (``max_running_jobs: 2``, one preparing while the other finishes) the card must hold the
  sum of the three peaks; with one job at a time under an offload mode, the Denoiser's peak plus the larger of the
  two others.

Not counted, as in the estimate: the CUDA context and library workspaces of each of the three processes (~0.5-1 GB
each), fragmentation, the step cache's residuals (``pipeline.step_cache.max_bytes``, on the Denoiser's device).

    python bench/service_memory.py      # -> bench/results/service_memory.txt / .json (instant)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory_estimate import GB, MODES, STAGE_MODEL, resident  # noqa: E402

DEPLOYMENT_STAGES = {"Preprocessor": ("audio", "vae_encode", "clip", "text"), "Denoiser": ("dit",),
                     "Postprocessor": ("vae_decode",)}
OFFLOAD_PREFIXES = ("model_offload", "block_offload")
CARDS_GB = {"16 GB": 16 * 2**30 / GB, "24 GB": 24 * 2**30 / GB, "48 GB": 48 * 2**30 / GB}  # GiB-sized cards


def deployment_peak(mode: str, deployment: str, w: dict[str, int], act: dict[str, int], t5_on_cpu: bool) -> int:
    """Bytes ``deployment``'s process holds on the device at its peak under ``mode``."""
    stages = DEPLOYMENT_STAGES[deployment]
    own = {STAGE_MODEL[s] for s in stages} - ({"text_encoder"} if t5_on_cpu else set())

    def on_device(stage: str) -> int:
        if mode.startswith(OFFLOAD_PREFIXES):
            return resident(mode, stage, w, t5_on_cpu)  # the working model (or groups) only, as in one process
        return sum(w[m] for m in own)

    return max(on_device(s) + (0 if t5_on_cpu and s == "text" else act[s]) for s in stages)


def service_estimate(single: dict) -> dict:
    rows = {}
    for t5_on_cpu in (False, True):
        for mode in MODES:
            key = "fp8_weights" if "fp8_weights" in mode else "bf16"
            w, act = single["weights"][key], single["activations"][key]
            peaks = {d: deployment_peak(mode, d, w, act, t5_on_cpu) for d in DEPLOYMENT_STAGES}
            two_jobs = sum(peaks.values())
            one_job = (peaks["Denoiser"] + max(peaks["Preprocessor"], peaks["Postprocessor"])
                       if mode.startswith(OFFLOAD_PREFIXES) else two_jobs)
            name = mode + (" (T5 on CPU)" if t5_on_cpu else "")
            rows[name] = {"deployments_gb": {d: round(v / GB, 2) for d, v in peaks.items()},
                          "two_jobs_gb": round(two_jobs / GB, 2), "one_job_gb": round(one_job / GB, 2)}
    return {"source": "bench/results/memory_estimate.json", "preset": single["preset"],
            "clip_seconds": single["clip_seconds"], "unit": "GB = 1e9 bytes", "cards_gb": CARDS_GB, "modes": rows}


def table(result: dict) -> str:
    lines = [f"Estimated GPU memory of the service on one card, {result['clip_seconds']:.0f} s clip at 480x832, "
             f"preset {result['preset']} (GB = 1e9 bytes; bench/service_memory.py from {result['source']})",
             "Per deployment: its process's peak. two jobs: all three at once (max_running_jobs >= 2); one job: "
             "max_running_jobs 1. Not counted: ~0.5-1 GB of CUDA context per process, step-cache residuals.", "",
             f"  {'mode':38s} {'Preproc.':>9s} {'Denoiser':>9s} {'Postproc.':>9s} {'two jobs':>9s} {'one job':>9s}"]
    for name, row in result["modes"].items():
        d = row["deployments_gb"]
        lines.append(f"  {name:38s} {d['Preprocessor']:9.2f} {d['Denoiser']:9.2f} {d['Postprocessor']:9.2f} "
                     f"{row['two_jobs_gb']:9.2f} {row['one_job_gb']:9.2f}")
    cards = ", ".join(f"{name} = {gb:.2f}" for name, gb in result["cards_gb"].items())
    return "\n".join(lines + ["", f"Cards (GiB-sized, in GB): {cards}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate", type=Path, default=ROOT / "bench" / "results" / "memory_estimate.json")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "service_memory.json")
    args = parser.parse_args(argv)
    result = service_estimate(json.loads(args.estimate.read_text()))
    args.json.write_text(json.dumps(result, indent=1))
    text = table(result)
    args.json.with_suffix(".txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
