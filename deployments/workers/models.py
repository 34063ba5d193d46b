"""Model loading in a replica's constructor (the deployments that run a model; the Gateway never imports this)."""

from __future__ import annotations

import logging

from deployments.config import AppArgs, DeploymentOptions
from deployments.runtime.replica import limit_heap_retention
from pipeline.loading import Component, ModelBundle, load_models

logger = logging.getLogger("ray.serve")


def load_replica_models(args: AppArgs, options: DeploymentOptions, components: list[Component]) -> ModelBundle:
    """Load the components this replica needs, once, in its constructor (which also sets the heap's policy)."""
    limit_heap_retention()
    device = args.torch_device(options.num_gpus)
    bundle = load_models(args.model_preset(), components, checkpoints=args.checkpoints, device=device,
                         variant=args.variant, dtype_policy=args.replica_dtype_policy(options))
    logger.info("loaded %s of preset %s on %s in %s", ", ".join(components), args.preset, device,
                {k: round(v, 2) for k, v in bundle.load_seconds.items()})
    return bundle
