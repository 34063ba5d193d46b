"""The step cache's slot in one DiT forward, apart from the model so that the step loop (the Orchestrator's
:mod:`pipeline.denoise`) names it without importing diffusers' transformer modules."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class BlockResidual:
    """The step cache's slot in one forward: the residual to reuse (the blocks are skipped), or where the blocks'
    residual (``output - input`` of the 30 blocks, ``[B, seq_len, C]`` in the model dtype) is written."""

    reuse: Tensor | None = None
    computed: Tensor | None = None
