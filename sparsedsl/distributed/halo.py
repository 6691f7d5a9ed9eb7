"""The halo plan: for patterns whose queries see only keys a bounded distance back, each
chunk of queries fetches just that stretch of keys (its halo) from the ranks that hold
it, instead of every key of the sequence.

A mask's look-back comes from its structure (:func:`mask_reach`): ``sliding(w)`` reaches
``w - 1`` back, ``chunked(s)`` at most ``s - 1``, an intersection the shorter of its two,
a union the longer. The chunk then attends as the last positions of the keys from its
halo's start to its end, so the keys' positions shift by the halo's start: only masks
whose meaning survives that shift qualify (``sink`` and ``global`` count from position 0
and do not; ``chunked(s)`` does for shifts by multiples of ``s``, so halos start on that
grid). Everything else keeps the all-gather plan of :mod:`.attention`.

The exchange is point-to-point (``torch.distributed.isend``/``irecv``, any backend), in an
order every rank derives from the same plan, and differentiable: the backward sends each
received piece's gradient back to its owner, which adds it to its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..frontend import model as M
from .sequence import sequence_chunks


@dataclass(frozen=True)
class Reach:
    """How far back a mask's keys reach from a query (``back``: every visible key j has
    ``i - back <= j``; None: unbounded), and the shifts of positions that keep the mask's
    meaning (multiples of ``align``)."""

    back: int | None
    align: int = 1


def mask_reach(mask: M.Mask) -> Reach | None:
    """The :class:`Reach` of ``mask`` among keys j <= i, or None where a shift of
    positions changes its meaning (``sink``, ``global``)."""
    if isinstance(mask, (M.Causal, M.Full, M.Document)):
        return Reach(None)
    if isinstance(mask, M.Sliding):
        return Reach(mask.window - 1)
    if isinstance(mask, M.Dilated):
        return Reach((mask.window - 1) * mask.dilation)
    if isinstance(mask, M.Chunked):
        return Reach(mask.size - 1, mask.size)
    if isinstance(mask, M.Not):
        inner = mask_reach(mask.operand)
        return None if inner is None else Reach(None, inner.align)
    if isinstance(mask, (M.And, M.Or)):
        left, right = mask_reach(mask.left), mask_reach(mask.right)
        if left is None or right is None:
            return None
        align = math.lcm(left.align, right.align)
        backs = [r.back for r in (left, right) if r.back is not None]
        if isinstance(mask, M.And):  # within both: the nearer bound holds
            return Reach(min(backs) if backs else None, align)
        return Reach(max(backs) if len(backs) == 2 else None, align)  # within either: the farther
    return None  # a primitive this plan does not know yet: all-gather


def pattern_reach(checked: M.CheckedPattern) -> Reach | None:
    """The reach of a pattern made of masks only (gated or not), or None where the halo
    plan does not apply (a compress or select branch, an unbounded or shift-variant mask)."""
    reaches = [mask_reach(b.mask) if isinstance(b, M.MaskBranch) else None for b in checked.branches]
    if any(r is None or r.back is None for r in reaches):
        return None
    return Reach(max(r.back for r in reaches), math.lcm(*(r.align for r in reaches)))


@dataclass(frozen=True)
class Piece:
    """Positions ``lo`` .. ``hi - 1`` of one chunk's keys, held by rank ``owner``."""

    owner: int
    lo: int
    hi: int


