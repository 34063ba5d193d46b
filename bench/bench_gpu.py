"""GPU benchmark of the pipeline: StableAvatar 1.3B sizes (random weights) in bf16 at 480x832 on CUDA.

Also runs at tiny size on the CPU (``--preset tiny --device cpu --quick``; ``tests/test_bench_gpu.py`` does, so the
script cannot rot). One JSON file out (``bench/results/gpu.json`` by default; ``--out-dir`` writes ``gpu.json`` and the
table ``gpu.txt`` there), both rewritten after every phase, so a run stopped by a time limit keeps what finished. A
phase that fails records its error and the exit code is 1.

``--budget-s``: a total time budget. Each phase first estimates its own time (from the FLOP count before anything is
measured, from the measured forward latency after) and is skipped with a note in ``skipped`` when it would not fit;
``e2e`` picks the step count that fits and extrapolates to the default 50. The device kit (``bench/device/``,
``docs/gpu.md``) runs this script under an 8-minute budget per call.

Phases, in order (``--phases`` selects):

* ``card``: the device, its bf16 dense peak (``BF16_PEAK_TFLOPS``) and a measured 8192³ bf16 matmul.
* ``memory_modes``: each memory mode (``pipeline.memory``) on copies of one set of host-memory weights: a
  ``--modes-steps`` clip's prepare / denoise / finish seconds and peak memory per stage, and the final latents
  against ``full`` (max |d|; 0 for the offload modes). Runs before ``load``, which would occupy the device.
* ``load``: seconds per component.
* ``preprocess``: the request's ``prepare`` (cold), then warm repeats of each part: wav2vec (all windows), T5
  (prompt), CLIP, VAE encode (``build_y``).
* ``forward``: one window's DiT forward at batch 1 (the audio row alone) and batch 3 (the CFG batch), eager;
  latency (mean and min of ``--repeats``), achieved TFLOP/s from the analytic count below.
* ``sdpa``: the attention kernels that ran (aten ops seen by the profiler in one forward) and diffusers' backend.
* ``vae_decode``: streaming VAE decode of the clip's latents in the pipeline's chunks: frames/s.
* ``e2e``: a full clip (``--seconds``, default 5 s = 2 windows) with ``--steps`` steps (or as many as the budget
  allows): prepare, denoise, decode and encode to mp4, seconds and peak memory per stage, compile off; extrapolated
  to 50 steps, and the GPU-seconds per second of output video at those reference settings (one GPU, 480x832,
  acceleration none).
* ``acceleration``: ``--aux-steps`` steps of the same clip at acceleration none / regular / high, and high without
  the fitted-range guard (TeaCache as published): the plan, row forwards computed / skipped, denoise seconds, max
  |d| of the final latents against none. With random weights the plan is not the real model's (see
  ``pipeline/step_cache.py``); pass ``--preset stableavatar-1.3b --checkpoints DIR`` for the real one.
* ``split_rows``: each guidance row alone (batch 1) against its row of the batch-3 forward (max |d| per row), and
  the final latents of a split-rows run against batch 3 (``--aux-steps`` steps).
* ``compile``: ``torch.compile`` of the DiT's repeated blocks: warm-up (compile) seconds, the forward latencies
  again, and the full clip compiled (the e2e run with compile on).

Peak memory: ``torch.cuda.max_memory_allocated`` per phase (reset before each) and overall; on the CPU the process's
peak RSS.

FLOP count (2 FLOP per multiply-add), one DiT forward of a window, per guidance row, with L = seq_len tokens of the
padded 21-frame window, d = inner dim, F = FFN dim, n = blocks, C = 769 context tokens (257 image + 512 text),
S = 21 audio slots of K tokens, A = S·K:

    per block:  8·L·d² (self q,k,v,o) + 4·L²·d (self QKᵀ, PV) + 4·L·d² (cross q,o) + 4·C·d² (cross k,v)
              + 4·L·C·d (cross QKᵀ, PV) + 4·A·d² (k_vocal, v_vocal) + 4·L·K·d (per-frame audio attention)
              + 4·L·d·F (FFN)
    per row:    n·(per block) + 2·L·144·d (patch embedding) + 2·L·d·64 (head)
              + 2·512·(text_dim·d + d²) (text embedder) + 2·257·(image_dim² + image_dim·d) (image embedder)
    adapter (once per forward that has an audio row, 2 blocks):
                2·(4·A·d² (q,o) + 4·L·d² (k,v of the tokens) + 4·A·(L/S)·d (attention) + 8·A·d² (FFN))
              + 2·N·audio_dim·d (input projection of N wav2vec tokens)
    forward = rows·(per row) + adapter

At 480x832 (L = 32 760, d = 1536, F = 8960, n = 30, K = 15) one row is 284.8 TFLOP (self-attention ≈ 70 %), the
adapter 0.64 TFLOP, a batch-3 window-step 855.1 TFLOP. Achieved TFLOP/s = forward FLOP / measured seconds.

Device time (an estimate from the FLOP count at 40-60 % of an H200's bf16 peak, not yet measured): about 1.4-2.1 s per
batch-3 window-step, so the defaults (50 steps for the two full clips, 10 for the comparisons, plus loading the
random 6.7B T5 and compiling) take ~9-13 min, more than one 10-minute device command; ``--steps 20`` takes ~5-7 min,
and ``--phases`` runs a subset. Typical device command:

    python bench/bench_gpu.py --steps 20 --json "$OUT/gpu.json"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROCESS_STARTED = time.monotonic()  # --budget-s counts from here: importing torch is part of the run
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PHASES = ("card", "memory_modes", "load", "preprocess", "forward", "sdpa", "vae_decode", "e2e", "acceleration",
          "split_rows", "compile")
ALWAYS = ("card", "load", "preprocess")  # every later phase needs them
TEXT_LEN, IMAGE_LEN, NUM_SLOTS = 512, 257, 21
PROMPT = "a person is talking to the camera in a bright room"
REFERENCE_STEPS = 50  # the fal default; e2e extrapolates to it
MEMORY_MODES = ("full", "model_offload", "block_offload", "fp8_weights", "model_offload+fp8_weights",
                "block_offload+fp8_weights")
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment, most specific first (vendor sheets).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)  # a V100 has no bf16 tensor cores: no entry


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from ``BF16_PEAK_TFLOPS`` (first matching fragment), ``None`` if unknown."""
    return next((tflops for fragment, tflops in BF16_PEAK_TFLOPS if fragment in device_name), None)


