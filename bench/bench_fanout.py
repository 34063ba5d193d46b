"""Fan-out of units over Denoiser replicas: efficiency, short-clip latency, fairness, and the caller's CPU time.

The Denoisers run the ``simulated`` stand-in DiT (``bench/simulated.py``): 0.5 s per guidance row, so a batch-3
unit takes 1.5 s, about what one row-forward of the 1.3B model at 480x832 costs on a datacenter GPU; Ray's
per-call overhead then weighs as it would there. The denoising loop runs inside a Serve replica (``BenchCaller``),
exactly as in the Orchestrator: the pipeline's ``denoise`` driving the Ray executor, whose units Serve's router
places with :class:`deployments.workers.placement.StickyBalancedRouter`. Replicas get fake GPUs. In one run:

1. **fan-out**: one job of 24 windows (batch-3 units) on 1, 2, 4 and 8 replicas. ``efficiency_vs_ideal`` =
   (24 x steps x 1.5 s / N) / wall; ``efficiency`` = T1 / (N x TN). Latents must be identical on every N.
2. **short clip**: 2 windows x 10 steps on 1, 2 and 6 replicas, guidance rows split (6 units of 0.5 s per step)
   or not (2 units of 1.5 s); ``short_clip_speedup_6_vs_2`` = T(2 replicas) / T(6 replicas) with split rows.
3. **short jobs first**: three jobs at once on 4 replicas (12, 2 and 2 windows), each also run alone; a short
   job's wall time beside the long one against its time alone (target: within 1.1x), the long job's growth against
   the short jobs' work (target: no more), and each job against its fair share (the completion time under ideal
   max-min sharing of the 4 replicas, simulated as a fluid). The default queue (``shortest_remaining``), then
   ``round_robin`` for comparison; ``--compare-fifo`` adds first come, first served.
4. **scale events**: the 24-window job's placement on 4 replicas, after a fifth joins and after it leaves again:
   units that changed replica (each a cold conditioning cache and step-cache residual there), measured through
   Serve, beside what ``slot mod N`` placement would have moved on the same replicas.
5. **caller CPU**: process CPU time of the replica running the loop, per step and as a fraction of wall time (a
   busy-looping router shows up here as ~100 %).

Every timed run starts after the replicas are running, the caller's router has seen all of them, and one
warm-up step has filled their conditioning caches.

    python bench/bench_fanout.py [--quick] [--compare-fifo] [--only SECTION ...] [--json bench/results/fanout.json]

``--quick`` (about 12 minutes on a quiet 2-core box) runs the fan-out job for 2 steps, the fairness jobs for 5,
and the short clip (always 10 steps) on 2 and 6 replicas only. ``--only`` runs some sections (``fanout``,
``short``, ``fairness``, ``scale``) and replaces just theirs in an existing ``--json`` file (and its table): the
others keep their figures, and ``sources`` in the JSON says which run (time, ``--quick``, load average) each
section's figures come from. The last line printed is one JSON object of the headline numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from bench.simulated import SIMULATED_ROW_S  # noqa: E402
from bench.stats import load_average  # noqa: E402
from deployments.config import AppArgs  # noqa: E402
from deployments.contracts import request_offset  # noqa: E402
from deployments.orchestrator.executor import RayDenoiserExecutor  # noqa: E402
from deployments.workers.denoiser import Denoiser  # noqa: E402
from deployments.workers.placement import moved_units, place, place_units  # noqa: E402
from pipeline.denoise import GuidanceScales, WindowStep, denoise, initial_noise  # noqa: E402
from pipeline.generator import GenerationParams, PipelineSettings, PreparedRequest, StableAvatarPipeline  # noqa: E402
from pipeline.loading import load_models  # noqa: E402
from pipeline.presets import get_preset  # noqa: E402
from testing.media import EXAMPLE_IMAGE, synthetic_speech  # noqa: E402

APP = "bench-fanout"
SECTIONS = ("fanout", "short", "fairness", "scale")
SECTION_KEYS = {  # the result keys each section writes
    "fanout": ("fanout", "fanout_steps", "fanout_identical"),
    "short": ("short_clip", "short_steps", "short_clip_identical", "short_clip_speedup_6_vs_2",
              "short_clip_split_gain_6"),
    "fairness": ("fairness", "fairness_steps", "fairness_replicas", "short_jobs_first"),
    "scale": ("scale",),
}
UNIT_S = {True: SIMULATED_ROW_S, False: 3 * SIMULATED_ROW_S}  # split rows: 1 row per unit; batch 3: 3 rows
PLAN_REPLICAS = (1, 2, 4, 5, 6, 8)  # every replica count a section deploys


@serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
class BenchCaller:
    """Runs a job's denoising loop over the Denoiser replicas, as the Orchestrator does."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    async def run(self, prepared: PreparedRequest, split: bool, request_id: str, expect_replicas: int) -> dict:
        cond = prepared.conditioning
        executor = RayDenoiserExecutor(self.denoiser, ray.put(cond), request_id, retries=0,
                                       num_steps=cond.num_steps)
        latents = initial_noise(prepared.seed, prepared.latent_shape, torch.float32)
        scales = GuidanceScales(cond.text_scale, cond.audio_scale) if split else None
        await self._warm_up(prepared, executor, latents, scales, expect_replicas)
        step_ends: list[float] = []
        cpu, started = time.process_time(), time.perf_counter()
        out = await denoise(prepared.plan, latents, cond.num_steps, executor, split_guidance=scales,
                            on_step=lambda _s, _x: step_ends.append(time.perf_counter() - started))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {"wall_s": wall, "cpu_s": cpu, "step_ends_s": step_ends,
                "units_per_replica": dict(executor.units_per_replica), "placement": list(executor.last_placement),
                "latents_sha256": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest()}

    async def _warm_up(self, prepared, executor, latents, scales, expect_replicas: int) -> None:
        """Untimed: the first units of step 0, one per replica this job can use, until the router has seen every
        replica (Serve's long poll brings new ones to this handle a moment after they run). Sticky placement
        sends the timed run's units to the same replicas, whose conditioning caches are now warm."""
        rows = ((0,), (1,), (2,)) if scales is not None else ((0, 1, 2),)
        units = [WindowStep(w.index, 0, latents[:, :, w.start:w.end], r) for w in prepared.plan.windows for r in rows]
        units = units[:min(len(units), expect_replicas)]
        deadline = time.monotonic() + 120
        while True:
            await executor.run(units)
            if len(executor.last_replicas) >= len(units) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        executor.units_per_replica.clear()


