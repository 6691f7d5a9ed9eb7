"""A sequence split across the ranks of a process group: which positions each rank holds,
and the two moves between a full tensor and a rank's part of it.

``zigzag`` splits the sequence into 2W equal chunks and gives rank r chunks r and
2W-1-r, so that every rank has as much causal work as any other (an early chunk sees few
keys, its partner many); ``contiguous`` gives rank r chunk r of W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import InputError

LAYOUTS = ("zigzag", "contiguous")
PLANS = ("auto", "all-gather")  # a call's `cp_plan`: the plan its branches call for, or the all-gather


def check_cp_options(cp_layout: str, cp_plan: str, pattern=None, names: tuple[str, str] = ("cp_layout", "cp_plan")) -> None:
    """An InputError, naming the argument (``names``), for a ``cp_layout`` or ``cp_plan``
    that is not one of the known ones, or (``pattern``) a plan its branches cannot take;
    checked with or without ``cp_group``."""
    if cp_layout not in LAYOUTS:
        raise InputError(f"`{names[0]}` {cp_layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    if cp_plan not in PLANS:
        raise InputError(f"`{names[1]}` {cp_plan!r}: expected one of {', '.join(map(repr, PLANS))}")
    if pattern is not None and pattern.checked.packed and cp_plan != "auto":
        raise InputError(f"pattern `{pattern.name}` is packed (compress within=document): only the packed plan "
                         f"serves it, so use cp_plan='auto', not {cp_plan!r}")  # fmt: skip


def sequence_chunks(length: int, world: int, rank: int, layout: str = "zigzag") -> list[tuple[int, int]]:
    """The (start, stop) position ranges rank ``rank`` of ``world`` holds, in order."""
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")
    pieces = 2 * world if layout == "zigzag" else world
    if length % pieces:
        raise InputError(
            f"a sequence of {length} positions does not split into {pieces} equal chunks ({layout} layout over "
            f"{world} ranks): pad it to a multiple of {pieces}"
        )
    size = length // pieces
    chunks = (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)
    return [(c * size, (c + 1) * size) for c in chunks]


def chunk_holders(length: int, world: int, layout: str) -> list[tuple[int, int]]:
    """For each of the sequence's equal chunks, in position order, (rank, index): the rank
    that holds it and where it comes among that rank's chunks."""
    holders = {start: (r, i) for r in range(world) for i, (start, _) in enumerate(sequence_chunks(length, world, r, layout))}
    return [holders[start] for start in sorted(holders)]


def process_group(group, argument: str = "group"):
    """A ProcessGroup from ``group``: None (the default group), a ProcessGroup, or a
    one-dimensional DeviceMesh."""
    if not dist.is_available() or not dist.is_initialized():
        raise InputError(f"`{argument}` needs torch.distributed initialised first (torch.distributed.init_process_group)")
    if group is None:
        return dist.group.WORLD
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise InputError(f"`{argument}`: a DeviceMesh of {group.ndim} dimensions; pass a one-dimensional one (mesh['cp'])")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise InputError(f"`{argument}` must be a ProcessGroup or a one-dimensional DeviceMesh, got {type(group).__name__}")
    return group


