"""The halo plan: for patterns whose queries see only keys a bounded distance back, each
chunk of queries fetches just that stretch of keys (its halo) from the ranks that hold
it, instead of every key of the sequence.

A mask's look-back comes from its structure (:func:`mask_reach`): ``sliding(w)`` reaches
``w - 1`` back, ``chunked(s)`` at most ``s - 1``, an intersection the shorter of its two,
a union the longer. The chunk then attends as the last positions of the keys from its
halo's start to its end, so the keys' positions shift by the halo's start: only masks
whose meaning survives that shift qualify (``chunked(s)`` does for shifts by multiples of
``s``, so halos start on that grid; ``global`` counts queries from position 0 and does
not). Everything else keeps the all-gather plan of :mod:`.attention`.

Sinks (``sink(s)``: the first ``s`` keys, whatever the query) travel too: a chunk whose
halo starts past them attends over the first keys (``s`` rounded up to the grid), then its
halo, with the halo shifted down to follow them. The first keys keep their positions and
the queries move, which changes no mask there: the halo then starts at least as far back
as the farthest-reaching window anywhere in the pattern, so every window is closed to the
first keys both before and after the move, while ``causal``, ``sink`` and ``document`` do
not depend on how far back a key lies.

The exchange is point-to-point (``torch.distributed.batch_isend_irecv``, any backend; on
NCCL each process must have its device set, ``torch.cuda.set_device``), in an order every
rank derives from the same plan, and differentiable: the backward sends each received
piece's gradient back to its owner, which adds it to its own. Every piece is posted at
once, one batch per chunk index, and each chunk waits only for its own batch
(:class:`PendingPieces`), so that a chunk is attended to while the next one's pieces are
still on their way; in the backward, each chunk's gradients are posted as soon as that
chunk's backward has them and waited for only by the exchange's own backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..frontend import model as M
from .sequence import BackwardOrder, sequence_chunks


@dataclass(frozen=True)
class Reach:
    """Which keys a mask may show query i: every visible key j has ``i - back <= j``
    (``back`` None: unbounded) or ``j < sinks``; ``align``: the shifts of positions that keep
    the mask's meaning are its multiples."""

    back: int | None
    align: int = 1
    sinks: int = 0


def mask_reach(mask: M.Mask) -> Reach | None:
    """The :class:`Reach` of ``mask`` among keys j <= i, or None where a shift of
    positions changes its meaning (``global``) or the plan does not know a primitive."""
    if isinstance(mask, (M.Causal, M.Full, M.Document)):
        return Reach(None)
    if isinstance(mask, M.Sink):
        return Reach(0, sinks=mask.size)  # j < size (j = i, the one key 0 back, is covered too)
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
        bounded = [r for r in (left, right) if r.back is not None]
        if isinstance(mask, M.And):  # within both: the nearer bound holds, with either's sinks
            if not bounded:
                return Reach(None, align)
            return Reach(min(r.back for r in bounded), align, max(r.sinks for r in bounded))
        if len(bounded) < 2:  # within either: the farther
            return Reach(None, align)
        return Reach(max(left.back, right.back), align, max(left.sinks, right.sinks))
    return None  # a primitive this plan does not know yet: all-gather


def _farthest_window(mask: M.Mask) -> int:
    """The largest reach of any window (``sliding``, ``dilated``, ``chunked``) in ``mask``."""
    if isinstance(mask, M.Not):
        return _farthest_window(mask.operand)
    if isinstance(mask, (M.And, M.Or)):
        return max(_farthest_window(mask.left), _farthest_window(mask.right))
    reach = mask_reach(mask)
    return reach.back if reach is not None and reach.back is not None else 0


def pattern_reach(checked: M.CheckedPattern) -> Reach | None:
    """The reach of a pattern made of masks only (gated or not), or None where the halo
    plan does not apply (a compress or select branch, an unbounded or shift-variant mask).
    With sinks, ``back`` is at least the farthest window's reach (see the module's note)."""
    reaches = [mask_reach(b.mask) if isinstance(b, M.MaskBranch) else None for b in checked.branches]
    if any(r is None or r.back is None for r in reaches):
        return None
    back, sinks = max(r.back for r in reaches), max(r.sinks for r in reaches)
    if sinks:
        back = max(back, *(_farthest_window(b.mask) for b in checked.branches))
    return Reach(back, math.lcm(*(r.align for r in reaches)), sinks)


@dataclass(frozen=True)
class Piece:
    """Positions ``lo`` .. ``hi - 1`` of one chunk's keys, held by rank ``owner``."""

    owner: int
    lo: int
    hi: int


