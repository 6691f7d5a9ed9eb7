"""Context parallelism on torch.distributed: one sequence split across the ranks of a
process group (gloo on CPUs, NCCL on GPUs; launched by ``torchrun`` or anything else).

``shard_sequence`` and ``gather_sequence`` move between a full tensor and a rank's part
of it; a pattern call with ``cp_group=`` takes and returns this rank's parts
(:func:`attend_sharded`); :func:`sequence_traffic` says how many bytes that moves
(docs/distributed.md has the tables).
"""

from .attention import attend_sharded
from .sequence import (
    LAYOUTS,
    PLANS,
    gather_sequence,
    process_group,
    sequence_chunks,
    shard_sequence,
)
from .traffic import Traffic, sequence_traffic

__all__ = [
    "LAYOUTS", "PLANS", "Traffic", "attend_sharded", "gather_sequence", "process_group", "sequence_chunks", "sequence_traffic",
    "shard_sequence",
]  # fmt: skip
