"""The soak: a few hundred short jobs from three API keys on a multi-node Ray cluster (PostgreSQL jobs database,
SeaweedFS S3 storage) while seeded chaos strikes, then the invariants that must hold whatever happened, each checked
from what the run left (rows, attempt history, job and replica logs, objects), so that the soak fails when the
chaos did not test what it claims.

Chaos, at seeded moments (measured in jobs submitted): kills of an Orchestrator replica while it runs a job (one
with a checkpoint when there is one), of a Denoiser, the Preprocessor and the Postprocessor while they serve
requests; a stall (SIGSTOP) of an Orchestrator running a job until its lease ran out and the job was claimed
elsewhere, then SIGCONT; the loss of the worker node that holds a Denoiser (``cluster.remove_node``) and a fresh
node added back; a second application (own route prefix) on the same database and bucket for part of the run, its
Orchestrator killed while it runs a job; a restart of the whole application while the second one runs; random
cancels of queued and running jobs; retention sweeping every 5 s in the applications, with a few early jobs made
older than every TTL. Invariants checked afterwards:

- every job is in the database exactly as submitted (no lost, no phantom job); every job not cancelled completed
  once without error: the row's one winning epoch names one result object ``results/<id>/e<epoch>/output.mp4``,
  which is the only result object of a job that ran once; a job reclaimed after a kill may also have left the
  dead runner's object under its own epoch (an orphan the retention sweep removes, checked at the end);
  each job's webhook was delivered exactly once;
- at least one job resumed from a checkpoint, and a sample of outputs (a resumed job, a reclaimed one, others)
  equals ``stable-avatar generate`` byte for byte; the second application won at least one job;
- each kill struck a replica holding work, and a killed Orchestrator's jobs went on under a later epoch; the
  stalled Orchestrator's late writes were refused by fencing (its log lines counted) and its jobs ended once,
  won elsewhere;
- while the applications ran, their sweepers deleted the aged jobs and every object they named;
- no job or file is visible to another key: status, result, stream, progress and cancel of every job answer 404
  with both other keys, and one key's upload is refused as another key's input;
- no replica's memory grows with the jobs it ran (the floor of its anonymous RSS may rise by 200 KiB per job, a
  bound a leak of 250 KiB per job breaks; why not tighter: ``testing/replica_memory.py``; 100 KiB per job over
  replicas that live 150 jobs: ``tests/test_long_lived_replicas.py``);
- a final retention sweep with seconds-long TTLs leaves no expired row and no expired object under ``uploads/``,
  ``inputs/``, ``results/``, ``checkpoints/`` (a fresh upload, younger than its TTL, stays).

With ``SOAK_RESULTS=<file>`` the figures (jobs lost and duplicated, resumes, the stall's refused writes, retention,
memory per replica) are written there as JSON.

Bounded: ``SOAK_JOBS`` (default 200) jobs, ``SOAK_SEED`` (default 20261130), ``LOAD_TIMEOUT_S`` to submit and
finish them. 200, because the memory check needs replicas that run some 60 jobs (a warm-up of 10, two windows of
10 and the 40 between them) between the restarts the chaos causes. Its cost is ~26 replica process starts (a model
replica imports torch, diffusers and transformers: 5-7 CPU-s) and the jobs' own work, paced by the Postprocessor's
decode and encode (the Preprocessor's reference-image cache answers the VAE encode of every job's image after the
first).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import random
import signal
import threading
import time
import urllib.request
from bisect import bisect_right
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from ray import serve
from ray._private import state as ray_state  # the actor table (name -> pid) without a dashboard

from deployments.app import build_app
from deployments.config import APP_NAME, AppArgs
from deployments.gateway.auth import fingerprint
from deployments.jobstore import JobStore, PostgresJobsConfig, make_sync_job_store
from deployments.orchestrator.retention import RetentionConfig, sweep_once
from deployments.storage import S3Storage
from stable_avatar.cli import main as cli_main
from testing.http import http_bytes, http_json
from testing.media import EXAMPLE_IMAGE, data_uri, synthetic_speech
from testing.ray_serve import ray_serve_multinode_cluster
from testing.replica_memory import SOAK, FloorGrowth, anonymous_rss, floor_growth

APP = "fal-ai/stable-avatar"
SECOND_APP, SECOND_PREFIX = "stable-avatar-b", "/b"
DSN_ENV = "STABLE_AVATAR_SOAK_DSN"
KEYS_ENV = "STABLE_AVATAR_SOAK_KEYS"
KEYS = ("soak-key-alpha", "soak-key-bravo", "soak-key-charlie")
JOBS = int(os.environ.get("SOAK_JOBS", "200"))
SEED = int(os.environ.get("SOAK_SEED", "20261130"))
IN_FLIGHT = 10  # unfinished jobs kept in the system (queued + running)
CANCEL_QUEUED, CANCEL_RUNNING = 0.06, 0.06  # shares of jobs cancelled right after submit / once running
UPLOAD_SHARE = 0.2  # jobs whose image is the key's own upload instead of a data: URI
SAMPLE_OUTPUTS = 5
NODE_AWAY_S = 10.0  # a lost worker node is replaced by a fresh one this long after
LOAD_TIMEOUT_S = 1500.0  # submitting and finishing every job (measured 8-15 min on the shared box, load 8-50)
pytestmark = [pytest.mark.soak, pytest.mark.timeout(LOAD_TIMEOUT_S + 900)]  # the load, then its setup and checks
PROMPT = "a person talking"
LEASE_S = 8.0  # dispatch.lease_s of both applications
# A killed or stalled Orchestrator is one running a job; for this long it is one whose job has a checkpoint (its
# successor resumes it), then any that runs a job.
CHECKPOINTED_VICTIM_S = 20.0
# A stalled (SIGSTOPped) Orchestrator is resumed once its lease ran out and its jobs were claimed by another runner,
# or once its lease ran out and STALL_CLAIM_WAIT_S more passed (another runner may be full: the jobs are queued
# again, fenced all the same), at the latest after STALL_MAX_S (Serve's health check gives up on a replica after
# 30 s); a stall whose lease did not run out in time is tried again later, on whichever replica runs a job then.
STALL_CLAIM_WAIT_S = 8.0
STALL_MAX_S = 25.0
STALL_RETRY_AFTER_S = 30.0
# Retention while the applications run: TTLs of an hour (no job of the soak expires by itself) and a sweep every few
# seconds; AGED_JOBS early jobs are made older than every TTL (their completion moved back two hours) and the
# applications' own sweepers must delete them and every object they name, leaving the rest alone.
RETENTION = {"results_s": 3600, "uploads_s": 3600, "inputs_s": 3600, "checkpoints_s": 3600, "jobs_s": 3600,
             "sweep_interval_s": 5}
AGED_JOBS = 6
AGED_BY_S = 7200
RETENTION_WAIT_S = 90.0  # the aged jobs are gone within this (a sweep every 5 s, under chaos)
RSS_SAMPLE_S = 1.0  # replica memory is sampled this often (the leak check bounds the floor of these samples)


# -- helpers ----------------------------------------------------------------------------------------------------
def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Key {key}"}


@dataclass
class Job:
    index: int
    request_id: str
    key: str
    prefix: str  # the route prefix it was submitted through ("" main, "/b" second)
    steps: int
    seed: int
    audio: str  # "a" | "b": which of the two short audio files
    uploaded_image: bool
    cancel: str | None = None  # None | "queued" | "running"
    cancel_answer: int | None = None
    submitted_at: float = 0.0


@dataclass
class Chaos:
    """What happened, for the summary."""

    events: list[tuple[float, int, str]] = field(default_factory=list)  # (t, jobs submitted, what)
    kills: Counter = field(default_factory=Counter)

    def note(self, started: float, submitted: int, what: str) -> None:
        self.events.append((round(time.monotonic() - started, 1), submitted, what))
        print(f"[soak {time.monotonic() - started:6.1f} s, {submitted} submitted] {what}", flush=True)


class Webhooks(http.server.BaseHTTPRequestHandler):
    """Counts deliveries per request id (always answers 200)."""

    deliveries: Counter = Counter()
    statuses: dict[str, str] = {}
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            self.deliveries[body["request_id"]] += 1
            self.statuses[body["request_id"]] = body["status"]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def replica_actors(app: str, deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    with contextlib.suppress(ValueError):  # already gone
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def raylet_pids(nodes) -> set[int]:
    """The raylets of the cluster's live nodes (head and workers): every worker process of ours descends from one."""
    return {node.all_processes["raylet"][0].process.pid for node in [nodes.head_node, *nodes.worker_nodes]}


