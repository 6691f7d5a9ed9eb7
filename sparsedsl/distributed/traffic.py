"""How many bytes a context-parallel pattern call moves, from the same plan the call runs
(no process group needed): the halo plan's pieces for patterns of bounded reach, the
all-gather of every rank's keys and values otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .halo import pattern_reach, plan_transfers
from .sequence import LAYOUTS, sequence_chunks


@dataclass(frozen=True)
class Traffic:
    """Bytes of keys and values (and document ids, where given) each rank receives and
    sends in one forward call of a layer, by rank. The backward sends the key and value
    gradients back the same way (received and sent swap; document ids carry none)."""

    plan: str  # "halo" or "all-gather"
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
    ranks (sent counts that, whatever the backend's algorithm)."""
    if layout not in LAYOUTS:
        raise InputError(f"`layout` {layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    sequence_chunks(length, world, 0, layout)  # raises where the length does not split
    per_position = batch * kv_heads * head_dim * element_bytes * 2  # keys and values
    ids = batch * 8 if documents else 0
    reach = pattern_reach(pattern.checked)
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
    return Traffic("halo", tuple(n * (per_position + ids) for n in received), tuple(n * (per_position + ids) for n in sent),
                   tuple(n * per_position for n in sent), tuple(n * per_position for n in received))  # fmt: skip