class Bench:
    def __init__(self, unit_order: str = "shortest_remaining"):
        self.unit_order = unit_order
        self.replicas = 0
        self.caller = None

    def deploy(self, replicas: int, unit_order: str | None = None) -> None:
        """Scale the Denoisers to ``replicas`` (replicas are added or removed; a new unit order restarts them) and
        wait until all are running."""
        self.unit_order = unit_order or self.unit_order

        def args(count: int) -> AppArgs:
            return AppArgs.model_validate({"preset": "simulated", "preset_modules": ["bench.simulated"],
                                           "device": "cpu", "unit_order": self.unit_order,
                                           "denoiser": {"num_replicas": count, "num_gpus": 1}})

        # A scale event, as autoscaling makes one: ``serve.run`` gives every deployment a new random version (so
        # every replica is replaced) unless it has one; ours changes with the unit order only, which restarts them,
        # and the replica count goes into the options only, never into the replicas' arguments.
        denoiser = Denoiser.options(**args(replicas).denoiser.serve_options(), version=f"bench-{self.unit_order}",
                                    _internal=True).bind(args(max(PLAN_REPLICAS)))
        self.caller = serve.run(BenchCaller.bind(denoiser), name=APP, route_prefix=None)
        running = serve.status().applications[APP].deployments["Denoiser"].replica_states.get("RUNNING")
        assert running == replicas, (running, replicas)
        self.replicas = replicas

    def run(self, prepared: PreparedRequest, split: bool, request_id: str) -> dict:
        return self.caller.run.remote(prepared, split, request_id, self.replicas).result(timeout_s=3600)

    def run_together(self, jobs: list[tuple[str, PreparedRequest]], split: bool) -> dict[str, dict]:
        responses = {name: self.caller.run.remote(prepared, split, name, self.replicas) for name, prepared in jobs}
        return {name: response.result(timeout_s=3600) for name, response in responses.items()}


def prepare(tmp: Path, windows: int, steps: int, seed: int = 1) -> PreparedRequest:
    """Conditioning (tiny encoders) for an audio clip of exactly ``windows`` windows at overlap 10."""
    settings = PipelineSettings()
    latent_frames = 21 + (21 - settings.overlap) * (windows - 1)
    seconds = (4 * (latent_frames - 1) + 1) / 25
    audio = synthetic_speech(tmp / f"speech-{windows}.wav", seconds)
    pipeline = StableAvatarPipeline(load_models(get_preset("simulated"), ["vae", "text_encoder", "image_encoder",
                                                                         "audio_encoder"]), settings)
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="bench", num_inference_steps=steps,
                                                                       seed=seed))
    assert prepared.plan.num_windows == windows, prepared.plan.num_windows
    return prepared


