"""A model, not a measurement: the denoising latency of a 3 s and a 5 s clip on 8 GPUs with and without parallel
units (``denoiser.sp_degree``), from the communication volume in ``bench/results/sp.json`` and a single-GPU
forward time given as a parameter.

No multi-GPU timing exists yet. The inputs are:

* ``--forward-s``: seconds of one batch-3 window-step forward on one GPU at 480x832. Default 1.73 s: the 855 TFLOP
  of ``bench/bench_gpu.py``'s count at 50 % of an H100's 989 TFLOP/s bf16 peak (an assumption; the device kit's
  ``bench_gpu.py`` run gives the measured figure, ``--forward-s`` takes it);
* ``--link-gbs``: GB/s one rank sends at over its links (default 450: NVLink 4 per direction); traffic is counted
  as not overlapped with compute (Ulysses' all-to-alls are not; ring's hops partly are: a pessimistic bound);
* ``--efficiency``: the fraction of ideal speed-up a rank's compute keeps (default 1.0: each rank does
  ``frames per rank / 21`` of the forward's work, parallel padding included, at single-GPU speed);
* bytes per rank per window-step, per degree, from ``sp.json``'s ``volume`` section (``step_volume``: computed,
  and checked against a gloo run in ``tests/test_sequence_parallel.py``).

Per configuration: ``R = GPUs // degree`` replicas run the step's ``U`` units (K windows, or 3·K guidance rows
with ``split_guidance_rows``) in ``ceil(U / R)`` rounds of one unit time (compute + communication; a guidance
row is a third of a batch-3 forward and of its traffic); latency = steps x step time. Pre- and post-processing
(encoders, VAE decode, mp4 encode) and the Orchestrator's per-step overhead are left out.

``bench/device/sp_multi_gpu.sh`` (a node with 8 GPUs; it cannot run on a one-GPU lent device) measures seconds per
unit at each degree with ``bench/bench_sp.py --device cuda``; its figures replace this model's inputs.

    python bench/sp_estimate.py [--forward-s 1.73] [--link-gbs 450] [--json ...] [--txt ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.presets import REAL_TRANSFORMER  # noqa: E402
from pipeline.sequence_parallel.split import FrameSplit, choose_attention  # noqa: E402
from pipeline.windows import plan_windows  # noqa: E402

SAMPLE_RATE = 16_000
OVERLAP = 10  # pipeline.settings' default latent overlap
CLIPS_S = (3.0, 5.0)
GPUS = 8
STEPS = 50
VOLUME = ROOT / "bench" / "results" / "sp.json"


def bytes_per_rank(volume: list[dict], degree: int) -> tuple[str, int]:
    """The scheme ``auto`` takes at ``degree`` and one rank's bytes per batch-3 window-step."""
    scheme = choose_attention(REAL_TRANSFORMER["num_attention_heads"], degree)
    for row in volume:
        if row["degree"] == degree and row["attention"] == scheme:
            return scheme, row["step_bytes_per_rank"]
    raise KeyError(f"{VOLUME.name} has no {scheme} volume at degree {degree}")


def unit_seconds(degree: int, rows: int, forward_s: float, sent_bytes: int, link_gbs: float,
                 efficiency: float, measured: dict[int, float] | None = None) -> float:
    """One unit of ``rows`` guidance rows on a parallel unit of ``degree`` ranks (``measured``: seconds per
    batch-3 unit by degree, where a multi-GPU run gave them)."""
    share = rows / 3
    if measured and degree in measured:
        return measured[degree] * share
    if degree == 1:
        return forward_s * share
    compute = forward_s * share * FrameSplit(degree).frames_per_rank / 21 / efficiency
    return compute + sent_bytes * share / (link_gbs * 1e9)


