"""Context parallelism on torch.distributed: one sequence split across the ranks of a
process group (gloo on CPUs, NCCL on GPUs; launched by ``torchrun`` or anything else).

``shard_sequence`` and ``gather_sequence`` move between a full tensor and a rank's part
of it; a pattern call with ``cp_group=`` takes and returns this rank's parts
(:func:`attend_sharded`). docs/distributed.md says what is sent.
"""

from .attention import attend_sharded
from .sequence import (
    LAYOUTS,
    gather_sequence,
    process_group,
    sequence_chunks,
    shard_sequence,
)

__all__ = ["LAYOUTS", "attend_sharded", "gather_sequence", "process_group", "sequence_chunks", "shard_sequence"]
