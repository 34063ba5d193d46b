"""Helpers shared by the deployments: model loading per replica and logging."""

from __future__ import annotations

import logging

from deployments.config import AppArgs, DeploymentOptions
from pipeline.loading import Component, ModelBundle, load_models

logger = logging.getLogger("ray.serve")


def replica_name() -> str:
    """``<app>#<deployment>#<replica>``: the replica's name in logs, leases and readiness answers; its Ray actor
    is ``SERVE_REPLICA::<this>`` in the ``serve`` namespace (tests kill a job's runner by it)."""
    from ray import serve

    context = serve.get_replica_context()
    return f"{context.app_name}#{context.deployment}#{context.replica_tag}"


def load_replica_models(args: AppArgs, options: DeploymentOptions, components: list[Component]) -> ModelBundle:
    """Load the components this replica needs, once, in its constructor."""
    device = args.torch_device(options.num_gpus)
    bundle = load_models(args.model_preset(), components, checkpoints=args.checkpoints, device=device,
                         variant=args.variant, dtype_policy=args.replica_dtype_policy(options))
    logger.info("loaded %s of preset %s on %s in %s", ", ".join(components), args.preset, device,
                {k: round(v, 2) for k, v in bundle.load_seconds.items()})
    return bundle
