"""Prometheus metrics of the service, through ``ray.serve.metrics`` (so they carry deployment/replica tags).

Ray exports them from each node's metrics agent (``ray start --metrics-export-port``; on KubeRay the pods'
``metrics`` port, scraped by the PodMonitor). Metric objects are created lazily inside the replica that uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200]
STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32]


@cache
def jobs_total() -> Counter:
    return Counter("stable_avatar_jobs_total", description="Jobs by outcome: submitted, completed, failed, "
                   "cancelled.", tag_keys=("outcome",))


@cache
def fenced_writes_total() -> Counter:
    return Counter("stable_avatar_fenced_writes_total", description="Writes of a runner that had lost its lease "
                   "(another runner or the store took the job over), refused by fencing, by write: heartbeat, log, "
                   "checkpoint, complete, retry, release.", tag_keys=("write",))


@cache
def queue_length() -> Gauge:
    return Gauge("stable_avatar_queue_length", description="Jobs waiting in the queue.")


@cache
def running_jobs() -> Gauge:
    return Gauge("stable_avatar_running_jobs", description="Jobs being processed.")


@cache
def job_latency() -> Histogram:
    return Histogram("stable_avatar_job_latency_seconds", description="Submit to completion, successful jobs.",
                     boundaries=SECONDS_BUCKETS)


@cache
def time_in_queue() -> Histogram:
    return Histogram("stable_avatar_time_in_queue_seconds", description="Submit to start of processing.",
                     boundaries=SECONDS_BUCKETS)


@cache
def window_step_latency() -> Histogram:
    return Histogram("stable_avatar_window_step_seconds",
                     description="One window-step on a Denoiser replica (CFG forward + Euler step).",
                     boundaries=STEP_BUCKETS)


@cache
def stage_duration() -> Histogram:
    return Histogram("stable_avatar_stage_seconds", description="Duration of a job stage.",
                     boundaries=SECONDS_BUCKETS, tag_keys=("stage",))


@cache
def bytes_total() -> Counter:
    return Counter("stable_avatar_bytes_total", description="Bytes downloaded (inputs) and uploaded (results).",
                   tag_keys=("direction",))


@cache
def output_seconds() -> Counter:
    return Counter("stable_avatar_output_video_seconds_total", description="Seconds of video generated.")


@cache
def retention_deleted_total() -> Counter:
    return Counter("stable_avatar_retention_deleted_total",
                   description="What the retention sweeper deleted: objects by kind (results, inputs, uploads, "
                   "checkpoints; orphans included) and job records (jobs).", tag_keys=("kind",))


@cache
def retention_failed_total() -> Counter:
    return Counter("stable_avatar_retention_failed_total",
                   description="Objects the retention sweeper could not delete (retried next sweep), by kind.",
                   tag_keys=("kind",))


@dataclass(frozen=True)
class CacheSeries:
    """A Preprocessor cache's Prometheus series, each name written out so that a search for it finds it here, and
    what their descriptions say: what the cache is keyed by, what an entry is, what bounds it."""

    keys: str
    entry: str
    bound: str
    names: dict[str, str]  # hits, misses, evictions (counters); entries, bytes (gauges)


CACHES = {
    "prompt": CacheSeries("Prompts", "T5 embedding", "pipeline.prompt_cache_bytes", {
        "hits": "stable_avatar_prompt_cache_hits_total", "misses": "stable_avatar_prompt_cache_misses_total",
        "evictions": "stable_avatar_prompt_cache_evictions_total",
        "entries": "stable_avatar_prompt_cache_entries", "bytes": "stable_avatar_prompt_cache_bytes"}),
    "reference": CacheSeries("Reference images", "VAE latents and CLIP tokens", "pipeline.reference_cache_bytes", {
        "hits": "stable_avatar_reference_cache_hits_total", "misses": "stable_avatar_reference_cache_misses_total",
        "evictions": "stable_avatar_reference_cache_evictions_total",
        "entries": "stable_avatar_reference_cache_entries", "bytes": "stable_avatar_reference_cache_bytes"}),
}


@cache
def cache_counter(name: str, event: str) -> Counter:
    """Hits, misses or evictions of a Preprocessor's ``name`` cache."""
    series = CACHES[name]
    meaning = {
        "hits": f"{series.keys} whose {series.entry} a Preprocessor replica found in its {name} cache.",
        "misses": f"{series.keys} a Preprocessor replica computed the {series.entry} of (not in its {name} cache).",
        "evictions": f"Entries ({series.entry}) dropped from a Preprocessor's {name} cache to stay within "
                     f"{series.bound}."}
    return Counter(series.names[event], description=meaning[event])


@cache
def cache_gauge(name: str, content: str) -> Gauge:
    """The entries or bytes a Preprocessor's ``name`` cache holds now."""
    series = CACHES[name]
    meaning = {"entries": f"{series.keys} held in a Preprocessor's {name} cache.",
               "bytes": f"Bytes of {series.entry} held in a Preprocessor's {name} cache (bound: {series.bound})."}
    return Gauge(series.names[content], description=meaning[content])


CACHE_EVENTS = ("hits", "misses", "evictions")


class CacheMetrics:
    """Publishes a replica's cache statistics (``pipeline.host_cache.CacheStats.as_dict()``) as the ``name``
    cache's series (:data:`CACHES`): the cache counts from the replica's start, a Prometheus counter takes
    increments, so each report adds what changed since the last one; the gauges take the current content."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reported = dict.fromkeys(CACHE_EVENTS, 0)

    def report(self, stats: Mapping[str, int]) -> None:
        for event in CACHE_EVENTS:
            if stats[event] > self._reported[event]:
                cache_counter(self.name, event).inc(stats[event] - self._reported[event])
                self._reported[event] = stats[event]
        for content in ("entries", "bytes"):
            cache_gauge(self.name, content).set(stats[content])


def record_retention(report) -> None:
    """Count one sweep's :class:`deployments.orchestrator.retention.SweepReport` (a ``RetentionSweeper`` ``on_report`` hook)."""
    for kind, n in report.deleted().items():
        if n:
            retention_deleted_total().inc(n, tags={"kind": kind})
    for kind, n in report.failed.items():
        if n:
            retention_failed_total().inc(n, tags={"kind": kind})
