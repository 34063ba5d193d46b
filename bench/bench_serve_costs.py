"""What the Serve tests' units of work cost in CPU on this machine: a replica's start, a deployment, a redeploy
that replaces every replica, an idle application, a status read and a tiny job, on a cluster of the test suite's
shape (``testing.ray_serve``).

The suite is CPU-bound on a 2-core box, so its wall time is the sum of these costs over what it does; this
measures them one at a time, with nothing else running, to tell which lever is worth pulling.

    python bench/bench_serve_costs.py [--compare-test-env]   # -> bench/results/serve_costs.{json,txt}

The cluster runs with the test clusters' settings (``testing/ray_env.py``). ``--compare-test-env`` also repeats the
deploy-and-run part and the idle application with Serve's own defaults for those settings, then with the test
clusters', alternating, each on a fresh cluster.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from testing.ray_env import TEST_CLUSTER_ENV, use_test_cluster_env  # noqa: E402

use_test_cluster_env()  # the tests' cluster settings, before Ray is imported

import psutil  # noqa: E402
from ray import serve  # noqa: E402

from bench.stats import load_average, write_results  # noqa: E402
from testing.http import http_json  # noqa: E402
from testing.media import EXAMPLE_AUDIO, EXAMPLE_IMAGE, data_uri, synthetic_speech  # noqa: E402
from testing.ray_serve import RayServeCluster, replica_processes, shared_cluster, stop_shared_cluster  # noqa: E402

APP = "fal-ai/stable-avatar"
IDLE_S = 60.0
STATUS_READS = 300
DEPLOYS = 3
REDEPLOY_SETTLE_S = 8.0  # after serve.run returns, the replaced replicas stop
# Serve's defaults for what testing/ray_env.py sets (ray/serve/_private/constants.py).
SERVE_DEFAULTS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100"}
assert SERVE_DEFAULTS.keys() == TEST_CLUSTER_ENV.keys() - {"RAY_AUTH_MODE"}, "compare every setting the tests change"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Leaf:
    def __call__(self, value: int) -> int:
        return value


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Root:
    """Five replicas like the application's, none importing anything of ours."""

    def __init__(self, *leaves) -> None:
        self.leaves = leaves

    async def __call__(self, request) -> str:
        return "ok"


def busy_cpu_s() -> float:
    """The machine's busy CPU seconds so far (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds) for this process and its descendants (the cluster's processes)."""
    found = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        replica = re.search(r"ServeReplica:[^:]+:(\w+)", name)
        kind = ("replica " + replica.group(1) if replica
                else "Serve controller" if "ServeController" in name else "Serve proxy" if "ProxyActor" in name
                else "this process" if proc.pid == os.getpid() else "Ray's other processes")
        found[proc.pid] = (kind, times.user + times.system)
    return found


