"""GCS fault tolerance on a real multi-node Ray cluster: the GCS dies while a request is in flight and the
application goes on serving from its worker nodes, as a KubeRay RayService with ``gcsFaultToleranceOptions`` does
while its head restarts (k8s/README.md, "The cluster's own faults").

The cluster (``ray.cluster_utils.Cluster``, as Ray's own tests build one, all on this machine):

- a head node with ``num_cpus=0`` (KubeRay's ``num-cpus: "0"``: no replica can be placed there) whose GCS keeps
  its tables in a real, password-protected ``redis-server`` (tests/redis_server.py), wired as KubeRay wires it
  from ``gcsFaultToleranceOptions``: ``RAY_REDIS_ADDRESS``, the head's Redis password and a fresh
  ``RAY_external_storage_namespace`` (KubeRay uses the RayCluster's UID);
- two worker nodes with CPUs, which hold every replica and a Serve proxy each. Clients talk to the worker proxies
  only (both bind one port with SO_REUSEPORT through ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``; the head's proxy binds
  another that no client uses): that is ``excludeHeadPodFromServeSvc``.

The fault, as Ray's GCS fault-tolerance tests make it: the head's ``gcs_server`` process is killed
(``Node.kill_gcs_server``) while a sync ``/run`` request is being processed, stays down for ``OUTAGE_S``, and is
started again on the same port (``Node.start_gcs_server``), where it reloads the cluster from Redis.

What this shows: the request in flight finishes with its video; while the GCS is down, ``/health`` (which calls
every deployment) answers and new jobs are accepted and run, through proxies and replicas that keep the routes and
replica sets they had; a new actor cannot be created until the GCS is back (the documented limit: no actor or
placement-group creation, so no autoscaling and no redeploy); after the restart the GCS knows the same nodes, the
same Serve controller and the same replicas (none was restarted), which it can only have read back from Redis.

What it cannot show: in KubeRay the whole head *pod* dies, so its raylet, the Serve controller, the dashboard and
the head's proxy go too, and a new pod (new IP, new node id) with a fresh GCS takes over after an image start; here
only the GCS process dies and comes back on the same node within seconds, the Serve controller keeps running, and
nothing crosses a network. KubeRay's own parts (probes, the serve Service's endpoints, restarting the head pod, the
workers' 600 s reconnect timeout) are not exercised; a kind/minikube cluster with the operator would be the next
step. Timings here come from a loaded 2-core box and are printed, never asserted.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from tests.helpers import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri, free_port, http_bytes, http_json  # noqa: E402
from tests.redis_server import Redis, redis_server  # noqa: E402, F401

pytestmark = pytest.mark.slow

APP = "fal-ai/stable-avatar"
OUTAGE_S = 12.0  # how long the GCS stays down (a KubeRay head restart takes longer: a pod start, an image)
SYNC_STEPS = 12  # the in-flight request: long enough to span the kill on this box
WORKER_CPUS = 4  # logical CPUs per worker node: room for every replica (1 CPU each) on either node


@dataclass
class FtCluster:
    """The running cluster: ``base`` reaches the worker nodes' proxies only; ``nodes`` is the Cluster."""

    base: str
    nodes: Any
    redis: Redis
    namespace: str
    root: Path


