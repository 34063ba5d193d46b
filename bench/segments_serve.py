"""The Serve parts of ``bench/bench_segments.py``: (a) decode + encode on 1-8 Postprocessor replicas, (c) a 60 s
video end to end with serial and segmented post-processing. See that module's docstring."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from ray import serve  # noqa: E402

from bench.simulated import SIMULATED_FRAME_S, SLEEPING_VAE_REACH  # noqa: E402
from bench.stats import load_average  # noqa: E402
from deployments.config import APP_NAME, AppArgs  # noqa: E402
from deployments.orchestrator.segments import SegmentedFinish  # noqa: E402
from deployments.runtime.transport import put_tensor  # noqa: E402
from deployments.workers.postprocessor import Postprocessor  # noqa: E402
from pipeline.media.video import probe_media  # noqa: E402
from pipeline.request import PreparedRequest  # noqa: E402
from pipeline.windows import SAMPLE_RATE, plan_windows  # noqa: E402
from testing.http import http_bytes, http_json  # noqa: E402
from testing.media import EXAMPLE_IMAGE, data_uri, synthetic_speech  # noqa: E402
from testing.ray_serve import RayServeCluster, ray_serve_cluster  # noqa: E402

POST_APP = "bench-segments"
MIN_SEGMENT_LATENTS = 40  # the service's default
SIZE = 64  # the tiny preset's 1:1 frames: x264 costs little beside the simulated decoder
_REPLICA = re.compile(r" decoded and encoded on (\S+) in ")


@contextmanager
def serve_cluster(cluster: RayServeCluster | None = None) -> Iterator[RayServeCluster]:
    """``cluster``, or one of the shape both parts need (4 CPUs, 4 fake GPUs for the Denoisers) for this block.
    The driver runs both parts in one cluster: a second cluster started by the same process after the first one
    stops can miss Ray's fixed 30 s raylet start-up wait on a loaded machine."""
    if cluster is not None:
        yield cluster
        return
    with ray_serve_cluster(num_cpus=4, num_gpus=4, object_store_mb=1024) as started:
        yield started


@serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
class PostCaller:
    """The Orchestrator's finish stage alone (:meth:`SegmentedFinish.finish`), driven from a replica as there."""

    def __init__(self, postprocessor, args: AppArgs):
        self.postprocessor, self.args = postprocessor, args

    async def run(self, prepared: PreparedRequest, replicas: int, min_segment_latents: int, key: str) -> dict:
        latents = torch.randn(prepared.latent_shape, generator=torch.Generator().manual_seed(0))
        handed_over = put_tensor(latents)  # into the object store once, as the Orchestrator does
        del latents
        finish = SegmentedFinish(self.postprocessor, self.args.model_preset(), replicas, min_segment_latents,
                                 retries=0)
        log: list[str] = []

        async def report(stage: str | None = None, message: str | None = None, level: str = "INFO") -> None:
            if message:
                log.append(message)

        segments = finish.plan(prepared)
        started = time.perf_counter()
        result = await finish.finish(prepared.request_id, prepared, handed_over, key, report)
        return {"wall_s": time.perf_counter() - started, "segments": len(segments),
                "lengths": [s.end - s.start for s in segments], "frames": result.frames,
                "file_size": result.file_size, "replicas_used": sorted({m.group(1) for line in log
                                                                        if (m := _REPLICA.search(line))})}


def prepared_request(seconds: float, workdir: Path) -> PreparedRequest:
    audio = synthetic_speech(workdir / f"speech-{seconds:g}.wav", seconds)
    plan = plan_windows(round(seconds * SAMPLE_RATE), overlap=10)
    return PreparedRequest(request_id=f"post-{seconds:g}", seed=0, width=SIZE, height=SIZE, plan=plan,
                           conditioning=None, audio_bytes=audio.read_bytes(), audio_seconds=seconds)


def durations(path: Path) -> dict[str, float]:
    info = probe_media(path)
    return {"format": float(info["format"]["duration"]),
            **{s["codec_type"]: float(s["duration"]) for s in info["streams"]}}


def _post_args(root: Path, replicas: int) -> AppArgs:
    return AppArgs.model_validate({"preset": "simulated-decoder", "preset_modules": ["bench.simulated"],
                                   "device": "cpu", "storage": {"kind": "local", "root": str(root)},
                                   "postprocessor": {"num_replicas": replicas}})


