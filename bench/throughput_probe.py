"""The throughput load probe, run inside one source tree (``bench/bench_throughput.py`` starts it in a process of
its own, with that tree first on ``PYTHONPATH`` and this repository's ``testing`` package after it).

It starts a Ray cluster, deploys the tree's application with its defaults (tiny preset, CPU, local storage; only
the submit limits opened, ``--app-args`` merged over them), submits ``--jobs`` queued jobs at once (data-URI image
and audio, 1 step), polls their status at a fixed rate until all are done, and prints one ``PROBE_RESULT`` JSON
line: jobs per minute and, per job, the stages read from its own log lines (which every tree writes the same way):

- prepare: the ``prepared in X s`` line (the Preprocessor call, timed by the Orchestrator);
- decode + encode: the ``encoded N frames in X s`` line (timed by the Postprocessor);
- total: from the ``preprocessing: fetching and decoding the inputs`` line's timestamp to the ``encoded`` line's.
  The jobs database stamps a line when its batch is written (``dispatch.log_flush_s``, 1 s): a total is good to
  about a second there, and the span over all jobs (jobs per minute) is not affected.

Every Serve actor (replicas, proxy, controller) reports its CPU seconds by thread over the run (read from /proc
through ``__ray_call__``); with ``--profile`` each also samples its Python stacks every 10 ms (which costs a few
per cent of a core per actor): where a replica's CPU goes, by thread and by stack.

Only what both trees have is used: the ``tiny`` preset, ``build_app``/``AppArgs``, the fal queue routes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PREPARED = re.compile(r"^prepared in ([0-9.]+) s")
ENCODED = re.compile(r"^encoded \d+ frames in ([0-9.]+) s")
SAMPLE_EVERY_S = 0.01
STARTS = 3  # tries to start the Ray cluster
IDLE_LEAVES = ("select", "poll", "epoll", "wait", "_wait_for_tstate_lock", "sleep", "get", "accept", "recv",
               "recv_into", "readinto", "_worker", "run_forever", "_run_once", "acquire", "main_loop")


# -- profiling inside each Serve actor (these functions travel by value: this file runs as __main__) --------------
def start_sampler(_actor: Any = None, stacks: bool = True) -> int:
    """Note every thread's CPU time now and (``stacks``) sample every thread's Python stack every 10 ms on a daemon
    thread; returns this process's pid."""
    import collections
    import os as _os
    import sys as _sys
    import threading as _threading
    import time as _time

    state = {"stop": False, "stacks": collections.Counter(), "samples": 0, "cpu_before": _thread_cpu()}

    def sample() -> None:
        me = _threading.get_ident()
        while not state["stop"]:
            names = {t.ident: t.name for t in _threading.enumerate()}
            for ident, frame in _sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None and len(stack) < 6:
                    code = frame.f_code
                    stack.append(f"{_os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
                    frame = frame.f_back
                state["stacks"][(names.get(ident, "?"), tuple(stack))] += 1
            state["samples"] += 1
            _time.sleep(SAMPLE_EVERY_S)

    _sys._throughput_sampler = state  # type: ignore[attr-defined]
    if stacks:
        _threading.Thread(target=sample, name="throughput-sampler", daemon=True).start()
    return _os.getpid()


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """Native thread id -> (name, CPU seconds) for every thread of this process, from /proc."""
    import os as _os
    import threading as _threading

    tick = _os.sysconf("SC_CLK_TCK")
    python_names = {t.native_id: t.name for t in _threading.enumerate()}
    out = {}
    for tid in _os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (python_names.get(int(tid), f"native:{comm}"), (int(fields[11]) + int(fields[12])) / tick)
    return out


def stop_sampler(_actor: Any = None) -> dict[str, Any]:
    """Stop the sampler; the busiest stacks (idle waits left out) and CPU seconds per thread name since start."""
    import sys as _sys

    state = _sys._throughput_sampler  # type: ignore[attr-defined]
    state["stop"] = True
    after, before = _thread_cpu(), state["cpu_before"]
    cpu: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        used = seconds - before.get(tid, (name, 0.0))[1]
        key = re.sub(r"_\d+$", "_N", name)  # pool threads (jobstore-sqlite_3) counted together
        cpu[key] = round(cpu.get(key, 0.0) + used, 2)
    busy = [(n, thread, stack) for (thread, stack), n in state["stacks"].items()
            if stack and stack[0].split(":")[1] not in IDLE_LEAVES]
    busy.sort(reverse=True)
    return {"samples": state["samples"], "cpu_s_by_thread": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
            "busy_stacks": [{"samples": n, "thread": thread, "stack": list(stack)} for n, thread, stack in busy[:25]]}


def serve_actors() -> dict[str, Any]:
    import ray

    found = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve":
            found[actor["name"]] = ray.get_actor(actor["name"], namespace=actor["namespace"])
    return found


# -- the probe ------------------------------------------------------------------------------------------------------
def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def stages(logs: list[dict[str, Any]]) -> dict[str, float]:
    """One job's stage times from its log lines (see the module docstring)."""
    first = {}
    prepare = encode = None
    for line in logs:
        message = line["message"]
        if "start" not in first and "preprocessing: fetching and decoding the inputs" in message:
            first["start"] = parse_time(line["timestamp"])
        if prepare is None and (found := PREPARED.match(message)):
            prepare = float(found.group(1))
        if encode is None and (found := ENCODED.match(message)):
            encode, first["encoded"] = float(found.group(1)), parse_time(line["timestamp"])
    if set(first) != {"start", "encoded"} or prepare is None or encode is None:
        raise ValueError(f"log lines without the stage markers: {[line['message'] for line in logs]}")
    return {"prepare_s": prepare, "decode_encode_s": encode,
            "total_s": first["encoded"] - first["start"], "start": first["start"], "end": first["encoded"]}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def run(jobs: int, poll_hz: float, profile: bool, audio_s: float, app_args: dict[str, Any]) -> dict[str, Any]:
    import ray

    from testing.http import http_json
    from testing.media import EXAMPLE_IMAGE, data_uri, synthetic_speech
    from testing.ray_serve import ray_serve_cluster

    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp, ray_serve_cluster(num_cpus=6) as cluster:
        root = Path(tmp)
        audio = data_uri(synthetic_speech(root / "speech.wav", audio_s), "audio/wav")
        cluster.deploy({"device": "cpu", "storage": cluster.local_storage(root / "storage"),
                        "max_queue_length": 100_000,
                        "auth": {"submit_rate_per_minute": 1e6, "submit_burst": 1_000_000,
                                 "max_queued_per_key": 1_000_000}} | app_args)
        base = cluster.base + "/fal-ai/stable-avatar"
        body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": audio, "prompt": "a person talking",
                "num_inference_steps": 1, "aspect_ratio": "1:1"}
        actors = serve_actors()
        pids = {name: ray.get(a.__ray_call__.remote(start_sampler, profile), timeout=60)
                for name, a in actors.items()}
        load_before = [round(x, 2) for x in os.getloadavg()]
        ids, submit_s = [], []
        for i in range(jobs):
            started = time.perf_counter()
            code, answer, _ = http_json("POST", base, dict(body, seed=i))
            submit_s.append(time.perf_counter() - started)
            assert code == 200, answer
            ids.append(answer["request_id"])
        # a fixed polling rate: one status request per 1/poll_hz s, round-robin over the unfinished jobs
        pending, polls, status_s = list(ids), 0, []
        deadline = time.monotonic() + 60 * 60
        rng = random.Random(0)
        while pending and time.monotonic() < deadline:
            rid = pending[polls % len(pending)]
            started = time.perf_counter()
            code, answer, _ = http_json("GET", f"{base}/requests/{rid}/status")
            status_s.append(time.perf_counter() - started)
            polls += 1
            if answer.get("status") == "COMPLETED":
                pending.remove(rid)
            time.sleep(max(0.0, 1 / poll_hz - (time.perf_counter() - started)))
        assert not pending, f"{len(pending)} jobs unfinished after an hour"
        load_after = [round(x, 2) for x in os.getloadavg()]
        profiles = {name: ray.get(a.__ray_call__.remote(stop_sampler), timeout=60) | {"pid": pids[name]}
                    for name, a in actors.items()}
        per_job, failed = [], []
        for rid in ids:
            code, answer, _ = http_json("GET", f"{base}/requests/{rid}/status?logs=1")
            result = http_json("GET", f"{base}/requests/{rid}")
            if result[0] != 200:
                failed.append({"request_id": rid, "code": result[0], "body": str(result[1])[:300]})
                continue
            per_job.append(stages(answer["logs"]))
        rng.shuffle(status_s)
    span = max(j["end"] for j in per_job) - min(j["start"] for j in per_job)
    ordered = sorted(status_s)
    return {
        "jobs": jobs, "completed": len(per_job), "failed": failed, "poll_hz": poll_hz, "audio_s": audio_s,
        "span_s": round(span, 2), "jobs_per_min": round(len(per_job) / span * 60, 1),
        "median_s": {k: round(median([j[k] for j in per_job]), 2) for k in ("prepare_s", "decode_encode_s", "total_s")},
        "submit_p50_ms": round(median(submit_s) * 1000, 1),
        "status_p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1), "status_polls": polls,
        "load_avg": {"before": load_before, "after": load_after}, "profile": profiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=150)
    parser.add_argument("--poll-hz", type=float, default=4.0)
    parser.add_argument("--audio-s", type=float, default=1.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--app-args", type=json.loads, default={},
                        help="JSON merged over the probe's app args (top-level keys), e.g. '{\"short_job_slots\": 0}'")
    args = parser.parse_args()
    for attempt in range(STARTS):
        try:
            result = run(args.jobs, args.poll_hz, args.profile, args.audio_s, args.app_args)
            break
        except Exception as exc:  # Ray gives its raylet 30 s to register, which a loaded shared box can exceed
            if "timed out during startup" not in str(exc) or attempt == STARTS - 1:
                raise
            import ray

            ray.shutdown()
            print(f"Ray did not start ({exc}); trying again", file=sys.stderr, flush=True)
    print("PROBE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    threading.current_thread().name = "probe"
    main()
