"""Long videos at the real resolution, through the service: 10 s, 60 s and 600 s of audio at 480x832 (9:16).

Each length runs on a fresh local Ray cluster with the real deployments (Gateway, Orchestrator, Preprocessor,
Denoiser(s), Postprocessor; the jobs database is SQLite under the storage root, the default) and the
``simulated-realsize`` preset (bench/simulated.py: real latent
shapes, near-free stand-in DiT and VAE), submitted like a fal client: image and audio uploaded through
``/storage/upload``, the job through the queue API, polled with logs, the mp4 downloaded and checked with ffprobe.

Measured per length:
* peak memory of every replica process (found by its ``ServeReplica:<app>:<Deployment>`` title among this
  benchmark's own descendants): the kernel's RSS high-water mark (``VmHWM``, reset through ``clear_refs`` before the
  job) next to the RSS the process had just before, and the sampled peaks of its private (anon) and shared (object
  store pages) parts;
* object-store bytes (the raylet's cumulative bytes created) per denoising step, the first step including the
  conditioning put once, and during postprocessing (the latents handed to the Postprocessor); peak bytes in use and
  bytes spilled;
* decode+encode frames/s (the Postprocessor's own timing), wall time per stage (status polling);
* disk: peak size of the replicas' temporary directory (``TMPDIR``: Postprocessor and ffmpeg temporaries,
  checkpoint files) and of the storage root; the output's size, frame count and duration (ffprobe).

    python bench/bench_long_video.py            # 10 s, 60 s, 600 s -> bench/results/long_video.{json,txt}
    python bench/bench_long_video.py --quick    # 10 s and 60 s (development)

Timings are noisy on a shared 2-core box; memory and bytes are what this benchmark is for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from pipeline.presets import REAL_RESOLUTIONS  # noqa: E402
from pipeline.windows import FPS, SAMPLE_RATE, plan_windows  # noqa: E402
from testing.http import http_json  # noqa: E402
from testing.media import EXAMPLE_IMAGE, synthetic_speech  # noqa: E402
from testing.ray_serve import object_store_stats, ray_serve_cluster, replica_processes  # noqa: E402

PRESET = "simulated-realsize"
ASPECT = "9:16"
DEPLOYMENTS = ("Gateway", "Orchestrator", "Preprocessor", "Denoiser", "Postprocessor")
MIB = 2**20
POLL_S = 0.2
QUICK_SECONDS = (10.0, 60.0)
FULL_SECONDS = (10.0, 60.0, 600.0)
NOISE_NOTE = ("timings are noisy: a shared 2-core CPU box with other jobs running; memory, bytes and frame counts "
              "are what this benchmark is for")


# -- the replicas' processes ----------------------------------------------------------------------------------------

def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of ``pid`` in KiB (``/proc/<pid>/status``)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[name] = int(rest.split()[0])
    return values


@dataclass
class ProcessPeaks:
    baseline_kib: int  # RSS right after the high-water mark was reset
    rss_kib: int = 0  # sampled peak
    anon_kib: int = 0
    shmem_kib: int = 0
    hwm_kib: int = 0  # the kernel's high-water mark at the end


class Sampler:
    """Calls ``sample()`` every ``interval_s`` in a thread, from ``with`` until its end (and once more there)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class MemoryMonitor(Sampler):
    """Resets the RSS high-water mark of every replica process, then samples RSS until stopped."""

    def __init__(self, processes: dict[str, list[int]], interval_s: float = 0.1):
        super().__init__(interval_s)
        self.processes = processes
        self.peaks: dict[int, ProcessPeaks] = {}
        for pids in processes.values():
            for pid in pids:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self.peaks[pid] = ProcessPeaks(_status_kib(pid)["VmRSS"])

    def sample(self) -> None:
        for pid, peak in self.peaks.items():
            with contextlib.suppress(OSError):
                s = _status_kib(pid)  # a process that died (Ray's memory monitor) has no Vm* lines left
                peak.rss_kib = max(peak.rss_kib, s.get("VmRSS", 0))
                peak.anon_kib = max(peak.anon_kib, s.get("RssAnon", 0))
                peak.shmem_kib = max(peak.shmem_kib, s.get("RssShmem", 0))
                peak.hwm_kib = max(peak.hwm_kib, s.get("VmHWM", 0))

    def report(self) -> dict[str, dict[str, float]]:
        """Per deployment (the replica with the highest peak when there are several), in MiB."""
        out = {}
        for name, pids in self.processes.items():
            peak = max((self.peaks[p] for p in pids), key=lambda p: p.hwm_kib)
            out[name] = {"replicas": len(pids), "peak_rss_mb": round(peak.hwm_kib / 1024, 1),
                         "rss_before_mb": round(peak.baseline_kib / 1024, 1),
                         "growth_mb": round((peak.hwm_kib - peak.baseline_kib) / 1024, 1),
                         "peak_private_mb": round(peak.anon_kib / 1024, 1),
                         "peak_shared_mb": round(peak.shmem_kib / 1024, 1)}
        return out