def fair_share(works: dict[str, float], caps: dict[str, int], capacity: int) -> dict[str, float]:
    """Completion times under ideal max-min sharing of ``capacity`` replicas: at every moment the active jobs get
    equal shares, a job never more than ``caps`` (its units per step), the rest spread over the others."""
    remaining, done, now = dict(works), {}, 0.0
    while remaining:
        rates, free, active = {}, float(capacity), sorted(remaining, key=lambda j: caps[j])
        for i, job in enumerate(active):
            rates[job] = min(caps[job], free / (len(active) - i))
            free -= rates[job]
        dt = min(remaining[j] / rates[j] for j in remaining)
        now += dt
        for job in list(remaining):
            remaining[job] -= rates[job] * dt
            if remaining[job] <= 1e-9:
                done[job] = now
                del remaining[job]
    return done


def fanout(bench: Bench, prepared: PreparedRequest, n: int, t1: float | None) -> dict:
    """The 24-window job on the ``n`` replicas deployed now; ``t1``: its wall time on one replica."""
    steps, windows = prepared.conditioning.num_steps, prepared.plan.num_windows
    result = bench.run(prepared, False, f"fanout-{n}")
    wall = result["wall_s"]
    t1 = wall if n == 1 else t1
    ideal = windows * steps * UNIT_S[False] / n
    row = {"replicas": n, "wall_s": round(wall, 2), "ideal_s": round(ideal, 2),
           "efficiency_vs_ideal": round(ideal / wall, 3), "efficiency": round(t1 / (n * wall), 3) if t1 else None,
           "overhead_per_step_s": round((wall - ideal) / steps, 3),
           "units_per_replica": sorted(result["units_per_replica"].values()),
           "caller_cpu_s_per_step": round(result["cpu_s"] / steps, 4),
           "caller_cpu_fraction": round(result["cpu_s"] / wall, 4), "latents_sha256": result["latents_sha256"],
           "load_average": load_average()}
    print(row, flush=True)
    return row