def estimate(volume: list[dict], forward_s: float, link_gbs: float, efficiency: float, gpus: int = GPUS,
             steps: int = STEPS, measured: dict[int, float] | None = None) -> list[dict]:
    degrees = [1] + sorted({row["degree"] for row in volume if row["degree"] <= gpus})
    rows_out = []
    for seconds in CLIPS_S:
        windows = plan_windows(int(seconds * SAMPLE_RATE), OVERLAP).num_windows
        for degree in degrees:
            scheme, sent = ("-", 0) if degree == 1 else bytes_per_rank(volume, degree)
            replicas = gpus // degree
            for split_rows in (False, True):
                units = windows * (3 if split_rows else 1)
                unit_s = unit_seconds(degree, 1 if split_rows else 3, forward_s, sent, link_gbs, efficiency,
                                      measured)
                rounds = math.ceil(units / replicas)
                rows_out.append({
                    "clip_s": seconds, "windows": windows, "sp_degree": degree, "attention": scheme,
                    "unit_source": "measured" if measured and degree in measured else "model",
                    "split_guidance_rows": split_rows, "replicas": replicas,
                    "gpus_busy": min(units, replicas) * degree, "units_per_step": units, "rounds_per_step": rounds,
                    "unit_s": round(unit_s, 4), "step_s": round(rounds * unit_s, 4),
                    "latency_s": round(steps * rounds * unit_s, 1)})
    return rows_out


def table(rows: list[dict], meta: dict) -> str:
    kind = "Model, not a measurement" if meta["model"] else f"Measured unit times at degrees {meta['measured_degrees']}"
    lines = [f"{kind}: {meta['gpus']} GPUs, {meta['steps']} steps, 480x832; inputs: batch-3 "
             f"forward on one GPU {meta['forward_s']} s ({'assumed' if meta['model'] else 'measured'}), links {meta['link_gbs']} GB/s per rank, "
             f"compute efficiency {meta['efficiency']}, bytes per rank from {meta['volume']}.",
             "Denoising only (no encoders, VAE decode or mp4 encode).", "",
             "| clip | sp_degree | attention | split rows | replicas | GPUs busy | unit s | step s | latency s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clip_s']:g} s ({r['windows']} window{'s' if r['windows'] > 1 else ''}) | "
                     f"{r['sp_degree']} | {r['attention']} | {'yes' if r['split_guidance_rows'] else 'no'} | "
                     f"{r['replicas']} | {r['gpus_busy']} | {r['unit_s']:.3f} | {r['step_s']:.3f} | "
                     f"{r['latency_s']:.1f} |")
    best = {}
    for r in rows:
        key = (r["clip_s"], r["sp_degree"] > 1)
        if key not in best or r["latency_s"] < best[key]["latency_s"]:
            best[key] = r
    lines += ["", "Best per clip, without / with parallel units:"]
    for seconds in CLIPS_S:
        without, with_ = best[(seconds, False)], best[(seconds, True)]
        lines.append(f"- {seconds:g} s: {without['latency_s']:.1f} s without (split rows "
                     f"{'yes' if without['split_guidance_rows'] else 'no'}), {with_['latency_s']:.1f} s with "
                     f"sp_degree {with_['sp_degree']} (split rows {'yes' if with_['split_guidance_rows'] else 'no'},"
                     f" {with_['gpus_busy']} GPUs busy): {without['latency_s'] / with_['latency_s']:.1f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forward-s", type=float, default=1.73)
    parser.add_argument("--link-gbs", type=float, default=450.0)
    parser.add_argument("--efficiency", type=float, default=1.0)
    parser.add_argument("--gpus", type=int, default=GPUS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--volume", type=Path, default=VOLUME)
    parser.add_argument("--measured", type=Path, default=None, help="bench_sp.py --device cuda's JSON: its seconds "
                        "per batch-3 unit replace the model at the degrees it ran (degree 1 sets --forward-s)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "sp_estimate.json")
    parser.add_argument("--txt", type=Path, default=ROOT / "bench" / "results" / "sp_estimate.txt")
    args = parser.parse_args(argv)
    volume = json.loads(args.volume.read_text())["volume"]
    measured = None
    if args.measured is not None:
        timing = json.loads(args.measured.read_text())["timing"]
        measured = {row["degree"]: row["median_s_per_unit"] for row in timing}
        args.forward_s = measured.get(1, args.forward_s)
    rows = estimate(volume, args.forward_s, args.link_gbs, args.efficiency, args.gpus, args.steps, measured)
    meta = {"model": measured is None, "measured_degrees": sorted(measured or {}), "forward_s": args.forward_s, "link_gbs": args.link_gbs, "efficiency": args.efficiency,
            "gpus": args.gpus, "steps": args.steps, "volume": str(args.volume.relative_to(ROOT))
            if args.volume.is_relative_to(ROOT) else str(args.volume)}
    text = table(rows, meta)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    args.txt.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