def chunk_keys(length: int, world: int, rank: int, layout: str, reach: Reach) -> list[list[Piece]]:
    """For each of ``rank``'s chunks, the pieces of keys it attends over, in position
    order: the first ``reach.sinks`` keys (rounded up to the ``reach.align`` grid) where the
    halo starts after them, then from the halo's start (``reach.back`` before the chunk,
    rounded down to the grid) to the chunk's end, split by the ranks that hold them."""
    owners = sorted((start, stop, r) for r in range(world) for start, stop in sequence_chunks(length, world, r, layout))

    def pieces(first: int, stop: int) -> list[Piece]:
        return [Piece(r, max(lo, first), min(hi, stop)) for lo, hi, r in owners if lo < stop and hi > first]

    sinks = -(-reach.sinks // reach.align) * reach.align
    plan = []
    for start, stop in sequence_chunks(length, world, rank, layout):
        first = max(0, (start - reach.back) // reach.align * reach.align)
        if sinks and first > sinks:  # the first keys, then the halo
            plan.append(pieces(0, sinks) + pieces(first, stop))
        else:  # the halo alone, or (where it starts among the sinks) the whole prefix
            plan.append(pieces(0 if sinks else first, stop))
    return plan


def _local_offset(length: int, world: int, rank: int, layout: str, position: int) -> int:
    """Where absolute ``position`` lies in ``rank``'s shard (its chunks concatenated)."""
    offset = 0
    for start, stop in sequence_chunks(length, world, rank, layout):
        if start <= position < stop:
            return offset + position - start
        offset += stop - start
    raise ValueError(f"position {position} is not on rank {rank}")


def halo_plans(length: int, world: int, layout: str, reach: Reach) -> list[list[list[Piece]]]:
    """rank -> chunk -> the pieces it attends over (:func:`chunk_keys`), for every rank."""
    return [chunk_keys(length, world, r, layout, reach) for r in range(world)]


def transfers(plans: list[list[list[Piece]]]) -> list[tuple[int, int, Piece]]:
    """Every (needer, chunk index, piece) of ``plans`` (rank -> chunk -> pieces) that
    another rank holds, in one order all ranks derive from the same plans."""
    return [
        (needer, index, piece)
        for needer, chunks in enumerate(plans)
        for index, pieces in enumerate(chunks)
        for piece in pieces
        if piece.owner != needer
    ]


def split_by_owner(intervals: list[tuple[int, int]], length: int, world: int, layout: str) -> list[Piece]:
    """The positions of ``intervals`` (any order, overlapping or not), merged and split
    into pieces by the ranks that hold them, in position order."""
    merged: list[list[int]] = []
    for lo, hi in sorted(i for i in intervals if i[0] < i[1]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    owners = sorted((start, stop, r) for r in range(world) for start, stop in sequence_chunks(length, world, r, layout))
    return [Piece(r, max(a, lo), min(b, hi)) for lo, hi in merged for a, b, r in owners if a < hi and b > lo]


def without(intervals: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
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


def _post(batches: list[list[tuple]], group) -> list[list]:
    """Post each batch of messages (isend or irecv, peer, tensor, tag) of this rank as one
    ``batch_isend_irecv`` (on NCCL one group, so that two ranks that both send first do
    not wait for each other's receive), in order; each batch's requests (NCCL gives one
    for a whole batch, gloo one per message). Every rank posts its batches in one order,
    which is how NCCL matches messages; gloo matches them by tag."""
    return [dist.batch_isend_irecv([dist.P2POp(op, tensor, dist.get_global_rank(group, peer), group=group, tag=tag)
                                    for op, peer, tensor, tag in batch]) if batch else []
            for batch in batches]  # fmt: skip


def _numbered(planned: list[tuple[int, int, Piece]], tag: int) -> list[tuple[int, int, Piece, int]]:
    """``planned`` with each transfer's gloo tag: ``tag`` plus its number among the
    transfers between the same two ranks, which both of them count alike. A gradient goes
    back with its piece's tag, in the other direction."""
    counts: dict[tuple[int, int], int] = {}
    numbered = []
    for needer, index, piece in planned:
        n = counts.get((piece.owner, needer), 0)
        counts[piece.owner, needer] = n + 1
        numbered.append((needer, index, piece, tag + n))
    return numbered


def fetch_halo(x_local: torch.Tensor, group, dim: int, layout: str, reach: Reach) -> list[torch.Tensor]:
    """For each of this rank's chunks, ``x`` at the positions it attends over (halo and
    chunk), assembled from this rank's shard and the pieces other ranks send; no gradient
    (document ids)."""
    plans = halo_plans(x_local.shape[dim] * dist.get_world_size(group), dist.get_world_size(group), layout, reach)
    return fetch_pieces(x_local, group, dim, layout, plans)


def fetch_pieces(x_local: torch.Tensor, group, dim: int, layout: str, plans: list[list[list[Piece]]]) -> list[torch.Tensor]:
    """For each of this rank's chunks, ``x`` at the positions of its pieces in ``plans``
    (rank -> chunk -> pieces, the same on every rank), concatenated in their order: this
    rank's own pieces from its shard, the others' received from their owners; waits for
    every piece at once, and carries no gradient (document ids)."""
    pending = PendingPieces(x_local, group, dim, layout, plans)
    return [pending.chunk(c) for c in range(pending.chunks)]


def post_pieces(tensors: list[torch.Tensor | None], group, dim: int, layout: str, plans: list[list[list[Piece]]],
                order: BackwardOrder, first_tag: int = 0) -> list[PendingPieces | None]:  # fmt: skip
    """:class:`PendingPieces` of each of ``tensors`` (None stays None) by the same
    ``plans``, all in flight at once: each exchange takes tags of its own, from exchange
    number ``first_tag`` on (calls whose exchanges are in flight together, forward or
    backward, start after each other's)."""
    return [PendingPieces(x, group, dim, layout, plans, order, tag=(first_tag + i) << 16) if x is not None else None
            for i, x in enumerate(tensors)]  # fmt: skip


@dataclass
class _Exchange:
    """What one exchange's forward, its chunks' reads and its backward share: the shard's
    shape and where an own piece starts in it, every transfer (needer, chunk index, piece,
    tag), and the requests in flight with the tensors they send or fill."""

    group: object
    dim: int
    rank: int
    shape: torch.Size
    like: torch.Tensor  # the dtype and device of the gradients
    offset: Callable[[Piece], int]
    planned: list[tuple[int, int, Piece, int]]
    batches: dict = field(default_factory=dict)  # chunk index -> the forward's requests
    sent: dict = field(default_factory=dict)  # chunk index -> the copies its batch sends
    returns: dict = field(default_factory=dict)  # chunk index -> (requests, gradients sent, (piece, buffer) received)

    def own(self, x: torch.Tensor, piece: Piece) -> torch.Tensor:
        """This rank's ``piece`` of its shard ``x``."""
        return x.narrow(self.dim, self.offset(piece), piece.hi - piece.lo)


class PendingPieces:
    """:func:`fetch_pieces` with every send and receive posted at once, one batch per
    chunk index c (the pieces of every rank's chunk c), and each batch waited for only
    when :meth:`chunk` reads chunk c, so that attending to one chunk overlaps the transfers
    of the next (on NCCL a wait makes the current stream wait, not the host). Exchanges in
    flight together need distinct tags: one takes ``tag`` to ``tag`` + its number of pieces.

    With ``order`` the pieces are differentiable, and the backward overlaps too: each
    chunk's read gives its pieces through :class:`_ReturnChunk`, whose backward posts
    their gradients to their owners as soon as that chunk's backward has them, without
    waiting; the exchange's own backward (:class:`_PostPieces`), which autograd reaches
    only after every chunk's, waits for them all and adds what came back to the shard's
    gradient. So the second chunk's gradients travel while the first chunk's backward
    runs. Without ``order``, or for a shard that needs no gradient (ranks agree on which
    do, as they run the same code), no gradient and no backward traffic."""

    def __init__(self, x_local: torch.Tensor, group, dim: int, layout: str, plans: list[list[list[Piece]]],
                 order: BackwardOrder | None = None, tag: int = 0) -> None:  # fmt: skip
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        length = x_local.shape[dim] * world
        # A shard that needs no gradient posts no gradients back: a _ReturnChunk would
        # post them, and no _PostPieces (which waits) would be in the graph.
        order = order if x_local.requires_grad else None
        self._x = x_local if order is not None else x_local.detach()
        self._rank, self._mine, self._order = rank, plans[rank], order
        self.chunks = len(self._mine)
        self._exchange = _Exchange(group, dim, rank, x_local.shape, x_local.new_empty(0),
                                   lambda piece: _local_offset(length, world, rank, layout, piece.lo),
                                   _numbered(transfers(plans), tag))  # fmt: skip
        self._handle, *buffers = _PostPieces.apply(self._x, self._exchange, self.chunks)
        mine = [(index, p) for needer, index, p, _ in self._exchange.planned if needer == rank]
        self._received = dict(zip(mine, buffers))

    def chunk(self, index: int) -> torch.Tensor:
        """This rank's chunk ``index``, read once: its pieces concatenated, after waiting for
        batch ``index`` (which also carries this rank's pieces of other ranks' chunk ``index``)."""
        exchange = self._exchange
        for request in exchange.batches.pop(index, []):
            request.wait()
        exchange.sent.pop(index, None)  # the copies sent in that batch may go
        pieces = self._mine[index]
        received = [self._received.pop((index, p)) for p in pieces if p.owner != self._rank]
        if self._order is not None:  # every rank, every chunk, in one order: the gradients' posts follow it
            self._order.token, *received = _ReturnChunk.apply(exchange, index, self._order.token, self._handle, *received)
        if not pieces:
            return _empty_like_piece(self._x, exchange.dim, Piece(self._rank, 0, 0))
        received = iter(received)
        return torch.cat([exchange.own(self._x, p) if p.owner == self._rank else next(received) for p in pieces],
                         exchange.dim)  # fmt: skip


class _PostPieces(torch.autograd.Function):
    """A handle, then the pieces this rank receives, as outputs that the posted receives
    fill after the forward returns (``exchange.batches[c]`` holds chunk index c's
    requests); this rank's own pieces are read from its shard by the caller. Every chunk's
    :class:`_ReturnChunk` takes the handle, so the backward runs after all of theirs (on a
    rank that receives nothing too): it waits for the gradients they posted and adds those
    of this rank's pieces to its shard's gradient. It posts nothing, so it takes no token
    of the :class:`BackwardOrder`: autograd may run it whenever the chunks' are done."""

    @staticmethod
    def forward(ctx, x_local, exchange: _Exchange, chunks: int):
        ctx.exchange = exchange
        ctx.set_materialize_grads(False)  # the pieces' gradients went back in _ReturnChunk: none to make here
        sent = {c: [] for c in range(chunks)}  # (every rank has as many chunks)
        received = {c: [] for c in range(chunks)}
        buffers = []
        for needer, index, p, tag in exchange.planned:
            if p.owner == exchange.rank:
                sent[index].append((dist.isend, needer, exchange.own(x_local, p).contiguous(), tag))
            if needer == exchange.rank:
                buffers.append(_empty_like_piece(x_local, exchange.dim, p))
                received[index].append((dist.irecv, p.owner, buffers[-1], tag))
        exchange.batches.update(enumerate(_post([sent[c] + received[c] for c in range(chunks)], exchange.group)))
        exchange.sent.update(sent)  # each batch's copies, alive until it is done
        return (x_local.new_zeros((), dtype=torch.float32), *buffers)

    @staticmethod
    def backward(ctx, *grads):
        exchange = ctx.exchange
        grad_local = None
        for index in sorted(exchange.returns):
            requests, _, returned = exchange.returns.pop(index)
            for request in requests:
                request.wait()
            for p, buffer in returned:
                grad_local = exchange.like.new_zeros(exchange.shape) if grad_local is None else grad_local
                exchange.own(grad_local, p).add_(buffer)
        return grad_local, None, None


class _ReturnChunk(torch.autograd.Function):
    """The pieces this rank received for chunk index c, as they are, and the next token;
    the backward posts chunk index c's gradients (this rank's received pieces' to their
    owners, and the receives of its own pieces' from the ranks that read them) as one
    batch, and leaves the wait to :class:`_PostPieces`' backward. The token makes every
    rank post these batches in one order (NCCL matches messages by order)."""

    @staticmethod
    def forward(ctx, exchange: _Exchange, index: int, token, handle, *received):
        ctx.exchange, ctx.index = exchange, index
        return (token.clone(), *received)

    @staticmethod
    def backward(ctx, grad_token, *grads):
        exchange, index, rank = ctx.exchange, ctx.index, ctx.exchange.rank
        mine = [(needer, p, tag) for needer, c, p, tag in exchange.planned if c == index]
        received = [(p, tag) for needer, p, tag in mine if needer == rank]  # in the order chunk() gave them
        sends = [(dist.isend, p.owner, grad.contiguous(), tag) for (p, tag), grad in zip(received, grads)]
        returned = [(needer, p, tag, exchange.like.new_empty(_piece_shape(exchange.shape, exchange.dim, p)))
                    for needer, p, tag in mine if p.owner == rank]  # fmt: skip
        receives = [(dist.irecv, needer, buffer, tag) for needer, _, tag, buffer in returned]
        requests = _post([sends + receives], exchange.group)[0]
        exchange.returns[index] = (requests, sends, [(p, buffer) for _, p, _, buffer in returned])  # sends: alive until done
        return None, None, grad_token, None, *(None for _ in grads)


def _piece_shape(shape, dim: int, piece: Piece) -> list[int]:
    shape = list(shape)
    shape[dim] = piece.hi - piece.lo
    return shape


def _empty_like_piece(x: torch.Tensor, dim: int, piece: Piece) -> torch.Tensor:
    return x.new_empty(_piece_shape(x.shape, dim, piece))