@pytest.fixture(scope="module")
def ft_cluster(redis_server: Redis, tmp_path_factory) -> Iterator[FtCluster]:  # noqa: F811 - the fixture
    from ray.cluster_utils import Cluster

    namespace = f"gcs-ft-test-{uuid.uuid4().hex[:12]}"
    head_port, worker_port = free_port(), free_port()
    # Read by the head's Node (RAY_REDIS_ADDRESS) and by the GCS process it starts (the namespace), as KubeRay sets
    # them on the head container.
    saved = {k: os.environ.get(k) for k in ("RAY_REDIS_ADDRESS", "RAY_external_storage_namespace")}
    os.environ.update(RAY_REDIS_ADDRESS=redis_server.address, RAY_external_storage_namespace=namespace)
    store = 200 * 2**20
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "object_store_memory": store, "include_dashboard": False,
        "redis_password": redis_server.password})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=WORKER_CPUS, num_gpus=0, object_store_memory=store,
                           env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        try:
            serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": head_port})
            root = tmp_path_factory.mktemp("gcs-ft-data")
            options = {"num_cpus": 1}  # a CPU each: never on the head, which has none
            serve.run(build_app(AppArgs.model_validate({
                "device": "cpu", "storage": {"kind": "local", "root": str(root),
                                             "public_base_url": f"http://127.0.0.1:{worker_port}"},
                "dispatch": {"lease_s": 20, "heartbeat_s": 1, "poll_interval_s": 0.2},
                "gateway": {**options, "num_replicas": 2}, "orchestrator": options, "preprocessor": options,
                "denoiser": options, "postprocessor": options})), name=APP_NAME, route_prefix="/")
            yield FtCluster(f"http://127.0.0.1:{worker_port}", nodes, redis_server, namespace, root)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def job_body(steps: int, seed: int) -> dict[str, Any]:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(EXAMPLE_AUDIO, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": steps, "seed": seed, "aspect_ratio": "1:1"}


def serve_actors() -> dict[str, dict[str, Any]]:
    """Alive Serve actors (controller, proxies, replicas) by actor id, from the GCS's actor table."""
    return {actor_id: info for actor_id, info in ray._private.state.actors(actor_state_name="ALIVE").items()
            if info["Name"].startswith(("SERVE_", "ServeReplica"))}


def wait_until(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def status(base: str, request_id: str) -> str:
    code, body, _ = http_json("GET", f"{base}/{APP}/requests/{request_id}/status", timeout=30)
    assert code == 200, body
    return body["status"]


def finished_before(root: Path, request_id: str, moment: float) -> bool:
    """Whether the job's row says it completed before ``moment`` (a time.monotonic() reading)."""
    from deployments.jobstore import SqliteJobsConfig, make_sync_job_store

    store = make_sync_job_store(SqliteJobsConfig(path=root / "jobs.sqlite3"), root / "unused")
    try:
        with store.backend.read() as cur:
            cur.execute("SELECT completed_at FROM jobs WHERE request_id = ?", (request_id,))
            completed_at = cur.fetchone()["completed_at"]
    finally:
        store.close()
    return completed_at is not None and completed_at < time.time() - (time.monotonic() - moment)


def gcs_answers() -> float | None:
    """When the GCS answered a node-table query, or None while it does not."""
    try:
        return time.monotonic() if ray.nodes() else None
    except Exception:  # noqa: BLE001 - any failure of the query means "not yet"
        return None


@ray.remote(num_cpus=0)
class Probe:
    def ping(self) -> str:
        return "pong"


def test_requests_in_flight_finish_and_new_ones_are_served_while_the_gcs_restarts(ft_cluster: FtCluster) -> None:
    base, head = ft_cluster.base, ft_cluster.nodes.head_node
    workers = {n.node_id for n in ft_cluster.nodes.worker_nodes}

    # -- before: the GCS writes to Redis, and nothing of Serve's but the controller and a proxy is on the head
    assert ft_cluster.redis.keys(f"*{ft_cluster.namespace}*"), "the GCS wrote nothing to Redis"
    before = serve_actors()
    replicas = {a: i for a, i in before.items() if i["Name"].startswith("SERVE_REPLICA")}
    assert {i["Name"].split("::")[1].split("#")[1] for i in replicas.values()} == {
        "Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"}
    assert {i["Address"]["NodeID"] for i in replicas.values()} <= workers  # no replica on the head
    code, warm, _ = http_json("POST", f"{base}/run/{APP}", job_body(1, 1), timeout=300)
    assert code == 200, warm  # every replica has loaded its model

    # -- a sync request in flight: its HTTP connection stays open on a worker proxy through the outage
    answers: dict[str, Any] = {}

    def sync_request() -> None:
        started = time.monotonic()
        answers["sync"] = http_json("POST", f"{base}/run/{APP}", job_body(SYNC_STEPS, 7), timeout=600)
        answers["sync_done_at"] = time.monotonic()
        answers["sync_s"] = answers["sync_done_at"] - started

    in_flight = threading.Thread(target=sync_request, daemon=True)
    in_flight.start()
    from deployments.jobstore import SqliteJobsConfig, make_sync_job_store

    store = make_sync_job_store(SqliteJobsConfig(path=ft_cluster.root / "jobs.sqlite3"), ft_cluster.root / "unused")
    try:
        def running() -> bool:
            with store.backend.read() as cur:
                cur.execute("SELECT count(*) AS n FROM jobs WHERE status = 'IN_PROGRESS'")
                return cur.fetchone()["n"] == 1
        wait_until("the sync request's job to run", running, 120)
    finally:
        store.close()

    # -- the fault. The restart runs on its own clock: whatever the requests do, the GCS is back after OUTAGE_S
    # (a driver that cannot reach it for 60 s exits, as a KubeRay worker would after its reconnect timeout).
    killed_at = time.monotonic()
    head.kill_gcs_server()
    moments: dict[str, float] = {}
    restarter = threading.Timer(OUTAGE_S, lambda: (moments.__setitem__("restarted", time.monotonic()),
                                                   head.start_gcs_server()))
    restarter.start()
    probe: dict[str, Any] = {}

    def create_an_actor() -> None:  # an actor needs the GCS to be created at all
        probe["pong"] = ray.get(Probe.remote().ping.remote(), timeout=OUTAGE_S + 120)
        probe["at"] = time.monotonic()

    threading.Thread(target=create_an_actor, daemon=True).start()
    health_s: list[float] = []
    health_failed: list[Any] = []
    submitted: list[str] = []
    while "restarted" not in moments:
        t0 = time.monotonic()
        code, body, _ = http_json("GET", f"{base}/health", timeout=10)
        (health_s if code == 200 else health_failed).append(time.monotonic() - t0 if code == 200 else body)
        if len(submitted) < 3 and "restarted" not in moments:
            code, body, _ = http_json("POST", f"{base}/{APP}", job_body(1, 100 + len(submitted)), timeout=10)
            assert code == 200, body
            submitted.append(body["request_id"])
        time.sleep(0.5)
    restarter.join()
    restarted_at = moments["restarted"]
    sync_during_outage = answers.get("sync_done_at", restarted_at + 1) < restarted_at
    gcs_back_at = wait_until("the GCS to answer", gcs_answers, 60)

    # -- after: the same cluster, read back from Redis
    wait_until("the actor asked for during the outage", lambda: "pong" in probe, 120)
    assert probe["at"] > restarted_at  # created only once the GCS was back
    after = serve_actors()
    assert {a: (i["Name"], i["Pid"], i["NumRestarts"]) for a, i in after.items() if a in replicas} == {
        a: (i["Name"], i["Pid"], i["NumRestarts"]) for a, i in replicas.items()}  # no replica was restarted
    controller = [a for a, i in before.items() if i["Name"] == "SERVE_CONTROLLER_ACTOR"]
    assert controller and controller[0] in after
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == workers | {head.node_id}  # the raylets reconnected; no node was replaced

    in_flight.join(timeout=600)
    code, result, _ = answers["sync"]
    assert code == 200, result
    assert len(http_bytes(result["video"]["url"])) == result["video"]["file_size"] > 0
    for request_id in submitted:  # the jobs accepted while the GCS was down ran to the end
        wait_until(f"job {request_id}", lambda rid=request_id: status(base, rid) == "COMPLETED", 300, 0.5)
    code, after_job, _ = http_json("POST", f"{base}/run/{APP}", job_body(1, 999), timeout=300)
    assert code == 200, after_job
    done_during_outage = sum(1 for rid in submitted if finished_before(ft_cluster.root, rid, restarted_at))

    assert health_s and not health_failed, health_failed
    load = os.getloadavg()[0]
    print(f"\n[gcs-ft] GCS down {restarted_at - killed_at:.1f} s (killed while the sync job ran), answering again "
          f"{gcs_back_at - restarted_at:.1f} s after the restart; during the outage: {len(health_s)} /health answered "
          f"(median {statistics.median(health_s) * 1000:.0f} ms, max {max(health_s) * 1000:.0f} ms), 0 failed, "
          f"{len(submitted)} jobs accepted ({done_during_outage} completed before the restart); the in-flight sync request took {answers['sync_s']:.1f} s and finished "
          f"{'during' if sync_during_outage else 'after'} the outage "
          f"({answers['sync_done_at'] - killed_at:+.1f} s from the kill); load average {load:.1f}", flush=True)