def replicas_part(quick: bool, workdir: Path, plan: dict[float, tuple[int, ...]] | None = None,
                  min_segment_latents: int = MIN_SEGMENT_LATENTS,
                  cluster: RayServeCluster | None = None) -> tuple[dict, dict]:
    """(a): each video length on 1, 2, 4, 8 Postprocessor replicas (quick: 60 s on 1 and 8, 600 s on 8);
    ``plan``: {video seconds: replica counts} instead (the test's tiny run); in ``cluster`` if given."""
    plan = plan or ({60.0: (1, 8), 600.0: (8,)} if quick else {60.0: (1, 2, 4, 8), 600.0: (1, 2, 4, 8)})
    requests = {seconds: prepared_request(seconds, workdir) for seconds in plan}
    root = workdir / "post-storage"
    rows: list[dict[str, Any]] = []
    with serve_cluster(cluster):
        for replicas in sorted({n for counts in plan.values() for n in counts}):  # ascending: replicas are added
            args = _post_args(root, replicas)
            postprocessor = Postprocessor.options(**args.postprocessor.serve_options()).bind(args)
            caller = serve.run(PostCaller.bind(postprocessor, args), name=POST_APP, route_prefix=None)
            _warm_up(caller, replicas, workdir)
            for seconds, counts in plan.items():
                if replicas not in counts:
                    continue
                prepared = requests[seconds]
                key = f"results/{prepared.request_id}-{replicas}/output.mp4"
                result = caller.run.remote(prepared, replicas, min_segment_latents, key).result(timeout_s=7200)
                frames = prepared.plan.output_frames
                ideal = frames * SIMULATED_FRAME_S / replicas
                row = {"video_s": seconds, "replicas": replicas, "frames": frames,
                       "latents": prepared.plan.decoded_latent_frames, "segments": result["segments"],
                       "lengths": result["lengths"], "replicas_used": len(result["replicas_used"]),
                       "wall_s": round(result["wall_s"], 2), "ideal_s": round(ideal, 2),
                       "efficiency_vs_ideal": round(ideal / result["wall_s"], 3),
                       "frames_written": result["frames"], "durations": durations(root / key),
                       "load_average": load_average()}
                rows.append(row)
                print(row, flush=True)
        serve.delete(POST_APP)  # its replicas would idle beside the next part's
    for row in rows:
        one = next((r for r in rows if r["video_s"] == row["video_s"] and r["replicas"] == 1), None)
        row["speedup_vs_1"] = round(one["wall_s"] / row["wall_s"], 2) if one else None
        row["same_frames_and_durations"] = row["frames_written"] == row["frames"] and (
            one is None or row["durations"] == one["durations"])
    at8 = {r["video_s"]: r["efficiency_vs_ideal"] for r in rows if r["replicas"] == 8}
    summary = {"post_efficiency_vs_ideal_8": at8.get(600.0), "post_efficiency_vs_ideal_8_60s": at8.get(60.0),
               "post_same_frames_and_durations": all(r["same_frames_and_durations"] for r in rows)}
    return {"rows": rows, "frame_s": SIMULATED_FRAME_S, "warm_up_latents": SLEEPING_VAE_REACH,
            "min_segment_latents": min_segment_latents}, summary


def _warm_up(caller, replicas: int, workdir: Path, timeout_s: float = 300) -> None:
    """Untimed: short videos cut into ``replicas`` tiny segments until every replica has taken one (the caller's
    router learns of new replicas through Serve's long poll a moment after they run)."""
    if replicas == 1:
        return
    prepared = prepared_request(8.0, workdir)  # 51 latents: n segments of at least 2 for n <= 8
    deadline = time.monotonic() + timeout_s
    while True:
        result = caller.run.remote(prepared, replicas, 2, "results/warm-up/output.mp4").result(timeout_s=600)
        if len(result["replicas_used"]) == replicas or time.monotonic() > deadline:
            return
        time.sleep(1.0)


# -- (c): end to end ---------------------------------------------------------------------------------------------