# -- disk and object store ------------------------------------------------------------------------------------------

def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class DiskMonitor(Sampler):
    """Peak total size of files under each folder, sampled in a thread."""

    def __init__(self, folders: dict[str, Path], interval_s: float = 0.25):
        super().__init__(interval_s)
        self.folders = folders
        self.peak = {name: 0 for name in folders}

    def sample(self) -> None:
        for name, folder in self.folders.items():
            self.peak[name] = max(self.peak[name], tree_bytes(folder))


# -- one job through the HTTP API -----------------------------------------------------------------------------------

def upload(base: str, path: Path, content_type: str) -> str:
    """The fal JS client's upload: initiate, then PUT the bytes to the returned URL; returns the file URL."""
    code, body, _ = http_json("POST", f"{base}/storage/upload/initiate",
                              {"content_type": content_type, "file_name": path.name})
    assert code == 200, body
    request = urllib.request.Request(body["upload_url"], data=path.read_bytes(), method="PUT",
                                     headers={"content-type": content_type})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200
    return body["file_url"]


def download(url: str, target: Path) -> int:
    with urllib.request.urlopen(url, timeout=600) as response, open(target, "wb") as f:
        shutil.copyfileobj(response, f, 4 * MIB)
    return target.stat().st_size


class ObjectStoreSampler(Sampler):
    """The raylet's object-store counters every ``interval_s`` (wall-clock time), in a thread."""

    def __init__(self, interval_s: float = 0.05):
        super().__init__(interval_s)
        self.samples: list[tuple[float, dict[str, int]]] = []

    def sample(self) -> None:
        self.samples.append((time.time(), object_store_stats()))

    def after(self, t: float, name: str = "created") -> int:
        """Counter ``name`` from the first sample taken at or after ``t``."""
        return next((stats[name] for when, stats in self.samples if when >= t), self.samples[-1][1][name])

    def before(self, t: float, name: str = "created") -> int:
        """Counter ``name`` from the last sample taken at or before ``t``."""
        return next((stats[name] for when, stats in reversed(self.samples) if when <= t), self.samples[0][1][name])

    def peak(self, name: str, start: float = 0.0, end: float = float("inf")) -> int:
        return max((stats[name] for when, stats in self.samples if start <= when <= end), default=0)


@dataclass
class JobTrace:
    submitted: float
    polls: list[tuple[float, str, str]] = field(default_factory=list)  # (time, status, stage)
    logs: list[dict] = field(default_factory=list)
    result: dict | None = None


