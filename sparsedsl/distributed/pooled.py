"""The pooled plan: for patterns of compress branches (and the selections they score)
beside masks of bounded reach, such as NSA, each rank fetches only a halo of raw keys
and values, all-gathers the pooled ones (1/stride of the raw ones) and fetches the blocks
its queries select, instead of every raw key of the sequence.

Pooled key ``w`` summarises raw keys ``[w*stride, w*stride + block)``; it is pooled by the
chunk that holds its last key, from the halo that reaches ``block - 1`` back (and as far
as the masks reach), so a window that crosses a rank boundary pools as in one process.
Every rank then gathers every chunk's pooled keys, in window order. Each chunk of queries
attends over keys laid out at their positions in the sequence, from 0 to the chunk's end,
with only the fetched halo (and sinks) filled in: the masks see nothing else, and the
compress branches read the gathered pooled keys, never the raw ones. A selection reads
raw keys anywhere before its queries, so the blocks it chooses come in a second round:
each chunk chooses its blocks as the call would (pooled keys, scores, top-k:
:func:`~sparsedsl.runtime.dispatch.selected_blocks`), every rank learns every chunk's
choice (an all-gather of one byte per block), the chosen blocks beyond the halo are
fetched from their owners into the layout of the keys the selections read, and the call
is handed that choice instead of scoring again. Every exchange is differentiable: fetched
keys' gradients go back by :mod:`.halo`, the pooled keys' to the rank that pooled them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ..frontend import model as M
from ..reference import pool as mean_or_max_pool
from ..reference import pooled_length
from ..runtime.dispatch import attend, selected_blocks
from ..runtime.inputs import validate_call
from .halo import Piece, Reach, fetch_pieces, halo_plans, mask_reach, split_by_owner
from .sequence import (
    BackwardOrder,
    all_gather_stacked,
    check_same_shapes,
    sequence_chunks,
)


def pooled_reach(checked: M.CheckedPattern) -> Reach | None:
    """The halo the pooled plan fetches for a pattern of compress branches, the selections
    they score and masks of bounded reach: as far back as the masks reach and ``block - 1``
    for every compress branch, those that only score a selection too (a window's first
    key from its last); None where the plan does not apply (no compress branch, an
    unbounded mask). Keys keep their positions in this plan, so no grid is needed."""
    compress = checked.compress_branches()
    reaches = [mask_reach(b.mask) for b in checked.branches if isinstance(b, M.MaskBranch)]
    if not compress or any(r is None or r.back is None for r in reaches):
        return None
    back = max([r.back for r in reaches] + [b.block - 1 for b in compress])
    return Reach(back, 1, max((r.sinks for r in reaches), default=0))


def owned_windows(start: int, stop: int, length: int, block: int, stride: int) -> tuple[int, int]:
    """The pooled keys ``lo .. hi - 1`` whose last raw key lies in ``[start, stop)``."""
    lo = max(0, -(-(start - block + 1) // stride))
    hi = min(pooled_length(length, block, stride), (stop - block) // stride + 1) if stop >= block else 0
    return lo, max(lo, hi)


def window_slots(length: int, world: int, layout: str, stride: int) -> int:
    """Pooled keys a chunk sends, padded to one count for every chunk (an all-gather needs
    equal parts): the most windows whose last keys, ``stride`` apart, fit in a chunk."""
    start, stop = sequence_chunks(length, world, 0, layout)[0]
    return -(-(stop - start) // stride)


def attend_pooled(pattern, q, k, v, group, layout: str, reach: Reach, *, gates, doc_ids, branch_kv, poolers, call):
    """This rank's output of ``pattern`` by the pooled plan (see the module's note)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length = k.shape[2] * world
    chunks = sequence_chunks(length, world, rank, layout)
    rows = q.shape[2] // len(chunks)
    checked = pattern.checked
    check_same_shapes(k, group=group, dim=2)  # the plans below assume every rank's part has one shape
    # Round 1: the halo, which the masks read and the compress branches pool.
    halo = halo_plans(length, world, layout, reach)
    raw = {"": (k, v), **branch_kv}  # "": the shared keys and values
    order = BackwardOrder(q)  # the ranks' graphs differ: every exchange's backward in one order

    def parts(x: torch.Tensor, dim: int, plans, in_order: bool = True) -> list[list[tuple[Piece, torch.Tensor]]]:
        """Per chunk, the (piece, values) pairs of ``x`` this rank fetches by ``plans``."""
        data = fetch_pieces(x, group, dim, layout, plans, order if in_order else None)
        return [list(zip(pieces, d.split([p.hi - p.lo for p in pieces], dim))) for pieces, d in zip(plans[rank], data)]

    # fetched[name][0 or 1]: per chunk, the pieces of keys or values; None: the document ids
    fetched = {name: [parts(t, 2, halo) for t in kv] for name, kv in raw.items()}
    if doc_ids is not None:  # no gradient, so out of the backward's order
        fetched[None] = [parts(doc_ids, 1, halo, in_order=False)]

    def laid_out(name: str | None, which: int) -> list[torch.Tensor]:
        return [_lay_out(chunk, 1 if name is None else 2) for chunk in fetched[name][which]]

    pooled = {
        b.name: _gathered_pooled_keys(b, [laid_out(b.name if b.name in raw else "", i) for i in (0, 1)],
                                      poolers.get(b.name), chunks, length, world, layout, group, order)  # fmt: skip
        for b in checked.compress_branches()
    }
    own = [name for name in branch_kv if name not in pooled]  # the masks' and selections' own keys

    def chunk_inputs(c: int, keys, values, ids, own_kv):
        stop = chunks[c][1]
        mine = {b.name: tuple(t[:, :, : pooled_length(stop, b.block, b.stride)] for t in pooled[b.name])
                for b in checked.compress_branches()}  # fmt: skip
        learned = {name: mine[name] for name in poolers}
        inputs = validate_call(
            pattern.ir, q.narrow(2, c * rows, rows), keys[c], values[c],
            gates=gates.narrow(2, c * rows, rows) if gates is not None else None,
            doc_ids=ids[c] if ids is not None else None,
            branch_kv={name: (own_kv[name][0][c], own_kv[name][1][c]) for name in own} or None,
            k_cmp={n: kv[0] for n, kv in learned.items()} or None, v_cmp={n: kv[1] for n, kv in learned.items()} or None,
            **call,
        )  # fmt: skip
        # Every compress branch reads the gathered pooled keys, mean-pooled ones too: the
        # raw keys laid out here hold only what was fetched.
        return replace(inputs, pooled=mine)

    def all_laid_out():
        ids = laid_out(None, 0) if doc_ids is not None else None
        return laid_out("", 0), laid_out("", 1), ids, {name: (laid_out(name, 0), laid_out(name, 1)) for name in own}

    selections = [b for b in checked.branches if isinstance(b, M.SelectBranch)]
    chosen = [{} for _ in chunks]
    if selections:
        # Round 2: the blocks the selections choose, beyond the halo, for the keys the
        # selections read. Every rank learns every chunk's choice (a small all-gather of
        # block masks) to derive one plan; the call then attends to that very choice.
        keys, values, ids, own_kv = all_laid_out()
        chosen = [
            selected_blocks(pattern.ir, checked, chunk_inputs(c, keys, values, ids, own_kv), pattern.kernels,
                            pattern.source_key)  # fmt: skip
            for c in range(len(chunks))
        ]
        extra = _selected_pieces([{n: union for n, (_, union) in c.items()} for c in chosen], selections, halo,
                                 length, world, layout, group)  # fmt: skip
        for name in dict.fromkeys(b.name if b.name in branch_kv else "" for b in selections):
            for which, t in enumerate(raw[name]):
                for chunk, more in zip(fetched[name][which], parts(t, 2, extra)):
                    chunk.extend(more)
    keys, values, ids, own_kv = all_laid_out()
    outputs = [
        attend(pattern.ir, checked, chunk_inputs(c, keys, values, ids, own_kv), pattern.kernels, pattern.source_key,
               record={(name, "blocks"): choice for name, (choice, _) in chosen[c].items()})  # fmt: skip
        for c in range(len(chunks))
    ]
    return order.tie(torch.cat(outputs, 2))