def shard_sequence(x: torch.Tensor, group=None, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` along ``dim`` (its chunks, concatenated)."""
    group = process_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = sequence_chunks(x.shape[dim], world, rank, layout)
    return torch.cat([x.narrow(dim, start, stop - start) for start, stop in chunks], dim)


def gather_sequence(x_local: torch.Tensor, group=None, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's part: the inverse of :func:`shard_sequence`,
    differentiable (each rank's gradient goes back to the rank that holds its part)."""
    group = process_group(group)
    world = dist.get_world_size(group)
    check_same_shapes(x_local, group=group, dim=dim)
    length = x_local.shape[dim] * world
    per_rank = len(sequence_chunks(length, world, 0, layout))
    size = length // (per_rank * world)
    parts = _AllGather.apply(x_local, group, x_local.new_zeros(()))[0].unbind(0)
    pieces: list[torch.Tensor | None] = [None] * (per_rank * world)
    for rank, part in enumerate(parts):
        for (start, _), piece in zip(sequence_chunks(length, world, rank, layout), part.split(size, dim)):
            pieces[start // size] = piece
    return torch.cat(pieces, dim)


class BackwardOrder:
    """Makes the backwards of the exchanges it threads run in the reverse of their forward
    order on every rank. Autograd orders a backward by each rank's own graph; where the
    ranks' graphs differ (a rank that pools no window, a chunk that fetches nothing), two
    ranks could enter different exchanges at once and wait for each other for ever. Each
    node whose backward posts an exchange takes the order's token and gives the next one,
    so its backward needs the next one's done; :meth:`tie` makes an output depend on the
    last token. Nodes that only wait for what they posted need no token: a wait after its
    own post cannot deadlock ranks whose posts follow one order."""

    def __init__(self, like: torch.Tensor) -> None:
        self.token = like.new_zeros((), dtype=torch.float32).requires_grad_()

    def tie(self, out: torch.Tensor) -> torch.Tensor:
        return out + (self.token * 0).to(out.dtype)


class _AllGather(torch.autograd.Function):
    """Every rank's ``x`` stacked (W, *x.shape), and the next token of a
    :class:`BackwardOrder`; the backward sums each part's gradient over the ranks onto the
    rank that holds it (:func:`_post_sum_to_owners`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, token: torch.Tensor):
        ctx.group = group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts), token.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_token: torch.Tensor):
        work, mine = _post_sum_to_owners(grad, ctx.group)
        work.wait()
        return mine, None, grad_token


def _post_sum_to_owners(grad: torch.Tensor, group) -> tuple:
    """Posts the sum over the ranks of the gradients (W, ...) of every rank's gathered
    parts, and gives (its work, this rank's part, filled once the work is done): a
    reduce-scatter where the backend has one (NCCL); gloo sums everything and keeps its
    own part."""
    grad = grad.contiguous()
    if dist.get_backend(group) == dist.Backend.NCCL:
        mine = torch.empty_like(grad[0])
        return dist.reduce_scatter(mine, list(grad.unbind(0)), group=group, async_op=True), mine
    return dist.all_reduce(grad, group=group, async_op=True), grad[dist.get_rank(group)]


class PendingGather:
    """An all-gather of every rank's ``x`` posted at once (``async_op``) and waited for when
    its parts are first read (:meth:`parts`), so that work between the two overlaps the
    transfer: on NCCL the wait only makes the current stream wait for the collective's.
    Differentiable, and the backward overlaps too: the first read gives the parts through
    :class:`_ReturnParts`, whose backward (in ``order``, once every use of the parts has
    its gradient) posts their sum to the owners without waiting, and the gather's own
    backward (:class:`_PostGather`) waits for it. So the sum of the parts read last (the
    second chunk's) travels while the backward of what came before runs (the first
    chunk's). Every rank must read its gathers first in one order."""

    def __init__(self, x: torch.Tensor, group, order: BackwardOrder) -> None:
        self._posted: dict = {}
        self._group, self._order = group, order
        *self._parts, self._handle = _PostGather.apply(x, group, self._posted)

    def parts(self) -> list[torch.Tensor]:
        """Every rank's ``x``, in rank order (the first call waits for them)."""
        work = self._posted.pop("work", None)
        if work is not None:
            work.wait()
            del self._posted["sent"]
            self._order.token, *self._parts = _ReturnParts.apply(self._posted, self._group, self._order.token, self._handle,
                                                                 *self._parts)  # fmt: skip
        return self._parts


class _PostGather(torch.autograd.Function):
    """Every rank's ``x`` as W outputs that the collective fills after the forward returns
    (``posted["work"]`` says when), then a handle for :class:`_ReturnParts`, so that the
    backward runs after its: it waits for the sum it posted (``posted["sum"]``) and gives
    this rank's part as x's gradient. It posts nothing, so it takes no token."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, posted: dict):
        ctx.posted = posted
        ctx.set_materialize_grads(False)  # the parts' gradients went into posted["sum"]
        posted["waited"] = ctx.needs_input_grad[0]  # else no backward of this node will wait for the sum
        posted["sent"] = x.contiguous()  # alive until the collective is done
        parts = [torch.empty_like(posted["sent"]) for _ in range(dist.get_world_size(group))]
        posted["work"] = dist.all_gather(parts, posted["sent"], group=group, async_op=True)
        return (*parts, x.new_zeros((), dtype=torch.float32))

    @staticmethod
    def backward(ctx, *grads):
        work, mine = ctx.posted.pop("sum")
        work.wait()
        return mine, None, None


class _ReturnParts(torch.autograd.Function):
    """The gathered parts as they are, and the next token of a :class:`BackwardOrder`; the
    backward posts the sum of the parts' gradients to their owners (``posted["sum"]``)
    and leaves the wait to :class:`_PostGather`'s, or waits itself where this rank's ``x``
    needs no gradient (then no :class:`_PostGather` backward runs)."""

    @staticmethod
    def forward(ctx, posted: dict, group, token: torch.Tensor, handle: torch.Tensor, *parts: torch.Tensor):
        ctx.posted, ctx.group = posted, group
        return (token.clone(), *parts)

    @staticmethod
    def backward(ctx, grad_token, *grads):  # (autograd gives zeros for a part no chunk read)
        posted = _post_sum_to_owners(torch.stack(grads), ctx.group)
        if ctx.posted["waited"]:
            ctx.posted["sum"] = posted
        else:  # this rank's x is frozen, but the others' parts still need its gradients: every rank posts
            posted[0].wait()
        return None, None, grad_token, None, *(None for _ in grads)


def check_same_shapes(*parts: torch.Tensor, group, dim: int) -> None:
    """Every rank's part of each of ``parts`` must have one shape (a collective over
    mismatched shapes hangs or fails deep inside the backend): compare them first."""
    for x_local in parts:
        _check_same_shape(x_local, group, dim)


def _check_same_shape(x_local: torch.Tensor, group, dim: int) -> None:
    shape = torch.tensor([x_local.dim(), *x_local.shape, *[0] * (8 - x_local.dim())], dtype=torch.int64, device=x_local.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        described = ", ".join(f"rank {r}: {tuple(s[1 : 1 + int(s[0])].tolist())}" for r, s in enumerate(shapes))
        raise InputError(f"the ranks' shards differ in shape ({described}); every rank must hold an equal part along dim {dim}")
