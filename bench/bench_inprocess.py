"""In-process tiny-preset generation benchmark: time per stage and peak memory, 5 s vs 60 s of audio.

Each audio length runs in its own subprocess so peak RSS numbers do not leak between runs. Decode + encode memory
is the RSS high-water mark sampled during ``finish`` (absolute, and as growth over the RSS right before it): it must
not grow with video length (streaming decode), so the 60 s / 5 s ratio is printed next to the 1.2x budget.

    python bench/bench_inprocess.py [--steps 10] [--seconds 5 60] [--json bench/results/inprocess.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class RssSampler:
    """Samples this process's RSS every few milliseconds in a thread; ``peak`` is the high-water mark."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.process, self.interval_s, self.peak, self._stop = psutil.Process(), interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def speech_like_audio(seconds: float, path: Path) -> None:
    """Amplitude-modulated harmonics: deterministic, speech-shaped energy, no external assets needed."""
    from pipeline.media.audio import write_wav

    t = np.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 900), start=1))
    write_wav(path, (0.2 * envelope * wave).astype(np.float32), 16000)


def run_one(seconds: float, steps: int) -> dict:
    import psutil
    import torch

    from pipeline.generator import GenerationParams, StableAvatarPipeline
    from pipeline.loading import load_models
    from pipeline.presets import get_preset

    torch.set_num_threads(2)
    process = psutil.Process()
    out: dict = {"audio_s": seconds, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio.wav"
        speech_like_audio(seconds, audio)
        started = time.perf_counter()
        models = load_models(get_preset("tiny"))
        out["load_s"] = time.perf_counter() - started
        pipeline = StableAvatarPipeline(models)
        params = GenerationParams(prompt="a person talking", num_inference_steps=steps, seed=1)
        started = time.perf_counter()
        prepared = pipeline.prepare(ROOT / "examples" / "portrait.png", audio, params)
        out["preprocess_s"] = time.perf_counter() - started
        out["windows"] = prepared.plan.num_windows
        latents = asyncio.run(pipeline.denoise(prepared))
        out["denoise_s"] = prepared.timings["denoise"]
        before = process.memory_info().rss
        with RssSampler() as sampler:
            result = pipeline.finish(prepared, latents, Path(tmp) / "out.mp4")
        out["decode_encode_s"] = result.timings["decode_encode"]
        out["frames"] = result.frames
        out["decode_encode_growth_mb"] = (sampler.peak - before) / 2**20
        out["decode_encode_peak_rss_mb"] = sampler.peak / 2**20
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seconds", type=float, nargs="+", default=[5.0, 60.0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "inprocess.json")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.steps)))
        return
    rows = []
    for seconds in args.seconds:
        proc = subprocess.run([sys.executable, __file__, "--child", str(seconds), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cols = ["audio_s", "windows", "frames", "load_s", "preprocess_s", "denoise_s", "decode_encode_s",
            "decode_encode_growth_mb", "decode_encode_peak_rss_mb", "peak_rss_mb"]
    print(f"tiny preset, {args.steps} steps, CPU ({len(rows)} runs, each in its own process)")
    print(" | ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>14.2f}" if isinstance(row[c], float) else f"{row[c]:>14}" for c in cols))
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratio = large["decode_encode_peak_rss_mb"] / small["decode_encode_peak_rss_mb"]
        print(f"decode+encode peak RSS {large['audio_s']:.0f} s / {small['audio_s']:.0f} s: {ratio:.2f}x "
              f"(budget 1.2x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