def replica_processes(nodes) -> dict[int, str]:
    """pid -> "<app>:<Deployment>" of every Serve replica process of this cluster (by process title; other Ray
    clusters on the machine, e.g. another session's benchmark, are told apart by their raylet)."""
    ours, found = raylet_pids(nodes), {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:" in cmdline and proc.info["ppid"] in ours:
            found[proc.info["pid"]] = cmdline.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
    return found


def replica_pids() -> dict[str, int]:
    """Actor name (``SERVE_REPLICA::<app>#<Deployment>#<replica>``) -> pid of every live Serve replica."""
    return {a["Name"]: a["Pid"] for a in ray_state.actors(actor_state_name="ALIVE").values()
            if a["Name"].startswith("SERVE_REPLICA::") and a["Pid"]}


def ongoing_requests(name: str) -> int:
    """Requests a replica is serving now (Serve answers this on a thread of its own, even while the replica works)."""
    try:
        actor = ray.get_actor(name, namespace="serve")
        return ray.get(actor.get_num_ongoing_requests.remote(), timeout=5)
    except (ValueError, ray.exceptions.RayError):  # it is going away
        return 0


def replica_log_lines(nodes, runner_id: str, needle: str) -> list[str]:
    """Lines of a replica's Serve log (``logs/serve/replica_<app>_<deployment>_<replica>.log``) containing
    ``needle``."""
    replica = runner_id.rsplit("#", 1)[1]
    dirs = {Path(node.get_logs_dir_path(), "serve") for node in [nodes.head_node, *nodes.worker_nodes]}
    files = sorted(file for folder in dirs for file in folder.glob(f"replica_*{replica}*.log"))
    assert files, f"no Serve log file of {runner_id} in {dirs}"
    return [line for file in files for line in file.read_text(errors="replace").splitlines() if needle in line]


def node_of_process(pid: int, nodes: list) -> Any:
    """The worker node whose raylet is an ancestor of ``pid``."""
    try:
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.NoSuchProcess:
        return None
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        if raylet in ancestors:
            return node
    return None


def cli_reference(folder: Path, audio: Path, steps: int, seed: int) -> bytes:
    out = folder / f"cli-{seed}-{steps}-{audio.stem}.mp4"
    assert cli_main(["generate", "--image", str(EXAMPLE_IMAGE), "--audio", str(audio), "--prompt", PROMPT,
                     "--steps", str(steps), "--seed", str(seed), "--aspect-ratio", "1:1", "--quiet",
                     "-o", str(out)]) == 0
    return out.read_bytes()


# -- the test ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def soak_env(postgres, seaweedfs, tmp_path_factory):
    """Environment the replicas inherit (DSN, S3 credentials, API keys), a database and a bucket prefix."""
    dsn = postgres.create_database("soak")
    try:
        with pytest.MonkeyPatch.context() as patch:  # module scope: the context form of ``monkeypatch``
            for name, value in {DSN_ENV: dsn, KEYS_ENV: " ".join(KEYS), **seaweedfs.env()}.items():
                patch.setenv(name, value)
            yield {"dsn": dsn, "s3": seaweedfs, "tmp": tmp_path_factory.mktemp("soak")}
    finally:
        postgres.drop_database(dsn)


def app_config(s3, orchestrators: int, denoisers: int) -> dict[str, Any]:
    return {
        "device": "cpu", "max_running_jobs": 2, "checkpoint_every_steps": 1, "job_attempts": 5,
        "webhook_first_delay_s": 0.2, "retention": RETENTION,
        "jobs": {"kind": "postgres", "dsn_env": DSN_ENV, "pool_max_size": 4, "connect_timeout_s": 5},
        # lease: a killed runner's job is claimed again within seconds, yet a replica starved of CPU on a loaded
        # 2-core machine still renews it in time
        "dispatch": {"lease_s": LEASE_S, "heartbeat_s": 1, "poll_interval_s": 0.2},
        "inputs": {"allow_private_hosts": ["127.0.0.1"]},  # the webhook receiver
        "storage": {"kind": "s3", "bucket": s3.bucket, "prefix": "soak", "endpoint_url": s3.endpoint_url,
                    "url_expiry_s": 3600},
        "auth": {"keys_env": KEYS_ENV, "submit_rate_per_minute": 6000, "submit_burst": 200,
                 "max_queued_per_key": 200, "max_running_per_key": 4},
        "gateway": {"num_cpus": 0.1},
        "orchestrator": {"num_cpus": 0.1, "num_replicas": orchestrators, "max_ongoing_requests": 16},
        "preprocessor": {"num_cpus": 0.1},
        "postprocessor": {"num_cpus": 0.1},
        "denoiser": {"num_cpus": 0, "num_gpus": 1, "num_replicas": denoisers, "max_ongoing_requests": 8},
    }


def test_soak_with_chaos_keeps_every_invariant(soak_env):  # noqa: C901, PLR0912, PLR0915 - one scenario
    rng = random.Random(SEED)
    s3, tmp = soak_env["s3"], soak_env["tmp"]
    audio = {"a": synthetic_speech(tmp / "a.wav", 1.0), "b": synthetic_speech(tmp / "b.wav", 1.4)}
    audio_uris = {name: data_uri(path, "audio/wav") for name, path in audio.items()}
    image_uri = data_uri(EXAMPLE_IMAGE, "image/png")
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
    storage = S3Storage(s3.storage_config(prefix="soak"))
    store = make_sync_job_store(PostgresJobsConfig(dsn_env=DSN_ENV, pool_max_size=2), tmp / "unused")
    owners = {key: fingerprint(key) for key in KEYS}

    def sql(text: str, params: tuple = ()) -> list[dict[str, Any]]:
        with store.backend.read() as cur:
            cur.execute(store.backend.sql(text), params)
            return cur.fetchall()

    def sql_write(text: str, params: tuple = ()) -> None:
        with store.backend.write() as cur:
            cur.execute(store.backend.sql(text), params)

    started = time.monotonic()
    chaos = Chaos()
    with ray_serve_multinode_cluster(head_cpus=8, workers=2, worker_gpus=2) as cluster:
        base = cluster.base
        main_args = AppArgs.model_validate(app_config(s3, orchestrators=2, denoisers=2))
        second_args = AppArgs.model_validate(app_config(s3, orchestrators=1, denoisers=1))
        serve.run(build_app(main_args), name=APP_NAME, route_prefix="/")
        chaos.note(started, 0, "cluster up (head + 2 GPU worker nodes), application deployed")

        # Each key uploads one image (presigned S3 PUT); another key may not use it as an input.
        uploads = {}
        for key in KEYS:
            code, init, _ = http_json("POST", f"{base}/storage/upload/initiate?storage_type=fal-cdn-v3",
                                      {"content_type": "image/png", "file_name": "me.png"}, auth(key))
            assert code == 200, init
            put = urllib.request.Request(init["upload_url"], data=EXAMPLE_IMAGE.read_bytes(), method="PUT",
                                         headers={"content-type": "image/png"})
            with urllib.request.urlopen(put, timeout=30) as response:
                assert response.status == 200
            uploads[key] = init["file_url"]
        for key in KEYS:
            other = uploads[KEYS[(KEYS.index(key) + 1) % 3]]
            body = {"image_url": other, "audio_url": audio_uris["a"], "prompt": PROMPT, "num_inference_steps": 1}
            code, answer, _ = http_json("POST", f"{base}/{APP}", body, auth(key))
            assert code == 422 and answer["detail"][0]["loc"] == ["body", "image_url"], (code, answer)

        # The schedule: each event fires once this many jobs were submitted (seeded jitter).
        def at(fraction: float) -> int:
            return max(1, int(fraction * JOBS) + rng.randint(-3, 3))

        schedule = sorted([
            # the Preprocessor and Postprocessor (one replica each) die together: one wait for their replacements
            (at(0.08), "kill_orchestrator"), (at(0.14), "kill_denoiser"), (at(0.21), "kill_preprocessor"),
            (at(0.21), "kill_postprocessor"), (at(0.26), "age_early_jobs"), (at(0.30), "remove_node"),
            (at(0.38), "stall_orchestrator"), (at(0.46), "start_second_app"), (at(0.58), "restart_main_app"),
            (at(0.70), "kill_orchestrator_b"), (at(0.78), "stop_second_app"),
        ])
        chaos_rng = random.Random(SEED + 2)  # victims: their choice depends on timing, the jobs' draws must not
        jobs: dict[str, Job] = {}
        unfinished: set[str] = set()
        waiting_to_cancel: set[str] = set()
        main_up, second_up = threading.Event(), threading.Event()
        main_up.set()
        background: list[threading.Thread] = []
        background_errors: list[BaseException] = []
        removed_nodes: list = []
        rss: dict[str, list[tuple[float, int]]] = defaultdict(list)  # replica actor name -> (time.time(), rss)
        # Kills and stalls wait for a victim holding work: (action, since); what each struck is in ``strikes``.
        pending: list[tuple[str, float]] = []
        strikes: list[dict[str, Any]] = []
        stalls: list[dict[str, Any]] = []
        aging: dict[str, Any] = {}
        done_count = 0
        last_transition = [0.0]  # when the last deploy/delete finished (the proxy's routes follow shortly after)
        transitional_refusals: Counter = Counter()
        add_node_at: list[float | None] = [None]

        def in_background(name: str, work) -> None:
            def body():
                try:
                    work()
                    last_transition[0] = time.monotonic()
                    chaos.note(started, len(jobs), f"{name}: done")
                except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                    background_errors.append(exc)

            for thread in background:
                thread.join()  # one application-level operation at a time, in order
            thread = threading.Thread(target=body, name=name, daemon=True)
            background.append(thread)
            thread.start()

        def start_second() -> None:
            serve.run(build_app(second_args), name=SECOND_APP, route_prefix=SECOND_PREFIX)
            second_up.set()

        def restart_main() -> None:
            main_up.clear()
            serve.delete(APP_NAME)  # graceful: its runners hand their jobs back; the second app claims them
            serve.run(build_app(main_args), name=APP_NAME, route_prefix="/")
            main_up.set()

        def stop_second() -> None:
            second_up.clear()
            serve.delete(SECOND_APP)

        def running_jobs_of(app: str, since: float) -> tuple[str, dict[str, int]] | None:
            """An Orchestrator of ``app`` running queued jobs (one with a checkpoint, for CHECKPOINTED_VICTIM_S),
            and the jobs it holds (request id -> epoch); None while there is none."""
            rows = sql("SELECT request_id, epoch, lease_owner, checkpoint_key FROM jobs WHERE status = 'IN_PROGRESS' "
                       "AND kind = 'queue' AND lease_owner LIKE ?", (f"{app}#Orchestrator#%",))
            eligible = [r for r in rows if r["checkpoint_key"]] or (
                rows if time.monotonic() - since > CHECKPOINTED_VICTIM_S else [])
            if not eligible:
                return None
            owner = chaos_rng.choice(sorted({r["lease_owner"] for r in eligible}))
            return owner, {r["request_id"]: r["epoch"] for r in rows if r["lease_owner"] == owner}

        def strike(action: str, since: float) -> bool:
            """Kill (or stall) a replica holding work now; False while none does (tried again next tick)."""
            submitted = len(jobs)
            if action in ("kill_orchestrator", "kill_orchestrator_b", "stall_orchestrator"):
                app = SECOND_APP if action == "kill_orchestrator_b" else APP_NAME
                found = running_jobs_of(app, since)
                if found is None:
                    return False
                owner, held = found
                if action == "stall_orchestrator":
                    pid = replica_pids().get(f"SERVE_REPLICA::{owner}")
                    if pid is None:
                        return False
                    os.kill(pid, signal.SIGSTOP)
                    stalls.append({"victim": owner, "pid": pid, "held": held, "stopped": time.monotonic()})
                    chaos.note(started, submitted, f"stopped (SIGSTOP) {owner} running {sorted(held)}")
                    return True
                kill_replica(f"SERVE_REPLICA::{owner}")
                strikes.append({"action": action, "victim": owner, "held": held})
                chaos.kills["Orchestrator"] += 1
                chaos.note(started, submitted, f"killed {owner} running {sorted(held)}")
                return True
            deployment = action.removeprefix("kill_").capitalize()
            names = replica_actors(APP_NAME, deployment)
            for name in chaos_rng.sample(names, len(names)):
                busy = ongoing_requests(name)
                if busy:
                    kill_replica(name)
                    strikes.append({"action": action, "victim": name, "held": busy})
                    chaos.kills[deployment] += 1
                    chaos.note(started, submitted, f"killed {name} serving {busy} requests")
                    return True
            return False

        def resume_stalled() -> None:
            """SIGCONT a stalled Orchestrator once its lease ran out (see STALL_CLAIM_WAIT_S and STALL_MAX_S)."""
            for stall in stalls:
                if "resumed_after_s" in stall:
                    continue
                stopped_for = time.monotonic() - stall["stopped"]
                if stopped_for < LEASE_S:
                    continue
                rows = sql("SELECT request_id, epoch, status FROM jobs WHERE request_id = ANY(?)", (list(stall["held"]),))
                held = stall["held"]
                lease_out = all(r["status"] != "IN_PROGRESS" or r["epoch"] > held[r["request_id"]] for r in rows)
                claimed = all(r["epoch"] > held[r["request_id"]] or r["status"] == "COMPLETED" for r in rows)
                if (lease_out and (claimed or stopped_for > LEASE_S + STALL_CLAIM_WAIT_S)) or stopped_for > STALL_MAX_S:
                    os.kill(stall["pid"], signal.SIGCONT)
                    stall.update(resumed_after_s=round(stopped_for, 1), lease_out=lease_out, claimed=claimed)
                    chaos.note(started, len(jobs), f"resumed (SIGCONT) {stall['victim']} after {stopped_for:.0f} s; "
                                                   f"its lease {'ran out' if lease_out else 'did NOT run out'}, its "
                                                   f"jobs {'were' if claimed else 'were not (yet)'} claimed again")
                    if not lease_out:
                        pending.append(("stall_orchestrator", time.monotonic() + STALL_RETRY_AFTER_S))

        def age_early_jobs() -> None:
            """Move the completion of a few early finished jobs back past every TTL: the running applications'
            sweepers must delete them (rows, logs, attempts, objects) while the chaos goes on."""
            early = [j for j in sorted(jobs.values(), key=lambda j: j.index)
                     if j.cancel is None and not j.uploaded_image and Webhooks.deliveries[j.request_id] == 1]
            rows = {r["request_id"]: r for r in sql(
                "SELECT request_id, attempts, outcome FROM jobs WHERE status = 'COMPLETED' AND request_id = ANY(?)",
                ([j.request_id for j in early],))}
            chosen = [j for j in early if j.request_id in rows and rows[j.request_id]["attempts"] == 1
                      and rows[j.request_id]["outcome"] == "succeeded"][:AGED_JOBS]
            assert len(chosen) == AGED_JOBS, "too few early jobs finished to age"
            prefixes = [p for j in chosen for p in (f"results/{j.request_id}/", f"checkpoints/{j.request_id}/",
                                                      f"inputs/{owners[j.key]}/{j.request_id}/")]
            keys = [k for prefix in prefixes for k in storage.list_keys(prefix)]
            assert sum(k.startswith("results/") for k in keys) == AGED_JOBS, keys
            ids = [j.request_id for j in chosen]
            sql_write("UPDATE jobs SET completed_at = completed_at - ? WHERE request_id = ANY(?)", (AGED_BY_S, ids))
            aging.update(ids=ids, keys=keys, prefixes=prefixes, at=time.monotonic())
            chaos.note(started, len(jobs), f"aged {len(ids)} finished jobs ({len(keys)} objects) past every TTL")

        def check_aged() -> None:
            if not aging or "gone_after_s" in aging:
                return
            if sql("SELECT count(*) AS n FROM jobs WHERE request_id = ANY(?)", (aging["ids"],))[0]["n"] == 0:
                aging["gone_after_s"] = round(time.monotonic() - aging["at"], 1)
                aging["left_objects"] = [k for prefix in aging["prefixes"] for k in storage.list_keys(prefix)]
                aging["left_logs"] = sql("SELECT count(*) AS n FROM job_logs WHERE request_id = ANY(?)",
                                         (aging["ids"],))[0]["n"]
                aging["left_attempts"] = sql("SELECT count(*) AS n FROM job_attempts WHERE request_id = ANY(?)",
                                             (aging["ids"],))[0]["n"]
                aging["rows_now"] = sql("SELECT count(*) AS n FROM jobs")[0]["n"]
                chaos.note(started, len(jobs), f"the applications' sweepers deleted the aged jobs after "
                                               f"{aging['gone_after_s']} s")

        def fire(action: str) -> None:
            submitted = len(jobs)
            if action.startswith(("kill_", "stall_")):
                pending.append((action, time.monotonic()))
                chaos.note(started, submitted, f"{action}: waiting for a victim holding work")
            elif action == "age_early_jobs":
                age_early_jobs()
            elif action == "remove_node":
                workers = list(cluster.nodes.worker_nodes)
                holding = [node_of_process(pid, workers) for pid, name in replica_processes(cluster.nodes).items()
                           if name == f"{APP_NAME}:Denoiser"]
                holding = [n for n in holding if n is not None]
                assert holding, "no worker node holds a Denoiser replica"
                node = rng.choice(holding)
                cluster.nodes.remove_node(node)
                removed_nodes.append(node)
                add_node_at[0] = time.monotonic() + NODE_AWAY_S  # by time: with no Denoiser left, jobs wait for it
                chaos.kills["node"] += 1
                chaos.note(started, submitted, f"removed worker node {node.unique_id[:12]} (holding "
                                               f"{sum(n is node for n in holding)} Denoiser replicas)")
            elif action == "add_node":
                node = cluster.nodes.add_node(**cluster.worker_args)
                chaos.note(started, submitted, f"added worker node {node.unique_id[:12]}")
            elif action == "start_second_app":
                chaos.note(started, submitted, "starting the second application (prefix /b)")
                in_background(action, start_second)
            elif action == "restart_main_app":
                chaos.note(started, submitted, "restarting the main application (serve.delete + serve.run)")
                in_background(action, restart_main)
            elif action == "stop_second_app":
                chaos.note(started, submitted, "deleting the second application")
                in_background(action, stop_second)

        def submit_one(index: int) -> bool:
            prefixes = ([""] if main_up.is_set() else []) + ([SECOND_PREFIX] if second_up.is_set() else [])
            if not prefixes:
                return False
            prefix = prefixes[index % len(prefixes)]
            key = KEYS[index % 3]
            steps, seed, clip = rng.choice((1, 2)), rng.randrange(1, 10_000), rng.choice("ab")
            uploaded = rng.random() < UPLOAD_SHARE
            cancel_draw = rng.random()
            body = {"image_url": uploads[key] if uploaded else image_uri, "audio_url": audio_uris[clip],
                    "prompt": PROMPT, "num_inference_steps": steps, "seed": seed, "aspect_ratio": "1:1"}
            try:
                code, answer, _ = http_json("POST", f"{base}{prefix}/{APP}?fal_webhook={hook_url}", body, auth(key),
                                            timeout=60)
            except OSError:
                return False  # the proxy is switching routes: try again next tick (nothing was committed)
            if code in (404, 503) and (background or time.monotonic() - last_transition[0] < 15):
                transitional_refusals[code] += 1  # its route is being (re)deployed or deleted right now
                return False
            assert code == 200, (code, answer)
            job = Job(index, answer["request_id"], key, prefix, steps, seed, clip, uploaded,
                      submitted_at=time.monotonic())
            if cancel_draw < CANCEL_QUEUED:
                job.cancel = "queued"
                job.cancel_answer = http_json("PUT", f"{base}{prefix}/{APP}/requests/{job.request_id}/cancel",
                                              headers=auth(key))[0]
            elif cancel_draw < CANCEL_QUEUED + CANCEL_RUNNING:
                job.cancel = "running"
                waiting_to_cancel.add(job.request_id)
            jobs[job.request_id] = job
            unfinished.add(job.request_id)
            return True

        def sample_rss() -> None:
            for name, pid in replica_pids().items():
                if any(stall["pid"] == pid and "resumed_after_s" not in stall for stall in stalls):
                    continue  # stopped: it runs no job
                with contextlib.suppress(OSError):  # it died between the listing and the read
                    rss[name].append((time.time(), anonymous_rss(pid)))

        next_event, last_sample = 0, 0.0
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while (len(jobs) < JOBS or unfinished) and time.monotonic() < deadline:
            for thread in list(background):
                if not thread.is_alive():
                    background.remove(thread)
            if background_errors:
                raise background_errors[0]
            if add_node_at[0] is not None and time.monotonic() >= add_node_at[0]:
                add_node_at[0] = None
                fire("add_node")
            while next_event < len(schedule) and len(jobs) >= schedule[next_event][0]:
                if schedule[next_event][1] == "stop_second_app" and any(
                        action == "kill_orchestrator_b" for action, _ in pending):
                    break  # its Orchestrator is still to be killed while it runs a job
                fire(schedule[next_event][1])
                next_event += 1
            for item in list(pending):
                if item[1] <= time.monotonic() and strike(*item):
                    pending.remove(item)
            resume_stalled()
            check_aged()
            while len(jobs) < JOBS and len(unfinished) < IN_FLIGHT and submit_one(len(jobs)):
                pass
            if unfinished:
                rows = sql("SELECT request_id, status FROM jobs WHERE request_id = ANY(?)", (list(unfinished),))
                for row in rows:
                    rid = row["request_id"]
                    if row["status"] == "COMPLETED":
                        unfinished.discard(rid)
                        waiting_to_cancel.discard(rid)
                        done_count += 1
                    elif row["status"] == "IN_PROGRESS" and rid in waiting_to_cancel:
                        job = jobs[rid]
                        job.cancel_answer = http_json("PUT", f"{base}{job.prefix}/{APP}/requests/{rid}/cancel",
                                                      headers=auth(job.key))[0]
                        if job.cancel_answer in (202, 400):
                            waiting_to_cancel.discard(rid)
            if time.monotonic() - last_sample >= RSS_SAMPLE_S:
                last_sample = time.monotonic()
                sample_rss()
            time.sleep(0.1)
        for thread in background:
            thread.join(timeout=120)
        for stall in stalls:
            if "resumed_after_s" not in stall:
                os.kill(stall["pid"], signal.SIGCONT)
        assert not background_errors, background_errors
        assert not unfinished, f"{len(unfinished)} jobs did not finish in time: {sorted(unfinished)[:5]}"
        assert next_event == len(schedule) and add_node_at[0] is None, "not every chaos event fired"
        assert not pending, f"no replica held work for {pending}"
        sample_rss()
        while aging and "gone_after_s" not in aging and time.monotonic() < aging["at"] + RETENTION_WAIT_S:
            check_aged()
            time.sleep(0.5)
        load_duration = time.monotonic() - started
        chaos.note(started, len(jobs), f"all {len(jobs)} jobs finished")

        # -- exactly once: rows, outcomes, result objects, webhooks ------------------------------------------------
        rows = {r["request_id"]: r for r in sql(
            "SELECT request_id, owner, status, outcome, error, epoch, attempts, result_keys, checkpoint_key "
            "FROM jobs")}
        aged = set(aging.get("ids", ()))
        # -- retention while the applications ran: the aged jobs and everything they named are gone, nothing else
        assert "gone_after_s" in aging, f"the running sweepers did not delete the aged jobs in {RETENTION_WAIT_S} s"
        assert (aging["left_objects"], aging["left_logs"], aging["left_attempts"]) == ([], 0, 0), aging
        assert not aged & set(rows)
        assert set(rows) == set(jobs) - aged, "the database holds exactly the jobs that were accepted (less the aged)"
        objects = defaultdict(list)
        for key in storage.list_keys():
            kind, _, rest = key.partition("/")
            objects[kind].append(key)
        results_of = defaultdict(list)
        for key in objects["results"]:
            results_of[key.split("/")[1]].append(key)
        completed, cancelled, orphans = [], [], []
        for rid, job in jobs.items():
            if rid in aged:
                continue
            row = rows[rid]
            assert row["owner"] == owners[job.key] and row["status"] == "COMPLETED", row
            error = row["error"] if isinstance(row["error"], dict | None) else json.loads(row["error"])
            if job.cancel is not None and row["outcome"] == "cancelled":
                assert error["error_type"] == "client_cancelled", row
                assert job.cancel_answer == 202, (job, row)
                assert not [k for k in results_of[rid] if k.endswith(f"/e{row['epoch']}/output.mp4")], row
                cancelled.append(rid)
                continue
            assert row["outcome"] == "succeeded" and error is None, (job, row["outcome"], error, row["attempts"])
            keys = row["result_keys"] if isinstance(row["result_keys"], list) else json.loads(row["result_keys"])
            winner = f"results/{rid}/e{row['epoch']}/output.mp4"
            assert keys == [winner], row
            assert winner in results_of[rid], f"the winning result object of {rid} is missing"
            extra = [k for k in results_of[rid] if k != winner]
            # Only a job whose runner died after writing its video may have another object, under that epoch.
            assert not extra or row["attempts"] > 1, (row, extra)
            orphans += extra
            completed.append(rid)
        reclaimed = [rid for rid in completed if rows[rid]["attempts"] > 1]
        # Where each attempt ran (request id -> epoch -> runner), and which jobs resumed from a checkpoint.
        attempts = sql("SELECT request_id, epoch, runner, ended_at FROM job_attempts")
        runner_of: dict[str, dict[int, str]] = defaultdict(dict)
        for attempt in attempts:
            runner_of[attempt["request_id"]][attempt["epoch"]] = attempt["runner"]
        resumed = {r["request_id"] for r in sql("SELECT DISTINCT request_id FROM job_logs WHERE message LIKE ?",
                                                ("resumed from the checkpoint after step %",))}
        resumed_completed = sorted(rid for rid in completed if rid in resumed)
        assert resumed_completed, "no job resumed from a checkpoint"
        won_by_second = [rid for rid in completed
                         if runner_of[rid].get(rows[rid]["epoch"], "").startswith(f"{SECOND_APP}#")]
        assert won_by_second, "the second application completed no job"
        # Each kill struck a replica holding work: an Orchestrator running jobs (each then went on under a later
        # epoch, or ended cancelled), a Denoiser/Preprocessor/Postprocessor serving requests.
        assert {s["action"] for s in strikes} == {"kill_orchestrator", "kill_orchestrator_b", "kill_denoiser",
                                                  "kill_preprocessor", "kill_postprocessor"}, strikes
        for hit in strikes:
            assert hit["held"], hit
            if hit["action"].startswith("kill_orchestrator"):
                assert any(rows[rid]["epoch"] > epoch or rows[rid]["outcome"] == "cancelled"
                           for rid, epoch in hit["held"].items()), (hit, [rows[rid] for rid in hit["held"]])
        # The stalled Orchestrator: its lease ran out while it was stopped; once resumed, its late writes were refused
        # by fencing (counted in its log); each of those jobs ended once, under a later epoch than the stalled run's.
        stall = next((st for st in stalls if st.get("lease_out")), None)
        assert stall is not None, f"no stall outlasted its lease: {stalls}"
        stall_jobs = [rid for rid in stall["held"] if rid not in aged]
        fenced_lines = [line for line in replica_log_lines(cluster.nodes, stall["victim"],
                                                           "write refused by fencing")
                        if any(rid in line for rid in stall_jobs)]
        stall["fenced_writes"] = len(fenced_lines)
        assert fenced_lines, f"the stalled runner {stall['victim']} logged no refused write for {stall_jobs}"
        for rid in stall_jobs:
            assert rows[rid]["epoch"] > stall["held"][rid] or rows[rid]["outcome"] == "cancelled", rows[rid]
        stall["won_by_another_replica"] = sum(runner_of[rid].get(rows[rid]["epoch"]) != stall["victim"]
                                              for rid in stall_jobs)
        # The figures the asserts above hold at 0: jobs lost (accepted, then missing or not completed unless
        # cancelled) and duplicated (a row nobody submitted, a result under more than one epoch's key).
        lost = len(set(jobs) - aged - set(rows)) + sum(
            rows[rid]["outcome"] != "succeeded" for rid in jobs if rid in rows and rid not in cancelled)
        duplicated = len(set(rows) - set(jobs)) + sum(
            len(json.loads(rows[rid]["result_keys"]) if isinstance(rows[rid]["result_keys"], str)
                else rows[rid]["result_keys"]) != 1 for rid in completed)
        # Checkpoints left behind: the one each row names (deleted by retention alone, below), and those a killed
        # runner wrote that no row names (retention's orphans, swept below).
        named = {row["checkpoint_key"] for row in rows.values() if row["checkpoint_key"]}
        assert named <= set(objects["checkpoints"]), "a checkpoint a row names is missing"
        stale_checkpoints = [k for k in objects["checkpoints"] if k not in named]
        assert all(rows[k.split("/")[1]]["attempts"] > 1 or rows[k.split("/")[1]]["outcome"] != "succeeded"
                   for k in stale_checkpoints), stale_checkpoints
        assert (lost, duplicated) == (0, 0)

        hook_deadline = time.monotonic() + 60
        while any(Webhooks.deliveries[rid] == 0 for rid in jobs) and time.monotonic() < hook_deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # several outbox polls later: still one delivery each
        with Webhooks.lock:
            deliveries = dict(Webhooks.deliveries)
        duplicated_webhooks = {rid: deliveries.get(rid, 0) for rid in jobs if deliveries.get(rid, 0) != 1}
        assert duplicated_webhooks == {}
        assert {rid for rid in completed if Webhooks.statuses[rid] != "OK"} == set()

        # -- isolation: every job is invisible to the two other keys ----------------------------------------------
        def foreign_answers(rid: str) -> list[tuple[str, int]]:
            job, answers = jobs[rid], []
            for key in KEYS:
                if key == job.key:
                    continue
                root = f"{base}/{APP}/requests/{rid}"
                answers += [("status", http_json("GET", f"{root}/status?logs=1", headers=auth(key))[0]),
                            ("result", http_json("GET", root, headers=auth(key))[0]),
                            ("stream", http_json("GET", f"{root}/status/stream", headers=auth(key))[0]),
                            ("progress", http_json("GET", f"{base}/progress/{rid}", headers=auth(key))[0]),
                            ("cancel", http_json("PUT", f"{root}/cancel", headers=auth(key))[0])]
            own = http_json("GET", f"{base}/{APP}/requests/{rid}/status", headers=auth(job.key))[0]
            return answers + [("own status", own)]

        live = [rid for rid in jobs if rid not in aged]
        with ThreadPoolExecutor(8) as pool:
            seen = dict(zip(live, pool.map(foreign_answers, live), strict=True))
        leaks = {rid: a for rid, a in seen.items() if any(code != 404 for what, code in a if what != "own status")}
        assert leaks == {}, f"visible to another key: {list(leaks.items())[:3]}"
        assert all(dict(a)["own status"] == 200 for a in seen.values())

        # -- a sample of outputs equals the CLI's, byte for byte (a resumed job and reclaimed ones first) ---------
        rng_sample = random.Random(SEED + 1)
        pick = rng_sample.sample(resumed_completed, 1)
        pick += rng_sample.sample([r for r in reclaimed if r not in pick], min(1, len(reclaimed) - len(pick)))
        pick += rng_sample.sample([r for r in completed if r not in pick], SAMPLE_OUTPUTS - len(pick))
        assert pick[0] in resumed
        for rid in pick:
            job = jobs[rid]
            code, output, _ = http_json("GET", f"{base}/{APP}/requests/{rid}", headers=auth(job.key))
            assert code == 200, output
            video = http_bytes(output["video"]["url"])
            assert video == cli_reference(tmp, audio[job.audio], job.steps, job.seed), (job, rows[rid])

        # -- memory of every replica: the floor of its RSS over the jobs it ran ------------------------------------
        # Jobs a replica ran, by the attempts that ended while it lived: an Orchestrator's own (its runner id), any
        # other replica's those of its application's Orchestrators.
        ended = defaultdict(list)
        for attempt in attempts:
            if attempt["ended_at"] is not None:
                ended[attempt["runner"]].append(attempt["ended_at"])
                ended[attempt["runner"].split("#", 1)[0]].append(attempt["ended_at"])
        for times in ended.values():
            times.sort()
        memory: dict[str, FloorGrowth] = {}
        for name, samples in sorted(rss.items()):
            replica = name.removeprefix("SERVE_REPLICA::")
            app, deployment, _ = replica.split("#")
            times = ended[replica if deployment == "Orchestrator" else app]
            growth = floor_growth([(bisect_right(times, t), r) for t, r in samples], SOAK)
            if growth is not None:
                memory[replica] = growth
        print("replica memory (floor of the RSS samples after warm-up):")
        for replica, growth in memory.items():
            print(f"  {replica}: {growth.describe()}")
        judged = {replica: growth for replica, growth in memory.items() if growth.judged}
        assert judged, "no replica ran jobs enough to judge its memory"
        leaked = {replica: growth.describe() for replica, growth in judged.items() if growth.leaked}
        assert leaked == {}, f"replica memory grew with the jobs it ran: {leaked}"

        stored_bytes = sum(info.size for info in storage.list_objects(""))
        serve.delete(APP_NAME)  # nothing writes while the final sweep runs

    # -- retention: a sweep with seconds-long TTLs leaves nothing expired ------------------------------------------
    ttl = 3.0
    fresh_key = f"uploads/{owners[KEYS[0]]}/fresh/me.png"
    time.sleep(ttl + 1.5)  # every row and object above is now older than the TTL (S3 stamps whole seconds)
    storage.put_bytes(fresh_key, EXAMPLE_IMAGE.read_bytes(), "image/png")  # younger than its TTL: stays
    retention = RetentionConfig(results_s=ttl, uploads_s=ttl, inputs_s=ttl, jobs_s=ttl, checkpoints_s=ttl)
    report = asyncio.run(sweep_once(JobStore(store), storage, retention, use_lease=False))
    left_rows = sql("SELECT count(*) AS n FROM jobs")[0]["n"]
    left_logs = sql("SELECT count(*) AS n FROM job_logs")[0]["n"]
    left_objects = sorted(k for k in storage.list_keys()
                          if k.split("/", 1)[0] in ("uploads", "inputs", "results", "checkpoints"))
    store.close()
    assert (left_rows, left_logs) == (0, 0), report.summary()
    assert left_objects == [fresh_key], (left_objects[:5], report.summary())
    assert report.rows["jobs"] == len(jobs) - len(aged), report.summary()
    assert report.objects["results"] >= len(completed), report.summary()

    duration = time.monotonic() - started
    print(f"\nsoak summary (seed {SEED}): {len(jobs)} jobs from {len(KEYS)} keys in {load_duration:.0f} s "
          f"(whole test {duration:.0f} s, load average {os.getloadavg()[0]:.1f}); completed {len(completed)}, "
          f"cancelled {len(cancelled)} (cancel asked for {sum(j.cancel is not None for j in jobs.values())}); "
          f"kills {dict(chaos.kills)}; reclaimed (attempts > 1) {len(reclaimed)}; resumed from a checkpoint "
          f"{len(resumed_completed)}; won by the second app {len(won_by_second)}; stalled runner's refused writes "
          f"{stall['fenced_writes']}; aged jobs swept while running {len(aged)}; lost {lost}, duplicated {duplicated}; "
          f"left by dead runners: {len(orphans)} result and {len(stale_checkpoints)} checkpoint objects (swept); "
          f"submits refused while a route was switching {dict(transitional_refusals)}; "
          f"jobs through the second app {sum(j.prefix == SECOND_PREFIX for j in jobs.values())}; "
          f"bytes stored before the sweep {stored_bytes / len(jobs) / 1e3:.0f} KB per job; "
          f"sweep: {report.summary()}")
    for event in chaos.events:
        print("  ", event)
    if os.environ.get("SOAK_RESULTS"):
        figures = {
            "seed": SEED, "jobs": len(jobs), "keys": len(KEYS), "completed": len(completed) + len(aged),
            "cancelled": len(cancelled), "lost": lost, "duplicated": duplicated,
            "webhooks_not_delivered_once": len(duplicated_webhooks),
            "kills": dict(chaos.kills), "strikes": [{"action": h["action"], "victim": h["victim"],
                                                    "held": h["held"]} for h in strikes],
            "reclaimed": len(reclaimed), "resumed_from_checkpoint": len(resumed_completed),
            "jobs_won_by_second_app": len(won_by_second),
            "stall": {"victim": stall["victim"], "stopped_s": stall["resumed_after_s"], "jobs": len(stall_jobs),
                      "won_by_another_replica": stall["won_by_another_replica"],
                      "fenced_writes": stall["fenced_writes"]},
            "retention_while_running": {"aged_jobs": len(aged), "objects": len(aging["keys"]),
                                        "deleted_after_s": aging["gone_after_s"]},
            "memory": {replica: {"jobs": g.jobs, "floor_growth_mib": round(g.growth / 2**20, 2),
                                 "judged": g.judged} for replica, g in memory.items()},
            "load_s": round(load_duration), "test_s": round(duration),
            "load_average": round(os.getloadavg()[0], 1), "cpus": os.cpu_count(),
        }
        Path(os.environ["SOAK_RESULTS"]).write_text(json.dumps(figures, indent=2) + "\n")
