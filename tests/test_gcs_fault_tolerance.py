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
(``Node.kill_gcs_server``) while a sync ``/run`` request is being processed, and started again on the same port
(``Node.start_gcs_server``), where it reloads the cluster from Redis. It stays down until the request in flight has
answered and a job accepted during the outage has completed (between MIN_OUTAGE_S and MAX_OUTAGE_S), so the printed
summary says what was served while there was no GCS; raylets and drivers wait RECONNECT_TIMEOUT_S for it.

What this shows: the request in flight finishes with its video; while the GCS is down, ``/health`` (which calls
every deployment) answers and new jobs are accepted and run, through proxies and replicas that keep the routes and
replica sets they had; a new actor asked for during the outage (by a second driver) is created only after the GCS
is back (the documented limit: no actor or placement-group creation, so no autoscaling and no redeploy); after the
restart the GCS knows the same nodes, the same Serve controller and the same replicas (none was restarted), which it
can only have read back from Redis.

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
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from deployments.app import build_app
from deployments.config import APP_NAME, AppArgs
from testing.http import free_port, http_bytes, http_json
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri
from testing.ray_serve import stop_shared_cluster
from tests.redis_server import Redis, redis_server  # noqa: F401

pytestmark = pytest.mark.serve  # a multi-node cluster of its own

APP = "fal-ai/stable-avatar"
# The GCS stays down at least MIN_OUTAGE_S and until the request in flight has answered and a job accepted during
# the outage has completed, or MAX_OUTAGE_S (a KubeRay head restart takes longer: a pod start, an image pull).
MIN_OUTAGE_S, MAX_OUTAGE_S = 8.0, 75.0
RECONNECT_TIMEOUT_S = 120  # raylets and drivers give up on a GCS gone this long (KubeRay sets 600 on workers)
SYNC_STEPS = 3  # the in-flight request
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

    stop_shared_cluster()  # one Ray cluster per process at a time
    namespace = f"gcs-ft-test-{uuid.uuid4().hex[:12]}"
    head_port, worker_port = free_port(), free_port()
    # Read by the head's Node (RAY_REDIS_ADDRESS) and by the GCS process it starts (the namespace), as KubeRay sets
    # them on the head container.
    saved = {k: os.environ.get(k) for k in ("RAY_REDIS_ADDRESS", "RAY_external_storage_namespace",
                                            "RAY_gcs_rpc_server_reconnect_timeout_s")}
    os.environ.update(RAY_REDIS_ADDRESS=redis_server.address, RAY_external_storage_namespace=namespace,
                      RAY_gcs_rpc_server_reconnect_timeout_s=str(RECONNECT_TIMEOUT_S))
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
            if info["Name"].startswith("SERVE_")}


def wait_until(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def jobs_query(root: Path, sql: str, params: tuple = ()) -> dict[str, Any]:
    """The first row of a query on the SQLite jobs database the application keeps beside its local storage (read
    directly: the test must not depend on the GCS to learn what the replicas did)."""
    from deployments.jobstore import SqliteJobsConfig, make_sync_job_store

    store = make_sync_job_store(SqliteJobsConfig(path=root / "jobs.sqlite3"), root / "unused")
    try:
        with store.backend.read() as cur:
            cur.execute(sql, params)
            return dict(cur.fetchone())
    finally:
        store.close()


def job_row(root: Path, request_id: str) -> dict[str, Any]:
    return jobs_query(root, "SELECT status, started_at, completed_at FROM jobs WHERE request_id = ?", (request_id,))


def running_jobs(root: Path) -> int:
    return jobs_query(root, "SELECT count(*) AS n FROM jobs WHERE status = 'IN_PROGRESS'")["n"]


def gcs_answers() -> float | None:
    """When the GCS answered a node-table query, or None while it does not."""
    try:
        return time.time() if ray.nodes() else None
    except Exception:  # noqa: BLE001 - any failure of the query means "not yet"
        return None


# A second driver that asks for a new actor when told to: in its own process, so that its wait for the GCS holds
# nobody else's interpreter. It prints when it asked and when the actor answered (wall-clock seconds).
ACTOR_PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, namespace="gcs-ft-probe")

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return "pong"

