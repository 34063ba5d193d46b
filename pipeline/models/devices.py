"""Where a model computes, which under an offload mode is not where its weights are between calls.

``pipeline.memory`` marks each offloaded model with the device its hook moves it to; callers place inputs there
(:func:`compute_device`) rather than on ``next(model.parameters()).device``, which is the host while the weights
are offloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

COMPUTE_DEVICE_ATTR = "_stable_avatar_compute_device"


def set_compute_device(module: torch.nn.Module, device: torch.device) -> None:
    """Record that an offload hook runs ``module`` on ``device``."""
    setattr(module, COMPUTE_DEVICE_ATTR, torch.device(device))


def compute_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its offload hook's, else its parameters'."""
    device = getattr(module, COMPUTE_DEVICE_ATTR, None)
    return device if device is not None else next(module.parameters()).device


@contextlib.contextmanager
def weights_onloaded(module: torch.nn.Module) -> Iterator[None]:
    """Run code that uses ``module``'s own (top-level) weights outside its ``forward`` with them on the compute
    device: diffusers' group offloading keeps them offloaded between forwards, so its top-level group is onloaded
    for the block and offloaded again; accelerate's model offload hook is fired as diffusers'
    ``apply_forward_hook`` fires it for ``vae.encode`` (the model then stays, as after a forward)."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    registry = getattr(module, "_diffusers_hook", None)
    group_hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
    if group_hook is not None:
        group_hook.group.onload_()
        try:
            yield
        finally:
            group_hook.group.offload_()
        return
    accelerate_hook = getattr(module, "_hf_hook", None)
    if accelerate_hook is not None and hasattr(accelerate_hook, "pre_forward"):
        accelerate_hook.pre_forward(module)
    yield
