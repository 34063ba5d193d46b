"""Jobs per minute of the whole service under one load probe, for several commits side by side in one run.

Each commit (by default the store before the jobs database, ``fffc418``, and this working tree) is unpacked
(:mod:`bench.trees`) and runs :mod:`bench.throughput_probe` in a process and Ray cluster of its own, one after the
other: the same queued tiny jobs (1 step, 1 s of audio, data-URI inputs, submitted at once), the same status
polling rate, each tree's defaults otherwise. Reported per commit: jobs per minute (completed jobs over the span
from the first job's start to the last one's end, from the jobs' own log lines) and the median prepare, decode +
encode and total times per job, with the load average around each run (the machine is shared: compare commits
within one run, not across runs), and each Serve actor's CPU seconds per job (by thread in the JSON);
``--profile`` adds each actor's busiest Python stacks.

    python bench/bench_throughput.py [--jobs 150] [--commits fffc418 working-tree] [--profile]
        [--variant LABEL COMMIT JSON]   # e.g. the working tree with other app args, in the same run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import load_average  # noqa: E402
from bench.trees import WORKING_TREE, describe, run_in_tree, unpack  # noqa: E402

PROBE = ROOT / "bench" / "throughput_probe.py"
OLD_STORE_COMMIT = "fffc418"  # the last commit with the single JobQueue replica (before the jobs database)


def probe(label: str, commit: str, app_args: dict[str, Any], tmp: Path, jobs: int, poll_hz: float,
          profile: bool) -> dict[str, Any]:
    tree = tmp / commit if (tmp / commit).exists() else unpack(commit, tmp / commit)  # a variant reuses it
    argv = [str(PROBE), "--jobs", str(jobs), "--poll-hz", str(poll_hz), "--app-args", json.dumps(app_args)]
    started = time.monotonic()
    result = run_in_tree(tree, argv + (["--profile"] if profile else []), "PROBE_RESULT", timeout_s=3600)
    result |= {"commit": label, "tree": commit, "app_args": app_args, "describe": describe(commit),
               "wall_s": round(time.monotonic() - started, 1)}
    print(f"{label}: {result['jobs_per_min']} jobs/min, medians {result['median_s']}, load "
          f"{result['load_avg']}", flush=True)
    return result


def text_report(report: dict[str, Any]) -> str:
    runs = report["runs"]
    width = max(14, *(len(r["commit"]) for r in runs))
    lines = [report["what"], f"machine: {report['machine']}", "",
             f"{'commit':<{width}} | {'jobs/min':>8} | {'prepare':>7} | {'decode+encode':>13} | {'total':>6} | "
             f"{'submit p50':>10} | {'status p95':>10} | load avg before -> after"]
    for r in runs:
        m = r["median_s"]
        lines.append(f"{r['commit']:<{width}} | {r['jobs_per_min']:>8.1f} | {m['prepare_s']:>6.2f}s | "
                     f"{m['decode_encode_s']:>12.2f}s | {m['total_s']:>5.2f}s | {r['submit_p50_ms']:>8.1f}ms | "
                     f"{r['status_p95_ms']:>8.1f}ms | {r['load_avg']['before']} -> {r['load_avg']['after']}")
    lines.append("(prepare, decode+encode, total: medians per job)")
    lines += [f"  {r['commit']}: {r['describe']}{' with ' + json.dumps(r['app_args']) if r.get('app_args') else ''}; "
              f"{r['completed']}/{r['jobs']} completed in {r['span_s']} s" for r in runs]
    base = runs[0]
    for r in runs[1:]:
        lines.append(f"  {r['commit']} / {base['commit']}: {r['jobs_per_min'] / base['jobs_per_min']:.2f}x jobs/min")
    lines += ["", "CPU seconds per completed job, by Serve actor (all its threads):"]
    for r in runs:
        per_actor = {actor.split("#")[1] if "#" in actor else actor.split("-")[0].removeprefix("SERVE_"):
                     sum(p["cpu_s_by_thread"].values()) / r["completed"] for actor, p in r["profile"].items()}
        lines.append(f"  {r['commit']:<{width}} " + ", ".join(f"{a} {s:.2f}" for a, s in sorted(per_actor.items())))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=150)
    parser.add_argument("--poll-hz", type=float, default=4.0, help="status requests per second while jobs run")
    parser.add_argument("--commits", nargs="+", default=[OLD_STORE_COMMIT, WORKING_TREE],
                        help=f"commits to compare, the first is the baseline ({WORKING_TREE}: this checkout)")
    parser.add_argument("--variant", nargs=3, action="append", default=[], metavar=("LABEL", "COMMIT", "JSON"),
                        help="one more run after the commits: COMMIT with JSON merged over the probe's app args, "
                             "reported as LABEL (e.g. wt-no-short working-tree '{\"short_job_slots\": 0}')")
    parser.add_argument("--profile", action="store_true", help="sample stacks and thread CPU in every Serve actor")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    args = parser.parse_args()
    started, load_start = time.monotonic(), load_average()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        plan = [(commit, commit, {}) for commit in args.commits]
        plan += [(label, commit, json.loads(app_args)) for label, commit, app_args in args.variant]
        for label, commit, app_args in plan:
            runs.append(probe(label, commit, app_args, Path(tmp), args.jobs, args.poll_hz, args.profile))
    report = {"what": f"{args.jobs} queued tiny jobs (1 step, 1 s audio, data-URI inputs, submitted at once), status "
                      f"polled {args.poll_hz:g}/s; each commit in its own process and Ray cluster, one after the other",
              "machine": {"cpus": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": load_average(),
                          "shared": "other sessions run on this machine: compare commits within this run"},
              "duration_s": round(time.monotonic() - started, 1), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    text = text_report(report)
    args.json.with_suffix(".txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
