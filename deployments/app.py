"""The application builder: ``serve_config.yaml`` points at ``deployments.app:build_app``.

    Gateway (FastAPI ingress) -> JobQueue (1 replica, durable) -> Orchestrator -> Preprocessor
                              -> Orchestrator (sync route)                  -> Denoiser x N (autoscaled, GPU)
                                                                            -> Postprocessor
"""


from ray.serve import Application

from deployments.config import APP_NAME, AppArgs
from deployments.denoiser import Denoiser
from deployments.gateway import Gateway
from deployments.job_queue import JobQueue
from deployments.orchestrator import Orchestrator
from deployments.postprocessor import Postprocessor
from deployments.preprocessor import Preprocessor
from deployments.storage import LocalStorageConfig

__all__ = ["APP_NAME", "AppArgs", "build_app"]


def build_app(args: AppArgs) -> Application:
    if isinstance(args.storage, LocalStorageConfig) and not args.storage.root.is_absolute():
        # Replicas may run in another working directory: pin the path where the config was read.
        args = args.model_copy(update={"storage": args.storage.model_copy(update={"root": args.storage.root.resolve()})})
    preprocessor = Preprocessor.options(**args.preprocessor.serve_options()).bind(args)
    denoiser = Denoiser.options(**args.denoiser.serve_options()).bind(args)
    postprocessor = Postprocessor.options(**args.postprocessor.serve_options()).bind(args)
    orchestrator = Orchestrator.options(**args.orchestrator.serve_options()).bind(
        preprocessor, denoiser, postprocessor, args)
    # The JobQueue owns the queue's order and state in memory: exactly one replica.
    queue_options = args.job_queue.serve_options() | {"num_replicas": 1}
    queue_options.pop("autoscaling_config", None)
    job_queue = JobQueue.options(**queue_options).bind(orchestrator, args)
    return Gateway.options(**args.gateway.serve_options()).bind(orchestrator, job_queue, args)
