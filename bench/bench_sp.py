"""Sequence parallelism inside a unit: equality per degree, communication volume, and timings per degree.

Sections (``--sections``; the default depends on ``--device``):

* ``equality`` (CPU, gloo, fp32; default on the CPU): for each degree, ``d`` local rank processes run every kind of
  unit (batch-3 window-step, short last window, one guidance row, step cache compute / reuse / rebuild) and the DiT
  forward itself, against the same units on one device: max |d| per degree and scheme. Ulysses runs on the tiny
  architecture with the real model's 12 heads (head dim 8), so every real Ulysses degree (2, 3, 4, 6, 12) is
  exercised; ring runs on the tiny preset (2 heads). Also the bytes each rank sent for one unit against
  ``step_volume`` at the same size.
* ``volume`` (no compute): ``step_volume`` at 480x832 in bf16 for each degree and scheme: bytes per collective
  call, per block and per window-step, per rank and for the unit.
* ``timing`` (default with ``--device cuda``): ``--preset`` (default ``stableavatar-1.3b-random``: real sizes,
  random weights, bf16) at 480x832 on ``d`` local GPUs over NCCL, rank ``r`` on ``cuda:r``, for each degree
  (degree 1 is the baseline, in the same run): seconds per batch-3 window-step unit (median of ``--repeats`` after
  ``--warmup``), speed-up and efficiency against degree 1, peak memory per rank, bytes sent per unit, and max |d|
  of the unit's output against degree 1 (bf16: reported, not a pass/fail).

The ``timing`` section needs as many GPUs on one node as the largest degree: it **cannot run on this 2-core CPU
machine nor on the one-GPU device that a task may be lent**; it is ready for a node with several GPUs:

    python bench/bench_sp.py --device cuda --degrees 1,2,3,4,6,8 --json sp_gpu.json --txt sp_gpu.txt

On the CPU, ``--sections timing --preset tiny --degrees 1,2`` runs the same code at tiny size (``tests/
test_bench_sp.py`` does, so the GPU path cannot rot); CPU timings on a shared machine mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.stats import load_average  # noqa: E402
from pipeline.denoise import WindowStep  # noqa: E402
from pipeline.presets import REAL_RESOLUTIONS, REAL_TRANSFORMER, get_preset  # noqa: E402
from pipeline.sequence_parallel import SequenceParallelRank, step_volume, ulysses_degrees  # noqa: E402
from pipeline.sequence_parallel.local import run_local_ranks  # noqa: E402
from testing.sp_scenarios import CONFIGS, HEIGHT, WIDTH, conditioning, equality_ranks, window_latents  # noqa: E402

SECTIONS = ("equality", "volume", "timing")
CPU_DEGREES = (2, 3, 4, 5, 6, 7, 8, 12)
TOLERANCE = 1e-5
REAL_WIDTH, REAL_HEIGHT = REAL_RESOLUTIONS["9:16"]  # 480 x 832 (same token count as 832 x 480)


def equality(degrees: list[int]) -> list[dict]:
    rows = []
    for degree in degrees:
        schemes = [("tiny-12-heads", "ulysses")] if degree in ulysses_degrees(12) else []
        for config, attention in [*schemes, ("tiny", "ring")]:
            started = time.perf_counter()
            ranks = run_local_ranks(equality_ranks, degree, (config, attention), timeout_s=600)
            rank0 = ranks[0]
            diffs = {kind: float((out - rank0["reference"][kind]).abs().max())
                     for kind, out in rank0["parallel"].items() if kind not in ("stats", "missing_raised")}
            volume = step_volume(CONFIGS[config], WIDTH, HEIGHT, degree, attention, batch=3, dtype_bytes=4)
            rows.append({
                "degree": degree, "attention": attention, "config": config,
                "heads": CONFIGS[config]["num_attention_heads"],
                "dit_max_abs_diff": diffs["dit"], "unit_max_abs_diff": max(diffs.values()),
                "max_abs_diff_by_unit": diffs, "within_tolerance": max(diffs.values()) <= TOLERANCE,
                "bytes_sent_per_rank": ranks[0]["sent"],
                "bytes_match_formula": all(r["sent"] == volume.sent_per_rank for r in ranks),
                "wall_s": round(time.perf_counter() - started, 2),
            })
            print(f"equality degree {degree} {attention}: max|d| {rows[-1]['unit_max_abs_diff']:.2e}", flush=True)
    return rows


def volume_table(degrees: list[int]) -> list[dict]:
    rows = []
    for degree in degrees:
        for attention in (["ulysses"] if degree in ulysses_degrees(12) else []) + ["ring"]:
            v = step_volume(REAL_TRANSFORMER, REAL_WIDTH, REAL_HEIGHT, degree, attention)
            rows.append({
                "degree": degree, "attention": attention, "frames_per_rank": v.local_tokens // v.tokens_per_frame,
                "local_tokens": v.local_tokens, "bytes_per_call": v.bytes_per_call, "calls_per_step": v.calls,
                "block_bytes_per_rank": v.block_rank_bytes, "step_bytes_per_rank": v.rank_bytes,
                "step_bytes_all_ranks": v.unit_bytes,
            })
    return rows


def timing_ranks(group: dist.ProcessGroup, device: torch.device, preset_name: str, width: int, height: int,
                 warmup: int, repeats: int) -> dict:
    """One rank of the timing section: load the preset's DiT, run batch-3 window-step units in lock-step."""
    preset = get_preset(preset_name)
    started = time.perf_counter()
    rank = SequenceParallelRank.from_preset(preset, group, device, dtype_policy="gpu" if device.type == "cuda"
                                            else "fp32")
    load_s = time.perf_counter() - started
    cond, (full, _, _) = conditioning(preset.transformer, width, height), window_latents(width, height)
    full = full.to(next(rank.denoiser.transformer.parameters()).dtype)
    work = WindowStep(0, 1, full)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        rank.run(cond, work)
    seconds, output = [], None
    if rank.comm is not None:
        rank.comm.sent.clear()
    for _ in range(repeats):
        if rank.comm is not None:
            dist.barrier(group)
        sync()
        t0 = time.perf_counter()
        output = rank.run(cond, work)
        sync()
        seconds.append(time.perf_counter() - t0)
    sent = {op: n // repeats for op, n in rank.comm.sent.items()} if rank.comm is not None else {}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": seconds, "load_s": load_s, "output": output, "sent": sent, "peak_bytes": peak,
            "attention": getattr(rank.denoiser.transformer, "attention", None),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def timing(degrees: list[int], device: str, preset: str, width: int, height: int, warmup: int,
           repeats: int) -> list[dict]:
    rows, baseline = [], None
    for degree in sorted(set(degrees) | {1}):
        ranks = run_local_ranks(timing_ranks, degree, (preset, width, height, warmup, repeats), device=device,
                                timeout_s=900)
        per_unit = [max(r["seconds"][i] for r in ranks) for i in range(repeats)]  # the slowest rank's time
        median = statistics.median(per_unit)
        output = ranks[0]["output"].float()
        if degree == 1:
            baseline = {"median_s": median, "output": output}
        rows.append({
            "degree": degree, "attention": ranks[0]["attention"] or "none", "device": ranks[0]["device_name"],
            "median_s_per_unit": median, "min_s_per_unit": min(per_unit),
            "speedup": baseline["median_s"] / median, "efficiency": baseline["median_s"] / median / degree,
            "max_abs_diff_vs_degree_1": float((output - baseline["output"]).abs().max()),
            "peak_bytes_per_rank": max((r["peak_bytes"] or 0) for r in ranks) or None,
            "bytes_sent_per_rank": ranks[0]["sent"], "load_s": round(max(r["load_s"] for r in ranks), 1),
        })
        print(f"timing degree {degree}: {median:.3f} s per unit", flush=True)
    return rows


def text_report(result: dict) -> str:
    lines = [f"sequence parallelism; load average {result['meta']['load_average']}"]
    if "equality" in result:
        lines += ["", "equality with one device (fp32, CPU, gloo; tiny sizes 48x80, seq_len 315; tolerance 1e-5)",
                  "degree | attention | heads | DiT max|d| | units max|d| | within | bytes == formula"]
        lines += [f"{r['degree']} | {r['attention']} | {r['heads']} | {r['dit_max_abs_diff']:.2e} | "
                  f"{r['unit_max_abs_diff']:.2e} | {r['within_tolerance']} | {r['bytes_match_formula']}"
                  for r in result["equality"]]
    if "volume" in result:
        lines += ["", "bytes sent per window-step (batch-3 forward) at 480x832, bf16, 30 blocks; MB = 1e6 bytes",
                  "degree | attention | frames/rank | per call MB (qkv a2a / out a2a or K/V hop) | per block per rank MB"
                  " | per step per rank MB | per step all ranks MB"]
        for r in result["volume"]:
            calls = r["bytes_per_call"]
            per_call = (f"{calls['ulysses_qkv'] / 1e6:.1f} / {calls['ulysses_out'] / 1e6:.1f}"
                        if r["attention"] == "ulysses" else f"{calls['ring_kv'] / 1e6:.1f}")
            lines.append(f"{r['degree']} | {r['attention']} | {r['frames_per_rank']} | {per_call} | "
                         f"{r['block_bytes_per_rank'] / 1e6:.1f} | {r['step_bytes_per_rank'] / 1e6:.0f} | "
                         f"{r['step_bytes_all_ranks'] / 1e6:.0f}")
    if "timing" in result:
        meta = result["meta"]
        lines += ["", f"timing: {meta['preset']} at {meta['width']}x{meta['height']} on {meta['device']}, "
                  f"median of {meta['repeats']} units after {meta['warmup']} warm-up",
                  "degree | attention | device | s per unit | speed-up | efficiency | max|d| vs degree 1 | "
                  "peak GiB per rank"]
        for r in result["timing"]:
            peak = f"{r['peak_bytes_per_rank'] / 2**30:.1f}" if r["peak_bytes_per_rank"] else "-"
            lines.append(f"{r['degree']} | {r['attention']} | {r['device']} | {r['median_s_per_unit']:.3f} | "
                         f"{r['speedup']:.2f} | {r['efficiency']:.2f} | {r['max_abs_diff_vs_degree_1']:.3g} | {peak}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--degrees", default=None, help="comma-separated degrees (default: 2-8 and 12 on the "
                        "CPU; 1 and every valid degree up to the GPU count with --device cuda)")
    parser.add_argument("--preset", default="stableavatar-1.3b-random", help="timing section's preset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sp.json")
    parser.add_argument("--txt", type=Path, default=ROOT / "bench" / "results" / "sp.txt")
    args = parser.parse_args(argv)

    sections = args.sections.split(",") if args.sections else (
        ["volume", "timing"] if args.device == "cuda" else ["equality", "volume"])
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.degrees:
        degrees = [int(d) for d in args.degrees.split(",")]
    elif args.device == "cuda":
        degrees = [1, *[d for d in range(2, min(torch.cuda.device_count(), 21) + 1)]]
    else:
        degrees = list(CPU_DEGREES)
    preset = get_preset(args.preset)
    width, height = preset.resolutions["9:16"]
    result: dict = {"meta": {"device": args.device, "degrees": degrees, "sections": sections,
                             "preset": args.preset, "width": width, "height": height, "warmup": args.warmup,
                             "repeats": args.repeats, "torch": torch.__version__,
                             "load_average": load_average()}}
    if "equality" in sections:
        result["equality"] = equality([d for d in degrees if d > 1])
    if "volume" in sections:
        result["volume"] = volume_table([d for d in degrees if d > 1])
    if "timing" in sections:
        result["timing"] = timing(degrees, args.device, args.preset, width, height, args.warmup, args.repeats)
    result["meta"]["load_average_after"] = load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    args.txt.write_text(text_report(result))
    print(text_report(result))
    failed = [r for r in result.get("equality", []) if not (r["within_tolerance"] and r["bytes_match_formula"])]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
