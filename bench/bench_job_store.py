"""Job store latency with 10,000 job rows: submit and status (get + queue position) p50/p95, per backend.

Backends measured side by side in one run: SQLite with ``synchronous=FULL`` (the default: a commit survives power
loss, one WAL fsync per write), SQLite with ``synchronous=NORMAL``, and PostgreSQL (a throw-away cluster from
Debian's package with its default durability: fsync and synchronous_commit on). The store is filled with
``--rows`` queued jobs (the worst case for the position count and the queue caps: every row is in the queue),
then measured through the blocking API (what a store thread does) and the async facade (what a Serve replica
awaits). Target: p95 of submit and status under 50 ms at 10,000 rows.

    python bench/bench_job_store.py [--rows 10000] [--samples 300] [--json bench/results/job_store.json]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import stats  # noqa: E402
from bench.stats import load_average  # noqa: E402
from deployments.jobstore import (  # noqa: E402
    JobLimits,
    JobStore,
    PostgresJobsConfig,
    SqliteJobsConfig,
    SyncJobStore,
    make_sync_job_store,
)
from testing.postgres import run_postgres  # noqa: E402

INPUT = {"image_url": "uploads/0123456789abcdef/face.png", "audio_url": "uploads/0123456789abcdef/voice.wav",
         "prompt": "a person talking", "num_inference_steps": 50, "guidance_scale": 4.5}
OWNERS = [f"{i:016x}" for i in range(8)]


def summary(seconds: list[float]) -> dict[str, float]:
    return stats.summary(seconds, digits=3)


def limits(rows: int) -> JobLimits:
    return JobLimits(max_queue_length=rows * 2, max_queued_per_owner=rows * 2, rate_per_s=1e6, rate_burst=1000000)


def fill(store: SyncJobStore, rows: int, threads: int) -> tuple[list[tuple[str, str]], float]:
    """``rows`` queued jobs (two priorities, eight keys) through the store's own submit."""
    started = time.perf_counter()

    def one(i: int) -> tuple[str, str]:
        owner = OWNERS[i % len(OWNERS)]
        submitted = store.submit(app_id="fal-ai/stable-avatar", input={**INPUT, "seed": i}, seed=i, owner=owner,
                                 priority="low" if i % 4 == 0 else "normal", rate_limited=False,
                                 input_keys=[f"inputs/{i}/image.png"])
        return submitted.request_id, owner

    if threads == 1:
        ids = [one(i) for i in range(rows)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            ids = list(pool.map(one, range(rows)))
    return ids, time.perf_counter() - started


def measure(store: SyncJobStore, ids: list[tuple[str, str]], samples: int) -> dict[str, Any]:
    rng = random.Random(0)
    out: dict[str, Any] = {}
    submit_s = []
    for i in range(samples):
        t = time.perf_counter()
        store.submit(app_id="fal-ai/stable-avatar", input=INPUT, seed=i, owner=OWNERS[i % len(OWNERS)])
        submit_s.append(time.perf_counter() - t)
    out["submit"] = summary(submit_s)
    for name, call in (
        ("status", lambda rid, owner: store.status(rid, owner)),
        ("status_with_logs", lambda rid, owner: store.status(rid, owner, logs_since=0)),
        ("get", lambda rid, owner: store.get(rid, owner)),
        ("position", lambda rid, owner: store.position(rid)),
    ):
        times = []
        for _ in range(samples):
            rid, owner = rng.choice(ids)
            t = time.perf_counter()
            result = call(rid, owner)
            times.append(time.perf_counter() - t)
            assert result is not None
        out[name] = summary(times)
    claim_s = []
    for i in range(min(samples, 200)):
        t = time.perf_counter()
        job = store.claim(f"bench-runner-{i}", 60)
        store.complete(job.request_id, job.epoch, result={"video": "k"}, result_keys=["k"])
        claim_s.append(time.perf_counter() - t)
    out["claim_and_complete"] = summary(claim_s)
    out["queue_length_after"] = store.queue_length()
    return out


def measure_async(store: SyncJobStore, ids: list[tuple[str, str]], samples: int) -> dict[str, Any]:
    """The same status poll and submit awaited through ``JobStore`` (thread hop included)."""
    facade = JobStore(store)
    rng = random.Random(1)

    async def run() -> dict[str, Any]:
        status_s, submit_s = [], []
        for i in range(samples):
            rid, owner = rng.choice(ids)
            t = time.perf_counter()
            assert await facade.status(rid, owner) is not None
            status_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            await facade.submit(app_id="fal-ai/stable-avatar", input=INPUT, seed=i, owner=OWNERS[i % len(OWNERS)])
            submit_s.append(time.perf_counter() - t)
        return {"status": summary(status_s), "submit": summary(submit_s)}

    try:
        return asyncio.run(run())
    finally:
        facade._executor.shutdown(wait=True)  # the caller closes the store


def bench_backend(name: str, config: Any, path: Path, rows: int, samples: int, fill_threads: int,
                  fill_config: Any = None) -> dict[str, Any]:
    if fill_config is not None:  # fill through a faster-committing instance on the same file, then reopen
        filler = make_sync_job_store(fill_config, path, limits(rows))
        ids, fill_s = fill(filler, rows, fill_threads)
        filler.close()
    store = make_sync_job_store(config, path, limits(rows))
    try:
        if fill_config is None:
            ids, fill_s = fill(store, rows, fill_threads)
        result = {"backend": name, "rows_before": rows, "fill_s": round(fill_s, 1)}
        result.update(measure(store, ids, samples))
        result["async"] = measure_async(store, ids, samples)
        return result
    finally:
        store.close()


def table(results: list[dict[str, Any]]) -> str:
    columns = ["submit", "status", "status_with_logs", "get", "position", "claim_and_complete"]
    lines = [f"{'backend':<16} | " + " | ".join(f"{c + ' p50/p95 ms':>30}" for c in columns)
             + f" | {'async status p50/p95':>22} | {'async submit p50/p95':>22}"]
    for r in results:
        cells = [f"{r[c]['p50_ms']:>14.2f} / {r[c]['p95_ms']:<13.2f}" for c in columns]
        a = r["async"]
        lines.append(f"{r['backend']:<16} | " + " | ".join(cells)
                     + f" | {a['status']['p50_ms']:>9.2f} / {a['status']['p95_ms']:<10.2f}"
                     + f" | {a['submit']['p50_ms']:>9.2f} / {a['submit']['p95_ms']:<10.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "job_store.json")
    args = parser.parse_args()

    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        for sync in ("FULL", "NORMAL"):
            path = Path(tmp) / f"jobs-{sync.lower()}.sqlite3"
            results.append(bench_backend(f"sqlite-{sync.lower()}", SqliteJobsConfig(path=path, synchronous=sync),
                                         path, args.rows, args.samples, 1,
                                         fill_config=SqliteJobsConfig(path=path, synchronous="NORMAL")))
            print(table(results[-1:]), flush=True)
        with run_postgres(fast=False) as pg:
            dsn = pg.create_database("bench")
            os.environ["STABLE_AVATAR_JOBS_DSN"] = dsn
            results.append(bench_backend("postgres", PostgresJobsConfig(pool_max_size=4), Path(tmp) / "unused",
                                         args.rows, args.samples, 4))
            print(table(results[-1:]), flush=True)

    report = {
        "what": f"job store latency with {args.rows} queued rows (worst case for position and caps), "
                f"{args.samples} samples per operation",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": load_before, "load_avg_after": load_average()},
        "target": "submit and status p95 < 50 ms at 10,000 rows",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    text = (f"{report['what']}; load average before/after {report['machine']['load_avg_before']} / "
            f"{report['machine']['load_avg_after']} on {report['machine']['cpus']} CPUs (shared machine: noisy)\n"
            + table(results) + "\n")
    verdicts = []
    for r in results:
        ok = r["submit"]["p95_ms"] < 50 and r["status"]["p95_ms"] < 50
        verdicts.append(f"{r['backend']}: submit p95 {r['submit']['p95_ms']:.2f} ms, status p95 "
                        f"{r['status']['p95_ms']:.2f} ms -> {'within' if ok else 'OVER'} the 50 ms target")
    text += "\n".join(verdicts) + "\n"
    args.json.with_suffix(".txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