def run_job(base: str, body: dict, timeout_s: float) -> JobTrace:
    """Submit through the queue API and poll the status (with logs) until the job completes."""
    code, submitted, _ = http_json("POST", f"{base}/fal-ai/stable-avatar", body)
    assert code == 200, submitted
    trace = JobTrace(time.time())
    while True:
        code, status, _ = http_json("GET", f"{submitted['status_url']}?logs=1")
        assert code in (200, 202), status
        trace.polls.append((time.time(), status["status"], (status.get("progress") or {}).get("stage", "")))
        if status["status"] == "COMPLETED":
            trace.logs = status.get("logs") or []
            break
        if time.time() > trace.submitted + timeout_s:
            raise TimeoutError(f"the job did not finish in {timeout_s} s: {status}")
        time.sleep(POLL_S)
    code, trace.result, _ = http_json("GET", submitted["response_url"])
    assert code == 200, (trace.result, trace.logs[-3:])
    return trace


# -- analysis -------------------------------------------------------------------------------------------------------

def stage_seconds(trace: JobTrace) -> dict[str, float]:
    """Wall time per stage from the polled stage transitions (resolution: the poll interval)."""
    order = ["queued", "preprocessing", "denoising", "postprocessing", "completed"]
    # A stage shorter than the poll interval is never seen: it starts when a later one is first seen, so the
    # marks never go backwards and a skipped stage counts 0 s.
    reached = [(t, order.index("completed") if status == "COMPLETED" else order.index(st) if st in order else 0)
               for t, status, st in trace.polls]
    marks = {"queued": trace.submitted}
    for rank, stage in enumerate(order[1:], start=1):
        marks[stage] = next((t for t, at in reached if at >= rank), trace.polls[-1][0])
    out = {f"{a}_s": round(marks[b] - marks[a], 2) for a, b in zip(order, order[1:], strict=False)}
    out["total_s"] = round(marks["completed"] - trace.submitted, 2)
    return out


def log_time(trace: JobTrace, pattern: str) -> float:
    """Wall-clock time of the first log line matching ``pattern`` (the jobs database stamps lines as they
    arrive)."""
    for entry in trace.logs:
        if re.search(pattern, entry["message"]):
            return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"no log line matches {pattern!r}: {[e['message'] for e in trace.logs]}")


def transfer_bytes(trace: JobTrace, store: ObjectStoreSampler, steps: int) -> tuple[list[int], int]:
    """Object-store bytes created during each denoising step, and the most in use while postprocessing.

    Step boundaries are the job's log lines, stamped by the jobs database as they arrive: "prepared in" (the
    Preprocessor's result is in; the conditioning put follows, so step 1 includes it) and "denoising step k/n"
    (step k is fused; before step k+1 sends anything the Orchestrator waits for this report and writes its
    checkpoint, so the first sample after it is clean; the last step's end is the sample before it, since the
    latents put follows at once). Edges are exact to about one window message (the sampling interval). The
    second number is what the store holds just before the Postprocessor returns (the Orchestrator logs "encoded"
    right after): the latents handed over, and anything else still held at that point.
    """
    t_prepared = log_time(trace, r"prepared in")
    t_steps = [log_time(trace, rf"denoising step {k}/{steps}\b") for k in range(1, steps + 1)]
    created = [store.before(t_prepared)] + [store.after(t) for t in t_steps[:-1]] + [store.before(t_steps[-1])]
    per_step = [b - a for a, b in zip(created, created[1:], strict=False)]
    return per_step, store.before(log_time(trace, r"encoded \d+ frames") - 0.1, "used")


def logged_encode(trace: JobTrace) -> tuple[int, float] | None:
    """(frames, seconds) of the Postprocessor's decode+encode, from its log line."""
    for entry in trace.logs:
        match = re.search(r"encoded (\d+) frames in ([\d.]+) s", entry["message"])
        if match:
            return int(match.group(1)), float(match.group(2))
    return None


