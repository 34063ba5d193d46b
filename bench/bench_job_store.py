"""Job store latency with 10,000 job rows: submit and status (get + queue position) p50/p95, per backend; the cost
of a running job's log lines written one transaction each against one batch; PostgreSQL's submit-to-claim wait,
polling against LISTEN/NOTIFY.

Backends measured side by side in one run: SQLite with ``synchronous=FULL`` (the default: a commit survives power
loss, one WAL fsync per write), SQLite with ``synchronous=NORMAL``, and PostgreSQL (a throw-away cluster from
Debian's package with its default durability: fsync and synchronous_commit on). The store is filled with
``--rows`` queued jobs (the worst case for the position count and the queue caps: every row is in the queue),
then measured through the blocking API (what a store thread does) and the async facade (what a Serve replica
awaits). Target: p95 of submit and status under 50 ms at 10,000 rows.

Log writes: a claimed job gets ``--log-lines`` lines per round, one ``log`` call (one commit) per line against one
``log_batch`` (one commit for all), rounds alternating, per backend. Wake-up (PostgreSQL): an idle runner claims,
then waits ``poll_interval_s`` (0.5 s, the dispatch default) by sleeping (polling) or in ``wait_for_job``
(notified), while another store submits at random moments; the time from the submit's return to the claim.

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
import threading
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
    LogEntry,
    PostgresJobsConfig,
    SqliteJobsConfig,
    SyncJobStore,
    make_sync_job_store,
)
from testing.postgres import run_postgres  # noqa: E402

INPUT = {"image_url": "uploads/0123456789abcdef/face.png", "audio_url": "uploads/0123456789abcdef/voice.wav",
         "prompt": "a person talking", "num_inference_steps": 50, "guidance_scale": 4.5}
OWNERS = [f"{i:016x}" for i in range(8)]
POLL_INTERVAL_S = 0.5  # DispatchConfig.poll_interval_s's default


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


def measure_log_writes(store: SyncJobStore, lines: int, rounds: int) -> dict[str, Any]:
    """``lines`` log lines of a running job, one commit each against one batch, ``rounds`` of each alternating."""
    job_id = store.submit(app_id="fal-ai/stable-avatar", input=INPUT, seed=0, owner="bench-logs",
                          rate_limited=False).request_id
    while (job := store.claim("bench-logger", 600)) is not None and job.request_id != job_id:
        store.complete(job.request_id, job.epoch, result={"video": "k"}, result_keys=["k"])
    assert job is not None
    entries = [LogEntry(message=f"step {i + 1}/{lines}: 1.23 s") for i in range(lines)]
    single, batched = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for entry in entries:
            store.log(job_id, job.epoch, entry.message)
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.log_batch(job_id, job.epoch, entries)
        batched.append(time.perf_counter() - t)
    store.complete(job_id, job.epoch, result={"video": "k"}, result_keys=["k"])
    out = {"lines_per_round": lines, "single": summary(single), "batched": summary(batched)}
    out["speedup_p50"] = round(out["single"]["p50_ms"] / out["batched"]["p50_ms"], 1)
    return out


def idle_runner(runner: SyncJobStore, mode: str, stop: threading.Event, claimed_at: dict[str, float]) -> None:
    """Claim and finish jobs at once; between empty claims sleep (``poll``) or wait to be notified (``notify``)."""
    while not stop.is_set():
        job = runner.claim("bench-idle", 600)
        if job is not None:
            claimed_at[job.request_id] = time.perf_counter()
            runner.complete(job.request_id, job.epoch, result={"video": "k"}, result_keys=["k"])
        elif mode == "poll":
            time.sleep(POLL_INTERVAL_S)
        else:
            runner.wait_for_job(POLL_INTERVAL_S)


def measure_wakeup(runner: SyncJobStore, gateway: SyncJobStore, samples: int) -> dict[str, Any]:
    """Submit-to-claim time of an idle runner that sleeps ``POLL_INTERVAL_S`` between claims (polling) against one
    that waits as long in ``wait_for_job`` (LISTEN/NOTIFY)."""
    rng = random.Random(2)
    out: dict[str, Any] = {"poll_interval_s": POLL_INTERVAL_S}
    for mode in ("poll", "notify"):
        claimed_at: dict[str, float] = {}
        stop = threading.Event()
        thread = threading.Thread(target=idle_runner, args=(runner, mode, stop, claimed_at))
        thread.start()
        waits = []
        for i in range(samples):
            time.sleep(rng.uniform(0.1, 0.6))
            job_id = gateway.submit(app_id="fal-ai/stable-avatar", input=INPUT, seed=i, owner="bench-wake",
                                    rate_limited=False).request_id
            submitted = time.perf_counter()
            deadline = submitted + 10
            while job_id not in claimed_at and time.perf_counter() < deadline:
                time.sleep(0.001)
            waits.append(claimed_at[job_id] - submitted)
        stop.set()
        thread.join()
        out[mode] = summary(waits)
    return out


def bench_backend(name: str, config: Any, path: Path, rows: int, samples: int, fill_threads: int,
                  fill_config: Any = None, log_lines: int = 20, log_rounds: int = 30) -> dict[str, Any]:
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
        result["log_writes"] = measure_log_writes(store, log_lines, log_rounds)
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


def log_table(results: list[dict[str, Any]]) -> str:
    first = results[0]["log_writes"]["lines_per_round"]
    lines = [f"{'backend':<16} | {f'{first} lines, one commit each p50/p95 ms':>40} | "
             f"{f'{first} lines, one batch p50/p95 ms':>36} | {'per line single/batched ms':>27} | speedup"]
    for r in results:
        w = r["log_writes"]
        n = w["lines_per_round"]
        lines.append(f"{r['backend']:<16} | {w['single']['p50_ms']:>19.2f} / {w['single']['p95_ms']:<18.2f} | "
                     f"{w['batched']['p50_ms']:>17.2f} / {w['batched']['p95_ms']:<16.2f} | "
                     f"{w['single']['p50_ms'] / n:>12.3f} / {w['batched']['p50_ms'] / n:<12.3f} | "
                     f"{w['speedup_p50']:>6.1f}x")
    return "\n".join(lines)


def wakeup_line(wakeup: dict[str, Any]) -> str:
    return (f"postgres submit-to-claim of an idle runner ({wakeup['poll']['n']} jobs each), waiting "
            f"{wakeup['poll_interval_s']} s between claims: polling p50/p95 {wakeup['poll']['p50_ms']:.1f} / "
            f"{wakeup['poll']['p95_ms']:.1f} ms, LISTEN/NOTIFY p50/p95 {wakeup['notify']['p50_ms']:.1f} / "
            f"{wakeup['notify']['p95_ms']:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--log-lines", type=int, default=20, help="log lines per round (one job's steps)")
    parser.add_argument("--log-rounds", type=int, default=30)
    parser.add_argument("--wakeup-samples", type=int, default=40)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "job_store.json")
    args = parser.parse_args()

    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        for sync in ("FULL", "NORMAL"):
            path = Path(tmp) / f"jobs-{sync.lower()}.sqlite3"
            results.append(bench_backend(f"sqlite-{sync.lower()}", SqliteJobsConfig(path=path, synchronous=sync),
                                         path, args.rows, args.samples, 1,
                                         fill_config=SqliteJobsConfig(path=path, synchronous="NORMAL"),
                                         log_lines=args.log_lines, log_rounds=args.log_rounds))
            print(table(results[-1:]), flush=True)
        with run_postgres(fast=False) as pg:
            dsn = pg.create_database("bench")
            os.environ["STABLE_AVATAR_JOBS_DSN"] = dsn
            results.append(bench_backend("postgres", PostgresJobsConfig(pool_max_size=4), Path(tmp) / "unused",
                                         args.rows, args.samples, 4, log_lines=args.log_lines,
                                         log_rounds=args.log_rounds))
            print(table(results[-1:]), flush=True)
            wake_db = pg.create_database("wake")
            os.environ["STABLE_AVATAR_JOBS_DSN"] = wake_db
            runner = make_sync_job_store(PostgresJobsConfig(pool_max_size=2), Path(tmp) / "unused")
            gateway = make_sync_job_store(PostgresJobsConfig(pool_max_size=2), Path(tmp) / "unused")
            try:
                wakeup = measure_wakeup(runner, gateway, args.wakeup_samples)
            finally:
                runner.close()
                gateway.close()
            print(wakeup_line(wakeup), flush=True)

    report = {
        "what": f"job store latency with {args.rows} queued rows (worst case for position and caps), "
                f"{args.samples} samples per operation",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_before": load_before, "load_avg_after": load_average()},
        "target": "submit and status p95 < 50 ms at 10,000 rows",
        "results": results,
        "wakeup": wakeup,
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
    text += ("\nA running job's log lines, one transaction (one commit) per line against one log_batch, "
             f"{args.log_rounds} rounds each:\n" + log_table(results) + "\n\n" + wakeup_line(wakeup) + "\n")
    args.json.with_suffix(".txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