def short_clip(bench: Bench, prepared: PreparedRequest, n: int) -> list[dict]:
    """The 2-window clip on the ``n`` replicas deployed now, batch-3 units and split rows."""
    steps = prepared.conditioning.num_steps
    rows = []
    for split in (False, True):
        units = prepared.plan.num_windows * (3 if split else 1)
        result = bench.run(prepared, split, f"short-{n}-{split}")
        ideal = steps * -(-units // n) * UNIT_S[split]
        rows.append({"replicas": n, "split_rows": split, "units_per_step": units,
                     "wall_s": round(result["wall_s"], 2), "ideal_s": round(ideal, 2),
                     "caller_cpu_s_per_step": round(result["cpu_s"] / steps, 4),
                     "caller_cpu_fraction": round(result["cpu_s"] / result["wall_s"], 4),
                     "latents_sha256": result["latents_sha256"], "load_average": load_average()})
        print(rows[-1], flush=True)
    return rows


def fairness(bench: Bench, jobs: list[tuple[str, PreparedRequest]], replicas: int, unit_order: str) -> list[dict]:
    """The three jobs alone, one after another, then at once."""
    if unit_order != bench.unit_order:
        bench.deploy(replicas, unit_order)
    alone = {name: bench.run(prepared, False, f"{name}-alone-{unit_order}")["wall_s"] for name, prepared in jobs}
    results = bench.run_together([(f"{name}-{unit_order}", prepared) for name, prepared in jobs], split=False)
    results = {name: results[f"{name}-{unit_order}"] for name, _ in jobs}
    works = {name: p.plan.num_windows * p.conditioning.num_steps * UNIT_S[False] for name, p in jobs}
    caps = {name: p.plan.num_windows for name, p in jobs}
    fair = fair_share(works, caps, replicas)
    rows = []
    for name, prepared in jobs:
        wall = results[name]["wall_s"]
        rows.append({"unit_order": unit_order, "job": name, "windows": prepared.plan.num_windows,
                     "wall_s": round(wall, 2), "alone_s": round(alone[name], 2),
                     "vs_alone": round(wall / alone[name], 3), "fair_share_s": round(fair[name], 2),
                     "vs_fair_share": round(wall / fair[name], 3), "work_s": works[name],
                     "placement": sorted(collections.Counter(results[name]["placement"]).items()),
                     "load_average": load_average()})
        print(rows[-1], flush=True)
    return rows


def short_jobs_first(rows: list[dict], unit_order: str) -> dict:
    """The targets of the fairness section for one unit order: each short job's time beside the long one against
    its time alone, and the long job's growth against the short jobs' work (replica-seconds, and per replica)."""
    mine = [r for r in rows if r["unit_order"] == unit_order]
    long, shorts = mine[0], mine[1:]
    short_work = sum(r["work_s"] for r in shorts)
    replicas = [{replica for replica, _n in r["placement"]} for r in shorts]
    return {"unit_order": unit_order, "short_vs_alone_max": max(r["vs_alone"] for r in shorts),
            "shorts_shared_replicas": len(set.intersection(*replicas)),
            "long_growth_s": round(long["wall_s"] - long["alone_s"], 2), "short_work_s": short_work,
            "short_work_per_replica_s": short_work / 4}


def scale_events(bench: Bench, prepared: PreparedRequest) -> dict:
    """The 24-window job's placement on 4 replicas, after a fifth joined and after it left: units moved."""
    def placed(tag: str, replicas: int) -> list[str]:
        deadline = time.monotonic() + 120
        while True:  # until the caller's router sees every replica (Serve's long poll)
            placement = bench.run(prepared, False, "scale-job")["placement"]
            if len(set(placement)) == replicas or time.monotonic() > deadline:
                print(tag, collections.Counter(placement), flush=True)
                return placement

    bench.deploy(4)
    four = placed("4 replicas", 4)
    bench.deploy(5)
    five = placed("5 replicas", 5)
    bench.deploy(4)
    back = placed("4 again", 4)
    units, offset = len(four), request_offset("scale-job")

    def modulo(ids: list[str]) -> list[str]:
        return [place(offset + i, ids) for i in range(units)]

    ids = {name: sorted(set(p)) for name, p in (("four", four), ("five", five), ("back", back))}
    row = {"units": units, "moved_join": moved_units(four, five), "moved_leave": moved_units(five, back),
           "rule_join": moved_units(place_units("scale-job", units, ids["four"]),
                                    place_units("scale-job", units, ids["five"])),
           "modulo_join": moved_units(modulo(ids["four"]), modulo(ids["five"])),
           "modulo_leave": moved_units(modulo(ids["five"]), modulo(ids["back"])),
           "ideal_join": units // 5, "ideal_leave": units - 4 * (units // 4) + units // 5}
    print(row, flush=True)
    return row


def source_line(results: dict, section: str) -> str:
    """Which run a section's figures come from: its time, ``--quick`` and the load average around it."""
    run = results["sources"][section]
    return (f"({run['at']}{', --quick' if run['quick'] else ''}; load average {run['load_before']} before, "
            f"{run['load_after']} after{'; ' + run['note'] if run.get('note') else ''})")


def report(results: dict, out: Path) -> list[str]:
    lines = [f"fan-out benchmark: simulated Denoisers ({SIMULATED_ROW_S} s per guidance row: batch-3 unit "
             f"{UNIT_S[False]} s, split-row unit {UNIT_S[True]} s), fake GPUs, the loop in a Serve replica",
             f"machine: {os.cpu_count()} CPUs; other work shares this machine: wall times are noisy, and each "
             "section says the run and load average its figures come from"]
    if results.get("fanout"):
        lines += ["", f"1. one job of 24 windows x {results['fanout_steps']} steps, batch-3 units",
                  source_line(results, "fanout"),
                  "replicas | wall s | ideal s | vs ideal | T1/(N*TN) | overhead/step s | units per replica | "
                  "caller CPU/step s | caller CPU/wall"]
        for r in results["fanout"]:
            lines.append(f"{r['replicas']:>8} | {r['wall_s']:>6.2f} | {r['ideal_s']:>7.2f} | "
                         f"{r['efficiency_vs_ideal']:>8.3f} | {r['efficiency'] if r['efficiency'] is not None else '-':>9}"
                         f" | {r['overhead_per_step_s']:>15.3f} | {r['units_per_replica']} | "
                         f"{r['caller_cpu_s_per_step']:>17.4f} | {r['caller_cpu_fraction']:.4f}")
        lines.append(f"identical latents on every replica count: {results['fanout_identical']}")
    if results.get("short_clip"):
        lines += ["", f"2. short clip: 2 windows x {results['short_steps']} steps", source_line(results, "short"),
                  "replicas | split rows | units/step | wall s | ideal s | caller CPU/wall"]
        for r in results["short_clip"]:
            lines.append(f"{r['replicas']:>8} | {str(r['split_rows']):>10} | {r['units_per_step']:>10} | "
                         f"{r['wall_s']:>6.2f} | {r['ideal_s']:>7.2f} | {r['caller_cpu_fraction']:.4f}")
        lines.append(f"speed-up 6 vs 2 replicas, split rows: {results['short_clip_speedup_6_vs_2']}x (ideal 3.0); "
                     f"split vs batch-3 on 6 replicas: {results['short_clip_split_gain_6']}x; identical latents "
                     f"per setting on every replica count: {results['short_clip_identical']}")
    if results.get("fairness"):
        lines += ["", f"3. three jobs at once on {results['fairness_replicas']} replicas, "
                      f"{results['fairness_steps']} steps, batch-3 units, each also alone; fair share = completion "
                      "under ideal max-min sharing", source_line(results, "fairness"),
                  "unit order         | job     | windows | wall s | alone s | vs alone | fair share s | "
                  "vs fair share | units per replica (last step)"]
        for r in results["fairness"]:
            lines.append(f"{r['unit_order']:<18} | {r['job']:<7} | {r['windows']:>7} | {r['wall_s']:>6.2f} | "
                         f"{r['alone_s']:>7.2f} | {r['vs_alone']:>8.3f} | {r['fair_share_s']:>12.2f} | "
                         f"{r['vs_fair_share']:>13.3f} | {[n for _, n in r['placement']]}")
        for t in results["short_jobs_first"]:
            lines.append(f"{t['unit_order']}: a short job beside the long one took at most {t['short_vs_alone_max']}x "
                         f"its time alone (target 1.1x); the long job grew by {t['long_growth_s']} s against the "
                         f"short jobs' {t['short_work_s']} replica-seconds of work ({t['short_work_per_replica_s']} "
                         f"s per replica); replicas the short jobs shared: {t.get('shorts_shared_replicas', '-')}")
    scale = results.get("scale")
    if scale:
        lines += ["", f"4. scale events: the {scale['units']}-unit job on 4 replicas, a fifth joins, then leaves "
                      "(units that changed replica = cold caches there)", source_line(results, "scale"),
                  f"rendezvous placement, measured through Serve: {scale['moved_join']} moved when it joined (the "
                  f"rule says {scale['rule_join']}), {scale['moved_leave']} when it left; slot mod N on the same "
                  f"replicas: {scale['modulo_join']} and {scale['modulo_leave']}; the least any balanced placement "
                  f"moves: {scale['ideal_join']} and {scale['ideal_leave']}"]
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return lines


def merged(results: dict, sections: list[str], path: Path) -> dict:
    """``results`` of the ``sections`` run now, over the other sections' figures in ``path`` (if any): the file's
    ``sources`` say which run each section comes from (a file without them: its own run for every section)."""
    if set(sections) == set(SECTIONS) or not path.exists():
        return results
    old = json.loads(path.read_text())
    whole_run = {k: old.get(k) for k in ("at", "quick", "load_before", "load_after")} | {"at": "an earlier run"}
    sources = old.get("sources") or dict.fromkeys(SECTIONS, whole_run)
    out = {key: value for key, value in old.items() if key not in ("quick", "load_before", "load_after")}
    out.update(sources={**sources, **results["sources"]}, total_s=results["total_s"])  # one run's: in sources
    for section in sections:
        out.update({key: results[key] for key in SECTION_KEYS[section]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fanout.json")
    parser.add_argument("--quick", action="store_true", help="fewer steps for the long jobs (under 10 min)")
    parser.add_argument("--compare-fifo", action="store_true", help="repeat the fairness run with FIFO queues")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these parts (the JSON then lacks the others' numbers)")
    args = parser.parse_args()

    fanout_steps, fair_steps, short_steps = (2, 5, 10) if args.quick else (10, 10, 10)
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = load_average(1)
    ray.init(address="local", num_cpus=4, num_gpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            big, short = prepare(Path(tmp), 24, fanout_steps), prepare(Path(tmp), 2, short_steps)
            scale_job = prepare(Path(tmp), 24, 1)
            jobs = [("long", prepare(Path(tmp), 12, fair_steps)), ("short-a", prepare(Path(tmp), 2, fair_steps, 2)),
                    ("short-b", prepare(Path(tmp), 2, fair_steps, 3))]
        bench, fan, clip, fair, scale = Bench(), [], [], [], None
        # replica counts grow (a scale-up adds replicas and keeps the running ones and their caches), but for the
        # scale section's step from 4 to 5 and back
        plan = {"fanout": (1, 2, 4, 8), "short": (2, 6) if args.quick else (1, 2, 6), "fairness": (4,),
                "scale": (4,)}
        counts = sorted({n for section in args.only for n in plan[section]})
        for n in counts:
            bench.deploy(n)
            if "fanout" in args.only and n in plan["fanout"]:
                fan.append(fanout(bench, big, n, fan[0]["wall_s"] if fan and fan[0]["replicas"] == 1 else None))
            if "short" in args.only and n in plan["short"]:
                clip += short_clip(bench, short, n)
            if "fairness" in args.only and n == 4:
                fair += fairness(bench, jobs, 4, "shortest_remaining")
            if "scale" in args.only and n == 4:
                scale = scale_events(bench, scale_job)
        if "fairness" in args.only:  # the other orders restart the replicas: last
            for order in ("round_robin", "fifo") if args.compare_fifo else ("round_robin",):
                fair += fairness(bench, jobs, 4, order)
    finally:
        serve.shutdown()
        ray.shutdown()

    wall = {(r["replicas"], r["split_rows"]): r["wall_s"] for r in clip}

    def ratio(a, b):
        return round(wall[a] / wall[b], 3) if a in wall and b in wall else None

    run = {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
           "load_before": load_before, "load_after": load_average(1)}
    results = {
        "quick": args.quick, "fanout_steps": fanout_steps, "short_steps": short_steps, "fairness_steps": fair_steps,
        "fairness_replicas": 4, "row_s": SIMULATED_ROW_S, "load_before": load_before,
        "load_after": run["load_after"], "fanout": fan, "short_clip": clip, "fairness": fair, "scale": scale,
        "short_jobs_first": [short_jobs_first(fair, order) for order in dict.fromkeys(r["unit_order"] for r in fair)],
        "fanout_identical": len({r["latents_sha256"] for r in fan}) == 1 if fan else None,
        "short_clip_identical": all(len({r["latents_sha256"] for r in clip if r["split_rows"] == s}) == 1
                                    for s in (False, True)) if clip else None,
        "short_clip_speedup_6_vs_2": ratio((2, True), (6, True)),
        "short_clip_split_gain_6": ratio((6, False), (6, True)),
        "total_s": round(time.perf_counter() - started, 1), "sources": dict.fromkeys(args.only, run),
    }
    results = merged(results, args.only, args.json)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(report(results, args.json)))
    print(json.dumps(headline(results)))


def headline(results: dict) -> dict:
    fan, clip, fair = (results[k] or [] for k in ("fanout", "short_clip", "fairness"))
    scale = results["scale"]
    rr = [r for r in fair if r["unit_order"] == "shortest_remaining"]
    targets = {t["unit_order"]: t for t in results["short_jobs_first"]}
    at8 = next((r for r in fan if r["replicas"] == 8), {})
    return {
        "efficiency_vs_ideal_8": at8.get("efficiency_vs_ideal"), "efficiency_8": at8.get("efficiency"),
        "short_clip_speedup_6_vs_2": results["short_clip_speedup_6_vs_2"],
        "fairness_worst_vs_fair_share": max((r["vs_fair_share"] for r in rr), default=None),
        "short_vs_alone_max": targets.get("shortest_remaining", {}).get("short_vs_alone_max"),
        "long_growth_s": targets.get("shortest_remaining", {}).get("long_growth_s"),
        "short_work_s": targets.get("shortest_remaining", {}).get("short_work_s"),
        "shorts_shared_replicas": targets.get("shortest_remaining", {}).get("shorts_shared_replicas"),
        "round_robin_short_vs_alone_max": targets.get("round_robin", {}).get("short_vs_alone_max"),
        "scale_moved_join": scale and scale["moved_join"], "scale_modulo_join": scale and scale["modulo_join"],
        "fifo_worst_vs_fair_share": max((r["vs_fair_share"] for r in fair if r["unit_order"] == "fifo"),
                                        default=None),
        "caller_cpu_fraction_max": max((r["caller_cpu_fraction"] for r in fan + clip), default=None),
        "caller_cpu_s_per_step_8": at8.get("caller_cpu_s_per_step"),
        "identical": results["fanout_identical"] is not False and results["short_clip_identical"] is not False,
        "total_s": results["total_s"],
    }


if __name__ == "__main__":
    main()