def _lay_out(chunk: list[tuple[Piece, torch.Tensor]], dim: int) -> torch.Tensor:
    """The values of ``chunk``'s pieces at their positions, 0 .. the last piece's end,
    zeros between pieces (document ids: the next piece's first id, so no new document
    starts there)."""
    parts, at = [], 0
    for piece, part in sorted(chunk, key=lambda item: item[0].lo):
        if piece.lo > at:
            gap = list(part.shape)
            gap[dim] = piece.lo - at
            parts.append(part.new_zeros(gap) if part.is_floating_point() else part.narrow(dim, 0, 1).expand(gap))
        parts.append(part)
        at = piece.hi
    return torch.cat(parts, dim)


def _selected_pieces(chosen: list[dict], selections, halo, length: int, world: int, layout: str, group) -> list:
    """rank -> chunk -> the pieces of the chosen blocks that the chunk's halo lacks, from
    every rank's choices (an all-gather of one boolean per block, chunk and selection)."""
    def padded(mask: torch.Tensor, block: int) -> torch.Tensor:  # a chunk's blocks, then none up to the sequence's end
        return torch.nn.functional.pad(mask.to(torch.uint8), (0, -(-length // block) - mask.numel()))

    mine = torch.cat([padded(chosen[c][b.name], b.block) for c in range(len(chosen)) for b in selections])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    every = torch.stack(every).cpu()  # the plan is the host's: one copy, not one per mask
    plans = []
    for r in range(world):
        masks = iter(every[r].split([-(-length // b.block) for _ in range(len(chosen)) for b in selections]))
        plan = []
        for c, (start, stop) in enumerate(sequence_chunks(length, world, r, layout)):
            wanted = []
            for b in selections:
                blocks = next(masks).nonzero().flatten().tolist()
                wanted += [(n * b.block, min((n + 1) * b.block, stop)) for n in blocks]
            have = [(p.lo, p.hi) for p in halo[r][c]]
            plan.append(split_by_owner(_without(wanted, have), length, world, layout))
        plans.append(plan)
    return plans


def _without(intervals: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The positions of ``intervals`` outside ``covered`` (sorted, disjoint)."""
    result = []
    for lo, hi in intervals:
        for a, b in covered:
            if b <= lo or a >= hi:
                continue
            if a > lo:
                result.append((lo, a))
            lo = max(lo, b)
        if lo < hi:
            result.append((lo, hi))
    return result


def _gathered_pooled_keys(branch, laid_out_kv, pooler, chunks, length: int, world: int, layout: str, group, order):
    """The whole sequence's pooled keys and values of compress ``branch``: each of this
    rank's chunks pools the windows it owns (:func:`owned_windows`) from its laid-out
    keys, and every rank's are gathered in window order."""
    slots = window_slots(length, world, layout, branch.stride)
    result = []
    for x_chunks, pool_fn in zip(laid_out_kv, (pooler[0], pooler[1]) if pooler else (None, None)):
        sent = []
        for (start, stop), x in zip(chunks, x_chunks):
            lo, hi = owned_windows(start, stop, length, branch.block, branch.stride)
            B, H, _, D = x.shape
            if hi > lo:
                windows = x[:, :, lo * branch.stride : stop]
                pooled = pool_fn(windows) if pool_fn else mean_or_max_pool(windows, branch.block, branch.stride, branch.pool)
                sent.append(pooled[:, :, : hi - lo])
            sent.append(x.new_zeros(B, H, slots - (hi - lo), D))
        parts = all_gather_stacked(torch.cat(sent, 2), group, order)  # (W, B, H, chunks * slots, D)
        ordered = []
        for r in range(world):
            for i, (start, stop) in enumerate(sequence_chunks(length, world, r, layout)):
                lo, hi = owned_windows(start, stop, length, branch.block, branch.stride)
                ordered.append((lo, parts[r][:, :, i * slots : i * slots + hi - lo]))
        result.append(torch.cat([part for _, part in sorted(ordered, key=lambda item: item[0])], 2))
    return tuple(result)
