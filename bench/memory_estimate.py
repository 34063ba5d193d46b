"""Estimated peak GPU memory of a 5 s 480x832 clip in one process, per memory mode (no GPU needed).

Weights are counted exactly: every model of the preset is built under ``FakeTensorMode`` (shapes, no data) with the
loader's dtypes (gpu policy: bf16 DiT and T5 with the DiT's fp32 modules kept, fp32 CLIP, wav2vec and VAE), and
``fp8_weights`` applies the real casting hooks (``pipeline.memory.cast_fp8``) before the bytes are summed.

Activations are the peak of the bytes that each stage allocates, traced with torch's ``MemTracker`` over a fake
forward of the stage at real shapes (on the CPU, whose SDPA is a flash kernel like the GPU's): wav2vec on one
window, the VAE encode of the 81-frame reference clip, CLIP, T5 on 512 tokens, one batch-3 DiT window forward, and
the streaming VAE decode (three latent frames: the causal cache is full from the second on). Under fp8 the casting
hooks add one layer's compute-dtype copy to the DiT's and T5's peaks (T5's token embedding, 1.05 B parameters, is
cast whole).

A mode's peak is the largest, over the stages, of the weights on the device during the stage plus the stage's
activations:

* ``full`` / ``fp8_weights``: every model resident.
* ``model_offload``: only the working model (accelerate's chain offloads the previous one when the next starts).
* ``block_offload``: the DiT's top-level group (embedders, adapter, head) plus two blocks (one computing, one
  prefetched on the stream); T5's top-level group (its embedding) plus one block while CLIP, the last model of the
  chain, is still resident; CLIP, wav2vec and the VAE alone.
* ``text_encoder_device: cpu``: T5 costs no device memory.

Not counted: the CUDA context and cuBLAS/cuDNN workspaces (~0.5-1 GB outside ``torch.cuda.max_memory_allocated``),
allocator fragmentation, the step cache's residuals with acceleration on (one ``[3, 32760, 1536]`` bf16 tensor per
window, 0.30 GB each). The device kit's second script (``bench/device/run_modes.sh``) measures the same table.

    python bench/memory_estimate.py            # real sizes, ~1-2 min on 2 cores -> bench/results/memory_estimate.*
    python bench/memory_estimate.py --preset tiny --json /tmp/m.json   # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GB = 10**9  # decimal, as the targets (full <= 24 GB, ...) and card sizes are quoted
STAGES = ("audio", "vae_encode", "clip", "text", "dit", "vae_decode")
STAGE_MODEL = {"audio": "audio_encoder", "vae_encode": "vae", "clip": "image_encoder", "text": "text_encoder",
               "dit": "transformer", "vae_decode": "vae"}
MODES = ("full", "fp8_weights", "model_offload", "model_offload+fp8_weights", "block_offload",
         "block_offload+fp8_weights")
CLIP_SECONDS = 5.0
PREFETCHED_DIT_BLOCKS = 2  # block_offload on CUDA: the block computing and the one its stream prefetches


def _tracker():
    """torch's MemTracker without its per-module statistics (the VAE calls its encoder and decoder once per chunk
    from outside ``forward``, which those statistics refuse); the global peak is all this script reads."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

    return PeakTracker()


def activation_peak(run: Callable[[], object], *tracked) -> int:
    """Peak bytes allocated by ``run`` above what ``tracked`` (models, inputs) holds when it starts."""
    tracker = _tracker()
    tracker.track_external(*(t for t in tracked if isinstance(t, (torch.Tensor, torch.nn.Module, list))))
    start = sum(snap["Total"] for snap in tracker.get_tracker_snapshot().values())
    with tracker, torch.no_grad():
        run()
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    return peak - start


