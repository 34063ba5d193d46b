"""Submit-to-claim latency of an idle Orchestrator runner: polling against LISTEN/NOTIFY, through the runner.

A real :class:`~deployments.orchestrator.runner.JobRunner` (its claim loop, its pause between claims) runs jobs
whose work returns at once, against a PostgreSQL throw-away cluster (Debian's package, default durability); a
second store (the Gateway's) submits one job at a time, at a random moment of the runner's idle pause, and the
time from the submit's return to the start of the job's work is measured. Modes side by side in one run:

- ``postgres poll``: ``dispatch.listen: false``, the runner sleeps ``poll_interval_s`` between empty claims;
- ``postgres notify``: ``dispatch.listen: true`` (the default), it waits in ``wait_for_job`` and a submit's
  NOTIFY wakes it, ``poll_interval_s`` staying the fallback;
- ``sqlite poll``: SQLite has no notifications (what a single machine gets).

    python bench/bench_wakeup.py [--samples 40] [--poll-interval 0.5] [--json bench/results/wakeup.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stats import load_average, summary  # noqa: E402
from deployments.config import AppArgs  # noqa: E402
from deployments.contracts import StoredResult, StoredVideo  # noqa: E402
from deployments.jobstore import PostgresJobsConfig, SqliteJobsConfig, make_job_store  # noqa: E402
from deployments.orchestrator.runner import JobRunner, Run, RunReporter  # noqa: E402
from deployments.storage import LocalStorage, LocalStorageConfig  # noqa: E402
from deployments.storage.keys import result_key  # noqa: E402
from testing.postgres import run_postgres  # noqa: E402

INPUT = {"request": {"image_url": "https://example.invalid/a.png", "audio_url": "https://example.invalid/a.wav",
                     "prompt": "a person talking"}, "stored": {}}


async def measure(config: Any, root: Path, listen: bool, samples: int, poll_s: float) -> dict[str, Any]:
    """Submit ``samples`` jobs one at a time to an idle runner; the submit-to-start latencies."""
    args = AppArgs(storage=LocalStorageConfig(root=root), max_running_jobs=1,
                   dispatch={"poll_interval_s": poll_s, "listen": listen})
    storage = LocalStorage(args.storage)
    started: dict[str, float] = {}

    async def work(run: Run, report: RunReporter) -> StoredResult:
        started[run.request_id] = time.monotonic()
        key = result_key(run.request_id, run.epoch)
        run.uncommitted.add(key)
        await asyncio.to_thread(storage.put_bytes, key, b"video", "video/mp4")
        return StoredResult(video=StoredVideo(key=key, file_size=5), seed=run.job.seed)

    runner_store = make_job_store(config, root / "jobs.sqlite3", args.job_limits())
    gateway = make_job_store(config, root / "jobs.sqlite3", args.job_limits())
    runner = JobRunner(runner_store, storage, args, "bench-runner", work)
    latencies: list[float] = []
    try:
        runner.loop.ensure_running()
        await asyncio.sleep(1.0)  # idle, listening
        for _ in range(samples):
            await asyncio.sleep(random.uniform(0.05, poll_s + 0.3))  # a random moment of the idle pause
            submitted = await gateway.submit(app_id="bench", input=INPUT, seed=1, rate_limited=False)
            returned = time.monotonic()
            while submitted.request_id not in started:
                await asyncio.sleep(0.001)
            latencies.append(started[submitted.request_id] - returned)
            while runner.runs:  # finished before the next one: the runner is idle again
                await asyncio.sleep(0.005)
        await runner.stop()
    finally:
        for store in (runner_store, gateway):
            await asyncio.to_thread(store.close)
    return summary(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="dispatch.poll_interval_s (its default)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "wakeup.json")
    args = parser.parse_args()

    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-wakeup-") as tmp:
        with run_postgres(fast=False) as pg:
            for listen in (False, True):
                dsn_file = Path(tmp) / f"dsn-{listen}"
                dsn_file.write_text(pg.create_database("wake"))
                config = PostgresJobsConfig(dsn_file=dsn_file, pool_max_size=2)
                name = f"postgres {'notify' if listen else 'poll'}"
                results[name] = asyncio.run(measure(config, Path(tmp) / name.replace(" ", "-"), listen,
                                                    args.samples, args.poll_interval))
                print(name, results[name], flush=True)
        sqlite = Path(tmp) / "sqlite"
        results["sqlite poll"] = asyncio.run(measure(SqliteJobsConfig(synchronous="NORMAL"), sqlite, True,
                                                     args.samples, args.poll_interval))
        print("sqlite poll", results["sqlite poll"], flush=True)

    report = {"what": f"submit-to-claim latency of an idle runner through JobRunner's claim loop, "
                      f"{args.samples} jobs per mode, poll_interval_s {args.poll_interval}",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_before": load_before, "load_avg_after": load_average()},
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{report['what']}; load average before/after {load_before} / {report['machine']['load_avg_after']} "
             f"on {report['machine']['cpus']} CPUs (shared machine: noisy)",
             f"{'mode':<18}| {'p50 ms':>8} | {'p95 ms':>8} | {'max ms':>8}"]
    lines += [f"{name:<18}| {r['p50_ms']:>8.1f} | {r['p95_ms']:>8.1f} | {r['max_ms']:>8.1f}"
              for name, r in results.items()]
    poll, notify = results["postgres poll"], results["postgres notify"]
    lines.append(f"postgres: notify p50 is {poll['p50_ms'] / max(notify['p50_ms'], 0.01):.1f}x lower than polling")
    text = "\n".join(lines) + "\n"
    args.json.with_suffix(".txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
