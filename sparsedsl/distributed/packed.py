"""The packed plan: context parallelism for patterns that work within documents
(``compress(within=document)``, such as ``nsa_packed``).

In such a pattern every document is a sequence of its own: its windows pool from its
start, its selections number blocks from its start, and no query sees another document's
keys. A chunk of queries therefore needs nothing but its own documents up to its end:
the stretch from the start of the document its first position lies in (the earliest over
the batch's rows) to its last position. Each chunk fetches that stretch point to point
from the ranks that hold it (queries, keys, values, gates and a branch's own keys alike;
:func:`.halo.post_pieces`, all posted at once, each chunk waiting for its own), calls
the pattern on it as a packed batch of its own, and keeps its own rows. The backward
sends the fetched pieces' gradients back to their owners, the second chunk's while the
first chunk's backward runs.

What it costs: a packed call queries every position it is given, so the queries of the
stretch before the chunk (at most one document's, per row) are computed again on this
rank and dropped (their rows get no gradient). Document ids are all-gathered, eight bytes
a position, so that every rank derives every chunk's stretch: one plan on every rank. A
document longer than a rank's part makes the stretch long; the plan is for the usual
packing of many documents.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import InputError
from ..runtime.documents import DocumentLayout
from .halo import Piece, post_pieces, split_by_owner
from .learned import pooled_call
from .sequence import BackwardOrder, check_same_shapes, gather_sequence, sequence_chunks


def document_stretches(doc_ids: torch.Tensor, world: int, layout: str) -> list[list[list[Piece]]]:
    """rank -> chunk -> the pieces of the chunk's stretch (see the module's note), from the
    whole sequence's (B, length) document ids."""
    B, length = doc_ids.shape
    positions = torch.arange(length, device=doc_ids.device).expand(B, length)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, positions, 0), dim=1).values  # each position's document start
    chunks = [sequence_chunks(length, world, r, layout) for r in range(world)]
    heads = first[:, [lo for ranks in chunks for lo, _ in ranks]].amin(0).tolist()  # one host copy
    stretches = iter(zip(heads, (hi for ranks in chunks for _, hi in ranks)))
    return [[split_by_owner([next(stretches)], length, world, layout) for _ in ranks] for ranks in chunks]


def attend_packed(pattern, q, k, v, group, layout: str, *, gates, doc_ids, branch_kv, poolers, call):
    """This rank's output of a pattern that works within documents, by the packed plan."""
    if doc_ids is None:
        raise InputError(
            f"pattern `{pattern.name}` works within documents (compress(within=document)): with `cp_group` pass "
            "this rank's shard of the document ids as doc_ids= (B, local length), or cu_seqlens="
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tensors = [q, k, v, gates, *(t for kv in branch_kv.values() for t in kv)]
    # The plan below assumes every rank's part of each fetched tensor has one shape.
    check_same_shapes(*(t for t in tensors if t is not None), group=group, dim=2)
    ids = gather_sequence(doc_ids, group, dim=1, layout=layout)
    plans = document_stretches(ids, world, layout)
    order = BackwardOrder(q)  # every fetch's backward in one order on every rank

    # Every stretch posted at once; a chunk waits for its own pieces only, so the first
    # chunk is attended to while the second's arrive.
    pending = post_pieces(tensors, group, 2, layout, plans, order)
    outputs = []
    for c, (lo, hi) in enumerate(sequence_chunks(k.shape[2] * world, world, rank, layout)):
        queries, keys, values, gate_rows, *own = (p.chunk(c) if p is not None else None for p in pending)
        start = plans[rank][c][0].lo
        documents = ids[:, start:hi]
        kv = {name: (own[2 * i], own[2 * i + 1]) for i, name in enumerate(branch_kv)}
        # Learned pooling: each document pooled on its own, over the layout that aligns them.
        aligned = DocumentLayout.of(documents, pattern.ir.document_alignment).pad if poolers else None
        extra = {**call, **pooled_call(poolers, kv, keys, values, aligned)}
        if kv:
            extra["branch_kv"] = kv
        out = pattern(queries, keys, values, gates=gate_rows, doc_ids=documents, **extra)
        outputs.append(out[:, :, lo - start :])
    return order.tie(torch.cat(outputs, 2))
