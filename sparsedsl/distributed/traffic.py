"""How many bytes a context-parallel pattern call moves, from the same plan the call runs
(no process group needed): the halo plan's pieces for patterns of bounded reach, the
pooled plan's halo and gathered pooled keys for compress branches beside such masks, the
all-gather of every rank's keys and values otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..frontend.model import SelectBranch
from .halo import pattern_reach, plan_transfers
from .pooled import pooled_reach, window_slots
from .sequence import LAYOUTS, sequence_chunks


@dataclass(frozen=True)
class Traffic:
    """Bytes of keys and values (and document ids, where given) each rank receives and
    sends in one forward call of a layer, by rank. The backward sends the key and value
    gradients back the same way (received and sent swap; document ids carry none)."""

    plan: str  # "halo", "pooled", "pooled+selected" (the selected blocks not counted) or "all-gather"
    received: tuple[int, ...]
    sent: tuple[int, ...]
    gradient_received: tuple[int, ...]
    gradient_sent: tuple[int, ...]


def sequence_traffic(
    pattern, length: int, world: int, *, layout: str = "zigzag", batch: int = 1, kv_heads: int, head_dim: int,
    element_bytes: int = 2, documents: bool = False,
) -> Traffic:  # fmt: skip
    """The :class:`Traffic` of ``pattern(q, k, v, cp_group=...)`` over a sequence of
    ``length`` positions on ``world`` ranks: keys and values of ``kv_heads`` x ``head_dim``
    elements of ``element_bytes`` each per position, and with ``documents`` the int64
    document ids. For the all-gather plan a rank's part reaches the other ``world - 1``
    ranks (sent counts that, whatever the backend's algorithm); so do the pooled plan's
    pooled keys and values, padded to one count per chunk, whose gradients come back by a
    reduce-scatter of the same size (NCCL; gloo all-reduces them). The blocks a selection
    chooses depend on the data: plan "pooled+selected" counts everything but them (at
    most every raw key another rank holds, as the all-gather)."""
    if layout not in LAYOUTS:
        raise InputError(f"`layout` {layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    sequence_chunks(length, world, 0, layout)  # raises where the length does not split
    if pattern.checked.packed:
        raise InputError(
            f"pattern `{pattern.name}` works within documents: its plan (distributed/packed.py) fetches each chunk's "
            "documents from their start, which depends on the documents, so sequence_traffic cannot count it"
        )
    per_position = batch * kv_heads * head_dim * element_bytes * 2  # keys and values
    ids = batch * 8 if documents else 0
    reach = pattern_reach(pattern.checked)
    pooled_bytes = 0  # per rank, received (and sent) by the pooled plan's all-gathers
    if reach is None and (reach := pooled_reach(pattern.checked)) is not None:
        chunks = len(sequence_chunks(length, world, 0, layout))
        slots = sum(window_slots(length, world, layout, b.stride) for b in pattern.checked.compress_branches())
        pooled_bytes = (world - 1) * chunks * slots * per_position  # a pooled key and value weigh as a raw pair
    if reach is None:
        local = length // world
        each = (world - 1) * local
        data = tuple([each * (per_position + ids)] * world)
        gradients = tuple([each * per_position] * world)
        return Traffic("all-gather", data, data, gradients, gradients)
    received, sent = [0] * world, [0] * world  # positions
    for needer, _, piece in plan_transfers(length, world, layout, reach):
        received[needer] += piece.hi - piece.lo
        sent[piece.owner] += piece.hi - piece.lo
    # The gradients of keys and values go back from each needer to each owner.
    selects = any(isinstance(b, SelectBranch) for b in pattern.checked.branches)
    return Traffic(
        ("pooled+selected" if selects else "pooled") if pooled_bytes else "halo",
        tuple(n * (per_position + ids) + pooled_bytes for n in received),
        tuple(n * (per_position + ids) + pooled_bytes for n in sent),
        tuple(n * per_position + pooled_bytes for n in sent),
        tuple(n * per_position + pooled_bytes for n in received),
    )
