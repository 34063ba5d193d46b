"""Sequence parallelism inside a unit: one window-step forward split over ``sp_degree`` devices by latent frames,
with each frame's audio kept on its rank (see ``docs/many-gpus.md``, "Sequence parallelism").

- ``split``: which frames each rank holds, and which attention scheme a degree allows;
- ``attention``: Ulysses and ring self-attention over the split sequence;
- ``transformer``: one rank's forward of the DiT;
- ``rank``: the rank-side object a host drives (``SequenceParallelRank.run`` per unit, on every rank);
- ``comm``: the collectives (bytes counted) and the rendezvous; ``volume``: bytes per window-step;
- ``local``: run ranks as local processes (tests, benchmarks).
"""

from .comm import Rendezvous, SequenceGroup, join_group, open_rendezvous
from .rank import SequenceParallelRank
from .split import FrameSplit, choose_attention, ulysses_degrees
from .transformer import SequenceParallelTransformer
from .volume import StepVolume, step_volume

__all__ = [
    "FrameSplit",
    "Rendezvous",
    "SequenceGroup",
    "SequenceParallelRank",
    "SequenceParallelTransformer",
    "StepVolume",
    "choose_attention",
    "join_group",
    "open_rendezvous",
    "step_volume",
    "ulysses_degrees",
]