print("connected", flush=True)
sys.stdin.readline()
asked = time.time()
print(ray.get(Probe.remote().ping.remote(), timeout=300), asked, time.time(), flush=True)
"""


@dataclass
class Traffic:
    """Clients of the worker proxies, run on a thread from the kill until told to stop: each round one
    ``/health`` (every deployment answers through its handles) and, in the first round, one job submitted (one:
    on two shared cores, more jobs at once beside the request in flight only measure CPU contention)."""

    base: str
    max_jobs: int = 1
    health: list[tuple[float, int, float]] = field(default_factory=list)  # (sent at, status, seconds)
    jobs: list[tuple[float, str]] = field(default_factory=list)  # (accepted at, request id)
    refused: list[Any] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            code, body, _ = http_json("GET", f"{self.base}/health", timeout=10)
            self.health.append((sent, code, time.time() - sent))
            if len(self.jobs) < self.max_jobs:
                code, body, _ = http_json("POST", f"{self.base}/{APP}", job_body(1, 100 + len(self.jobs)),
                                          timeout=10)
                if code == 200:
                    self.jobs.append((time.time(), body["request_id"]))
                else:
                    self.refused.append(body)
            self.stop.wait(0.5)


def test_requests_in_flight_finish_and_new_ones_are_served_while_the_gcs_restarts(ft_cluster: FtCluster) -> None:
    base, head, root = ft_cluster.base, ft_cluster.nodes.head_node, ft_cluster.root
    workers = {n.node_id for n in ft_cluster.nodes.worker_nodes}

    # -- before: the GCS keeps its tables in Redis, and no replica is on the head
    assert ft_cluster.redis.keys(f"RAY{ft_cluster.namespace}@*"), "the GCS wrote nothing to Redis"
    before = serve_actors()
    replicas = {a: i for a, i in before.items() if i["Name"].startswith("SERVE_REPLICA")}
    assert {i["Name"].split("::")[1].split("#")[1] for i in replicas.values()} == {
        "Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor"}
    assert {i["Address"]["NodeID"] for i in replicas.values()} <= workers
    code, warm, _ = http_json("POST", f"{base}/run/{APP}", job_body(1, 1), timeout=300)
    assert code == 200, warm  # every replica has loaded its model
    probe = subprocess.Popen([sys.executable, "-c", ACTOR_PROBE, ft_cluster.nodes.address], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert probe.stdout.readline().strip() == "connected"

        # -- a sync request in flight: its HTTP connection stays open on a worker proxy through the outage
        sync: dict[str, Any] = {}

        def sync_request() -> None:
            sync["sent"] = time.time()
            sync["answer"] = http_json("POST", f"{base}/run/{APP}", job_body(SYNC_STEPS, 7), timeout=600)
            sync["done"] = time.time()

        in_flight = threading.Thread(target=sync_request, daemon=True)
        in_flight.start()
        wait_until("the sync request's job to run", lambda: running_jobs(root) == 1, 120)

        # -- the fault: the GCS process dies; the clients go on; the GCS comes back. It is started from this
        # thread: Ray ties a process it starts to the life of the starting thread (PR_SET_PDEATHSIG).
        traffic = Traffic(base)
        killed = time.time()
        head.kill_gcs_server()
        clients = threading.Thread(target=traffic.run, daemon=True)
        clients.start()
        probe.stdin.write("go\n")
        probe.stdin.flush()
        time.sleep(MIN_OUTAGE_S)
        while time.time() - killed < MAX_OUTAGE_S and not (
                "done" in sync and any(job_row(root, rid)["status"] == "COMPLETED" for _, rid in traffic.jobs)):
            time.sleep(0.5)
        restarted = time.time()
        head.start_gcs_server()
        gcs_back = wait_until("the GCS to answer", gcs_answers, 60)
        time.sleep(2.0)  # a few more rounds of traffic after the restart
        traffic.stop.set()
        clients.join(timeout=30)

        # -- after: the same cluster, read back from Redis
        answer, asked, answered = probe.stdout.readline().split()
        assert answer == "pong" and float(asked) < restarted < float(answered)  # no new actor while it was down
    finally:
        probe.kill()
        probe.wait(timeout=30)
    after = serve_actors()
    assert {a: (i["Name"], i["Pid"], i["NumRestarts"]) for a, i in after.items() if a in replicas} == {
        a: (i["Name"], i["Pid"], i["NumRestarts"]) for a, i in replicas.items()}  # no replica was restarted
    controller = [a for a, i in before.items() if i["Name"] == "SERVE_CONTROLLER_ACTOR"]
    assert controller and controller[0] in after
    assert {n["NodeID"] for n in ray.nodes() if n["Alive"]} == workers | {head.node_id}  # no node replaced

    in_flight.join(timeout=600)
    code, result, _ = sync["answer"]
    assert code == 200, result  # the request in flight when the GCS died
    assert len(http_bytes(result["video"]["url"])) == result["video"]["file_size"] > 0
    during = [h for h in traffic.health if h[0] < restarted]
    assert during and all(code == 200 for _, code, _ in traffic.health), traffic.health
    assert not traffic.refused and [at for at, _ in traffic.jobs if at < restarted], (traffic.refused, traffic.jobs)
    for _, request_id in traffic.jobs:  # every job accepted while the GCS was down ran to the end
        wait_until(f"job {request_id}", lambda rid=request_id: job_row(root, rid)["status"] == "COMPLETED", 300, 0.5)
    code, after_job, _ = http_json("POST", f"{base}/run/{APP}", job_body(1, 999), timeout=300)
    assert code == 200, after_job  # and a new one after

    rows = [job_row(root, rid) for at, rid in traffic.jobs if at < restarted]
    seconds = sorted(s for _, _, s in during)
    print(f"\n[gcs-ft] GCS down {restarted - killed:.1f} s, answering {gcs_back - restarted:.1f} s after its restart. "
          f"During the outage: {len(during)} /health answered 200 (median {statistics.median(seconds) * 1000:.0f} "
          f"ms, max {seconds[-1] * 1000:.0f} ms), none failed; {len(rows)} jobs accepted, "
          f"{sum(r['started_at'] is not None and r['started_at'] < restarted for r in rows)} started and "
          f"{sum(r['completed_at'] is not None and r['completed_at'] < restarted for r in rows)} completed before the "
          f"restart. The in-flight sync request ({SYNC_STEPS} steps) took {sync['done'] - sync['sent']:.1f} s and "
          f"answered {sync['done'] - killed:+.1f} s from the kill ({'during' if sync['done'] < restarted else 'after'}"
          f" the outage). Load average {os.getloadavg()[0]:.1f}.", flush=True)
