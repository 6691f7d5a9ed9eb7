"""How many bytes a context-parallel pattern call moves, from the same plan the call runs
(no process group needed): the halo plan's pieces for patterns of bounded reach, the
pooled plan's halo and gathered pooled keys for compress branches beside such masks, the
all-gather of every rank's keys and values otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..frontend.model import SelectBranch
from .attention import choose_plan
from .halo import halo_plans, split_by_owner, transfers, without
from .pooled import window_slots
from .sequence import check_cp_options, sequence_chunks


@dataclass(frozen=True)
class Traffic:
    """Bytes of keys and values (and document ids, where given) each rank receives and
    sends in one forward call of a layer, by rank. The backward sends the key and value
    gradients back the same way (received and sent swap; document ids carry none).

    ``parts`` splits ``received`` by what each part serves: ``"halo"`` (the masks'
    branches, such as NSA's window, and the pooling of compress branches), ``"pooled"``
    (the compress branches' pooled keys) or ``"all-gather"``. The blocks selections
    choose in the pooled plan depend on the data and are in neither: ``selected_at_most``
    bounds them, (received, sent) by rank, as if every query chose every block before its
    chunk's end that its halo lacks."""

    plan: str  # "halo", "pooled", "pooled+selected" (the selected blocks not counted) or "all-gather"
    received: tuple[int, ...]
    sent: tuple[int, ...]
    gradient_received: tuple[int, ...]
    gradient_sent: tuple[int, ...]
    parts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    selected_at_most: tuple[tuple[int, ...], tuple[int, ...]] | None = None


def sequence_traffic(
    pattern, length: int, world: int, *, layout: str = "zigzag", batch: int = 1, kv_heads: int, head_dim: int,
    element_bytes: int = 2, documents: bool = False, plan: str = "auto",
) -> Traffic:  # fmt: skip
    """The :class:`Traffic` of ``pattern(q, k, v, cp_group=...)`` over a sequence of
    ``length`` positions on ``world`` ranks: keys and values of ``kv_heads`` x ``head_dim``
    elements of ``element_bytes`` each per position, and with ``documents`` the int64
    document ids. For the all-gather plan a rank's part reaches the other ``world - 1``
    ranks (sent counts that, whatever the backend's algorithm); so do the pooled plan's
    pooled keys and values, padded to one count per chunk, whose gradients come back by a
    reduce-scatter of the same size (NCCL; gloo all-reduces them). The blocks a selection
    chooses depend on the data: plan "pooled+selected" counts everything but them (at
    most every raw key another rank holds, as the all-gather). ``plan`` is the call's
    ``cp_plan``."""
    check_cp_options(layout, plan, names=("layout", "plan"))
    sequence_chunks(length, world, 0, layout)  # raises where the length does not split
    kind, reach = choose_plan(pattern.checked, plan)
    if kind == "packed":
        raise InputError(
            f"pattern `{pattern.name}` works within documents: its plan (distributed/packed.py) fetches each chunk's "
            "documents from their start, which depends on the documents, so sequence_traffic cannot count it"
        )
    per_position = batch * kv_heads * head_dim * element_bytes * 2  # keys and values
    ids = batch * 8 if documents else 0
    pooled_bytes = 0  # per rank, received (and sent) by the pooled plan's all-gathers
    if kind == "pooled":
        chunks = len(sequence_chunks(length, world, 0, layout))
        slots = sum(window_slots(length, world, layout, b.stride) for b in pattern.checked.compress_branches())
        pooled_bytes = (world - 1) * chunks * slots * per_position  # a pooled key and value weigh as a raw pair
    if kind == "all-gather":
        local = length // world
        each = (world - 1) * local
        data = tuple([each * (per_position + ids)] * world)
        gradients = tuple([each * per_position] * world)
        return Traffic("all-gather", data, data, gradients, gradients, (("all-gather", data),))
    received, sent = _positions(transfers(halo_plans(length, world, layout, reach)), world)
    # The gradients of keys and values go back from each needer to each owner.
    selects = any(isinstance(b, SelectBranch) for b in pattern.checked.branches)
    halo = tuple(n * (per_position + ids) for n in received)
    parts = (("halo", halo), ("pooled", (pooled_bytes,) * world)) if pooled_bytes else (("halo", halo),)
    selected = None
    if pooled_bytes and selects:
        most = _positions(transfers(_every_block_before(length, world, layout, reach)), world)
        selected = tuple(tuple(n * per_position for n in side) for side in most)
    return Traffic(
        ("pooled+selected" if selects else "pooled") if pooled_bytes else "halo",
        tuple(h + pooled_bytes for h in halo),
        tuple(n * (per_position + ids) + pooled_bytes for n in sent),
        tuple(n * per_position + pooled_bytes for n in sent),
        tuple(n * per_position + pooled_bytes for n in received),
        parts,
        selected,
    )


def _positions(moves, world: int) -> tuple[list[int], list[int]]:
    """Positions each rank receives and sends in ``moves`` ((needer, chunk, piece), ...)."""
    received, sent = [0] * world, [0] * world
    for needer, _, piece in moves:
        received[needer] += piece.hi - piece.lo
        sent[piece.owner] += piece.hi - piece.lo
    return received, sent


def _every_block_before(length: int, world: int, layout: str, reach) -> list[list[list]]:
    """rank -> chunk -> the pieces the pooled plan's second round would fetch if the chunk's
    queries chose every block before its end (``_selected_pieces`` with every block chosen)."""
    halo = halo_plans(length, world, layout, reach)
    return [
        [split_by_owner(without([(0, stop)], [(p.lo, p.hi) for p in halo[r][c]]), length, world, layout)
         for c, (_, stop) in enumerate(sequence_chunks(length, world, r, layout))]
        for r in range(world)
    ]  # fmt: skip
