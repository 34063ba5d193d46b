"""Model loading in a replica's constructor (the deployments that run a model; the Gateway never imports this).

Each replica places its models as ``pipeline.memory`` says (``pipeline.memory.apply_memory_mode``): models
offloaded whole go back to host memory when a Preprocessor's ``prepare`` or a Postprocessor's ``finish`` ends (the
pipeline's stages release them); a Denoiser never releases its DiT between units (it would cross PCIe at every
unit), so under ``model_offload`` the DiT moves to the GPU at the first unit and stays, and under ``block_offload``
its blocks stream at every forward.
"""

from __future__ import annotations

import logging

from deployments.config import AppArgs, DeploymentOptions
from pipeline.loading import Component, ModelBundle, load_models

logger = logging.getLogger("ray.serve")


def load_replica_models(args: AppArgs, options: DeploymentOptions, components: list[Component]) -> ModelBundle:
    """Load the components this replica needs, once, in its constructor (each deployment sets its heap policy
    itself: :mod:`deployments.runtime.replica`)."""
    device = args.torch_device(options.num_gpus)
    bundle = load_models(args.model_preset(), components, checkpoints=args.checkpoints, device=device,
                         variant=args.variant, dtype_policy=args.replica_dtype_policy(options),
                         memory=args.pipeline.memory)
    logger.info("loaded %s of preset %s on %s in %s; memory %s", ", ".join(components), args.preset, device,
                {k: round(v, 2) for k, v in bundle.load_seconds.items()}, bundle.placement.describe())
    return bundle