def dit_flops(config: dict, seq_len: int, rows: int, audio_tokens: int, slot_len: int, with_adapter: bool) -> float:
    """The analytic FLOP count of one forward (module docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    F, n, L = config["ffn_dim"], config["num_layers"], seq_len
    C, K = TEXT_LEN + IMAGE_LEN, slot_len
    A = NUM_SLOTS * K
    patch = math.prod(config["patch_size"])
    per_block = (8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * C * d * d + 4 * L * C * d
                 + 4 * A * d * d + 4 * L * K * d + 4 * L * d * F)
    per_row = (n * per_block + 2 * L * config["in_channels"] * patch * d + 2 * L * d * config["out_channels"] * patch
               + 2 * TEXT_LEN * (config["text_dim"] * d + d * d)
               + 2 * IMAGE_LEN * (config["image_dim"] ** 2 + config["image_dim"] * d))
    adapter = 0
    if with_adapter:
        adapter = (2 * (4 * A * d * d + 4 * L * d * d + 4 * A * (L // NUM_SLOTS) * d + 8 * A * d * d)
                   + 2 * audio_tokens * config["audio_in_dim"] * d)
    return float(rows * per_row + adapter)


class Bench:
    """Holds the run's state and writes the JSON after every phase."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.out: dict = {"meta": self._meta(), "errors": {}, "skipped": {}}
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))

    def _meta(self) -> dict:
        import diffusers
        import transformers

        a = self.args
        meta = {
            "preset": a.preset, "device": a.device, "quick": a.quick, "seconds": a.seconds, "steps": a.steps,
            "aux_steps": a.aux_steps, "repeats": a.repeats, "aspect_ratio": a.aspect_ratio,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            meta.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        else:
            meta["note"] = "CPU run: shapes and code paths only; timings are not GPU numbers"
        if a.preset != "stableavatar-1.3b":
            meta["weights"] = "random: outputs are noise; step-cache plans are not the real model's"
        return meta

    # -- helpers -------------------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn, repeats: int = 1) -> tuple[object, list[float]]:
        times, result = [], None
        for _ in range(repeats):
            self.sync()
            started = time.perf_counter()
            result = fn()
            self.sync()
            times.append(time.perf_counter() - started)
        return result, times

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict:
        if self.cuda:
            return {"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}
        return {"peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}

    def write(self) -> None:
        self.args.json.parent.mkdir(parents=True, exist_ok=True)
        self.args.json.write_text(json.dumps(self.out, indent=1, default=str))
        if self.args.txt is not None:
            from bench.device.report import render

            self.args.txt.write_text(render(self.out))

    def time_left(self) -> float:
        if self.args.budget_s is None:
            return math.inf
        return self.args.budget_s - (time.monotonic() - PROCESS_STARTED)

    def phase(self, name: str, fn) -> bool:
        needs, left = self.estimate(name), self.time_left()
        if needs > left:
            self.out["skipped"][name] = f"needs ~{needs:.0f} s by its estimate, {max(left, 0):.0f} s of the budget left"
            print(f"[bench_gpu] {name} skipped: {self.out['skipped'][name]}", file=sys.stderr, flush=True)
            self.write()
            return False
        print(f"[bench_gpu] {name} ... (~{needs:.0f} s by its estimate)", file=sys.stderr, flush=True)
        self.reset_peak()
        started = time.perf_counter()
        try:
            result = fn()
            result.update(self.peak(), phase_s=round(time.perf_counter() - started, 2))
            self.out[name] = result
        except Exception as exc:  # a measurement tool: record, keep the other phases
            self.out["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
            print(self.out["errors"][name], file=sys.stderr, flush=True)
        self.write()
        print(f"[bench_gpu] {name} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        return name not in self.out["errors"]

    # -- phases --------------------------------------------------------------------------------------------------
    def card(self) -> dict:
        """The device and what its bf16 tensor cores can do: the vendor's dense peak and a measured matmul."""
        if not self.cuda:
            return {"name": platform.processor() or "cpu", "bf16_peak_tflops": None, "matmul_bf16_tflops": None}
        name = torch.cuda.get_device_properties(self.device).name
        peak = bf16_peak_tflops(name)
        n = 8192
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        self.timed(lambda: a @ b, 3)  # warm-up
        _, times = self.timed(lambda: a @ b, 10)
        measured = 2 * n**3 / (sum(times) / len(times)) / 1e12
        return {"name": name, "bf16_peak_tflops": peak, "matmul_bf16_tflops": round(measured, 1),
                "matmul_fraction_of_peak": round(measured / peak, 3) if peak else None,
                "peak_source": "vendor dense bf16 (no sparsity) by device name" if peak else "unknown card"}

    def memory_modes(self) -> dict:
        """Each memory mode on deep copies of one host-memory bundle (same random weights for every mode): the
        clip's seconds and peak memory per stage, and its final latents against ``full``'s."""
        import copy
        import dataclasses
        import gc

        from bench.bench_inprocess import speech_like_audio
        from pipeline.generator import PipelineSettings, StableAvatarPipeline
        from pipeline.loading import ALL_COMPONENTS, load_models
        from pipeline.memory import apply_memory_mode, home_device
        from pipeline.presets import get_preset
        from pipeline.settings import MemorySettings

        self.audio = self.tmp / "speech.wav"
        speech_like_audio(self.args.seconds, self.audio)
        self.image = ROOT / "examples" / "portrait.png"
        started = time.perf_counter()
        host = load_models(get_preset(self.args.preset), device="cpu", dtype_policy="gpu" if self.cuda else "auto")
        result: dict = {"host_load_s": round(time.perf_counter() - started, 1), "steps": self.args.modes_steps,
                        "modes": {}}
        reference = None
        for mode in self.args.modes:
            if self.clip_s(self.args.modes_steps, slowdown=1.5) > self.time_left():
                result["modes"][mode] = {"skipped": "would not fit the budget"}
                continue
            memory = MemorySettings(mode=mode)
            models = {c: copy.deepcopy(getattr(host, c)).to(home_device(c, memory, self.device))
                      for c in ALL_COMPONENTS}
            bundle = dataclasses.replace(host, device=self.device, **models)
            bundle.placement = apply_memory_mode(bundle, memory, host.dtypes)
            pipeline = StableAvatarPipeline(bundle, PipelineSettings(memory=memory))
            self.reset_peak()
            clip = self._clip(self.args.modes_steps, mode.replace("+", "_"), pipeline)
            clip["peak_memory"] = max((v.get("peak_gpu_memory_gb") or v.get("peak_host_rss_gb") or 0)
                                      for v in clip["peak_memory_per_stage"].values())
            if reference is None:
                reference, result["reference_mode"] = self.last_latents, mode
            clip["latents_max_abs_diff_vs_reference"] = float((self.last_latents.float() - reference.float()).abs().max())
            result["modes"][mode] = clip
            del pipeline, bundle, models
            gc.collect()  # hooks reference their modules: free this mode's copies before the next
            if self.cuda:
                torch.cuda.empty_cache()
            self.write_partial("memory_modes", result)
        del host
        return result

    def write_partial(self, name: str, result: dict) -> None:
        """A long phase's results so far (a time limit may stop it before it returns)."""
        self.out[name] = dict(result, partial=True)
        self.write()

    def load(self) -> dict:
        from pipeline.generator import PipelineSettings, StableAvatarPipeline
        from pipeline.loading import load_models
        from pipeline.presets import get_preset

        self.preset = get_preset(self.args.preset)
        self.models = load_models(self.preset, checkpoints=self.args.checkpoints, device=self.device)
        self.pipeline = StableAvatarPipeline(self.models, PipelineSettings())
        self.audio = self.tmp / "speech.wav"
        from bench.bench_inprocess import speech_like_audio

        speech_like_audio(self.args.seconds, self.audio)
        self.image = ROOT / "examples" / "portrait.png"
        dtypes = {name: str(next(getattr(self.models, name).parameters()).dtype)
                  for name in ("transformer", "text_encoder", "vae", "image_encoder", "audio_encoder")}
        return {"seconds": {k: round(v, 2) for k, v in self.models.load_seconds.items()}, "dtypes": dtypes,
                "state_dtype": str(self.models.state_dtype)}

    def params(self, steps: int, **overrides):
        from pipeline.generator import GenerationParams

        return GenerationParams(prompt=PROMPT, aspect_ratio=self.args.aspect_ratio, num_inference_steps=steps,
                                seed=1, **overrides)

    def preprocess(self) -> dict:
        import numpy as np

        from pipeline.conditioning import build_clip_context, build_y
        from pipeline.media.audio import decode_audio
        from pipeline.media.image import choose_size, load_image, resize_cover
        from pipeline.models.audio_encoder import audio_features
        from pipeline.windows import SAMPLE_RATE

        models = self.models
        self.prepared, cold = self.timed(lambda: self.pipeline.prepare(self.image, self.audio,
                                                                       self.params(self.args.aux_steps)))
        prepared = self.prepared
        picture = load_image(self.image)
        width, height = choose_size(self.args.aspect_ratio, picture.width, picture.height, models.preset.resolutions)
        image_u8 = resize_cover(picture, width, height)
        samples = decode_audio(self.audio.read_bytes(), SAMPLE_RATE)
        padded = np.zeros(prepared.plan.padded_audio_samples, dtype=np.float32)
        padded[: len(samples)] = samples
        repeats = self.args.repeats
        with torch.no_grad():
            _, wav2vec = self.timed(lambda: [audio_features(models.audio_encoder, models.feature_extractor,
                                                            padded[w.audio_start:w.audio_end])
                                             for w in prepared.plan.windows], repeats)
            _, t5 = self.timed(lambda: self.pipeline.prompt_encoder.run_text_encoder(PROMPT), repeats)
            _, clip = self.timed(lambda: build_clip_context(models.image_encoder, image_u8), repeats)
            _, vae = self.timed(lambda: build_y(models.vae, image_u8), repeats)
        return {
            "width": width, "height": height, "windows": prepared.plan.num_windows,
            "seq_len": prepared.conditioning.seq_len, "prepare_cold_s": round(cold[0], 3),
            "prepare_cold_stages_s": {k: round(v, 3) for k, v in prepared.timings.items()},
            "wav2vec_all_windows_s": round(min(wav2vec), 4), "t5_prompt_s": round(min(t5), 4),
            "clip_s": round(min(clip), 4), "vae_encode_s": round(min(vae), 4),
        }

    def _forward_latency(self, label: str, batch_sizes=(1, 3)) -> dict:
        from pipeline.models.audio_split import AUDIO_EXPAND_LENGTH, split_audio_sequence

        cond, denoiser = self.prepared.conditioning, self.pipeline.window_denoiser
        window = self.prepared.plan.windows[0]
        latents = self.pipeline.initial_latents(self.prepared)[:, :, window.start:window.end]
        n_tokens = cond.audio_features[window.index].shape[1]
        slot_len = max(e - s + 1 for s, e in split_audio_sequence(n_tokens)) + 2 * AUDIO_EXPAND_LENGTH
        result = {}
        for batch in batch_sizes:
            rows = (0, 1, 2) if batch == 3 else (2,)
            inputs = denoiser.model_inputs(cond, window.index, 0, latents, rows)
            with torch.no_grad():
                forward = lambda i=inputs: self.models.transformer(**i, return_dict=False)  # noqa: E731
                self.timed(forward, 1)  # warm-up
                _, times = self.timed(forward, self.args.repeats)
            flops = dit_flops(self.preset.transformer, cond.seq_len, batch, n_tokens, slot_len, with_adapter=True)
            result[f"batch{batch}"] = {
                "rows": list(rows), "latency_s_mean": round(sum(times) / len(times), 4),
                "latency_s_min": round(min(times), 4), "flop": flops, "tflop": float(f"{flops / 1e12:.4g}"),
                "achieved_tflops": float(f"{flops / min(times) / 1e12:.4g}"),
            }
            peak = self.out.get("card", {}).get("bf16_peak_tflops")
            result[f"batch{batch}"]["fraction_of_peak"] = round(flops / min(times) / 1e12 / peak, 3) if peak else None
        result["mode"] = label
        return result

    def forward(self) -> dict:
        return self._forward_latency("eager")

    def sdpa(self) -> dict:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        from torch.profiler import ProfilerActivity, profile

        cond, denoiser = self.prepared.conditioning, self.pipeline.window_denoiser
        window = self.prepared.plan.windows[0]
        latents = self.pipeline.initial_latents(self.prepared)[:, :, window.start:window.end]
        inputs = denoiser.model_inputs(cond, window.index, 0, latents, (2,))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            self.models.transformer(**inputs, return_dict=False)
            self.sync()
        names = sorted({e.key for e in prof.key_averages()
                        if "scaled_dot_product" in e.key or "flash" in e.key.lower() or "attention" in e.key})
        backends = {}
        if self.cuda:
            backends = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                        "math": torch.backends.cuda.math_sdp_enabled()}
        return {"diffusers_backend": str(_AttentionBackendRegistry.get_active_backend()[0].value),
                "attention_ops": names, "torch_sdp_enabled": backends}

    def vae_decode(self) -> dict:
        from pipeline.models.vae import StreamingVaeDecoder

        plan, chunk = self.prepared.plan, self.pipeline.settings.decode_chunk_latents
        latents = self.pipeline.initial_latents(self.prepared)[:, :, :plan.decoded_latent_frames].float()

        def decode() -> int:
            decoder = StreamingVaeDecoder(self.models.vae)
            decoder.reset()
            frames = 0
            with torch.no_grad():
                for start in range(0, latents.shape[2], chunk):
                    frames += decoder.feed(latents[:, :, start:start + chunk]).shape[2]
            decoder.close()
            return frames

        frames, times = self.timed(decode, 1)
        return {"latent_frames": latents.shape[2], "frames": frames, "chunk_latents": chunk,
                "seconds": round(times[0], 3), "frames_per_s": round(frames / times[0], 2)}

    def staged(self, fn) -> tuple[object, float, dict]:
        """``fn()``'s result, seconds and peak memory (reset before it)."""
        self.reset_peak()
        result, (seconds,) = self.timed(fn)
        return result, seconds, self.peak()

    def _clip(self, steps: int, label: str, pipeline=None) -> dict:
        pipeline = pipeline or self.pipeline
        prepared, wall, prepare_peak = self.staged(
            lambda: pipeline.prepare(self.image, self.audio, self.params(steps)))
        latents, denoise_s, denoise_peak = self.staged(lambda: asyncio.run(pipeline.denoise(prepared)))
        out = self.tmp / f"{label}.mp4"
        result, finish_s, finish_peak = self.staged(lambda: pipeline.finish(prepared, latents, out))
        window_steps = prepared.plan.num_windows * steps
        self.last_latents = latents
        return {"mode": label, "steps": steps, "windows": prepared.plan.num_windows, "frames": result.frames,
                "width": result.width, "height": result.height, "audio_s": round(prepared.audio_seconds, 3),
                "prepare_s": round(wall, 3), "denoise_s": round(denoise_s, 3), "decode_encode_s": round(finish_s, 3),
                "total_s": round(wall + denoise_s + finish_s, 3),
                "denoise_s_per_window_step": round(denoise_s / window_steps, 4), "file_size": result.file_size,
                "peak_memory_per_stage": {"prepare": prepare_peak, "denoise": denoise_peak,
                                          "decode_encode": finish_peak}}

    def e2e(self) -> dict:
        """The clip at ``--steps`` or the most steps that fit the budget, extrapolated to the reference 50."""
        steps = self.e2e_steps()
        clip = self._clip(steps, "eager")
        denoise_50 = clip["denoise_s"] / steps * REFERENCE_STEPS
        total_50 = clip["prepare_s"] + denoise_50 + clip["decode_encode_s"]
        clip["extrapolated"] = {
            "steps": REFERENCE_STEPS, "denoise_s": round(denoise_50, 2), "total_s": round(total_50, 2),
            "gpu_seconds_per_output_second": round(total_50 / clip["audio_s"], 2),
            "how": f"prepare and decode+encode as measured; denoise scaled from {steps} to {REFERENCE_STEPS} steps",
        }
        return clip

    # -- time estimates (--budget-s) -------------------------------------------------------------------------
    @property
    def real_size(self) -> bool:
        from pipeline.presets import get_preset

        return get_preset(self.args.preset).transformer["num_layers"] >= 30

    def forward_s(self, batch: int) -> float:
        """A DiT window forward: measured once ``forward`` ran; before, its FLOP count at 40 % of the card's bf16
        peak (CPU or unknown card: 0.2 TFLOP/s)."""
        from pipeline.presets import get_preset

        measured = self.out.get("forward", {}).get(f"batch{batch}", {}).get("latency_s_min")
        if measured:
            return measured
        preset = get_preset(self.args.preset)
        width, height = preset.resolutions["9:16"]
        seq_len = 21 * (width // 16) * (height // 16)
        peak = self.out.get("card", {}).get("bf16_peak_tflops") or 0
        rate = 0.4 * peak * 1e12 if self.cuda and peak else 0.2e12
        return dit_flops(preset.transformer, seq_len, batch, 161, 15, with_adapter=True) / rate

    def windows(self) -> int:
        return self.out.get("preprocess", {}).get("windows") or math.ceil(self.args.seconds / 2.5)

    def prepare_s(self) -> float:
        return self.out.get("preprocess", {}).get("prepare_cold_s") or (20.0 if self.real_size else 2.0)

    def decode_s(self) -> float:
        """VAE decode + mp4 encode of the clip: the measured decode and 30 % for the encode."""
        measured = self.out.get("vae_decode", {}).get("seconds")
        return 1.3 * measured if measured else (60.0 if self.real_size else 5.0)

    def clip_s(self, steps: int, slowdown: float = 1.0) -> float:
        return self.prepare_s() + slowdown * steps * self.windows() * self.forward_s(3) + self.decode_s()

    def e2e_steps(self) -> int:
        """``--steps``, or fewer (at least 2) so that the clip fits the time left."""
        left = self.time_left()
        if math.isinf(left):
            return self.args.steps
        per_step = self.windows() * self.forward_s(3)
        fits = int((0.9 * left - self.prepare_s() - self.decode_s()) / per_step)
        return max(2, min(self.args.steps, fits))

    def estimate(self, name: str) -> float:
        """Seconds ``name`` is expected to take (the budget's yardstick; generous where nothing is measured)."""
        big = self.real_size
        fwd1, fwd3, repeats, aux = self.forward_s(1), self.forward_s(3), self.args.repeats, self.args.aux_steps
        return {
            "card": 5.0,
            "load": 90.0 if big else 5.0,
            "preprocess": 3 * self.prepare_s(),
            "forward": (1 + repeats) * (fwd1 + fwd3) * 1.2 + 2,
            "sdpa": 3 * fwd1 + 5,
            "vae_decode": self.decode_s() / 1.3,
            "e2e": self.clip_s(2),
            "acceleration": 4 * aux * self.windows() * fwd3 + self.prepare_s(),
            "split_rows": aux * self.windows() * 3 * fwd1 + 3 * fwd1 + fwd3 + self.prepare_s(),
            "compile": (150.0 if big else 60.0) + (1 + repeats) * (fwd1 + fwd3) + self.clip_s(2),
            "memory_modes": (90.0 if big else 5.0) + self.clip_s(self.args.modes_steps, slowdown=1.5),
        }[name]

    def acceleration(self) -> dict:
        from pipeline.generator import PipelineSettings, StableAvatarPipeline
        from pipeline.schedule import sigma_schedule
        from pipeline.step_cache import StepCacheSettings, fitted_range_limit

        steps = self.args.aux_steps
        prepared = self.pipeline.prepare(self.image, self.audio, self.params(steps))
        e0 = self.models.transformer.timestep_modulation(sigma_schedule(steps).timesteps).double().cpu()
        moves = ((e0[1:] - e0[:-1]).abs().mean(dim=(1, 2)) / e0[:-1].abs().mean(dim=(1, 2))).tolist()
        rows, reference = [], None
        for level, guard in (("none", True), ("regular", True), ("high", True), ("high", False)):
            settings = PipelineSettings(step_cache=StepCacheSettings(guard_fitted_range=guard))
            pipeline = StableAvatarPipeline(self.models, settings)
            run = dataclasses.replace(prepared, acceleration=level)
            plan = pipeline.step_cache_plan(run)
            executor = pipeline.in_process_executor(run)
            latents, (seconds,) = self.timed(lambda p=pipeline, r=run, e=executor: asyncio.run(p.denoise(r, e)))
            stats = executor.step_cache.stats
            units = prepared.plan.num_windows * steps
            if level == "none":
                reference = latents
                row_computed, row_skipped = units * 3, 0
            else:
                row_computed, row_skipped = stats.row_forwards_computed, stats.row_forwards_skipped
            rows.append({
                "level": level, "guard_fitted_range": guard if level != "none" else None,
                "threshold": settings.step_cache.threshold(level) if level != "none" else None,
                "plan": "".join("C" if c else "." for c in plan.compute) if plan else "C" * steps,
                "row_forwards_computed": row_computed, "row_forwards_skipped": row_skipped,
                "rebuilt": stats.rebuilt, "denoise_s": round(seconds, 3),
                "max_abs_diff_vs_none": float((latents.float() - reference.float()).abs().max()),
            })
        self.split_reference = (prepared, reference)
        return {"steps": steps, "windows": prepared.plan.num_windows,
                "always_compute_first": StepCacheSettings().always_compute_first,
                "fitted_range_limit": fitted_range_limit(StepCacheSettings().coefficients),
                "e0_relative_l1_per_step": [round(m, 5) for m in moves], "runs": rows}

    def split_rows(self) -> dict:
        from pipeline.denoise import WindowStep
        from pipeline.generator import PipelineSettings, StableAvatarPipeline

        if getattr(self, "split_reference", None) is None:
            prepared = self.pipeline.prepare(self.image, self.audio, self.params(self.args.aux_steps))
            self.split_reference = (prepared, asyncio.run(self.pipeline.denoise(prepared)))
        prepared, reference = self.split_reference
        prepared = dataclasses.replace(prepared, acceleration="none")
        cond, denoiser = prepared.conditioning, self.pipeline.window_denoiser
        window = prepared.plan.windows[0]
        x = self.pipeline.initial_latents(prepared)[:, :, window.start:window.end]
        with torch.no_grad():
            (batch3,) = self.models.transformer(**denoiser.model_inputs(cond, window.index, 0, x, (0, 1, 2)),
                                                return_dict=False)
        rows = torch.cat([denoiser(cond, WindowStep(window.index, 0, x, rows=(r,))) for r in range(3)])
        batch3 = batch3.to(rows.dtype).cpu()
        split = StableAvatarPipeline(self.models, PipelineSettings(split_guidance_rows=True))
        latents, (seconds,) = self.timed(lambda: asyncio.run(split.denoise(prepared)))
        difference = (latents.float() - reference.float()).abs()
        return {
            "dtype": str(rows.dtype), "steps": prepared.conditioning.num_steps,
            "noise_prediction_max_abs_diff_per_row": [float((rows[r].float() - batch3[r].float()).abs().max())
                                                     for r in range(3)],
            "noise_prediction_max_abs": float(batch3.float().abs().max()),
            "final_latents_max_abs_diff": float(difference.max()),
            "final_latents_max_abs_diff_relative": float(difference.max() / reference.float().abs().max()),
            "final_latents_fraction_differing": float((difference > 0).float().mean()),
            "split_denoise_s": round(seconds, 3),
        }

    def compile(self) -> dict:
        from pipeline.compile import compile_dit

        how = compile_dit(self.models.transformer)
        cond, denoiser = self.prepared.conditioning, self.pipeline.window_denoiser
        window = self.prepared.plan.windows[0]
        x = self.pipeline.initial_latents(self.prepared)[:, :, window.start:window.end]
        batches = (3,) if self.args.quick else (1, 3)
        warmups = {}
        for batch in batches:
            inputs = denoiser.model_inputs(cond, window.index, 0, x, (0, 1, 2) if batch == 3 else (2,))
            with torch.no_grad():
                _, (seconds,) = self.timed(lambda i=inputs: self.models.transformer(**i, return_dict=False))
            warmups[f"batch{batch}"] = round(seconds, 2)
        result = {"how": how, "warmup_s": warmups, "forward": self._forward_latency("compiled", batches)}
        result["e2e"] = self._clip(self.args.steps, "compiled")
        return result

    def run(self) -> int:
        """``card``, ``load`` and ``preprocess`` always run (the later phases need them); the rest as selected."""
        for name in PHASES:
            if name not in ALWAYS and name not in self.args.phases:
                continue
            if not self.phase(name, getattr(self, name)) and name in ALWAYS:
                break
        peaks = [v.get("peak_gpu_memory_gb", v.get("peak_host_rss_gb")) for v in self.out.values()
                 if isinstance(v, dict) and ("peak_gpu_memory_gb" in v or "peak_host_rss_gb" in v)]
        self.out["peak_memory_gb"] = max(peaks, default=None)
        self.out["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.out["flop_formula"] = __doc__[__doc__.index("FLOP count"):__doc__.index("At 480x832")].strip()
        self.write()
        return 1 if self.out["errors"] else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stableavatar-1.3b-random")
    parser.add_argument("--checkpoints", type=Path, default=None, help="official layout, for --preset stableavatar-1.3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--aspect-ratio", default="9:16", help="9:16 is 480x832 at real size")
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length (5 s = 2 windows)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the full clips (default 50; quick 2)")
    parser.add_argument("--aux-steps", type=int, default=None,
                        help="steps of the acceleration and split-rows comparisons (default 10; quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per forward (default 3; quick 1)")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--quick", action="store_true", help="few steps and repeats (CPU smoke run)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write gpu.json and the table gpu.txt here (overrides --json)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds: phases that would not fit are skipped, e2e takes fewer steps")
    parser.add_argument("--modes", nargs="+", default=list(MEMORY_MODES), help="memory_modes: the modes to run")
    parser.add_argument("--modes-steps", type=int, default=2, help="memory_modes: steps of each clip")
    args = parser.parse_args(argv)
    args.txt = None
    if args.out_dir is not None:
        args.json, args.txt = args.out_dir / "gpu.json", args.out_dir / "gpu.txt"
    args.steps = args.steps or (2 if args.quick else 50)
    args.aux_steps = args.aux_steps or (8 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run with --device cpu --preset tiny --quick for a smoke run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bench = Bench(args)
    code = bench.run()
    print(json.dumps({k: v for k, v in bench.out.items() if k in ("meta", "errors")}, indent=1, default=str))
    print(f"wrote {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
