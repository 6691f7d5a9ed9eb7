"""A pattern call over a sequence split across ranks (context parallelism).

Four plans, chosen from the pattern's branches:

- the halo plan (:mod:`.halo`), for masks whose queries see only a bounded stretch back
  (windows, chunks, with or without sinks): each chunk fetches just that stretch;
- the pooled plan (:mod:`.pooled`), for compress branches and the selections they score
  beside such masks (NSA): a halo, the pooled keys all-gathered, the selected blocks
  fetched;
- the packed plan (:mod:`.packed`), for patterns that work within documents
  (``compress(within=document)``): each chunk fetches its documents from their start;
- otherwise the all-gather plan, for every causal pattern: keys and values (and document
  ids) are gathered from all ranks (differentiable: in the backward each rank's key and
  value gradients are summed back to the rank that holds them), and each of this rank's
  chunks of queries attends as the last positions of the prefix that ends with it, which
  is what the single call computes for those queries when no query sees a later key.
  Compress branches pool the gathered prefix (learned pooling too, with the functions
  passed as ``k_cmp``/``v_cmp``); selections score and choose on global block numbers.

``cp_plan="all-gather"`` takes the all-gather plan for a pattern another plan would serve
(where it measures faster: on NVLink the bytes the other plans save are a small part of
the step, and the pooled plan's second round costs a host round trip). A branch's own keys
and values (``branch_kv``) travel by the same plan; ``cu_seqlens`` are the whole
sequence's document boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import InputError
from ..frontend.kinds import Per
from ..frontend.model import SelectBranch
from ..runtime.inputs import document_ids
from .halo import fetch_halo, halo_plans, pattern_reach, post_pieces
from .learned import learned_poolers, pooled_call
from .packed import attend_packed
from .pooled import attend_pooled, pooled_reach
from .sequence import (
    BackwardOrder,
    PendingGather,
    check_cp_options,
    check_same_shapes,
    chunk_holders,
    gather_sequence,
    process_group,
    sequence_chunks,
    shard_sequence,
)


def attend_sharded(pattern, q, k, v, cp_group, cp_layout: str = "zigzag", *, cp_plan: str = "auto", gates=None,
                   doc_ids=None, **call):  # fmt: skip
    """``pattern(q, k, v, ...)`` for this rank's shards (B, H, local length, D) of one
    sequence, with ``cp_layout`` placing them (:func:`~.sequence.sequence_chunks`); the
    output is this rank's shard of the single call's output. ``gates`` are sharded like
    ``q``, ``doc_ids`` (B, local length) like ``k``. ``cp_plan``: ``"auto"``, the plan
    the pattern's branches call for (the module's note), or ``"all-gather"``."""
    group = process_group(cp_group, "cp_group")
    check_cp_options(cp_layout, cp_plan, pattern)
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]:
        raise InputError(f"with `cp_group`, q and k are this rank's shards of one sequence and hold the same positions; "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")  # fmt: skip
    world = dist.get_world_size(group)
    if world == 1:
        return pattern(q, k, v, gates=gates, doc_ids=doc_ids, **call)
    cu_seqlens = call.pop("cu_seqlens", None)
    if cu_seqlens is not None:
        if doc_ids is not None:
            raise InputError(f"pattern `{pattern.name}`: pass documents as doc_ids= or as cu_seqlens=, not both")
        doc_ids = sharded_document_ids(f"pattern `{pattern.name}` with `cp_group`", cu_seqlens, k, group, cp_layout)
    branch_kv = _checked_branch_kv(pattern, call.pop("branch_kv", None), k)
    poolers = learned_poolers(pattern, call.pop("k_cmp", None), call.pop("v_cmp", None))
    plan, reach = choose_plan(pattern.checked, cp_plan)
    # The packed plan queries whole documents from their start: no block of a document is cut.
    _check_prefix_safe(pattern, q.shape[2], world, cp_layout, cut_blocks=plan != "packed")
    if plan == "packed":
        return attend_packed(pattern, q, k, v, group, cp_layout, gates=gates, doc_ids=doc_ids, branch_kv=branch_kv,
                             poolers=poolers, call=call)  # fmt: skip
    if plan == "pooled":
        return attend_pooled(pattern, q, k, v, group, cp_layout, reach, gates=gates, doc_ids=doc_ids, branch_kv=branch_kv,
                             poolers=poolers, call=call)  # fmt: skip
    raw = {"": (k, v), **branch_kv}  # "": the shared keys and values
    order = BackwardOrder(q)  # every exchange's backward in one order on every rank
    if plan == "all-gather":
        chunks = _prefix_chunks(raw, doc_ids, group, cp_layout, order)
    else:
        chunks = _halo_chunks(raw, doc_ids, group, cp_layout, reach, order)
    outputs, rows = [], q.shape[2] // (2 if cp_layout == "zigzag" else 1)
    for c, (kv, documents) in enumerate(chunks):
        keys, values = kv.pop("")
        chunk_call = {**call, **pooled_call(poolers, kv, keys, values)}  # learned pooling of the chunk's prefix
        if kv:  # a branch's own keys and values travel as the shared ones do
            chunk_call["branch_kv"] = kv
        outputs.append(
            pattern(
                q.narrow(2, c * rows, rows), keys, values,
                gates=gates.narrow(2, c * rows, rows) if gates is not None else None, doc_ids=documents, **chunk_call,
            )  # fmt: skip
        )
    return order.tie(torch.cat(outputs, 2))


def choose_plan(checked, cp_plan: str = "auto") -> tuple[str, object]:
    """The plan of a call (``"packed"``, ``"halo"``, ``"pooled"`` or ``"all-gather"``) and
    the halo it fetches (a :class:`~.halo.Reach`, or None), from the pattern's branches
    unless ``cp_plan`` is ``"all-gather"``."""
    if cp_plan == "all-gather":
        return "all-gather", None
    if checked.packed:
        return "packed", None
    if (reach := pattern_reach(checked)) is not None:
        return "halo", reach
    if (reach := pooled_reach(checked)) is not None:
        return "pooled", reach
    return "all-gather", None


def _checked_branch_kv(pattern, branch_kv, k: torch.Tensor) -> dict:
    """``branch_kv`` as {branch: (keys, values)} shards shaped like ``k``, in name order
    (the ranks' collectives must follow one order), or an InputError before any collective."""
    if branch_kv is None:
        return {}
    names = {b.name for b in pattern.ir.branches}
    shape = tuple(k.shape)
    if not isinstance(branch_kv, dict) or any(
        name not in names or not isinstance(pair, (tuple, list)) or len(pair) != 2
        or any(not isinstance(t, torch.Tensor) or tuple(t.shape) != shape for t in pair)
        for name, pair in branch_kv.items()
    ):  # fmt: skip
        raise InputError(
            f"pattern `{pattern.name}` with `cp_group`: `branch_kv` must map branch names ({', '.join(sorted(names))}) "
            f"to (keys, values) shards shaped like k, {shape}"
        )
    return {name: tuple(branch_kv[name]) for name in sorted(branch_kv)}


def sharded_document_ids(where: str, cu_seqlens, k: torch.Tensor, group, layout: str) -> torch.Tensor:
    """This rank's (B, local length) document ids from ``cu_seqlens``, the boundaries of the
    whole sequence (the same on every rank)."""
    B, L = k.shape[0], k.shape[2] * dist.get_world_size(group)
    whole = document_ids(where, None, cu_seqlens, B, L, k.device)
    return shard_sequence(whole, group, dim=1, layout=layout)


def _prefix_chunks(raw: dict, doc_ids, group, layout: str, order: BackwardOrder):
    """For each of this rank's chunks in turn, its ({name: (keys, values)}, document ids)
    of the prefix that ends with it, gathered from every rank. The zigzag layout gathers in
    two all-gathers posted at once, every rank's first chunk then every rank's second: a
    first chunk's prefix holds first chunks only, so it is attended to while the second
    gather is still on its way."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_same_shapes(*(t for kv in raw.values() for t in kv), group=group, dim=2)
    ids = gather_sequence(doc_ids, group, dim=1, layout=layout) if doc_ids is not None else None  # small: at once
    local = raw[""][0].shape[2]
    mine = sequence_chunks(local * world, world, rank, layout)
    size = local // len(mine)
    phases = [
        {name: tuple(PendingGather(t.narrow(2, p * size, size), group, order) for t in kv) for name, kv in raw.items()}
        for p in range(len(mine))
    ]
    holders = chunk_holders(local * world, world, layout)  # phase p gathers every rank's chunk p
    for _, stop in mine:
        held = holders[: stop // size]
        yield (
            {name: tuple(torch.cat([phases[p][name][which].parts()[r] for r, p in held], 2) for which in (0, 1))
             for name in raw},
            ids[:, :stop] if ids is not None else None,
        )  # fmt: skip


def _halo_chunks(raw: dict, doc_ids, group, layout: str, reach, order: BackwardOrder):
    """For each of this rank's chunks in turn, its ({name: (keys, values)}, document ids)
    from its halo's start to its end, fetched from their owners (:mod:`.halo`): every
    piece posted at once, each chunk waiting for its own, so that the first chunk is
    attended to while the second one's pieces arrive."""
    check_same_shapes(*(t for kv in raw.values() for t in kv), group=group, dim=2)
    documents = fetch_halo(doc_ids, group, 1, layout, reach) if doc_ids is not None else None  # small: at once
    world = dist.get_world_size(group)
    plans = halo_plans(raw[""][0].shape[2] * world, world, layout, reach)
    pending = post_pieces([t for kv in raw.values() for t in kv], group, 2, layout, plans, order)  # keys, values, ...
    for c in range(pending[0].chunks):
        parts = [p.chunk(c) for p in pending]
        fetched = {name: (parts[2 * i], parts[2 * i + 1]) for i, name in enumerate(raw)}
        yield fetched, documents[c] if documents is not None else None


def _check_prefix_safe(pattern, local_length: int, world: int, layout: str, cut_blocks: bool = True) -> None:
    """Refuse what the plans would compute wrongly: a branch whose queries may see
    later keys, and (``cut_blocks``) a per-block selection whose blocks a chunk boundary
    would cut."""
    chunks = 2 if layout == "zigzag" else 1
    if local_length % chunks:
        raise InputError(f"cp_layout={layout!r}: this rank's {local_length} positions do not split into its {chunks} chunks")
    chunk = local_length // chunks
    for branch in pattern.checked.later_keys():
        if isinstance(branch, SelectBranch) and branch.per == Per.BLOCK:
            if cut_blocks and chunk % branch.block:
                raise InputError(
                    f"pattern `{pattern.name}`: branch `{branch.name}` chooses blocks per block of {branch.block} "
                    f"queries, but the {layout} chunks over {world} ranks hold {chunk} positions; make the sequence "
                    f"length a multiple of {branch.block * world * chunks}"
                )
            continue
        raise InputError(
            f"pattern `{pattern.name}`: branch `{branch.name}` may let a query see later keys, which context "
            "parallelism (each rank's queries over the prefix up to them) cannot serve yet; intersect its mask "
            "with `causal`"
        )