def chunk_keys(length: int, world: int, rank: int, layout: str, reach: Reach) -> list[list[Piece]]:
    """For each of ``rank``'s chunks, the pieces of keys it attends over, in position
    order: from its halo's start (``reach.back`` before the chunk, rounded down to the
    ``reach.align`` grid) to the chunk's end, split by the ranks that hold them."""
    owners = [(start, stop, r) for r in range(world) for start, stop in sequence_chunks(length, world, r, layout)]
    owners.sort()
    plan = []
    for start, stop in sequence_chunks(length, world, rank, layout):
        first = max(0, (start - reach.back) // reach.align * reach.align)
        plan.append([Piece(r, max(lo, first), min(hi, stop)) for lo, hi, r in owners if lo < stop and hi > first])
    return plan


def _local_offset(length: int, world: int, rank: int, layout: str, position: int) -> int:
    """Where absolute ``position`` lies in ``rank``'s shard (its chunks concatenated)."""
    offset = 0
    for start, stop in sequence_chunks(length, world, rank, layout):
        if start <= position < stop:
            return offset + position - start
        offset += stop - start
    raise ValueError(f"position {position} is not on rank {rank}")


def _transfers(length: int, world: int, layout: str, reach: Reach) -> list[tuple[int, int, Piece]]:
    """Every (needer, chunk index, piece) with a piece held by another rank, in one order
    all ranks agree on (the order sends and receives are posted in)."""
    return [
        (needer, index, piece)
        for needer in range(world)
        for index, pieces in enumerate(chunk_keys(length, world, needer, layout, reach))
        for piece in pieces
        if piece.owner != needer
    ]


def _exchange(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]], group) -> None:
    """Post every send and receive (peer, tensor) of this rank, then wait for all of them.
    The n-th message between two ranks carries tag n, so a pair's messages match in order."""
    tags: dict[tuple[str, int], int] = {}
    requests = []
    for kind, items, op in (("send", sends, dist.isend), ("recv", receives, dist.irecv)):
        for peer, tensor in items:
            tag = tags.get((kind, peer), 0)
            tags[kind, peer] = tag + 1
            requests.append(op(tensor, dist.get_global_rank(group, peer), group=group, tag=tag))
    for request in requests:
        request.wait()


def fetch_halo(x_local: torch.Tensor, group, dim: int, layout: str, reach: Reach) -> list[torch.Tensor]:
    """For each of this rank's chunks, ``x`` at the positions it attends over (halo and
    chunk), assembled from this rank's shard and the pieces other ranks send; the
    gradients of received pieces go back to their owners."""
    return list(_FetchHalo.apply(x_local, group, dim, layout, reach))


class _FetchHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, layout, reach):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        length = x_local.shape[dim] * world
        mine = chunk_keys(length, world, rank, layout, reach)
        transfers = _transfers(length, world, layout, reach)
        ctx.saved = (group, dim, rank, x_local.shape, mine, transfers)
        ctx.local = lambda piece: _local_offset(length, world, rank, layout, piece.lo)  # where an own piece starts

        def own(piece):
            return x_local.narrow(dim, ctx.local(piece), piece.hi - piece.lo)

        sends = [(needer, own(p).contiguous()) for needer, _, p in transfers if p.owner == rank]
        received = {(index, p): _empty_like_piece(x_local, dim, p) for needer, index, p in transfers if needer == rank}
        _exchange(sends, [(p.owner, buffer) for (_, p), buffer in received.items()], group)
        return tuple(torch.cat([own(p) if p.owner == rank else received[index, p] for p in pieces], dim)
                     for index, pieces in enumerate(mine))  # fmt: skip

    @staticmethod
    def backward(ctx, *grads):
        group, dim, rank, shape, mine, transfers = ctx.saved
        grad_local = grads[0].new_zeros(shape)
        fetched = {}  # the gradients of the pieces this rank received, to send back
        for index, (pieces, grad) in enumerate(zip(mine, grads)):
            for p, part in zip(pieces, grad.split([p.hi - p.lo for p in pieces], dim)):
                if p.owner == rank:
                    grad_local.narrow(dim, ctx.local(p), p.hi - p.lo).add_(part)
                else:
                    fetched[index, p] = part.contiguous()
        # The forward's messages, in its order, in the other direction.
        sends = [(p.owner, fetched[index, p]) for needer, index, p in transfers if needer == rank]
        returned = [(needer, p, _empty_like_piece(grad_local, dim, p)) for needer, _, p in transfers if p.owner == rank]
        _exchange(sends, [(needer, buffer) for needer, _, buffer in returned], group)
        for _, p, buffer in returned:
            grad_local.narrow(dim, ctx.local(p), p.hi - p.lo).add_(buffer)
        return grad_local, None, None, None, None


def _empty_like_piece(x: torch.Tensor, dim: int, piece: Piece) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = piece.hi - piece.lo
    return x.new_empty(shape)