def end_to_end_part(quick: bool, workdir: Path, seconds: float = 60.0, steps: int = 2, post_replicas: int = 8,
                    min_segment_latents: int = MIN_SEGMENT_LATENTS,
                    cluster: RayServeCluster | None = None) -> tuple[dict, dict]:
    """(c): one ``seconds`` video through the whole service, serial post-processing then segmented, one run (in
    ``cluster`` if given)."""
    audio = synthetic_speech(workdir / f"e2e-{seconds:g}.wav", seconds)
    body = {"image_url": data_uri(EXAMPLE_IMAGE, "image/png"), "audio_url": data_uri(audio, "audio/wav"),
            "prompt": "a person talking", "num_inference_steps": steps, "seed": 3, "aspect_ratio": "1:1"}
    warm = dict(body, audio_url=data_uri(synthetic_speech(workdir / "e2e-warm.wav", 2.0), "audio/wav"),
                num_inference_steps=1)
    rows = []
    with serve_cluster(cluster) as cluster:
        for variant, replicas in (("serial", 1), ("segmented", post_replicas)):
            root = workdir / f"e2e-{variant}"
            cluster.deploy({"preset": "simulated-decoder-dit", "preset_modules": ["bench.simulated"],
                            "device": "cpu", "storage": cluster.local_storage(root),
                            "jobs": {"kind": "sqlite", "path": str(root / "jobs.sqlite3")},
                            "denoiser": {"num_replicas": 4, "num_gpus": 1},
                            "postprocessor": {"num_replicas": replicas}, "min_segment_latents": min_segment_latents})
            run = f"{cluster.base}/run/fal-ai/stable-avatar"
            code, answer, _ = http_json("POST", run, warm, timeout=600)  # untimed: every deployment's first call
            assert code == 200, answer
            started = time.perf_counter()
            code, answer, headers = http_json("POST", run, body, timeout=7200)
            wall = time.perf_counter() - started
            assert code == 200, answer
            request_id = {k.lower(): v for k, v in headers.items()}["x-fal-request-id"]
            _, state, _ = http_json("GET", f"{cluster.base}/fal-ai/stable-avatar/requests/{request_id}/status?logs=1")
            logs = [entry["message"] for entry in state["logs"]]
            planned = [m for m in logs if m.startswith("decoding and encoding in ")]
            path = workdir / f"e2e-{variant}.mp4"
            path.write_bytes(http_bytes(answer["video"]["url"]))
            rows.append({"variant": variant, "post_replicas": replicas, "video_s": seconds, "steps": steps,
                         "segments": int(planned[0].split()[4]) if planned else 1,
                         "wall_s": round(wall, 2), "file_size": path.stat().st_size, "durations": durations(path),
                         "load_average": load_average()})
            print(rows[-1], flush=True)
        serve.delete(APP_NAME)
    serial, segmented = rows
    result = {"rows": rows, "speedup": round(serial["wall_s"] / segmented["wall_s"], 2),
              "same_durations": serial["durations"] == segmented["durations"]}
    return result, {"end_to_end_speedup_60s": result["speedup"], "end_to_end_same_durations": result["same_durations"]}


def report_lines(results: dict) -> list[str]:
    lines = []
    post = results.get("replicas")
    if post:
        lines += ["", f"(a) decode + encode on Postprocessor replicas through Serve: simulated decoder "
                      f"({post['frame_s']} s per frame, a warm-up of {post['warm_up_latents']} latents), 64x64, "
                      f"min_segment_latents {post['min_segment_latents']}; ideal = frames x frame time / replicas",
                  "video s | replicas | segments | replicas used | wall s | ideal s | vs ideal | speed-up vs 1 | "
                  "same frames+durations | load"]
        for r in post["rows"]:
            lines.append(f"{r['video_s']:>7g} | {r['replicas']:>8} | {r['segments']:>8} | {r['replicas_used']:>13} | "
                         f"{r['wall_s']:>6.1f} | {r['ideal_s']:>7.1f} | {r['efficiency_vs_ideal']:>8.3f} | "
                         f"{r['speedup_vs_1'] if r['speedup_vs_1'] is not None else '-':>13} | "
                         f"{str(r['same_frames_and_durations']):>21} | {r['load_average'][0]}")
    e2e = results.get("end_to_end")
    if e2e:
        lines += ["", f"(c) a {e2e['rows'][0]['video_s']:g} s video end to end (POST /run to its answer; "
                      "simulated-decoder-dit: DiT 0.05 s per row on 4 Denoisers, the decoder as above), serial "
                      "post-processing then segmented, same run",
                  "variant   | Postprocessors | segments | wall s | file bytes | durations (format, video, audio) | load"]
        for r in e2e["rows"]:
            d = r["durations"]
            lines.append(f"{r['variant']:<9} | {r['post_replicas']:>14} | {r['segments']:>8} | {r['wall_s']:>6.1f} | "
                         f"{r['file_size']:>10} | {d['format']:.3f}, {d['video']:.3f}, {d['audio']:.3f}{'':>9} | "
                         f"{r['load_average'][0]}")
        lines.append(f"speed-up: {e2e['speedup']}x; same durations: {e2e['same_durations']}")
    return lines