def stored_bytes(module: torch.nn.Module, prefix: str = "", exclude: str | None = None) -> int:
    """Bytes of the parameters and buffers under ``prefix`` (tied tensors once), minus those under ``exclude``."""
    seen, total = set(), 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not name.startswith(prefix) or (exclude and name.startswith(exclude)) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def build_models(preset_name: str, fp8: bool) -> dict[str, torch.nn.Module]:
    """The preset's models with the gpu policy's dtypes, optionally fp8-cast by the real hooks. Call on the meta
    device (weights) or under FakeTensorMode without fp8 (activations: fake parameters refuse ``Module.to``)."""
    from pipeline.loading import component_dtype
    from pipeline.memory import FP8_COMPONENTS, cast_fp8
    from pipeline.models.audio_encoder import build_audio_encoder
    from pipeline.models.image_encoder import build_image_encoder
    from pipeline.models.text_encoder import build_text_encoder
    from pipeline.models.transformer import StableAvatarTransformer3DModel
    from pipeline.models.vae import build_vae
    from pipeline.presets import get_preset

    preset = get_preset(preset_name)
    dtype = {c: component_dtype(c, torch.device("cuda"), "gpu") for c in STAGE_MODEL.values()}

    def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
        for param in model.parameters():  # what Module.to does, without its tensor swap
            param.data = param.data.to(dtype)
        return model

    models = {
        "transformer": StableAvatarTransformer3DModel(**preset.transformer).eval().to_inference_dtype(
            dtype["transformer"]),
        "text_encoder": cast(build_text_encoder(**preset.text_encoder), dtype["text_encoder"]),
        "image_encoder": cast(build_image_encoder(**preset.image_encoder), dtype["image_encoder"]),
        "audio_encoder": cast(build_audio_encoder(**preset.audio_encoder), dtype["audio_encoder"]),
        "vae": cast(build_vae(**preset.vae), dtype["vae"]),
    }
    if fp8:
        for component in FP8_COMPONENTS:
            cast_fp8(component, models[component], dtype[component])
    return models


def largest_cast_copy(model: torch.nn.Module) -> int:
    """Bytes of the biggest compute-dtype copy the fp8 casting hooks make (one layer at a time)."""
    from diffusers.hooks import HookRegistry

    sizes = [sum(p.numel() * 2 for p in m.parameters(recurse=False)) for m in model.modules()
             if isinstance(getattr(m, "_diffusers_hook", None), HookRegistry)
             and m._diffusers_hook.get_hook("layerwise_casting") is not None]
    return max(sizes, default=0)


