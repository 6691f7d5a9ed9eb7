"""The pooled plan: for patterns of compress branches beside masks of bounded reach (no
selection), each rank fetches only a halo of raw keys and values and all-gathers the
pooled ones, 1/stride of the raw ones, instead of every raw key of the sequence.

Pooled key ``w`` summarises raw keys ``[w*stride, w*stride + block)``; it is pooled by the
chunk that holds its last key, from the halo that reaches ``block - 1`` back (and as far
as the masks reach), so a window that crosses a rank boundary pools as in one process.
Every rank then gathers every chunk's pooled keys, in window order. Each chunk of queries
attends over keys laid out at their positions in the sequence, from 0 to the chunk's end,
with only the fetched halo (and sinks) filled in: the masks see nothing else, and the
compress branches read the gathered pooled keys, never the raw ones. Both exchanges are
differentiable: the halo's gradients go back by :mod:`.halo`, the pooled keys' to the rank
that pooled them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist

from ..frontend import model as M
from ..reference import pool as mean_or_max_pool
from ..reference import pooled_length
from ..runtime.dispatch import attend
from ..runtime.inputs import validate_call
from .halo import Reach, chunk_keys, fetch_halo, mask_reach
from .sequence import _AllGather, sequence_chunks


def pooled_reach(checked: M.CheckedPattern) -> Reach | None:
    """The halo the pooled plan fetches for a pattern of compress branches and masks of
    bounded reach: as far back as the masks reach and ``block - 1`` (a window's first key
    from its last), on a grid of every stride (pooling windows start on it); None where
    the plan does not apply (no compress branch, a selection, an unbounded mask)."""
    compress = [b for b in checked.branches if isinstance(b, M.CompressBranch)]
    if not compress or not all(isinstance(b, (M.CompressBranch, M.MaskBranch)) for b in checked.branches):
        return None
    reaches = [mask_reach(b.mask) for b in checked.branches if isinstance(b, M.MaskBranch)]
    if any(r is None or r.back is None for r in reaches):
        return None
    back = max([r.back for r in reaches] + [b.block - 1 for b in compress])
    align = math.lcm(*(r.align for r in reaches), *(b.stride for b in compress))
    return Reach(back, align, max((r.sinks for r in reaches), default=0))


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
    pieces = chunk_keys(length, world, rank, layout, reach)

    def laid_out(x_local: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """For each chunk, ``x`` at positions 0 .. its end: the fetched pieces in place,
        the rest zeros (document ids: the first fetched id, so no new document starts)."""
        result = []
        for chunk_pieces, fetched in zip(pieces, fetch_halo(x_local, group, dim, layout, reach)):
            parts, at = [], 0
            for piece, part in zip(chunk_pieces, fetched.split([p.hi - p.lo for p in chunk_pieces], dim)):
                if piece.lo > at:
                    gap = list(part.shape)
                    gap[dim] = piece.lo - at
                    parts.append(part.new_zeros(gap) if part.is_floating_point() else part.narrow(dim, 0, 1).expand(gap))
                parts.append(part)
                at = piece.hi
            result.append(torch.cat(parts, dim))
        return result

    keys, values = laid_out(k, 2), laid_out(v, 2)
    documents = laid_out(doc_ids, 1) if doc_ids is not None else [None] * len(chunks)
    own = {name: (laid_out(bk, 2), laid_out(bv, 2)) for name, (bk, bv) in branch_kv.items()}
    pooled = {
        branch.name: _gathered_pooled_keys(branch, own.get(branch.name, (keys, values)), poolers.get(branch.name),
                                           chunks, length, world, layout, group)  # fmt: skip
        for branch in pattern.checked.compress_branches()
    }
    raw = {name: kv for name, kv in own.items() if name not in pooled}  # the masks' own keys; compress ones are pooled
    outputs, offset = [], 0
    for c, (keys_c, values_c, documents_c) in enumerate(zip(keys, values, documents)):
        rows = q.shape[2] // len(chunks)
        stop = keys_c.shape[2]
        mine = {name: tuple(t[:, :, : pooled_length(stop, b.block, b.stride)] for t in pooled[name])
                for name, b in ((b.name, b) for b in pattern.checked.compress_branches())}  # fmt: skip
        learned = {name: mine[name] for name in poolers}
        inputs = validate_call(
            pattern.ir, q.narrow(2, offset, rows), keys_c, values_c,
            gates=gates.narrow(2, offset, rows) if gates is not None else None, doc_ids=documents_c,
            branch_kv={name: (bk[c], bv[c]) for name, (bk, bv) in raw.items()} or None,
            k_cmp={n: kv[0] for n, kv in learned.items()} or None, v_cmp={n: kv[1] for n, kv in learned.items()} or None,
            **call,
        )  # fmt: skip
        # Every compress branch reads the gathered pooled keys, mean-pooled ones too: the
        # raw keys laid out here hold only the halo.
        inputs = replace(inputs, pooled=mine)
        outputs.append(attend(pattern.ir, pattern.checked, inputs, pattern.kernels, pattern.source_key))
        offset += rows
    return torch.cat(outputs, 2)


def _gathered_pooled_keys(branch, laid_out_kv, pooler, chunks, length: int, world: int, layout: str, group):
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
        parts = _AllGather.apply(torch.cat(sent, 2), group)  # (W, B, H, chunks * slots, D)
        ordered = []
        for r in range(world):
            for i, (start, stop) in enumerate(sequence_chunks(length, world, r, layout)):
                lo, hi = owned_windows(start, stop, length, branch.block, branch.stride)
                ordered.append((lo, parts[r][:, :, i * slots : i * slots + hi - lo]))
        result.append(torch.cat([part for _, part in sorted(ordered, key=lambda item: item[0])], 2))
    return tuple(result)