def cpu_by_kind(before: dict, after: dict, with_new: bool = False) -> dict[str, float]:
    """CPU seconds spent between the two samples by the processes in both; ``with_new``: also those that started in
    between, counted whole. A process that ended in between is missed (a replaced replica's last seconds)."""
    spent: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        if pid in before or with_new:
            spent[kind] = spent.get(kind, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return {kind: round(cpu, 2) for kind, cpu in sorted(spent.items(), key=lambda item: -item[1])}


def tiny_config(root: Path, cluster: RayServeCluster, running: int = 1) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {"device": "cpu", "storage": cluster.local_storage(root / "storage"), "max_running_jobs": running,
            "jobs": {"kind": "sqlite", "path": str(root / "jobs.sqlite3")}, "dispatch": {"poll_interval_s": 0.2}}


def job_body(audio: Path = EXAMPLE_AUDIO, steps: int = 1, seed: int = 1) -> dict:
    return {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "talking", "num_inference_steps": steps, "seed": seed, "aspect_ratio": "1:1"}


def run_job(cluster: RayServeCluster, body: dict) -> float:
    started = time.monotonic()
    code, answer, _ = http_json("POST", f"{cluster.base}/run/{APP}", body)
    assert code == 200, answer
    return time.monotonic() - started


def trivial_replica_start(cluster: RayServeCluster) -> dict:
    cluster.run(Root.bind(*[Leaf.options(name=f"Leaf{i}").bind() for i in range(4)]), "trivial", "/trivial")
    cpu = [sum(psutil.Process(pids[0]).cpu_times()[:2]) for pids in replica_processes("trivial").values()]
    serve.delete("trivial")
    return {"replicas": len(cpu), "cpu_s_median": round(statistics.median(cpu), 2)}


def deploys_and_jobs(cluster: RayServeCluster, root: Path) -> dict:
    """``DEPLOYS`` deployments of the tiny application (each config differs, so every replica restarts), each
    followed by one 1 s job: the machine's busy CPU over all of it, and the wall time of each step."""
    busy, walls, jobs = busy_cpu_s(), [], []
    for i in range(DEPLOYS):
        started = time.monotonic()
        cluster.deploy(tiny_config(root / "deploys", cluster, running=1 + i))
        walls.append(round(time.monotonic() - started, 1))
        jobs.append(round(run_job(cluster, job_body(seed=i)), 1))
    return {"deploys": DEPLOYS, "busy_cpu_s": round(busy_cpu_s() - busy, 1), "deploy_wall_s": walls,
            "job_wall_s": jobs}


def redeploys(cluster: RayServeCluster, root: Path) -> dict:
    """``DEPLOYS`` redeploys of the running tiny application, each with other app args (so Serve replaces every
    replica) and no job: the CPU of each, by process kind, from the call until the old replicas stopped."""
    runs = []
    for i in range(DEPLOYS):
        before, started = process_cpu(), time.monotonic()
        cluster.deploy(tiny_config(root / "redeploys", cluster, running=10 + i))
        wall = time.monotonic() - started
        time.sleep(REDEPLOY_SETTLE_S)
        spent = cpu_by_kind(before, process_cpu(), with_new=True)
        runs.append({"wall_s": round(wall, 1), "cpu_s": round(sum(spent.values()), 1), "cpu_s_by_kind": spent})
    return {"redeploys": DEPLOYS, "runs": runs}


def idle_application(cluster: RayServeCluster) -> dict:
    time.sleep(10)  # the earlier deployment's replicas finish stopping
    before = process_cpu()
    time.sleep(IDLE_S)
    spent = cpu_by_kind(before, process_cpu())
    return {"seconds": IDLE_S, "cpu_s_per_minute": {k: round(v * 60 / IDLE_S, 2) for k, v in spent.items()},
            "total_cpu_s_per_minute": round(sum(spent.values()) * 60 / IDLE_S, 2)}


def status_reads(cluster: RayServeCluster) -> dict:
    code, submitted, _ = http_json("POST", f"{cluster.base}/{APP}", job_body())
    assert code == 200, submitted
    url = submitted["status_url"]
    while http_json("GET", url)[1]["status"] != "COMPLETED":
        time.sleep(0.5)
    before = process_cpu()
    for _ in range(STATUS_READS):
        http_json("GET", url)
    spent = cpu_by_kind(before, process_cpu())
    return {"reads": STATUS_READS, "cpu_ms_per_read": round(1000 * sum(spent.values()) / STATUS_READS, 1),
            "cpu_s_by_kind": spent}


def job_cpu_by_replica(cluster: RayServeCluster, root: Path) -> dict:
    """A 9 s, 3-step job twice (the image is in the Preprocessor's reference cache from an earlier job): each
    replica's CPU."""
    audio = synthetic_speech(root / "speech-9s.wav", 9.0)
    runs = []
    for seed in (5, 6):
        before = process_cpu()
        wall = run_job(cluster, job_body(audio, steps=3, seed=seed))
        spent = cpu_by_kind(before, process_cpu())
        runs.append({"wall_s": round(wall, 1), "cpu_s": {k: v for k, v in spent.items() if k.startswith("replica")}})
    return {"audio_s": 9.0, "steps": 3, "runs": runs}


def on_a_fresh_cluster(measure: Callable[[RayServeCluster], dict], env: dict[str, str] | None = None) -> dict:
    previous = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})  # read by the cluster's processes, which inherit this process's environment
    try:
        stop_shared_cluster()
        return measure(shared_cluster())
    finally:
        stop_shared_cluster()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(compare_test_env: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="serve-costs-"))

    def everything(cluster: RayServeCluster) -> dict:
        result = {"trivial_replica_start": trivial_replica_start(cluster),
                  "deploys_and_jobs": deploys_and_jobs(cluster, root)}
        cluster.deploy(tiny_config(root / "app", cluster))
        result["redeploys"] = redeploys(cluster, root)
        run_job(cluster, job_body())  # the first job's one-time costs are not idle
        result["idle_application"] = idle_application(cluster)
        result["status_read"] = status_reads(cluster)
        result["job_cpu_by_replica"] = job_cpu_by_replica(cluster, root)
        return result

    def deploys_then_idle(cluster: RayServeCluster, folder: Path) -> dict:
        measured = deploys_and_jobs(cluster, folder)
        measured["idle_cpu_s_per_minute"] = idle_application(cluster)["total_cpu_s_per_minute"]
        return measured

    result = on_a_fresh_cluster(everything)
    if compare_test_env:
        test_env = {name: TEST_CLUSTER_ENV[name] for name in SERVE_DEFAULTS}
        result["test_env"] = [
            {"settings": label, "env": env,
             **on_a_fresh_cluster(partial(deploys_then_idle, folder=root / f"env-{i}"), env)}
            for i, (label, env) in enumerate([("Serve's defaults", SERVE_DEFAULTS), ("the test clusters'", test_env)]
                                             * 2)]
    result["load_average"] = load_average()
    return result


