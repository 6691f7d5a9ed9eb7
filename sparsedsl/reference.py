"""The dense reference: any pattern's exact output, computed from its definition.

This is the oracle every kernel is tested against. It materialises each branch's element
mask (and the pooled keys, the block selection and the gates) from the checked pattern,
not from the IR, so the IR and the kernels are checked against an independent reading of
the semantics. Plain PyTorch, float64 by default; rows that see no key give 0, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .frontend import model as M
from .runtime.inputs import CallInputs


# ---------------------------------------------------------------- element masks
def query_positions(Lq: int, Lk: int, device=None) -> torch.Tensor:
    """Absolute positions of the queries: the last ``Lq`` of ``Lk``."""
    return torch.arange(Lk - Lq, Lk, device=device)


def element_mask(
    mask: M.Mask, Lq: int, Lk: int, doc_ids: torch.Tensor | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """The boolean (Lq, Lk) mask, or (B, Lq, Lk) when ``doc_ids`` (B, Lk) is given."""
    device = doc_ids.device if doc_ids is not None else device
    i = query_positions(Lq, Lk, device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    if doc_ids is not None:
        i, j = i[None], j[None]
    return _mask(mask, i, j, doc_ids, Lq, Lk).expand(*((doc_ids.shape[0],) if doc_ids is not None else ()), Lq, Lk)


def _document(mask: M.Document, i, j, doc_ids, Lq, Lk) -> torch.Tensor:
    if doc_ids is None:
        raise ValueError("a document mask needs doc_ids")
    query_docs = doc_ids[:, Lk - Lq :]
    return query_docs[:, :, None] == doc_ids[:, None, :]


def _dilated(mask: M.Dilated, i, j, doc_ids, Lq, Lk) -> torch.Tensor:
    d = i - j
    return (d % mask.dilation == 0) & (d.abs() < mask.window * mask.dilation)


# One entry per mask primitive (the model class of primitives.PRIMITIVES): its element
# mask ``f(mask, i, j, doc_ids, Lq, Lk)`` at query positions ``i`` (a column) and key
# positions ``j`` (a row), written from the semantics, not from the IR. ``i - j`` has the
# grid's shape.
ELEMENT_MASKS: dict[type[M.Atom], Callable[..., torch.Tensor]] = {
    M.Full: lambda m, i, j, *_: torch.ones_like(i - j, dtype=torch.bool),
    M.Causal: lambda m, i, j, *_: j <= i,
    M.Sliding: lambda m, i, j, *_: (i - j).abs() < m.window,
    M.Sink: lambda m, i, j, *_: (j < m.size).expand_as(i - j),
    M.Global: lambda m, i, j, *_: (j < m.size) | (i < m.size),
    M.Chunked: lambda m, i, j, *_: (
        torch.div(i, m.size, rounding_mode="floor") == torch.div(j, m.size, rounding_mode="floor")
    ),
    M.Dilated: _dilated,
    M.Document: _document,
}


def _mask(mask: M.Mask, i, j, doc_ids, Lq, Lk) -> torch.Tensor:
    if isinstance(mask, M.And):
        return _mask(mask.left, i, j, doc_ids, Lq, Lk) & _mask(mask.right, i, j, doc_ids, Lq, Lk)
    if isinstance(mask, M.Or):
        return _mask(mask.left, i, j, doc_ids, Lq, Lk) | _mask(mask.right, i, j, doc_ids, Lq, Lk)
    if isinstance(mask, M.Not):
        return ~_mask(mask.operand, i, j, doc_ids, Lq, Lk)
    element = ELEMENT_MASKS.get(type(mask))
    if element is None:
        raise TypeError(f"not a mask: {mask!r}")
    return element(mask, i, j, doc_ids, Lq, Lk)


def pooled_length(Lk: int, block: int, stride: int) -> int:
    """How many pooled keys a compress branch has over ``Lk`` keys."""
    return max(0, (Lk - block) // stride + 1)


def compressed_mask(branch: M.CompressBranch, Lq: int, Lk: int, device=None) -> torch.Tensor:
    """(Lq, Lc): pooled key ``c`` is visible to query ``i`` once ``c*stride + block - 1 <= i``."""
    i = query_positions(Lq, Lk, device)[:, None]
    c = torch.arange(pooled_length(Lk, branch.block, branch.stride), device=device)[None, :]
    return c * branch.stride + branch.block - 1 <= i


def key_windows(x: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """The windows ``[c*stride, c*stride + block)`` of ``x`` (B, H, L, D) as a
    (B, H, Lc, block, D) view; differentiable (overlapping windows' gradients add up)."""
    B, H, L, D = x.shape
    n = pooled_length(L, block, stride)
    if n == 0:
        return x.new_zeros(B, H, 0, block, D)
    return x[:, :, : (n - 1) * stride + block].unfold(2, block, stride).transpose(-1, -2)


def pool(x: torch.Tensor, block: int, stride: int, how: str) -> torch.Tensor:
    """Mean or max of ``x`` (B, H, L, D) over windows ``[c*stride, c*stride + block)``."""
    windows = key_windows(x, block, stride)
    if how == "mean":
        return windows.mean(-2)
    if how == "max":
        return windows.amax(-2)
    raise ValueError(f"pool {how!r} is computed by its module, not by the reference")


def block_overlap(Lc: int, Lk: int, compress: M.CompressBranch, select_block: int, device=None) -> torch.Tensor:
    """(Lc, Ns) float: 1 where pooled block ``c``'s keys overlap selection block ``s``."""
    n_blocks = -(-Lk // select_block)
    c = torch.arange(Lc, device=device)[:, None]
    s = torch.arange(n_blocks, device=device)[None, :]
    first, last = c * compress.stride, c * compress.stride + compress.block - 1
    return ((first <= s * select_block + select_block - 1) & (last >= s * select_block)).to(torch.float64)


# ---------------------------------------------------------------- attention
@dataclass
class ReferenceResult:
    """The output and what led to it: each branch's output and log-sum-exp (-inf where a
    row sees nothing), each selection as a (B, Hkv, Lq, n_blocks) boolean with the block
    scores it was chosen by (per query row; with ``per=block`` those of the block's first query),
    and the pooled keys and values of each compress branch."""

    out: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)
    lse: dict[str, torch.Tensor] = field(default_factory=dict)
    selections: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def masked_attention(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the keys ``mask`` allows; k and v already have q's heads.

    Returns the output and the log-sum-exp. Written so that empty rows give exactly 0
    and no NaN appears anywhere, gradients included.
    """
    if k.shape[-2] == 0:  # e.g. no pooled key exists yet
        shape = torch.broadcast_shapes(q.shape[:-1], mask.shape[:-1])
        return q.new_zeros(*shape, v.shape[-1]), q.new_full(shape, float("-inf"))
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
    row_max = torch.where(mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device)).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.where(mask, torch.exp(s - row_max), torch.zeros((), dtype=s.dtype, device=s.device))
    total = e.sum(-1, keepdim=True)
    seen = total > 0
    p = e / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, row_max + torch.log(torch.where(seen, total, torch.ones_like(total))), float("-inf"))
    return torch.matmul(p, v), lse.squeeze(-1)


def attention(
    checked: M.CheckedPattern,
    inputs: CallInputs,
    dtype: torch.dtype = torch.float64,
    selections: dict[str, torch.Tensor] | None = None,
) -> ReferenceResult:
    """The exact output of ``checked`` on validated ``inputs``, computed in ``dtype``.

    ``selections`` may impose a select branch's (B, Hkv, Lq, n_blocks) choice instead of
    the one the scores make (to check attention over a kernel's choice on its own).

    A pattern that works within documents runs on every document of the packed batch as a
    sequence of its own; its selections and scores then number blocks as the aligned
    layout does (``inputs.layout``), and ``pooled`` is not filled. (Without a layout the
    inputs are one document, as a KV cache passes them.)"""
    if checked.packed and inputs.layout is not None:
        return _packed_attention(checked, inputs, dtype, selections)
    q = inputs.q.to(dtype)
    B, Hq, Lq, D = q.shape
    Lk = inputs.k.shape[2]

    def keys_values(branch):  # the branch's own keys and values, or the shared ones
        return (t.to(dtype) for t in inputs.kv(branch.name))

    group = inputs.group
    result = ReferenceResult(out=q.new_zeros(B, Hq, Lq, D))
    probabilities: dict[str, torch.Tensor] = {}

    def heads(x):  # (B, Hkv, ...) -> (B, Hq, ...): each query head reads its group's KV head
        return x.repeat_interleave(group, dim=1)

    for compress in checked.compress_branches():
        if compress.name in inputs.pooled:  # learned pooling, or pooled keys given (context parallelism)
            kc, vc = (t.to(dtype) for t in inputs.pooled[compress.name])
        else:
            k, v = keys_values(compress)
            kc, vc = pool(k, compress.block, compress.stride, compress.pool), pool(v, compress.block, compress.stride, compress.pool)
        mask = compressed_mask(compress, Lq, Lk, q.device)
        out, lse = masked_attention(q, heads(kc), heads(vc), mask, inputs.scale)
        result.pooled[compress.name] = (kc, vc)
        result.branches[compress.name], result.lse[compress.name] = out, lse
        # The probabilities a selection is scored with (recomputed from the log-sum-exp).
        s = torch.matmul(q, heads(kc).transpose(-1, -2)) * inputs.scale
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probabilities[compress.name] = torch.where(mask, torch.exp(s - finite_lse[..., None]), 0.0).detach()

    for branch in checked.branches:
        k, v = keys_values(branch)
        if isinstance(branch, M.MaskBranch):
            mask = element_mask(branch.mask, Lq, Lk, inputs.doc_ids, q.device)
            if mask.dim() == 3:
                mask = mask[:, None]
            result.branches[branch.name], result.lse[branch.name] = masked_attention(q, heads(k), heads(v), mask, inputs.scale)
        elif isinstance(branch, M.SelectBranch):
            selected, result.scores[branch.name] = select_blocks(branch, probabilities[branch.score.name], Lq, Lk, group)
            if selections is not None and branch.name in selections:
                selected = selections[branch.name]
            result.selections[branch.name] = selected
            keys = torch.arange(Lk, device=q.device)
            mask = selected[..., keys // branch.block] & (keys[None, :] <= query_positions(Lq, Lk, q.device)[:, None])
            result.branches[branch.name], result.lse[branch.name] = masked_attention(
                q, heads(k), heads(v), heads(mask), inputs.scale
            )

    outputs = [result.branches[b.name] for b in checked.branches]
    if checked.gated:
        gates = inputs.gates.to(dtype)
        result.out = sum(gates[..., n, None] * out for n, out in enumerate(outputs))
    else:
        result.out = outputs[0]
    return result


def _packed_attention(checked: M.CheckedPattern, inputs: CallInputs, dtype, selections) -> ReferenceResult:
    q, layout = inputs.q, inputs.layout
    B, Hq, L, D = q.shape
    Hkv = inputs.k.shape[1]
    result = ReferenceResult(out=q.new_zeros(B, Hq, L, D, dtype=dtype))
    selects = [b for b in checked.branches if isinstance(b, M.SelectBranch)]
    for branch in checked.branches:
        result.branches[branch.name] = q.new_zeros(B, Hq, L, D, dtype=dtype)
        result.lse[branch.name] = q.new_full((B, Hq, L), float("-inf"), dtype=dtype)
    for branch in selects:
        n_blocks = -(-layout.length // branch.block)
        result.selections[branch.name] = torch.zeros(B, Hkv, L, n_blocks, dtype=torch.bool, device=q.device)
        result.scores[branch.name] = q.new_full((B, Hkv, L, n_blocks), float("-inf"), dtype=dtype)
    starts = torch.ones_like(inputs.doc_ids, dtype=torch.bool)
    starts[:, 1:] = inputs.doc_ids[:, 1:] != inputs.doc_ids[:, :-1]
    for b in range(B):
        bounds = [*torch.nonzero(starts[b]).flatten().tolist(), L]
        for s, e in zip(bounds[:-1], bounds[1:]):
            aligned = int(layout.position[b, s])  # where the document starts on the grid
            pooled = {}
            for c in checked.compress_branches():
                if c.pool == "mlp":
                    first = aligned // c.stride
                    count = pooled_length(e - s, c.block, c.stride)
                    pooled[c.name] = tuple(t[b : b + 1, :, first : first + count] for t in inputs.pooled[c.name])
            doc = CallInputs(
                *(t[b : b + 1, :, s:e] for t in (inputs.q, inputs.k, inputs.v)),
                inputs.scale,
                inputs.gates[b : b + 1, :, s:e] if inputs.gates is not None else None,
                torch.zeros(1, e - s, dtype=torch.int64, device=q.device),
                pooled,
                branch_kv={name: tuple(t[b : b + 1, :, s:e] for t in kv) for name, kv in inputs.branch_kv.items()},
            )
            imposed = {  # the document's rows and blocks of imposed selections
                branch.name: selections[branch.name][b : b + 1, :, s:e, aligned // branch.block :][..., : -(-(e - s) // branch.block)]
                for branch in selects
                if selections is not None and branch.name in selections
            }
            part = attention(replace(checked, branches=_within_sequence(checked.branches)), doc, dtype, imposed)
            result.out[b, :, s:e] = part.out[0]
            for name in part.branches:
                if name in result.branches:
                    result.branches[name][b, :, s:e] = part.branches[name][0]
                    result.lse[name][b, :, s:e] = part.lse[name][0]
            for branch in selects:
                first = aligned // branch.block
                width = part.scores[branch.name].shape[-1]
                result.selections[branch.name][b, :, s:e, first : first + width] = part.selections[branch.name][0]
                result.scores[branch.name][b, :, s:e, first : first + width] = part.scores[branch.name][0]
    return result


def _within_sequence(branches: tuple[M.Branch, ...]) -> tuple[M.Branch, ...]:
    """The branches as they act on one document alone."""
    def alone(branch):
        if isinstance(branch, M.CompressBranch):
            return replace(branch, within="sequence")
        if isinstance(branch, M.SelectBranch):
            return replace(branch, score=alone(branch.score))
        return branch

    return tuple(alone(b) for b in branches)


def select_blocks(
    branch: M.SelectBranch, p_cmp: torch.Tensor, Lq: int, Lk: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query group selects, (B, Hkv, Lq, n_blocks) boolean, and the scores
    they were ranked by (per row; with ``per="block"`` those of the query block's first
    row): +inf for forced blocks, -inf for blocks after the query.

    The score of block ``s`` is the compressed-attention probability of every pooled block
    overlapping it, summed over those pooled blocks and over the query heads of the group
    (with ``per="block"``, the block's first query in the call chooses for all its queries,
    so that no query's blocks depend on a later one). The first
    ``keep_first`` blocks and the ``keep_local`` most recent ones are forced; only blocks
    starting at or before the query (block) count; ties go to the lower block.
    """
    B, Hq, _, Lc = p_cmp.shape
    overlap = block_overlap(Lc, Lk, branch.score, branch.block, p_cmp.device).to(p_cmp.dtype)
    scores = torch.matmul(p_cmp, overlap)  # (B, Hq, Lq, Ns)
    scores = scores.view(B, Hq // group, group, Lq, -1).sum(2)
    own = torch.div(query_positions(Lq, Lk, p_cmp.device), branch.block, rounding_mode="floor")
    chosen, ranked = _choose(branch, scores, own)
    if branch.per == "block":  # every query of a block takes the choice of the block's first
        # Rows' blocks are consecutive: the first row of each row's block, from shapes alone
        # (no look at values, which keeps torch.compile from breaking the graph here).
        first = torch.clamp(own * branch.block - (Lk - Lq), min=0)
        return chosen[:, :, first], ranked[:, :, first]
    return chosen, ranked


def _choose(branch: M.SelectBranch, scores: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (B, Hkv, units, Ns) ``scores`` for units whose own block is ``own``, and
    the scores as ranked: +inf for forced blocks, -inf for ineligible ones."""
    s = torch.arange(scores.shape[-1], device=scores.device)[None, :]
    own = own[:, None]
    eligible = s <= own
    forced = eligible & ((s < branch.keep_first) | (s > own - branch.keep_local))
    ranked = torch.where(forced, float("inf"), torch.where(eligible, scores, float("-inf")))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., : branch.topk]
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, order, True)
    return chosen & eligible, ranked