def ffprobe_summary(path: Path) -> dict[str, Any]:
    from pipeline.media.ffmpeg_bin import ffprobe_path

    probe = ffprobe_path()
    if probe is None:
        raise RuntimeError("ffprobe is required (Debian's ffmpeg package)")
    out = subprocess.run([probe, "-v", "error", "-count_packets", "-show_entries",
                          "stream=codec_type,codec_name,width,height,nb_frames,nb_read_packets,duration:"
                          "format=duration,size", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next((s for s in info["streams"] if s["codec_type"] == "audio"), {})
    return {"codec": video["codec_name"], "width": int(video["width"]), "height": int(video["height"]),
            "frames": int(video["nb_read_packets"]), "video_duration_s": float(video["duration"]),
            "audio_duration_s": float(audio.get("duration", 0.0)),
            "format_duration_s": float(info["format"]["duration"])}


def serialized_bytes(obj: object) -> int:
    """Bytes Ray stores for ``obj`` (its own serializer, as ``ray.put`` and task arguments use it)."""
    import ray

    return ray._private.worker.global_worker.get_serialization_context().serialize(obj).total_bytes


def message_sizes(seconds: float) -> dict[str, float]:
    """What the Orchestrator sends per window-step and gets back, serialized by Ray, for this geometry: a
    ``WindowStep`` holding window 1's slice of the whole latent (as ``denoise`` builds it) and a window's output."""
    import torch

    from pipeline.denoise import WindowStep

    g = geometry(seconds)
    latents = torch.zeros(g["latent_shape"])
    window = plan_windows(round(seconds * SAMPLE_RATE), overlap=10).windows[min(1, g["windows"] - 1)]
    work = WindowStep(window.index, 0, latents[:, :, window.start:window.end])
    output = torch.zeros_like(latents[:, :, window.start:window.end])
    return {"window_step_sent_mb": round(serialized_bytes(work) / MIB, 2),
            "window_step_received_mb": round(serialized_bytes(output) / MIB, 2)}


def conditioning_size(seconds: float, audio: Path) -> float:
    """MiB Ray stores for the request's conditioning (put once per request, cached by each Denoiser replica),
    prepared in this process with the same preset and inputs as the service's Preprocessor."""
    import bench.simulated  # noqa: F401 - registers the preset
    from pipeline.generator import GenerationParams, StableAvatarPipeline
    from pipeline.loading import load_models
    from pipeline.presets import get_preset

    pipeline = StableAvatarPipeline(load_models(get_preset(PRESET), ["vae", "text_encoder", "image_encoder",
                                                                   "audio_encoder"]))
    prepared = pipeline.prepare(EXAMPLE_IMAGE, audio, GenerationParams(prompt="a person talking",
                                                                       aspect_ratio=ASPECT, seed=7))
    return round(serialized_bytes(prepared.conditioning) / MIB, 2)


def tiny_wan_vae_decode_fps(latent_frames: int = 3) -> float:
    """Frames/s of the tiny preset's real Wan VAE (``base_dim`` 4) streaming-decoding 480x832 in this process:
    why the benchmark's preset uses a stand-in VAE (15000 frames at this speed would take hours)."""
    import torch

    from pipeline.models.vae import StreamingVaeDecoder, build_vae
    from pipeline.presets import TINY_VAE

    width, height = REAL_RESOLUTIONS[ASPECT]
    decoder = StreamingVaeDecoder(build_vae(**TINY_VAE))
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    started, frames = time.perf_counter(), 0
    for chunk in decoder.decode(latents):
        frames += chunk.shape[2]
    return round(frames / (time.perf_counter() - started), 3)


def geometry(seconds: float) -> dict[str, Any]:
    """What the plan says about this length at 480x832: frames, windows, latent shape and sizes (fp32 state)."""
    width, height = REAL_RESOLUTIONS[ASPECT]
    plan = plan_windows(round(seconds * SAMPLE_RATE), overlap=10)
    h, w = height // 8, width // 8
    latent = 16 * plan.latent_frames * h * w * 4
    window = 16 * 21 * h * w * 4
    return {"width": width, "height": height, "frames": plan.output_frames, "windows": plan.num_windows,
            "latent_shape": [1, 16, plan.latent_frames, h, w], "latents_mb": round(latent / MIB, 1),
            "window_latents_mb": round(window / MIB, 2)}


# -- one length on a fresh cluster ----------------------------------------------------------------------------------

@contextlib.contextmanager
def replica_environment(tmp: Path) -> Iterator[None]:
    """Replicas inherit the driver's environment: their ``TMPDIR`` is a folder this benchmark measures (Ray's own
    session folder stays under /tmp)."""
    with mock.patch.dict(os.environ, {"TMPDIR": str(tmp), "RAY_TMPDIR": tempfile.gettempdir()}):
        yield


def wait_ready(base: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            code, _, _ = http_json("GET", f"{base}/health", timeout=10)
            if code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError("the service did not become healthy")


@contextlib.contextmanager
def started_cluster(object_store_mb: int, attempts: int = 5) -> Iterator[Any]:
    """A fresh local cluster; its start is tried again when Ray's node does not come up within Ray's fixed 30 s
    (it happens on a loaded shared box)."""
    import ray

    for attempt in range(attempts):
        stack = contextlib.ExitStack()
        try:
            running = stack.enter_context(ray_serve_cluster(num_cpus=8, object_store_mb=object_store_mb))
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a node that timed out
            ray.shutdown()
            if attempt + 1 == attempts:
                raise
            print(f"the cluster did not start ({exc}); trying again", flush=True)
            time.sleep(10)
            continue
        with stack:  # serve.shutdown, ray.shutdown when the block ends
            yield running
        return


def lower_priority(nice: int) -> None:
    """The whole cluster under this process at ``nice`` or lower priority (processes the raylet starts later
    inherit it; this process keeps its own, so the next length's cluster starts at it)."""
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.nice() < nice:
                proc.nice(nice)


def run_length(seconds: float, steps: int, workdir: Path, denoisers: int = 1, object_store_mb: int = 4096,
               timeout_s: float = 6 * 3600, nice: int = 0, denoiser_max_ongoing: int | None = None) -> dict[str, Any]:
    """One job of ``seconds`` of audio through a fresh cluster; returns the measurements (see the module doc).
    ``denoiser_max_ongoing``: the Denoisers' ``max_ongoing_requests`` (None: the application's default)."""
    case = workdir / f"{seconds:g}s"
    tmp, storage_root = case / "replica-tmp", case / "storage"
    tmp.mkdir(parents=True)
    audio = synthetic_speech(case / "speech.wav", seconds)
    row: dict[str, Any] = {"audio_s": seconds, "steps": steps, "denoisers": denoisers,
                           "denoiser_max_ongoing": denoiser_max_ongoing, **geometry(seconds)}
    denoiser: dict[str, Any] = {"num_replicas": denoisers}
    if denoiser_max_ongoing is not None:
        denoiser["max_ongoing_requests"] = denoiser_max_ongoing
    with replica_environment(tmp), started_cluster(object_store_mb) as cluster:
        cluster.deploy({
            "preset": PRESET, "preset_modules": ["bench.simulated"], "device": "cpu",
            "storage": cluster.local_storage(storage_root), "checkpoint_every_steps": 1,
            "denoiser": denoiser,
        })
        wait_ready(cluster.base)
        if nice:
            lower_priority(nice)
        row |= message_sizes(seconds)
        body = {"image_url": upload(cluster.base, EXAMPLE_IMAGE, "image/png"),
                "audio_url": upload(cluster.base, audio, "audio/wav"), "prompt": "a person talking",
                "aspect_ratio": ASPECT, "num_inference_steps": steps, "seed": 7}
        processes = replica_processes()
        missing = [name for name in DEPLOYMENTS if name not in processes]
        assert not missing, f"replica processes not found for {missing}: {processes}"
        with MemoryMonitor(processes) as memory, DiskMonitor({"tmp": tmp, "storage": storage_root}) as disk, \
                ObjectStoreSampler() as store:
            trace = run_job(cluster.base, body, timeout_s)
        output = case / "output.mp4"
        row["output_mb"] = round(download(trace.result["video"]["url"], output) / MIB, 2)
        row["memory"] = memory.report()
    row["conditioning_mb"] = conditioning_size(seconds, audio)  # after the cluster is gone: not on top of its peak
    per_step, postprocess = transfer_bytes(trace, store, steps)
    row["stages"] = stage_seconds(trace)
    encode = logged_encode(trace)
    frames, encode_s = encode if encode else (row["frames"], row["stages"]["postprocessing_s"])
    row["decode_encode_s"] = round(encode_s, 2)
    row["decode_encode_fps"] = round(frames / encode_s, 2) if encode_s else None
    row["object_store"] = {
        "per_step_mb": [round(b / MIB, 1) for b in per_step],
        "postprocess_in_use_mb": round(postprocess / MIB, 1),
        "peak_used_mb": round(store.peak("used") / MIB, 1),
        "spilled_mb": round(store.peak("spilled") / MIB, 1),
        "fallback_mb": round(store.peak("fallback") / MIB, 1),
    }
    row["disk"] = {"tmp_peak_mb": round(disk.peak["tmp"] / MIB, 1),
                   "storage_peak_mb": round(disk.peak["storage"] / MIB, 1)}
    probe = ffprobe_summary(output)
    row["ffprobe"] = probe
    row["frames_ok"] = probe["frames"] == row["frames"] and (probe["width"], probe["height"]) == (
        row["width"], row["height"])
    row["duration_ok"] = abs(probe["video_duration_s"] - row["frames"] / FPS) < 0.5 / FPS and abs(
        probe["format_duration_s"] - seconds) < 0.05
    row["completed"] = True
    return row


# -- report ---------------------------------------------------------------------------------------------------------

def max_ongoing_note(row: dict) -> str:
    value = row.get("denoiser_max_ongoing")
    return "" if value is None else f" taking {value} units at once (max_ongoing_requests)"


def text_report(rows: list[dict], label: str) -> str:
    lines = [f"long videos through the service: {PRESET} preset at 480x832 ({ASPECT}), "
             f"{rows[0]['steps']} denoising steps, {rows[0]['denoisers']} Denoiser replicas"
             f"{max_ongoing_note(rows[0])}, fp32 state (CPU) [{label}]", NOISE_NOTE, ""]
    lines.append("audio s | frames | windows | latents MiB | preprocess s | denoise s | postprocess s | total s | "
                 "decode+encode fps | output MiB | ffprobe frames | duration s | ok")
    for r in rows:
        s, p = r["stages"], r["ffprobe"]
        lines.append(f"{r['audio_s']:>7g} | {r['frames']:>6} | {r['windows']:>7} | {r['latents_mb']:>11} | "
                     f"{s['preprocessing_s']:>12} | {s['denoising_s']:>9} | {s['postprocessing_s']:>13} | "
                     f"{s['total_s']:>7} | {r['decode_encode_fps']:>17} | {r['output_mb']:>10} | "
                     f"{p['frames']:>14} | {p['format_duration_s']:>10.3f} | "
                     f"{r['frames_ok'] and r['duration_ok']}")
    lines += ["", "peak RSS per replica process, MiB: high-water mark (growth over the RSS just before the job; "
                  "private / shared-object-store parts at their sampled peaks)"]
    lines.append("audio s | " + " | ".join(f"{name:>28}" for name in DEPLOYMENTS))
    for r in rows:
        cells = []
        for name in DEPLOYMENTS:
            m = r["memory"][name]
            cells.append(f"{m['peak_rss_mb']:>7.0f} (+{m['growth_mb']:>6.0f}; {m['peak_private_mb']:>5.0f}/"
                         f"{m['peak_shared_mb']:>5.0f})")
        lines.append(f"{r['audio_s']:>7g} | " + " | ".join(f"{c:>28}" for c in cells))
    lines += ["", "object store, MiB: one window-step's message to a Denoiser and its answer (as Ray serializes "
                  "them), created per denoising step (step 1 includes the conditioning put; model = windows x "
                  "(sent + received)), the conditioning as Ray stores it, in use at the end of postprocessing "
                  "(the latents handed over), peak in use, spilled; disk: peak size of the replicas' TMPDIR and of the "
                  "storage root"]
    lines.append("audio s | step sent / received | per step: measured (model) | conditioning | postprocess | "
                 "peak in use | spilled | tmp peak | storage peak")
    for r in rows:
        o, d = r["object_store"], r["disk"]
        model = r["windows"] * (r["window_step_sent_mb"] + r["window_step_received_mb"])
        lines.append(f"{r['audio_s']:>7g} | {r['window_step_sent_mb']:>9} / {r['window_step_received_mb']:>8} | "
                     f"{', '.join(str(x) for x in o['per_step_mb']):>16} ({model:>8.1f}) | "
                     f"{r['conditioning_mb']:>12} | {o['postprocess_in_use_mb']:>11} | {o['peak_used_mb']:>11} | "
                     f"{o['spilled_mb']:>7} | "
                     f"{d['tmp_peak_mb']:>8} | {d['storage_peak_mb']:>12}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s and 60 s only (development)")
    parser.add_argument("--seconds", type=float, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=3, help="3: step 2 is a clean step for the byte count")
    parser.add_argument("--denoisers", type=int, default=1, help="Denoiser replicas (each holds its own "
                        "conditioning cache; 1 keeps the benchmark's footprint small on a shared box)")
    parser.add_argument("--object-store-mb", type=int, default=4096)
    parser.add_argument("--denoiser-max-ongoing", type=int, default=None, help="the Denoisers' "
                        "max_ongoing_requests (default: the application's); below the windows of a step, Serve "
                        "rejects and re-sends units")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. before/after a fix)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_video",
                        help="writes OUT.json and OUT.txt")
    parser.add_argument("--nice", type=int, default=0, help="once the cluster is up, run it and this process at "
                        "this niceness (Ray's node start has a fixed 30 s deadline, which a loaded box misses when "
                        "started under nice)")
    parser.add_argument("--keep", type=Path, default=None, help="keep inputs, outputs and storage here")
    parser.add_argument("--merge", action="store_true", help="keep OUT.json's rows of other lengths (a length "
                        "measured again replaces its row): the lengths can be measured in separate runs")
    parser.add_argument("--wan-vae", action="store_true", help="also time the tiny Wan VAE (default: with the "
                        "full set of lengths)")
    args = parser.parse_args()
    seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    label = args.label or f"commit {commit}"
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.merge and args.out.with_suffix(
        ".json").exists() else {"meta": {}, "runs": []}
    rows = [r for r in previous["runs"] if r["audio_s"] not in seconds]
    with contextlib.ExitStack() as stack:
        workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-long-")))
        for length in seconds:
            print(f"--- {length:g} s of audio", flush=True)
            row = run_length(length, args.steps, Path(workdir), args.denoisers, args.object_store_mb,
                             nice=args.nice, denoiser_max_ongoing=args.denoiser_max_ongoing)
            row["label"], row["commit"] = label, commit
            rows = sorted([*rows, row], key=lambda r: r["audio_s"])
            print(json.dumps(row), flush=True)
            write_results(args.out, rows, label, commit, previous["meta"].get("tiny_wan_vae_decode_fps"))
    if args.wan_vae or not (args.quick or args.seconds):
        write_results(args.out, rows, label, commit, tiny_wan_vae_decode_fps())
    print(args.out.with_suffix(".txt").read_text())


def write_results(out: Path, rows: list[dict], label: str, commit: str, wan_fps: float | None) -> None:
    """OUT.txt and OUT.json, rewritten after every length (a long run that fails later keeps what it measured)."""
    labels = sorted({r.get("label", label) for r in rows})
    report = text_report(rows, "; ".join(labels))
    if wan_fps is not None:
        report += (f"\nfor comparison, the tiny preset's real Wan VAE (base_dim 4) decodes 480x832 at {wan_fps} "
                   f"frames/s in one process here: hence the stand-in VAE\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(report)
    meta = {"preset": PRESET, "aspect_ratio": ASPECT, "label": label, "commit": commit, "note": NOISE_NOTE,
            "cpus": os.cpu_count(), "machine": platform.machine(), "tiny_wan_vae_decode_fps": wan_fps}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