def table(result: dict) -> str:
    trivial, deploys = result["trivial_replica_start"], result["deploys_and_jobs"]
    idle, reads, jobs = result["idle_application"], result["status_read"], result["job_cpu_by_replica"]
    lines = [f"Serve's units of work on this machine (load average at the end {result['load_average']})", "",
             f"a trivial replica's start (no imports of ours), median of {trivial['replicas']}: "
             f"{trivial['cpu_s_median']} CPU-s",
             f"{deploys['deploys']} deployments of the tiny application, each followed by a 1 s job: "
             f"{deploys['busy_cpu_s']} busy CPU-s in all; deploy wall s {deploys['deploy_wall_s']}, "
             f"job wall s {deploys['job_wall_s']}",
             *(f"a redeploy that replaces every replica (no job): {run['cpu_s']} CPU-s, wall {run['wall_s']} s: "
               + ", ".join(f"{k} {v}" for k, v in run["cpu_s_by_kind"].items() if v >= 0.1)
               for run in result["redeploys"]["runs"]),
             f"an idle application: {idle['total_cpu_s_per_minute']} CPU-s a minute: "
             + ", ".join(f"{k} {v}" for k, v in idle["cpu_s_per_minute"].items()),
             f"a status read (proxy, Gateway, this client): {reads['cpu_ms_per_read']} ms of CPU"]
    for i, job in enumerate(jobs["runs"]):
        lines.append(f"a {jobs['audio_s']:g} s, {jobs['steps']}-step job (run {i + 1}; the image cached), "
                     f"{job['wall_s']} s: " + ", ".join(f"{k[8:]} {v}" for k, v in job["cpu_s"].items()))
    for row in result.get("test_env", []):
        lines.append(f"{row['settings']} settings {row['env']}: {row['busy_cpu_s']} busy CPU-s for {row['deploys']} "
                     f"deploys and jobs (deploy wall s {row['deploy_wall_s']}), then idle "
                     f"{row['idle_cpu_s_per_minute']} CPU-s a minute")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare-test-env", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "serve_costs")
    args = parser.parse_args()
    result = run(args.compare_test_env)
    text = table(result)
    write_results(args.out, result, text)
    print(text)


if __name__ == "__main__":
    main()
