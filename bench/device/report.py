"""The readable table of a ``bench/bench_gpu.py`` result (``gpu.txt`` beside ``gpu.json``): what was measured, what
was skipped and why, what failed. Rewritten with the JSON after every phase."""

from __future__ import annotations

from typing import Any


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _mem(entry: dict | None) -> str:
    if not entry:
        return "-"
    if entry.get("peak_gpu_memory_gb") is not None:
        return f"{entry['peak_gpu_memory_gb']:.2f} GiB GPU"
    if entry.get("peak_host_rss_gb") is not None:
        return f"{entry['peak_host_rss_gb']:.2f} GiB host RSS"
    return "-"


def render(out: dict[str, Any]) -> str:
    meta, card = out.get("meta", {}), out.get("card", {})
    lines = [f"bench_gpu: preset {meta.get('preset')} on {card.get('name') or meta.get('device')}, "
             f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, diffusers {meta.get('diffusers')}, "
             f"python {meta.get('python')}, "
             f"started {meta.get('started')}" + (f", finished {meta['finished']}" if meta.get("finished") else "")]
    if meta.get("note"):
        lines.append(f"note: {meta['note']}")
    if meta.get("weights"):
        lines.append(f"weights: {meta['weights']}")
    peak = card.get("bf16_peak_tflops")
    if card:
        lines.append(f"card: bf16 dense peak {peak or '-'} TFLOP/s, measured 8192^3 bf16 matmul "
                     f"{card.get('matmul_bf16_tflops') or '-'} TFLOP/s")
    lines.append("")

    forward = out.get("forward", {})
    for batch in ("batch1", "batch3"):
        entry = forward.get(batch)
        if entry:
            tflops = entry["achieved_tflops"]
            share = f", {entry['fraction_of_peak']:.0%} of peak" if entry.get("fraction_of_peak") else ""
            lines.append(f"DiT forward {batch} (one window): {_ms(entry['latency_s_min'])} min, "
                         f"{_ms(entry['latency_s_mean'])} mean; {entry['tflop']} TFLOP, {tflops} TFLOP/s{share}")
    if forward:
        lines.append(f"  peak memory: {_mem(forward)}")
    sdpa = out.get("sdpa")
    if sdpa:
        lines.append(f"attention: diffusers backend {sdpa['diffusers_backend']}; ops {', '.join(sdpa['attention_ops'])}")
    pre = out.get("preprocess")
    if pre:
        lines.append(f"preprocess at {pre['width']}x{pre['height']}: prepare (cold) {_s(pre['prepare_cold_s'])}; "
                     f"T5 {_ms(pre['t5_prompt_s'])}, CLIP {_ms(pre['clip_s'])}, wav2vec (all {pre['windows']} "
                     f"windows) {_ms(pre['wav2vec_all_windows_s'])}, VAE encode {_ms(pre['vae_encode_s'])}; "
                     f"peak {_mem(pre)}")
    decode = out.get("vae_decode")
    if decode:
        lines.append(f"VAE decode: {decode['frames']} frames in {_s(decode['seconds'])} = "
                     f"{decode['frames_per_s']} frames/s; peak {_mem(decode)}")
    e2e = out.get("e2e")
    if e2e:
        stages = e2e["peak_memory_per_stage"]
        lines += [f"clip of {e2e['audio_s']} s ({e2e['frames']} frames, {e2e['windows']} windows) at "
                  f"{e2e['steps']} steps: prepare {_s(e2e['prepare_s'])}, denoise {_s(e2e['denoise_s'])} "
                  f"({_ms(e2e['denoise_s_per_window_step'])} per window-step), decode+encode "
                  f"{_s(e2e['decode_encode_s'])}, total {_s(e2e['total_s'])}",
                  "  peak memory: " + ", ".join(f"{k} {_mem(v)}" for k, v in stages.items())]
        ex = e2e.get("extrapolated")
        if ex:
            lines.append(f"  at {ex['steps']} steps: denoise {_s(ex['denoise_s'])}, total {_s(ex['total_s'])}; "
                         f"GPU-seconds per output second: {ex['gpu_seconds_per_output_second']}")
    modes = out.get("memory_modes")
    if modes:
        lines += ["", f"memory modes ({modes.get('steps')} steps; latents vs {modes.get('reference_mode')}):",
                  f"  {'mode':28s} {'prepare':>9s} {'denoise':>9s} {'decode':>9s} {'peak':>22s}  max|d|"]
        for mode, clip in modes.get("modes", {}).items():
            if "skipped" in clip:
                lines.append(f"  {mode:28s} skipped: {clip['skipped']}")
                continue
            peak_mem = max((_mem(v) for v in clip["peak_memory_per_stage"].values()), key=lambda t: float(
                t.split()[0]) if t != "-" else -1)
            lines.append(f"  {mode:28s} {_s(clip['prepare_s']):>9s} {_s(clip['denoise_s']):>9s} "
                         f"{_s(clip['decode_encode_s']):>9s} {peak_mem:>22s}  "
                         f"{clip['latents_max_abs_diff_vs_reference']:.3g}")
    compiled = out.get("compile")
    if compiled:
        fw = compiled.get("forward", {}).get("batch3", {})
        lines += ["", f"compile ({compiled['how']}): warm-up {compiled['warmup_s']}; batch3 {_ms(fw.get('latency_s_min'))}"
                  f"; clip {_s(compiled.get('e2e', {}).get('total_s'))}"]
    for name in ("acceleration", "split_rows"):
        if name in out:
            lines.append(f"{name}: see gpu.json")
    if out.get("skipped"):
        lines += ["", "skipped:"] + [f"  {k}: {v}" for k, v in out["skipped"].items()]
    if out.get("errors"):
        lines += ["", "errors:"] + [f"  {k}: {v.splitlines()[0]}" for k, v in out["errors"].items()]
    return "\n".join(lines) + "\n"