def stage_activations(preset_name: str, models: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Peak activation bytes of each stage of a ``CLIP_SECONDS`` clip at the preset's 9:16 size (fake tensors)."""
    from pipeline.denoise import CFG_AUDIO_ROWS
    from pipeline.models.image_encoder import encode_image_tokens
    from pipeline.models.vae import StreamingVaeDecoder
    from pipeline.presets import get_preset
    from pipeline.windows import SAMPLE_RATE, plan_windows

    preset = get_preset(preset_name)
    width, height = preset.resolutions["9:16"]
    plan = plan_windows(int(CLIP_SECONDS * SAMPLE_RATE), 10)
    window = plan.windows[0]
    dit, t5, vae = models["transformer"], models["text_encoder"], models["vae"]
    h, w = height // 8, width // 8
    seq_len = 21 * (h // 2) * (w // 2)
    audio = torch.randn(1, window.audio_end - window.audio_start)
    image = torch.randn(3, height, width)
    ids, mask = torch.ones(1, 512, dtype=torch.long), torch.ones(1, 512, dtype=torch.long)
    tokens = models["audio_encoder"](audio).last_hidden_state.shape[1]
    bf16 = torch.bfloat16
    dit_inputs = dict(
        latents=torch.randn(3, 16, 21, h, w, dtype=bf16), y=torch.randn(3, 20, 21, h, w, dtype=bf16),
        timestep=torch.full((3,), 999.0), text_context=[torch.randn(512, dit.config.text_dim, dtype=bf16)] * 3,
        clip_fea=torch.randn(3, 257, dit.config.image_dim, dtype=bf16),
        audio_features=torch.randn(1, tokens, dit.config.audio_in_dim, dtype=bf16), audio_rows=CFG_AUDIO_ROWS,
        seq_len=seq_len)
    video = torch.randn(1, 3, 81, height, width)  # reference_video's shape: the reference frame, then 80 grey
    latents = torch.randn(1, 16, 3, h, w)

    def decode() -> None:
        decoder = StreamingVaeDecoder(vae)
        for i in range(latents.shape[2]):
            decoder.feed(latents[:, :, i:i + 1])

    return {
        "audio": activation_peak(lambda: models["audio_encoder"](audio), models["audio_encoder"], audio),
        "vae_encode": activation_peak(lambda: vae.encode(video), vae, video),
        "clip": activation_peak(lambda: encode_image_tokens(models["image_encoder"], image),
                                models["image_encoder"], image),
        "text": activation_peak(lambda: t5(input_ids=ids, attention_mask=mask), t5),
        "dit": activation_peak(lambda: dit(**dit_inputs, return_dict=False), dit, *dit_inputs.values()),
        "vae_decode": activation_peak(decode, vae, latents),
    }


def weights(models: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Whole models, and the groups that block offloading keeps on the device."""
    dit, t5 = models["transformer"], models["text_encoder"]
    out = {name: stored_bytes(model) for name, model in models.items()}
    out["transformer_top_level"] = stored_bytes(dit, exclude="blocks.")
    out["transformer_block"] = stored_bytes(dit, "blocks.0.")
    out["text_encoder_top_level"] = stored_bytes(t5, exclude="encoder.block.")
    out["text_encoder_block"] = max(stored_bytes(t5, f"encoder.block.{i}.") for i in range(len(t5.encoder.block)))
    return out


def resident(mode: str, stage: str, w: dict[str, int], t5_on_cpu: bool) -> int:
    """Weight bytes on the device while ``stage`` runs under ``mode``."""
    model = STAGE_MODEL[stage]
    if t5_on_cpu and stage == "text":
        return 0
    if mode.startswith("model_offload"):
        return w[model]
    if mode.startswith("block_offload"):
        if stage == "dit":
            return w["transformer_top_level"] + PREFETCHED_DIT_BLOCKS * w["transformer_block"]
        if stage == "text":  # CLIP, the last model of the chain, stays until the stage ends
            return w["image_encoder"] + w["text_encoder_top_level"] + w["text_encoder_block"]
        return w[model]
    return sum(w[m] for m in set(STAGE_MODEL.values()) if not (t5_on_cpu and m == "text_encoder"))


def estimate(preset_name: str) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    started = time.perf_counter()
    out: dict = {"preset": preset_name, "clip_seconds": CLIP_SECONDS, "unit": "bytes; GB = 1e9", "weights": {},
                 "activations": {}, "peaks": {}}
    with torch.device("meta"):
        out["weights"]["bf16"] = weights(build_models(preset_name, fp8=False))
        fp8_models = build_models(preset_name, fp8=True)
        out["weights"]["fp8_weights"] = weights(fp8_models)
    with FakeTensorMode(allow_non_fake_inputs=True):
        bf16 = out["activations"]["bf16"] = stage_activations(preset_name, build_models(preset_name, fp8=False))
    # fp8: the same activations, plus the compute-dtype copy of the layer being cast (T5: its token embedding)
    out["activations"]["fp8_weights"] = dict(bf16, dit=bf16["dit"] + largest_cast_copy(fp8_models["transformer"]),
                                             text=bf16["text"] + largest_cast_copy(fp8_models["text_encoder"]))
    for t5_on_cpu in (False, True):
        for mode in MODES:
            key = "fp8_weights" if "fp8_weights" in mode else "bf16"
            w, act = out["weights"][key], out["activations"][key]
            stages = {s: resident(mode, s, w, t5_on_cpu) + (0 if t5_on_cpu and s == "text" else act[s])
                      for s in STAGES}
            worst = max(stages, key=stages.get)
            name = mode + (" (T5 on CPU)" if t5_on_cpu else "")
            out["peaks"][name] = {"peak_bytes": stages[worst], "peak_gb": round(stages[worst] / GB, 1),
                                  "peak_stage": worst, "stages_gb": {s: round(v / GB, 2) for s, v in stages.items()}}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def table(result: dict) -> str:
    gb = lambda b: f"{b / GB:6.2f}"  # noqa: E731
    lines = [f"Estimated peak GPU memory, {result['clip_seconds']:.0f} s clip at 480x832, preset {result['preset']} "
             "(GB = 1e9 bytes; bench/memory_estimate.py)", "", "weights (bf16 | fp8_weights):"]
    w16, w8 = result["weights"]["bf16"], result["weights"]["fp8_weights"]
    lines += [f"  {name:24s} {gb(w16[name])} | {gb(w8[name])}" for name in w16]
    lines += ["", "stage activations (bf16 | fp8_weights):"]
    a16, a8 = result["activations"]["bf16"], result["activations"]["fp8_weights"]
    lines += [f"  {stage:24s} {gb(a16[stage])} | {gb(a8[stage])}" for stage in STAGES]
    lines += ["", f"  {'mode':38s} {'peak':>6s}  stage       " + " ".join(f"{s:>10s}" for s in STAGES)]
    for name, peak in result["peaks"].items():
        lines.append(f"  {name:38s} {peak['peak_gb']:6.1f}  {peak['peak_stage']:11s} "
                     + " ".join(f"{peak['stages_gb'][s]:10.2f}" for s in STAGES))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="stableavatar-1.3b-random")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "memory_estimate.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = estimate(args.preset)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    text = table(result)
    args.json.with_suffix(".txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
