"""The application builder: ``serve_config.yaml`` points at ``deployments.app:build_app``.

    Gateway (FastAPI ingress, any number of replicas) --reads/writes--> jobs database (SQLite / PostgreSQL)
       |  sync requests                                                     ^  claims with leases
       v                                                                    |
    Orchestrator (each replica claims and runs jobs) -> Preprocessor
                                                     -> Denoiser x N (autoscaled, GPU)
                                                     -> Postprocessor
"""


from ray.serve import Application

from deployments.config import APP_NAME, AppArgs
from deployments.gateway.deployment import Gateway
from deployments.jobstore import SqliteJobsConfig
from deployments.orchestrator.deployment import Orchestrator
from deployments.storage import LocalStorageConfig
from deployments.workers.denoiser import Denoiser
from deployments.workers.postprocessor import Postprocessor
from deployments.workers.preprocessor import Preprocessor

__all__ = ["APP_NAME", "AppArgs", "build_app"]


def pin_paths(args: AppArgs) -> AppArgs:
    """Replicas may run in another working directory: resolve relative paths where the config was read."""
    update: dict = {}
    if isinstance(args.storage, LocalStorageConfig) and not args.storage.root.is_absolute():
        update["storage"] = args.storage.model_copy(update={"root": args.storage.root.resolve()})
    if isinstance(args.jobs, SqliteJobsConfig) and args.jobs.path is not None and not args.jobs.path.is_absolute():
        update["jobs"] = args.jobs.model_copy(update={"path": args.jobs.path.resolve()})
    if args.checkpoints is not None and not args.checkpoints.is_absolute():
        update["checkpoints"] = args.checkpoints.resolve()
    memory = args.pipeline.memory
    if memory.offload_dir is not None and not memory.offload_dir.is_absolute():
        memory = memory.model_copy(update={"offload_dir": memory.offload_dir.resolve()})
        update["pipeline"] = args.pipeline.model_copy(update={"memory": memory})
    return args.model_copy(update=update) if update else args


def build_app(args: AppArgs) -> Application:
    args = pin_paths(args)
    preprocessor = Preprocessor.options(**args.preprocessor.serve_options()).bind(args)
    denoiser = Denoiser.options(**args.denoiser.serve_options()).bind(args)
    postprocessor = Postprocessor.options(**args.postprocessor.serve_options()).bind(args)
    orchestrator = Orchestrator.options(**args.orchestrator.serve_options()).bind(
        preprocessor, denoiser, postprocessor, args)
    return Gateway.options(**args.gateway.serve_options()).bind(orchestrator, preprocessor, denoiser, postprocessor,
                                                                args)
