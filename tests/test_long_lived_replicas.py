"""No replica's memory grows with the jobs it runs, to within 100 KiB per job: the application on the shared cluster,
one replica per deployment, runs 130 tiny queued jobs one at a time while every replica's anonymous RSS is sampled
with the count of finished jobs; each replica's floor is judged by ``testing.replica_memory.LONG_LIVED``.

The chaos soak (``tests/test_soak.py``) restarts its replicas every 40-70 jobs, too few to tell a leak of 100 KiB per
job from a healthy floor's creep; here nothing restarts them. The same samples with 100 KiB per job added must be
called a leak, so the check is shown to catch that leak on this run's own noise, not only on synthetic series
(``tests/test_replica_memory.py``). With ``LONG_LIVED_RESULTS=<file>`` the samples are written there as JSON."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from deployments.config import DENOISER_MAX_ONGOING
from testing.http import http_json
from testing.media import EXAMPLE_IMAGE, data_uri, synthetic_speech
from testing.ray_serve import replica_processes
from testing.replica_memory import LONG_LIVED, anonymous_rss, floor_growth

APP = "long-lived"
ROUTE = "fal-ai/stable-avatar"
JOBS = 130
IN_FLIGHT = 1  # one job at a time: each replica idles between its jobs, where its floor shows
SAMPLE_S = 0.25
TIMEOUT_S = 1200.0
# What glibc keeps for reuse is not what the program keeps: by default each thread has its heap, which holds up to
# 64 MiB of freed buffers at its top (the trim threshold follows the mmap threshold up), and the floors wander by
# several MiB from one stretch of jobs to the next, as much as a leak of 100 KiB per job adds over 100. With one
# arena and fixed thresholds (every buffer of 1 MiB or more unmapped on free, a heap top beyond 1 MiB trimmed) the
# floor shows what the replica keeps; a leak is kept memory under any heap policy. (glibc's own names for the
# tunables: Ray cuts a GLIBC_TUNABLES value at its first ":".)
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "1"}


def finished_jobs(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT count(*) FROM jobs WHERE status = 'COMPLETED'").fetchone()[0]


@pytest.fixture(scope="module")
def run(serve_cluster, tmp_path_factory) -> dict:
    """Deploy, run the jobs, and return the samples: deployment -> [(finished jobs, RSS bytes)]."""
    root = tmp_path_factory.mktemp("long-lived")
    database = root / "jobs.sqlite3"
    serve_cluster.deploy({
        "device": "cpu", "storage": serve_cluster.local_storage(root / "storage"),
        "jobs": {"kind": "sqlite", "path": str(database)},
        "dispatch": {"poll_interval_s": 0.2}, "max_queue_length": 10_000,
        "auth": {"submit_rate_per_minute": 1e6, "submit_burst": 1_000_000, "max_queued_per_key": 1_000_000},
        # One Denoiser, not the default 1..2 autoscaling: a job's guidance rows in flight at once can scale it up,
        # and a second replica would take some of the jobs whose memory this one is judged by.
        "denoiser": {"num_replicas": 1, "max_ongoing_requests": DENOISER_MAX_ONGOING},
    }, name=APP, route_prefix=f"/{APP}", env=HEAP_ENV)
    processes = replica_processes(APP)
    assert {name: len(found) for name, found in processes.items()} == dict.fromkeys(
        ("Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"), 1), processes
    pids = {name: found[0] for name, found in processes.items()}
    for name, pid in pids.items():
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert all(f"{key}={value}".encode() in environment for key, value in HEAP_ENV.items()), name
    audio = data_uri(synthetic_speech(root / "speech.wav", 1.0), "audio/wav")
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": audio, "prompt": "a person talking",
            "num_inference_steps": 1, "aspect_ratio": "1:1"}
    url = f"{serve_cluster.base}/{APP}/{ROUTE}"
    samples: dict[str, list[tuple[int, int]]] = {name: [] for name in pids}
    submitted, finished, ids = 0, 0, []
    deadline = time.monotonic() + TIMEOUT_S
    while finished < JOBS:
        assert time.monotonic() < deadline, f"{finished} of {JOBS} jobs finished in {TIMEOUT_S:.0f} s"
        finished = finished_jobs(database)
        for name, pid in pids.items():
            samples[name].append((finished, anonymous_rss(pid)))  # a replica that died fails the test
        while submitted < JOBS and submitted - finished < IN_FLIGHT:  # the next job as soon as one finished
            code, answer, _ = http_json("POST", url, dict(body, seed=submitted))
            assert code == 200, answer
            ids.append(answer["request_id"])
            submitted += 1
        time.sleep(SAMPLE_S)
    assert replica_processes(APP) == {name: [pid] for name, pid in pids.items()}  # none was restarted or added
    if os.environ.get("LONG_LIVED_RESULTS"):
        Path(os.environ["LONG_LIVED_RESULTS"]).write_text(json.dumps(samples) + "\n")
    return {"samples": samples, "ids": ids, "url": url}


def test_every_job_finished_with_a_video(run):
    for request_id in run["ids"]:
        code, result, _ = http_json("GET", f"{run['url']}/requests/{request_id}")
        assert code == 200 and result["video"]["content_type"] == "video/mp4", result


@pytest.mark.parametrize("deployment", ["Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"])
def test_no_replica_grows_by_100_kib_per_job_and_the_check_would_see_it(run, deployment):
    samples = run["samples"][deployment]
    growth = floor_growth(samples, LONG_LIVED)
    assert growth is not None and growth.judged, growth.describe() if growth else "too few jobs sampled"
    assert not growth.leaked, growth.describe()
    leaking = floor_growth([(jobs, rss + LONG_LIVED.leak_per_job * jobs) for jobs, rss in samples], LONG_LIVED)
    assert leaking.leaked, leaking.describe()
    print(f"{deployment}: {growth.describe()}")
