"""``AppArgs``: the typed arguments of the application builder (the ``args:`` block of ``serve_config.yaml``).

Ray Serve validates the block against this model before deploying, so a typo or an out-of-range value stops the
deploy with a message instead of starting a half-configured service.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.gateway.auth import AuthConfig
from deployments.jobstore import JobLimits, JobsConfig, SqliteJobsConfig
from deployments.orchestrator.retention import RetentionConfig
from deployments.storage import LocalStorageConfig, StorageConfig
from deployments.storage.keys import LOCAL_JOBS_DATABASE
from deployments.workers.unit_queue import UnitOrder
from guarded_fetch import AddressGuard, FetchLimits
from pipeline.media.validate import MediaLimits
from pipeline.presets import PRESETS, ModelPreset, get_preset
from pipeline.schema import APP_ID
from pipeline.settings import PipelineSettings

APP_NAME = "stable-avatar"  # serve.get_app_handle(APP_NAME)
DEFAULT_APP_ID = APP_ID


class Autoscaling(BaseModel):
    """The subset of Ray Serve's ``autoscaling_config`` we expose, with values checked up front."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(1.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


SERVE_DEFAULT_MAX_ONGOING = 5  # Ray Serve's max_ongoing_requests when a deployment sets none


class DeploymentOptions(BaseModel):
    """Resources and scaling of one deployment: fixed ``num_replicas`` or ``autoscaling``."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    sp_degree: int = Field(1, ge=1, description="denoiser only: GPUs (ranks) one replica splits each unit over "
                           "(sequence parallelism, docs/many-gpus.md); num_cpus/num_gpus/memory_gb are per rank")
    health_check_period_s: float | None = Field(
        None, gt=0, description="seconds between Serve's health checks of a replica (Serve's default: 10); a replica "
        "that fails three in a row is replaced, so this sets how soon a wedged one (a Denoiser past timeouts.unit_s) "
        "goes")

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    @property
    def capacity(self) -> int:
        """Requests the deployment accepts at once at its largest: beyond that, Serve's replicas reject calls."""
        return self.max_replicas * (self.max_ongoing_requests or SERVE_DEFAULT_MAX_ONGOING)

    def rank_resources(self) -> dict[str, float]:
        """One rank's placement-group bundle: its CPUs, GPUs and memory (zero entries left out)."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": int((self.memory_gb or 0) * 2**30)}
        return {name: value for name, value in bundle.items() if value}

    def serve_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb:
            actor["memory"] = int(self.memory_gb * 2**30)
        options: dict[str, Any] = {"ray_actor_options": actor}
        if self.sp_degree > 1:
            # One bundle per rank, all on one node (the ranks' collectives run over NVLink); the replica itself
            # (rank 0) takes bundle 0, its rank actors the others. Autoscaling still counts whole replicas.
            options["placement_group_bundles"] = [self.rank_resources() for _ in range(self.sp_degree)]
            options["placement_group_strategy"] = "STRICT_PACK"
        if self.autoscaling is not None:
            options["num_replicas"] = "auto"
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        if self.max_ongoing_requests is not None:
            options["max_ongoing_requests"] = self.max_ongoing_requests
        if self.health_check_period_s is not None:
            options["health_check_period_s"] = self.health_check_period_s
        return options


class InputLimits(BaseModel):
    """How ``image_url``/``audio_url`` are fetched and what they must contain (the ``inputs:`` block).

    ``allow_private_hosts`` lists hostnames, IPs or CIDRs the fetcher may reach although they are private or
    loopback (an in-cluster MinIO, a test server); everything else private is refused (SSRF guard).
    ``s3_input_buckets`` lists the buckets ``s3://bucket/key`` inputs may name (read with the service's S3
    credentials, so only buckets meant for client inputs belong here).
    """

    model_config = ConfigDict(extra="forbid")

    fetch: FetchLimits = Field(default_factory=FetchLimits)
    media: MediaLimits = Field(default_factory=MediaLimits)
    allow_private_hosts: list[str] = Field(default_factory=list)
    s3_input_buckets: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> InputLimits:
        AddressGuard(self.allow_private_hosts)  # raises ValueError naming a malformed entry
        for bucket in self.s3_input_buckets:
            if not 3 <= len(bucket) <= 63 or "/" in bucket:
                raise ValueError(f"s3_input_buckets entry {bucket!r} is not a bucket name")
        return self

    def guard(self) -> AddressGuard:
        return AddressGuard(self.allow_private_hosts)


# Units a Denoiser replica accepts at once. One runs; the rest wait inside the replica on its GPU queue (shortest
# remaining job first), so Serve's router places every unit at once on its sticky replica and never has to hold one
# back (no rejections, no retry back-off). Autoscaling still sees every in-flight unit as an ongoing request: with
# target_ongoing_requests 1 it asks for one replica per unit in flight (capped by max_replicas).
DENOISER_MAX_ONGOING = 64
# pipeline.segment_plan.MIN_SEGMENT_LATENTS (not imported: that module loads torch, and the Gateway reads this one).
MIN_SEGMENT_LATENTS = 2


class DispatchConfig(BaseModel):
    """How Orchestrator replicas hold the jobs they run (the ``dispatch:`` block).

    Each replica claims queued jobs from the jobs database (``poll_interval_s`` apart while idle) and holds each
    with a lease of ``lease_s`` seconds, renewed every ``heartbeat_s``; a job whose replica died is claimed again
    by another replica once its lease ran out and resumes from its latent checkpoint. A cancel request is seen at
    the next heartbeat or step. Webhook deliveries are leased for ``webhook_lease_s`` (longer than one delivery
    attempt).
    """

    model_config = ConfigDict(extra="forbid")

    lease_s: float = Field(30.0, ge=0.5, le=3600, description="how long a job stays ours without a heartbeat")
    heartbeat_s: float = Field(10.0, gt=0, le=600, description="lease renewal (and cancel check) period")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="idle wait between claims / webhook polls")
    listen: bool = Field(True, description="on PostgreSQL an idle replica waits for a submit's NOTIFY between "
                         "polls (claims within milliseconds); false: poll only (e.g. behind a transaction-pooling "
                         "PgBouncer, which cannot LISTEN)")
    webhook_lease_s: float = Field(60.0, ge=20, le=3600, description="one delivery attempt's lease")
    retry_backoff_s: float = Field(10.0, ge=0, le=3600, description="after an infrastructure fault the job is "
                                   "queued again and claimable after this long, doubling with each attempt")
    retry_backoff_max_s: float = Field(600.0, ge=0, le=24 * 3600, description="the longest retry backoff")
    log_flush_s: float = Field(1.0, ge=0, le=60, description="a run's log lines and progress are written at "
                               "most this often, each batch in one transaction (0: every line at once)")

    @model_validator(mode="after")
    def _renewed_in_time(self) -> DispatchConfig:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of lease_s ({self.lease_s}), "
                             "so one late heartbeat does not lose the lease")
        return self


MODEL_DEPLOYMENTS = ("preprocessor", "denoiser", "postprocessor")  # the deployments that load models


class TimeoutsConfig(BaseModel):
    """How long each part of a job may take (the ``timeouts:`` block), in seconds. The defaults leave GPU speeds
    room many times over (a unit takes seconds on a GPU, a 10-minute video's decode and encode minutes): they bound
    a hung part, they do not pace a healthy one.

    An overrun unit is sent again to another Denoiser replica (and the hung replica's health check fails, so Serve
    replaces it); an overrun Preprocessor or Postprocessor call, a unit that overran on every try and a stalled run
    are infrastructure faults: the job is retried from its checkpoint. A job past ``job_s`` fails (504).
    """

    model_config = ConfigDict(extra="forbid")

    unit_s: float = Field(600.0, gt=0, le=24 * 3600, description="one unit on a Denoiser replica, its wait in the "
                          "replica's queue included")
    preprocess_s: float = Field(1800.0, gt=0, le=24 * 3600, description="one Preprocessor call (fetch, decode, "
                                "encoders)")
    postprocess_s: float = Field(3600.0, gt=0, le=24 * 3600, description="one Postprocessor call (VAE decode, "
                                 "encode, upload)")
    job_s: float = Field(12 * 3600.0, gt=0, le=7 * 24 * 3600, description="a job from its first start to its "
                         "end, over all its attempts")
    stall_s: float = Field(900.0, gt=0, le=24 * 3600, description="no progress (a unit done, a log line) for this "
                           "long outside a Preprocessor/Postprocessor call: the lease is no longer renewed and the "
                           "run stops; the job is retried")

    @model_validator(mode="after")
    def _units_progress_within_the_stall_timeout(self) -> TimeoutsConfig:
        if self.stall_s <= self.unit_s:
            raise ValueError(f"timeouts.stall_s ({self.stall_s:g}) must exceed timeouts.unit_s ({self.unit_s:g}): "
                             "a unit that takes its full time must not count as a stall")
        return self


def _denoiser_defaults() -> DeploymentOptions:
    return DeploymentOptions(max_ongoing_requests=DENOISER_MAX_ONGOING,
                             autoscaling=Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=1))


class AppArgs(BaseModel):
    """Everything the service needs to know; defaults are the embedded, CPU-only, tiny set-up."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field(DEFAULT_APP_ID, description="fal application id served under /run/<app_id>")
    preset: str = Field("tiny", description="model preset: " + ", ".join(PRESETS))
    preset_modules: list[str] = Field(
        default_factory=list, description="modules imported before the preset is looked up, in every replica; "
        "they may register extra presets (benchmarks: bench.simulated)")
    checkpoints: Path | None = Field(None, description="official checkpoint layout (preset stableavatar-1.3b)")
    variant: Literal["square", "rec-vec"] = "square"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype_policy: Literal["auto", "gpu", "fp32"] = Field(
        "auto", description="auto: GPU dtypes (bf16 DiT/T5 and sampling state) for deployments given a GPU, fp32 "
        "otherwise; gpu/fp32 force one policy everywhere (gpu on CPU replays the GPU dtype path)")
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    storage: StorageConfig = Field(default_factory=LocalStorageConfig)
    jobs: JobsConfig | None = Field(
        None, description="the jobs database: {kind: sqlite, path?} or {kind: postgres, dsn_env?, dsn_file?}; "
        "default: SQLite in <local storage root>/jobs.sqlite3 (with S3 storage a jobs block is required)")
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    window_step_retries: int = Field(3, ge=0, le=10, description="retries of a window-step, or of a "
                                     "Preprocessor/Postprocessor call, whose replica died")
    conditioning_cache_size: int = Field(4, ge=1, le=64, description="requests cached per Denoiser replica")
    unit_order: UnitOrder = Field(
        "shortest_remaining", description="order of the units waiting on a Denoiser replica: shortest_remaining "
        "(the job with the least work left first, with ageing), round_robin across requests (equal turns) or fifo "
        "(first come, first served)")
    unit_ageing_s: float = Field(
        60.0, gt=0, le=3600, description="shortest_remaining: a unit that has waited this long goes before any "
        "newer one, so a long job is delayed, never starved")
    unit_anticipation: float = Field(
        1.0, ge=0, le=10, description="shortest_remaining: a replica keeps itself for the next unit of the job "
        "that goes first for up to this many times its last unit's run time (0: never)")
    max_running_jobs: int = Field(2, ge=1, le=256, description="queued jobs each Orchestrator replica runs at once")
    short_job_slots: int = Field(
        1, ge=0, le=64, description="slots each Orchestrator replica keeps, beyond max_running_jobs, for short jobs "
        "(at most short_job_rows of work), so long jobs cannot hold every slot while a short one waits")
    short_job_rows: int = Field(
        750, ge=0, description="work of a short job, in guidance rows (windows x 3 x steps): 750 is a 10 s clip (5 "
        "windows) at 50 steps")
    admission_ageing_s: float = Field(
        600.0, gt=0, le=86400, description="a job waiting for a slot goes before any newer one after this long "
        "(shorter jobs first until then)")
    min_segment_latents: int = Field(
        40, ge=MIN_SEGMENT_LATENTS, le=100_000, description="shortest segment, in latent frames (4 video frames "
        "each), a long video's decode + encode is cut into for the Postprocessor replicas (postprocessor."
        "max_replicas segments at most); a segment also decodes a warm-up of about 10 latents' worth, so 40 keeps it "
        "under a fifth (docs/long-videos.md)")
    max_queue_length: int = Field(1000, ge=1, description="queued jobs beyond which submits get 429")
    checkpoint_every_steps: int = Field(5, ge=0, le=100, description="persist fused latents every N steps (0: off)")
    idempotency_window_s: float = Field(
        24 * 3600.0, gt=0, le=7 * 24 * 3600.0, description="how long an Idempotency-Key answers with the job its "
        "first request created (per API key)")
    job_attempts: int = Field(3, ge=1, le=10, description="attempts of a job (claims, each ended by an "
                              "infrastructure fault or a lost runner) before it is failed as a dead letter")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and per-key limits")
    max_request_body_mb: float = Field(64.0, gt=0, description="JSON bodies above this get 413 (upload instead)")
    webhook_attempts: int = Field(10, ge=1, le=20, description="deliveries tried before giving up (fal: 10)")
    webhook_first_delay_s: float = Field(
        14.0, ge=0.0, le=600.0, description="doubles after each failed attempt: at the defaults the 10 attempts "
        "span about 2 hours (14 s x (2^9 - 1) = 7154 s), as fal's")
    inputs: InputLimits = Field(default_factory=InputLimits)
    retention: RetentionConfig = Field(default_factory=RetentionConfig,
                                       description="time to live of results, uploads, inputs, records, checkpoints")

    gateway: DeploymentOptions = Field(default_factory=DeploymentOptions)
    orchestrator: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_ongoing_requests=16))
    preprocessor: DeploymentOptions = Field(default_factory=DeploymentOptions)
    denoiser: DeploymentOptions = Field(default_factory=_denoiser_defaults)
    postprocessor: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        preset = self.model_preset()  # raises ValueError naming the preset or the module
        if preset.weights == "checkpoint" and self.checkpoints is None:
            raise ValueError(f"preset {self.preset!r} needs 'checkpoints' (the official checkpoint layout)")
        if preset.is_random and self.checkpoints is not None:  # the weights would be ignored: noise, silently
            raise ValueError(f"checkpoints: preset {self.preset!r} has random weights and reads no checkpoints; "
                             f"for the official weights in {self.checkpoints} set 'preset: stableavatar-1.3b'")
        self._check_streams()
        self._check_sequence_parallel(preset)
        if self.postprocessor.max_ongoing_requests == 1:
            raise ValueError("postprocessor.max_ongoing_requests must be at least 2: a replica decoding a segment "
                             "must still answer readiness probes (segments go one per replica by its router)")
        no_path = self.jobs is None or (isinstance(self.jobs, SqliteJobsConfig) and self.jobs.path is None)
        if no_path and not isinstance(self.storage, LocalStorageConfig):
            raise ValueError(
                "jobs: S3 storage serves a cluster, whose replicas must share one jobs database: set "
                "'jobs: {kind: postgres}' (DSN in $STABLE_AVATAR_JOBS_DSN or a mounted file), or, on a single "
                "machine, 'jobs: {kind: sqlite, path: /some/local/jobs.sqlite3}'")
        if "url_expiry_s" in self.storage.model_fields_set:  # written down: a contradiction is refused
            self.retention.check_link_lifetime(self.storage.url_expiry_s)
        else:  # the default follows a shorter results_s
            self.storage.url_expiry_s = min(self.storage.url_expiry_s, max(1, int(self.retention.results_s)))
        return self

    def _check_streams(self) -> None:
        """``pipeline.memory.use_stream: true`` needs CUDA in every model replica (each refuses it when it loads
        on the CPU): refused here, from the configuration alone, when a replica is bound to run on the CPU."""
        if not self.pipeline.memory.use_stream:
            return
        if self.device == "cpu":
            raise ValueError("pipeline.memory.use_stream: true prefetches blocks on CUDA streams, but device is "
                             "'cpu' (leave use_stream unset, or set device: auto with GPU shares)")
        on_cpu = [name for name in MODEL_DEPLOYMENTS if getattr(self, name).num_gpus == 0]
        if self.device == "auto" and on_cpu:
            raise ValueError(f"pipeline.memory.use_stream: true prefetches blocks on CUDA streams, but "
                             f"{', '.join(f'{name}.num_gpus' for name in on_cpu)} is 0, so device 'auto' runs "
                             f"{'it' if len(on_cpu) == 1 else 'them'} on the CPU (give each a GPU share, or leave "
                             "use_stream unset)")

    def _check_sequence_parallel(self, preset: ModelPreset) -> None:
        """``denoiser.sp_degree``: a degree the model's heads or frames allow (the pipeline decides which
        attention scheme a degree takes, or refuses it), whole GPUs per rank, and nothing sequence parallelism
        does not support."""
        for name in ("gateway", "orchestrator", "preprocessor", "postprocessor"):
            if getattr(self, name).sp_degree != 1:
                raise ValueError(f"{name}.sp_degree: only the denoiser splits its work over several GPUs")
        options = self.denoiser
        if options.sp_degree == 1:
            return
        from pipeline.sequence_parallel.split import choose_attention, ulysses_degrees

        heads = preset.transformer["num_attention_heads"]
        try:
            choose_attention(heads, options.sp_degree)  # Ulysses where the heads divide evenly, ring otherwise
        except ValueError as exc:
            raise ValueError(f"denoiser.sp_degree: {exc}; Ulysses attention at {ulysses_degrees(heads)} (the "
                             f"preset's {heads} heads), ring attention at the other degrees") from None
        if options.num_gpus < 1 or options.num_gpus != int(options.num_gpus):
            raise ValueError(f"denoiser.sp_degree {options.sp_degree} needs whole GPUs per rank (denoiser.num_gpus "
                             f"1 or more, got {options.num_gpus:g}): each rank runs its share on its own GPU")
        if self.pipeline.compile:
            raise ValueError("denoiser.sp_degree > 1 does not support pipeline.compile (collectives inside "
                             "compiled blocks are untested); set compile: false")

    def jobs_config(self) -> JobsConfig:
        """The jobs database: ``jobs``, else SQLite at :meth:`default_jobs_path`."""
        return self.jobs or SqliteJobsConfig()

    def default_jobs_path(self) -> Path:
        """Where SQLite keeps jobs when ``jobs`` names no path: ``<local storage root>/jobs.sqlite3`` (a file the
        storage never serves: only keys under results/, uploads/, ... are linked)."""
        root = self.storage.root if isinstance(self.storage, LocalStorageConfig) else Path(".")
        return root / LOCAL_JOBS_DATABASE

    def job_limits(self) -> JobLimits:
        """The limits the jobs database enforces in its transactions, from ``auth``, the queue settings and
        retention (an upload counts against its key's quota until retention deletes it)."""
        auth = self.auth
        return JobLimits(max_queue_length=self.max_queue_length, max_queued_per_owner=auth.max_queued_per_key,
                         max_running_per_owner=auth.max_running_per_key,
                         rate_per_s=auth.submit_rate_per_minute / 60.0, rate_burst=auth.submit_burst,
                         max_attempts=self.job_attempts, idempotency_ttl_s=self.idempotency_window_s,
                         upload_quota_bytes=int(auth.upload_quota_mb * 2**20),
                         max_uploads_per_owner=auth.max_uploads_per_key, upload_ttl_s=self.retention.uploads_s)

    def model_preset(self) -> ModelPreset:
        """The preset, after importing ``preset_modules`` (a replica unpickles the args without validating them,
        so every replica calls this rather than ``get_preset``)."""
        for module in self.preset_modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ValueError(f"preset_modules: cannot import {module!r}: {exc}") from None
        return get_preset(self.preset)

    def replica_dtype_policy(self, options: DeploymentOptions) -> Literal["gpu", "fp32"]:
        """The dtype policy of a deployment, decided from the configuration alone, never from the hardware of
        the process that asks: the Orchestrator (a CPU pod on KubeRay) draws the noise in the Denoisers' state
        dtype, so both must reach the same answer wherever they run."""
        if self.dtype_policy != "auto":
            return self.dtype_policy
        on_gpu = self.device == "cuda" or (self.device == "auto" and options.num_gpus > 0)
        return "gpu" if on_gpu else "fp32"

    def state_dtype(self) -> Any:
        """``torch.dtype`` of the sampling state, as the Denoisers hold it (bf16 under the gpu policy)."""
        import torch

        from pipeline.loading import state_dtype

        return state_dtype(torch.device("cpu"), self.replica_dtype_policy(self.denoiser))

    def torch_device(self, num_gpus: float) -> str:
        """``auto`` means CUDA when the replica was given a GPU share and CUDA is there."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
