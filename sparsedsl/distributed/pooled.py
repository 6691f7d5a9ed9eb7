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

Every exchange is posted ahead and waited for where its data is first needed: both
chunks' halos at once, each chunk's pooled keys gathered (one gather per chunk index) as
soon as its halo is in, a chunk's pooled keys waited for only when it chooses or attends,
and both chunks' selected blocks at once, so that the first chunk pools, chooses and
attends while the second's data arrives (docs/distributed.md says what overlaps in the
backward, and what cannot).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from ..frontend import model as M
from ..reference import pool as mean_or_max_pool
from ..reference import pooled_length
from ..runtime.dispatch import attend, selected_blocks
from ..runtime.inputs import validate_call
from .halo import (
    Piece,
    Reach,
    fetch_pieces,
    halo_plans,
    mask_reach,
    post_pieces,
    split_by_owner,
    without,
)
from .sequence import (
    BackwardOrder,
    PendingGather,
    check_same_shapes,
    chunk_holders,
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
    halo = halo_plans(length, world, layout, reach)
    raw = {"": (k, v), **branch_kv}  # "": the shared keys and values
    order = BackwardOrder(q)  # the ranks' graphs differ: every exchange's backward in one order
    # held[name][0 or 1][c]: chunk c's (piece, values) pairs of keys or values; None: the document ids
    held = {name: ([], []) for name in raw}
    if doc_ids is not None:  # small, no gradient: at once
        held[None] = ([_split(halo[rank][c], ids, 1) for c, ids in enumerate(fetch_pieces(doc_ids, group, 1, layout, halo))],)
    kept = KeptAsPieces()  # what the calls save for their backward: the pieces, not the layouts

    def laid_out(name: str | None, which: int, c: int) -> torch.Tensor:
        pieces = list(held[name][which][c])
        return kept.build(partial(_lay_out, pieces, 1 if name is None else 2), [t for _, t in pieces])

    # Round 1: the halo, which the masks read and the compress branches pool, every piece
    # posted at once. Each chunk pools its windows as soon as its halo is in, and posts
    # their gather at once (one per chunk index: every rank's chunk c), so the next
    # chunk's halo and the gathers travel while this rank pools and chooses.
    compress = checked.compress_branches()
    halos = post_pieces([t for kv in raw.values() for t in kv], group, 2, layout, halo, order)

    def pool(b, which: int, c: int) -> torch.Tensor:  # chunk c's pooled keys (0) or values (1) of branch b
        x = laid_out(b.name if b.name in raw else "", which, c)
        pool_fn = poolers[b.name][which] if b.name in poolers else None
        with kept:  # max and learned pooling save (a view of) the layout
            return _owned_pooled(b, x, pool_fn, *chunks[c], length, window_slots(length, world, layout, b.stride))

    gathers = []  # chunk index -> {branch: (keys, values) PendingGather}
    for c in range(len(chunks)):
        for i, name in enumerate(raw):
            for which in (0, 1):
                held[name][which].append(_split(halo[rank][c], halos[2 * i + which].chunk(c), 2))
        gathers.append({b.name: tuple(PendingGather(pool(b, which, c), group, order) for which in (0, 1)) for b in compress})
    holders = chunk_holders(length, world, layout)
    size = length // len(holders)
    pooled: dict[int, dict] = {}  # chunk -> {branch: the pooled keys and values up to its end}
    own = [name for name in branch_kv if name not in {b.name for b in compress}]  # the masks' and selections' own keys

    def chunk_inputs(c: int):
        if c not in pooled:  # waits for the gathers of the chunks before this one's end, not the others
            pooled[c] = {b.name: tuple(kept.build(partial(_pooled_prefix, b, gathers, holders[: chunks[c][1] // size], size,
                                                          length, which), []) for which in (0, 1))
                         for b in compress}  # fmt: skip (no sources to watch: the gathered parts are this call's own)
        mine = pooled[c]
        learned = {name: mine[name] for name in poolers}
        inputs = validate_call(
            pattern.ir, q.narrow(2, c * rows, rows), laid_out("", 0, c), laid_out("", 1, c),
            gates=gates.narrow(2, c * rows, rows) if gates is not None else None,
            doc_ids=laid_out(None, 0, c) if None in held else None,
            branch_kv={name: (laid_out(name, 0, c), laid_out(name, 1, c)) for name in own} or None,
            k_cmp={n: kv[0] for n, kv in learned.items()} or None, v_cmp={n: kv[1] for n, kv in learned.items()} or None,
            **call,
        )  # fmt: skip
        # Every compress branch reads the gathered pooled keys, mean-pooled ones too: the
        # raw keys laid out here hold only what was fetched.
        return replace(inputs, pooled=mine)

    selections = [b for b in checked.branches if isinstance(b, M.SelectBranch)]
    chosen = [{} for _ in chunks]
    compressed = [{} for _ in chunks]  # chunk -> {compress branch: (out, lse)}, computed once, while choosing
    extra = None
    if selections:
        # Round 2: the blocks the selections choose, beyond the halo, for the keys the
        # selections read. Every rank learns every chunk's choice (a small all-gather of
        # block masks) to derive one plan; the call then attends to that very choice, with
        # the compress branches' outputs that scored it. The first chunk chooses while the
        # second chunk's pooled keys arrive.
        with kept:
            chosen = [selected_blocks(pattern.ir, checked, chunk_inputs(c), pattern.kernels, pattern.source_key, compressed[c])
                      for c in range(len(chunks))]  # fmt: skip
        plans = _selected_pieces([{n: union for n, (_, union) in c.items()} for c in chosen], selections, halo,
                                 length, world, layout, group)  # fmt: skip
        names = list(dict.fromkeys(b.name if b.name in branch_kv else "" for b in selections))
        extra = (plans, names, post_pieces([t for name in names for t in raw[name]], group, 2, layout, plans, order,
                                           first_tag=len(halos)))  # (the halos' returns may be in flight too)
    outputs = []
    for c in range(len(chunks)):
        if extra is not None:  # this chunk's blocks (the next chunk's still on their way)
            plans, names, pending = extra
            for i, name in enumerate(names):
                for which in (0, 1):
                    held[name][which][c].extend(_split(plans[rank][c], pending[2 * i + which].chunk(c), 2))
        with kept:
            outputs.append(attend(pattern.ir, checked, chunk_inputs(c), pattern.kernels, pattern.source_key,
                                  record={(name, "blocks"): choice for name, (choice, _) in chosen[c].items()},
                                  compressed=compressed[c]))  # fmt: skip
    return order.tie(torch.cat(outputs, 2))


def _split(pieces: list[Piece], data: torch.Tensor, dim: int) -> list[tuple[Piece, torch.Tensor]]:
    """The (piece, values) pairs of ``data``, ``pieces``' values concatenated along ``dim``."""
    return list(zip(pieces, data.split([p.hi - p.lo for p in pieces], dim)))


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
            plan.append(split_by_owner(without(wanted, have), length, world, layout))
        plans.append(plan)
    return plans


def _owned_pooled(branch, x: torch.Tensor, pool_fn, start: int, stop: int, length: int, slots: int) -> torch.Tensor:
    """The pooled keys (or values) of the windows chunk ``[start, stop)`` owns
    (:func:`owned_windows`), from its laid-out keys ``x``, padded to ``slots`` (an
    all-gather needs equal parts)."""
    lo, hi = owned_windows(start, stop, length, branch.block, branch.stride)
    B, H, _, D = x.shape
    padding = x.new_zeros(B, H, slots - (hi - lo), D)
    if hi == lo:
        return padding
    windows = x[:, :, lo * branch.stride : stop]
    pooled = pool_fn(windows) if pool_fn else mean_or_max_pool(windows, branch.block, branch.stride, branch.pool)
    return torch.cat([pooled[:, :, : hi - lo], padding], 2)


def _pooled_prefix(branch, gathers: list[dict], held: list[tuple[int, int]], size: int, length: int, which: int) -> torch.Tensor:
    """The pooled keys (``which`` 0) or values (1) of compress ``branch`` whose windows end
    in the chunks ``held`` (each chunk's (rank, index), in position order, chunks of
    ``size``), in window order, from the gathers of chunk index i (``gathers[i]``): waits
    for those of the indices ``held`` names only."""
    parts = []
    for g, (r, i) in enumerate(held):
        lo, hi = owned_windows(g * size, (g + 1) * size, length, branch.block, branch.stride)
        parts.append(gathers[i][branch.name][which].parts()[r][:, :, : hi - lo])
    return torch.cat(parts, 2)


class KeptAsPieces(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks under which a tensor that a call saves for its backward, where it
    is (a view of) a tensor made by :meth:`build`, is kept as the function that made it
    and made again when the backward reads it. Each chunk's keys are laid out from
    position 0 for the kernels, which index keys by position, from the pieces that were
    fetched (the halo, the blocks selected) or gathered (the pooled keys): so between a
    call's forward and its backward a rank holds those pieces, not every chunk's prefix of
    the sequence; a layout lives only while a call that reads it runs, and is made again
    for each call that saved it. Other saved tensors are kept as they are (detached, since
    a saved output that held itself would never be freed, with autograd's check that they
    did not change in place), so the calls have no double backward (``create_graph=True``
    is refused). Where an outer pair of hooks is active (activation checkpointing,
    offloading to the host), or torch cannot say whether one is, these step aside: the
    outer pair then decides about every saved tensor, layouts included."""

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)
        self._made: list[tuple[weakref.ref, object, list]] = []  # (a tensor made, its function, what it reads)
        self._entered: list[bool] = []  # per (nested) entry: whether these hooks were pushed

    def __enter__(self) -> None:
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self._entered.append(top is not None and top(False) is None)
        if self._entered[-1]:
            super().__enter__()

    def __exit__(self, *exc) -> None:
        if self._entered.pop():
            super().__exit__(*exc)

    def build(self, make, sources: list[torch.Tensor]) -> torch.Tensor:
        """``make()``, remembered as the way to make it again from ``sources`` (the tensors
        it reads, which must not change in place before the backward)."""
        x = make()
        self._made = [entry for entry in self._made if entry[0]() is not None]
        self._made.append((weakref.ref(x), make, sources))
        return x

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.nbytes() and t.device.type != "meta":
            for ref, make, sources in self._made:  # only a live tensor counts: a freed one's memory may be another's now
                x = ref()
                if (x is not None and x.device == t.device and x.dtype == t.dtype
                        and x.untyped_storage().data_ptr() == storage.data_ptr()):  # fmt: skip
                    return _MadeAgain(make, sources, t.shape, t.stride(), t.storage_offset())
        return t.detach(), t._version  # (the detached tensor shares t's version counter)

    @staticmethod
    def _unpack(saved) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("the pooled plan of context parallelism (`cp_group=`) has no double backward: "
                               "call backward without create_graph=True")  # fmt: skip
        if isinstance(saved, _MadeAgain):
            return saved.make_view()
        tensor, version = saved
        if tensor._version != version:
            raise RuntimeError(f"one of the tensors the pooled plan of context parallelism (`cp_group=`) saved for its "
                               f"backward was modified by an inplace operation (version {tensor._version}, saved at "
                               f"{version}); clone it before changing it")  # fmt: skip
        return tensor


class _MadeAgain:
    """A saved view (size, stride, offset) of the tensor that ``make()`` makes from ``sources``."""

    __slots__ = ("make", "versions", "size", "stride", "offset")

    def __init__(self, make, sources: list[torch.Tensor], size, stride, offset) -> None:
        self.make, self.size, self.stride, self.offset = make, size, stride, offset
        self.versions = [(t, t._version) for t in sources]

    def make_view(self) -> torch.Tensor:
        if any(t._version != version for t, version in self.versions):
            raise RuntimeError("a key or value that the pooled plan of context parallelism (`cp_group=`) reads in its "
                               "backward was modified in place after the forward")  # fmt: skip
        return self.make().as_strided(self.size, self.stride, self.offset)
