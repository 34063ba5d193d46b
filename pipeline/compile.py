"""``torch.compile`` for the DiT (the ``compile`` setting, off by default).

Regional compilation: diffusers' ``compile_repeated_blocks`` compiles each of the 30 identical transformer blocks
(``_repeated_blocks``) and leaves the per-window glue (patch embedding, padding, adapter, head) eager. The blocks
are ~99 % of the FLOPs, their compiled code is shared by all 30, and a changed window length or batch size (the
``upstream`` policy's short last window, batch 1 vs 3) recompiles one small graph instead of the whole model.
Models without ``_repeated_blocks`` (the simulated stand-in) are compiled whole.
"""

from __future__ import annotations

import torch

COMPILED_ATTR = "_stable_avatar_compiled"


def compile_dit(transformer: torch.nn.Module) -> str:
    """Compile ``transformer`` in place, once (a second call is a no-op); returns how: ``repeated_blocks`` or
    ``module``. Compilation itself is lazy: it happens on the first forward of each new shape."""
    done = getattr(transformer, COMPILED_ATTR, None)
    if done:
        return done
    if getattr(transformer, "_repeated_blocks", None) and hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks()
        how = "repeated_blocks"
    else:
        transformer.compile()
        how = "module"
    setattr(transformer, COMPILED_ATTR, how)
    return how
