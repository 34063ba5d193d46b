"""Retention sweep cost: how long a sweep takes, side by side per jobs database and storage, in one run.

For each (database, storage) pair: ``--jobs`` finished jobs, each naming two inputs, a result and a checkpoint
(4 objects each), plus ``--orphans`` loose uploads, all past their TTL (rows back-dated in the database, local
files back-dated, S3 objects aged by passing a later ``now``), and as many live jobs that must stay. Measured:

- ``full``: the sweep that deletes everything expired (row purges per second: each expired job counts four, its
  results, inputs and checkpoint marked purged and then its record deleted; objects deleted per second);
- ``idle``: the next sweep, with nothing expired but the live rows and their objects still there (the steady-state
  cost of one sweep every ``sweep_interval_s``: a few indexed queries plus one listing of the four prefixes), in
  the worst case for the listing: every live object is older than its TTL by the objects' clock, so each one is
  listed and checked against the rows (``named_keys``) before it is kept;
- ``named_keys``: one orphan-check batch (500 keys) against the live rows (p50/p95).

Databases: SQLite (``synchronous=FULL``, the default) and PostgreSQL (a throw-away cluster, default durability).
Storage: local files and SeaweedFS S3 (``weed mini`` on 127.0.0.1). The machine is shared: numbers are noisy.

    python bench/bench_retention.py [--jobs 2000] [--orphans 1000] [--json bench/results/retention.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from bench.stats import load_average, percentile  # noqa: E402
from deployments.jobstore import (  # noqa: E402
    JobLimits,
    JobStore,
    PostgresJobsConfig,
    SqliteJobsConfig,
    SyncJobStore,
    make_sync_job_store,
)
from deployments.orchestrator.retention import DAY, RetentionConfig, sweep_once  # noqa: E402
from deployments.storage import LocalStorage, LocalStorageConfig, S3Storage, S3StorageConfig, Storage  # noqa: E402
from testing.postgres import run_postgres  # noqa: E402
from testing.seaweedfs import run_seaweedfs  # noqa: E402

INPUT = {"image_url": "stored", "audio_url": "stored", "prompt": "a person talking"}
AGE_S = 40 * DAY  # past every default TTL, records included


def make_jobs(store: SyncJobStore, storage: Storage, n: int, tag: str, threads: int) -> list[str]:
    """``n`` finished jobs with 4 objects each: two inputs, a checkpoint left behind and a result."""
    inputs = {}
    for i in range(n):
        keys = [f"inputs/k{i % 8}/{tag}{i}/image.png", f"inputs/k{i % 8}/{tag}{i}/audio.wav"]
        job_id = store.submit(app_id="a", input=INPUT, seed=i, owner=f"k{i % 8}", input_keys=keys,
                              rate_limited=False).request_id
        inputs[job_id] = keys
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(n):
            claimed = store.claim("bench", 600)
            checkpoint = f"checkpoints/{claimed.request_id}/e1/latents.pt"
            result = f"results/{claimed.request_id}/e1/output.mp4"
            list(pool.map(lambda k: storage.put_bytes(k, b"x" * 64, "application/octet-stream"),
                          [*inputs[claimed.request_id], checkpoint, result]))
            store.record_checkpoint(claimed.request_id, claimed.epoch, checkpoint, 5)
            store.complete(claimed.request_id, claimed.epoch, result={"video": {"key": result}}, result_keys=[result])
    return list(inputs)


def back_date(store: SyncJobStore, seconds: float) -> None:
    with store.backend.write() as cur:
        cur.execute(store.backend.sql("UPDATE jobs SET created_at = created_at - ?, started_at = started_at - ?, "
                                      "completed_at = completed_at - ?"), (seconds, seconds, seconds))


def age_local_files(storage: Storage, seconds: float) -> None:
    if isinstance(storage, LocalStorage):
        past = time.time() - seconds
        for path in storage.root.rglob("*"):
            if path.is_file() and path.relative_to(storage.root).parts[0] in ("inputs", "results", "checkpoints",
                                                                              "uploads"):
                os.utime(path, (past, past))


def bench_pair(store: SyncJobStore, storage: Storage, jobs: int, orphans: int, threads: int) -> dict[str, Any]:
    retention = RetentionConfig()
    make_jobs(store, storage, jobs, "old", threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: storage.put_bytes(f"uploads/k{i % 8}/{i}/f.png", b"u" * 64, "image/png"),
                      range(orphans)))
    back_date(store, AGE_S)
    live = make_jobs(store, storage, jobs, "new", threads)  # completed now: their rows keep their objects
    # Every object is aged past its TTL by the objects' clock (local: mtimes; S3 stamps LastModified itself, so
    # the sweep runs "later"): the worst case for the listing pass, which then lists and checks every live object.
    age_local_files(storage, AGE_S)
    now = time.time() + (AGE_S if isinstance(storage, S3Storage) else 0)
    facade = JobStore(store)
    try:
        t = time.perf_counter()
        full = asyncio.run(sweep_once(facade, storage, retention, now))
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        idle = asyncio.run(sweep_once(facade, storage, retention, now))
        idle_s = time.perf_counter() - t
    finally:
        facade._executor.shutdown()
    assert full.rows["jobs"] == jobs and sum(full.deleted().values()) == 4 * jobs + orphans + jobs, full
    assert sum(idle.deleted().values()) == 0 and store.get(live[0], "k0") is not None
    live_keys = [f"results/{j}/e1/output.mp4" for j in live] + [f"inputs/k{i % 8}/new{i}/image.png"
                                                                 for i in range(jobs)]
    rng = random.Random(0)
    timings = []
    for _ in range(40):
        batch = rng.sample(live_keys, min(500, len(live_keys)))
        t = time.perf_counter()
        named = store.named_keys(batch)
        timings.append(time.perf_counter() - t)
        assert len(named) == len(batch)
    objects = sum(full.objects.values())
    return {
        "expired_jobs": jobs, "live_jobs": jobs, "objects_deleted": objects, "orphans_deleted": orphans,
        "full_sweep_s": round(full_s, 3), "rows_purged_per_s": round(sum(full.rows.values()) / full_s, 1),
        "objects_deleted_per_s": round(objects / full_s, 1),
        "idle_sweep_s": round(idle_s, 3), "idle_listed_objects": idle.listed,
        "named_keys_500_p50_ms": round(percentile(timings, 50) * 1000, 2),
        "named_keys_500_p95_ms": round(percentile(timings, 95) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--orphans", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8, help="parallel object writes while filling")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "retention.json")
    args = parser.parse_args()
    load_before = load_average()
    results: dict[str, Any] = {}
    limits = JobLimits(max_queue_length=10 * args.jobs, max_queued_per_owner=10 * args.jobs)
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(run_postgres(fast=False))
        weed = stack.enter_context(run_seaweedfs())
        os.environ.update(weed.env())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-retention-")))
        for db in ("sqlite", "postgres"):
            for kind in ("local", "s3"):
                name = f"{db}+{kind}"
                if db == "sqlite":
                    config: Any = SqliteJobsConfig(path=tmp / f"{name}.sqlite3")
                else:
                    dsn_file = tmp / f"{name}.dsn"
                    dsn_file.write_text(pg.create_database("bench"))
                    config = PostgresJobsConfig(dsn_file=dsn_file)
                store = make_sync_job_store(config, tmp / "unused", limits)
                storage: Storage = (LocalStorage(LocalStorageConfig(root=tmp / name)) if kind == "local" else
                                    S3Storage(S3StorageConfig(kind="s3", bucket=weed.bucket, prefix=name.replace("+", "-"),
                                                              endpoint_url=weed.endpoint_url)))
                try:
                    results[name] = bench_pair(store, storage, args.jobs, args.orphans, args.threads)
                finally:
                    store.close()
                print(name, results[name], flush=True)
    load_after = load_average()
    header = (f"retention sweep with {args.jobs} expired + {args.jobs} live jobs (4 objects each) and {args.orphans} "
              f"orphaned uploads; load average before/after {load_before} / {load_after} on {os.cpu_count()} CPUs (shared machine: noisy)")
    columns = ("full_sweep_s", "rows_purged_per_s", "objects_deleted_per_s", "idle_sweep_s", "idle_listed_objects",
               "named_keys_500_p50_ms", "named_keys_500_p95_ms")
    lines = [header, f"{'pair':<16} | " + " | ".join(f"{c:>22}" for c in columns)]
    for name, row in results.items():
        lines.append(f"{name:<16} | " + " | ".join(f"{row[c]:>22}" for c in columns))
    text = "\n".join(lines)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"header": header, "python": platform.python_version(), "results": results},
                                    indent=2) + "\n")
    args.json.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
