"""The soak: a few hundred short jobs from three API keys on a multi-node Ray cluster (PostgreSQL jobs database,
SeaweedFS S3 storage) while seeded chaos strikes, then the invariants that must hold whatever happened.

Chaos, at seeded moments (measured in jobs submitted): kills of an Orchestrator replica that runs a job, of a
Denoiser, the Preprocessor and the Postprocessor; the loss of the worker node that holds a Denoiser
(``cluster.remove_node``) and a fresh node added back; a second application (own route prefix) on the same
database and bucket for part of the run; a restart of the whole application while the second one runs; random
cancels of queued and running jobs. Invariants checked afterwards:

- every job is in the database exactly as submitted (no lost, no phantom job); every job not cancelled completed
  once without error: the row's one winning epoch names one result object ``results/<id>/e<epoch>/output.mp4``,
  which is the only result object of a job that ran once; a job reclaimed after a kill may also have left the
  dead runner's object under its own epoch (an orphan the retention sweep removes, checked at the end);
  each job's webhook was delivered exactly once;
- a sample of outputs equals ``stable-avatar generate`` byte for byte (reclaimed jobs first);
- no job or file is visible to another key: status, result, stream, progress and cancel of every job answer 404
  with both other keys, and one key's upload is refused as another key's input;
- every replica's RSS stays within a bound over the run (sampled with psutil by process title);
- a final retention sweep with seconds-long TTLs leaves no expired row and no expired object under ``uploads/``,
  ``inputs/``, ``results/``, ``checkpoints/`` (a fresh upload, younger than its TTL, stays).

Bounded: ``SOAK_JOBS`` (default 200) jobs, ``SOAK_SEED`` (default 20261130), ``LOAD_TIMEOUT_S`` to submit and
finish them. 200, because the memory check needs replicas that live through 50 finished jobs between the restarts
the chaos causes (with 60 jobs none does). Its cost is ~26 replica process starts (a model replica imports torch,
diffusers and transformers: 5-7 CPU-s) and ~3 CPU-s per job, half of it in the one Preprocessor replica (the
VAE encoding of the reference window, one request at a time): that replica sets the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import random
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from deployments.gateway.auth import fingerprint  # noqa: E402
from deployments.jobstore import JobStore, PostgresJobsConfig, make_sync_job_store  # noqa: E402
from deployments.orchestrator.retention import RetentionConfig, sweep_once  # noqa: E402
from deployments.storage import S3Storage  # noqa: E402
from stable_avatar.cli import main as cli_main  # noqa: E402
from testing.http import http_bytes, http_json  # noqa: E402
from testing.media import EXAMPLE_IMAGE, data_uri, synthetic_speech  # noqa: E402
from testing.ray_serve import ray_serve_multinode_cluster  # noqa: E402

pytestmark = pytest.mark.soak

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
PROMPT = "a person talking"
# Replica memory: the last RSS sample of a replica may exceed its first sample after warm-up by at most this.
# Why 64 MiB: a replica holds the tiny models (tens of MB) and per-job buffers freed after each job; what moves
# legitimately is allocator high-water (the Pre/Postprocessor run torch in asyncio.to_thread, so several threads'
# malloc arenas each keep their peak) and the bounded caches (conditioning LRU, unit counts). Measured: the
# Preprocessor's work in one process, 80 jobs through the default executor, plateaus after ~20 jobs (546 -> 534
# MiB from job 20 to 80); in the soak the Pre/Postprocessor replicas move within +-40 MiB after warm-up and the
# others within 4 MiB. A leak of 1.5 MiB or more per job over the 40+ jobs a replica lives is caught.
RSS_GROWTH_BOUND = 64 * 2**20
RSS_WARMUP_JOBS = 20  # a replica's samples before this many more jobs finished load models and warm allocators
RSS_MIN_SPAN_JOBS = 30  # a replica is judged only if it lived this many jobs after its warm-up


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
        "webhook_first_delay_s": 0.2,
        "jobs": {"kind": "postgres", "dsn_env": DSN_ENV, "pool_max_size": 4, "connect_timeout_s": 5},
        # lease: a killed runner's job is claimed again within seconds, yet a replica starved of CPU on a loaded
        # 2-core machine still renews it in time
        "dispatch": {"lease_s": 8, "heartbeat_s": 1, "poll_interval_s": 0.2},
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
            (at(0.21), "kill_postprocessor"), (at(0.30), "remove_node"),
            (at(0.46), "start_second_app"), (at(0.58), "restart_main_app"), (at(0.70), "kill_orchestrator_b"),
            (at(0.78), "stop_second_app"),
        ])
        jobs: dict[str, Job] = {}
        unfinished: set[str] = set()
        waiting_to_cancel: set[str] = set()
        main_up, second_up = threading.Event(), threading.Event()
        main_up.set()
        background: list[threading.Thread] = []
        background_errors: list[BaseException] = []
        removed_nodes: list = []
        rss: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # pid -> (jobs done, rss, name)
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

        def fire(action: str) -> None:
            submitted = len(jobs)
            if action == "kill_orchestrator":
                running = sql("SELECT lease_owner FROM jobs WHERE status = 'IN_PROGRESS' AND lease_owner LIKE ?",
                              (f"{APP_NAME}#Orchestrator#%",))
                names = sorted({f"SERVE_REPLICA::{r['lease_owner']}" for r in running}) or \
                    replica_actors(APP_NAME, "Orchestrator")
                victim = rng.choice(names)
                kill_replica(victim)
                chaos.kills["Orchestrator"] += 1
                chaos.note(started, submitted, f"killed {victim} ({len(running)} jobs running)")
            elif action == "kill_orchestrator_b":
                victim = rng.choice(replica_actors(SECOND_APP, "Orchestrator"))
                kill_replica(victim)
                chaos.kills["Orchestrator"] += 1
                chaos.note(started, submitted, f"killed {victim}")
            elif action in ("kill_denoiser", "kill_preprocessor", "kill_postprocessor"):
                deployment = action.removeprefix("kill_").capitalize()
                victim = rng.choice(replica_actors(APP_NAME, deployment))
                kill_replica(victim)
                chaos.kills[deployment] += 1
                chaos.note(started, submitted, f"killed {victim}")
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
            for pid, name in replica_processes(cluster.nodes).items():
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss[pid].append((done_count, psutil.Process(pid).memory_info().rss, name))

        next_event, last_sample = 0, -1
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
                fire(schedule[next_event][1])
                next_event += 1
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
            if done_count // 10 != last_sample:
                last_sample = done_count // 10
                sample_rss()
            time.sleep(0.1)
        for thread in background:
            thread.join(timeout=120)
        assert not background_errors, background_errors
        assert not unfinished, f"{len(unfinished)} jobs did not finish in time: {sorted(unfinished)[:5]}"
        assert next_event == len(schedule) and add_node_at[0] is None, "not every chaos event fired"
        sample_rss()
        load_duration = time.monotonic() - started
        chaos.note(started, len(jobs), f"all {len(jobs)} jobs finished")

        # -- exactly once: rows, outcomes, result objects, webhooks ------------------------------------------------
        rows = {r["request_id"]: r for r in sql(
            "SELECT request_id, owner, status, outcome, error, epoch, attempts, result_keys, checkpoint_key "
            "FROM jobs")}
        assert set(rows) == set(jobs), "the database holds exactly the jobs that were accepted"
        objects = defaultdict(list)
        for key in storage.list_keys():
            kind, _, rest = key.partition("/")
            objects[kind].append(key)
        results_of = defaultdict(list)
        for key in objects["results"]:
            results_of[key.split("/")[1]].append(key)
        completed, cancelled, orphans = [], [], []
        for rid, job in jobs.items():
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
        # Checkpoints left behind: the one each row names (deleted by retention alone, below), and those a killed
        # runner wrote that no row names (retention's orphans, swept below).
        named = {row["checkpoint_key"] for row in rows.values() if row["checkpoint_key"]}
        assert named <= set(objects["checkpoints"]), "a checkpoint a row names is missing"
        stale_checkpoints = [k for k in objects["checkpoints"] if k not in named]
        assert all(rows[k.split("/")[1]]["attempts"] > 1 or rows[k.split("/")[1]]["outcome"] != "succeeded"
                   for k in stale_checkpoints), stale_checkpoints

        hook_deadline = time.monotonic() + 60
        while any(Webhooks.deliveries[rid] == 0 for rid in jobs) and time.monotonic() < hook_deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # several outbox polls later: still one delivery each
        with Webhooks.lock:
            deliveries = dict(Webhooks.deliveries)
        assert {rid: deliveries.get(rid, 0) for rid in jobs if deliveries.get(rid, 0) != 1} == {}
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

        with ThreadPoolExecutor(8) as pool:
            seen = dict(zip(jobs, pool.map(foreign_answers, jobs), strict=True))
        leaks = {rid: a for rid, a in seen.items() if any(code != 404 for what, code in a if what != "own status")}
        assert leaks == {}, f"visible to another key: {list(leaks.items())[:3]}"
        assert all(dict(a)["own status"] == 200 for a in seen.values())

        # -- a sample of outputs equals the CLI's, byte for byte (reclaimed jobs first) ---------------------------
        rng_sample = random.Random(SEED + 1)
        pick = rng_sample.sample(reclaimed, min(2, len(reclaimed)))
        pick += rng_sample.sample([r for r in completed if r not in pick], SAMPLE_OUTPUTS - len(pick))
        for rid in pick:
            job = jobs[rid]
            code, output, _ = http_json("GET", f"{base}/{APP}/requests/{rid}", headers=auth(job.key))
            assert code == 200, output
            video = http_bytes(output["video"]["url"])
            assert video == cli_reference(tmp, audio[job.audio], job.steps, job.seed), (job, rows[rid])

        # -- memory of every replica ------------------------------------------------------------------------------
        growth = {}
        for pid, samples in rss.items():  # per process: its baseline once it has seen RSS_WARMUP_JOBS jobs finish
            warm = [s for s in samples if s[0] >= samples[0][0] + RSS_WARMUP_JOBS]
            if len(warm) >= 3 and warm[-1][0] - warm[0][0] >= RSS_MIN_SPAN_JOBS:
                growth[f"{samples[0][2]} (pid {pid})"] = (warm[0][0], warm[-1][0], warm[0][1], warm[-1][1])
            print(f"  rss {samples[0][2]} pid {pid}: " + " ".join(f"{j}:{r / 2**20:.0f}" for j, r, _ in samples))
        print("replica RSS (jobs done at first/last warm sample: MiB first -> last):")
        for name, (j0, j1, r0, r1) in sorted(growth.items()):
            print(f"  {name}: {j0}->{j1} jobs: {r0 / 2**20:.0f} -> {r1 / 2**20:.0f} MiB ({(r1 - r0) / 2**20:+.1f})")
        assert growth, "no replica lived long enough to sample its memory"
        grown = {name: (r1 - r0) / 2**20 for name, (_, _, r0, r1) in growth.items() if r1 - r0 > RSS_GROWTH_BOUND}
        assert grown == {}, f"replica memory grew by more than {RSS_GROWTH_BOUND / 2**20:.0f} MiB: {grown}"

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
    assert report.rows["jobs"] == len(jobs) and report.objects["results"] >= len(completed), report.summary()

    duration = time.monotonic() - started
    print(f"\nsoak summary (seed {SEED}): {len(jobs)} jobs from {len(KEYS)} keys in {load_duration:.0f} s "
          f"(whole test {duration:.0f} s, load average {os.getloadavg()[0]:.1f}); completed {len(completed)}, "
          f"cancelled {len(cancelled)} (cancel asked for {sum(j.cancel is not None for j in jobs.values())}); "
          f"kills {dict(chaos.kills)}; reclaimed (attempts > 1) {len(reclaimed)}; "
          f"left by dead runners: {len(orphans)} result and {len(stale_checkpoints)} checkpoint objects (swept); "
          f"submits refused while a route was switching {dict(transitional_refusals)}; "
          f"jobs through the second app {sum(j.prefix == SECOND_PREFIX for j in jobs.values())}; "
          f"bytes stored before the sweep {stored_bytes / len(jobs) / 1e3:.0f} KB per job; "
          f"sweep: {report.summary()}")
    for event in chaos.events:
        print("  ", event)
