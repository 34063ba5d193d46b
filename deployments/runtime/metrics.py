"""Prometheus metrics of the service, through ``ray.serve.metrics`` (so they carry deployment/replica tags).

Ray exports them from each node's metrics agent (``ray start --metrics-export-port``; on KubeRay the pods'
``metrics`` port, scraped by the PodMonitor). Metric objects are created lazily inside the replica that uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
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


@cache
def prompt_cache_hits() -> Counter:
    return Counter("stable_avatar_prompt_cache_hits_total",
                   description="Prompts whose T5 embedding a Preprocessor replica found in its prompt cache.")


@cache
def prompt_cache_misses() -> Counter:
    return Counter("stable_avatar_prompt_cache_misses_total",
                   description="Prompts a Preprocessor replica ran T5 for (not in its prompt cache).")


@cache
def prompt_cache_evictions() -> Counter:
    return Counter("stable_avatar_prompt_cache_evictions_total",
                   description="Embeddings dropped from a Preprocessor's prompt cache to stay within its bytes.")


@cache
def prompt_cache_entries() -> Gauge:
    return Gauge("stable_avatar_prompt_cache_entries", description="Prompts held in a Preprocessor's prompt cache.")


@cache
def prompt_cache_bytes() -> Gauge:
    return Gauge("stable_avatar_prompt_cache_bytes",
                 description="Bytes of embeddings held in a Preprocessor's prompt cache (bound: "
                 "pipeline.prompt_cache_bytes).")


PROMPT_CACHE_COUNTERS = {"hits": prompt_cache_hits, "misses": prompt_cache_misses,
                         "evictions": prompt_cache_evictions}


class PromptCacheMetrics:
    """Publishes a replica's prompt-cache statistics (``pipeline.prompt_cache.PromptCacheStats.as_dict()``): the
    cache counts from the replica's start, a Prometheus counter takes increments, so each report adds what
    changed since the last one; the gauges take the current content."""

    def __init__(self) -> None:
        self._reported = dict.fromkeys(PROMPT_CACHE_COUNTERS, 0)

    def report(self, stats: Mapping[str, int]) -> None:
        for name, counter in PROMPT_CACHE_COUNTERS.items():
            if stats[name] > self._reported[name]:
                counter().inc(stats[name] - self._reported[name])
                self._reported[name] = stats[name]
        prompt_cache_entries().set(stats["entries"])
        prompt_cache_bytes().set(stats["bytes"])


def record_retention(report) -> None:
    """Count one sweep's :class:`deployments.orchestrator.retention.SweepReport` (a ``RetentionSweeper`` ``on_report`` hook)."""
    for kind, n in report.deleted().items():
        if n:
            retention_deleted_total().inc(n, tags={"kind": kind})
    for kind, n in report.failed.items():
        if n:
            retention_failed_total().inc(n, tags={"kind": kind})
