"""What a pattern costs at a sequence length, computed from its block IR: the keys each
query reads, the density against dense causal attention, the attention FLOPs and the K/V
bytes one decode step reads.

The unit is *keys read*: for one sequence and one query head, query ``i`` of a length-``L``
sequence (queries = keys, ``i = 0..L-1``) reads

- over raw keys (a mask branch): the keys its mask lets it see, counted per row from the
  IR's segments (each gives the key interval ``[keys_lo(i), keys_hi(i)]``; a union is the
  union of the intervals), exactly;
- over pooled keys (a compress branch): the pooled keys it sees, counted the same way,
  each pooled key one key;
- a select branch: the keys of its chosen blocks up to the query itself:
  ``min(topk, b + 1)`` blocks of ``block`` keys where ``b = i // block`` is the query's own
  block, of which the own block counts ``i % block + 1`` keys. The own block is always
  chosen when ``keep_local >= 1``; with ``keep_local = 0`` the count is an upper bound
  (``exact`` is then false).

Patterns that use ``document`` are costed as one document spanning the sequence. A mask
the IR describes by a hull (a dilated window) is counted on the element mask instead: every
row up to 4096 positions, else 1024 evenly spaced rows (then ``exact`` is false).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from .. import reference
from ..frontend import model as M
from ..ir.evaluate import (
    _ARGUMENTS as FORMULA_ARGUMENTS,  # the IR formulas' argument names
)
from ..ir.evaluate import key_count
from ..ir.expressions import ExpressionPrinter
from ..ir.nodes import BranchIR, SelectedBlocks, StaticBlocks
from ..pattern import Pattern

# Mask rows counted one by one up to this length; beyond, a sample of rows.
EXACT_ROWS_LIMIT = 4096
SAMPLED_ROWS = 1024

ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Shape:
    """The attention the costs are for: batch, query heads, K/V heads, head dim, dtype."""

    batch: int = 1
    heads: int = 64
    kv_heads: int = 4
    head_dim: int = 128
    dtype: str = "bfloat16"

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]


@dataclass(frozen=True)
class BranchCost:
    """The keys one branch reads at one length, for one sequence and one query head.

    ``pairs`` sums the keys over all query rows; ``last_row`` is what the query at
    position ``L - 1`` reads (a decode step); ``output`` is false for a compress branch
    that only scores a selection."""

    name: str
    kind: str  # "mask", "compress", "select"
    pairs: int
    last_row: int
    exact: bool
    output: bool


def causal_pairs(seq: int) -> int:
    """The (query, key) pairs of dense causal attention over ``seq`` positions."""
    return seq * (seq + 1) // 2


def branch_costs(pattern: Pattern, seq: int) -> tuple[BranchCost, ...]:
    """Every branch's keys read at length ``seq``: output branches first, then compress
    branches that only score a selection."""
    if seq < 1:
        raise ValueError(f"seq must be positive, got {seq}")
    checked = {b.name: b for b in pattern.checked.compress_branches()}
    checked.update({b.name: b for b in pattern.checked.branches})
    costs = []
    for branch in pattern.ir.branches:
        model = checked[branch.name]
        if isinstance(branch.blocks, SelectedBlocks):
            counts, exact = select_row_counts(branch.blocks, seq), branch.blocks.keep_local >= 1
            kind = "select"
        else:
            counts, exact = static_row_counts(branch, model, seq)
            kind = "compress" if isinstance(model, M.CompressBranch) else "mask"
        pairs = _total(counts, seq)
        costs.append(BranchCost(branch.name, kind, pairs, int(counts[-1]), exact, branch.output))
    return tuple(costs)


def _total(counts: torch.Tensor, seq: int) -> int:
    """The sum over all ``seq`` rows, from every row or from evenly spaced sampled rows."""
    if len(counts) == seq:
        return int(counts.sum())
    return round(float(counts.double().mean()) * seq)


def select_row_counts(blocks: SelectedBlocks, seq: int) -> torch.Tensor:
    """(seq,) keys a selection reads per query row (see the module's definition)."""
    i = torch.arange(seq, dtype=torch.int64)
    own = i // blocks.block
    chosen = torch.clamp(own + 1, max=blocks.topk)
    if blocks.keep_local >= 1:  # the own block is forced: it is one of the chosen
        return (chosen - 1) * blocks.block + i % blocks.block + 1
    # Otherwise the own block may lose to a full one: at most `topk` whole blocks.
    return torch.where(own + 1 <= blocks.topk, i + 1, blocks.topk * blocks.block)


def static_row_counts(branch: BranchIR, model: M.Branch, seq: int) -> tuple[torch.Tensor, bool]:
    """Keys a mask or compress branch reads per query row, and whether every row was
    counted exactly: from the IR's segments when all are exact, else from the element mask
    (all rows, or a sample of rows for long sequences)."""
    assert isinstance(branch.blocks, StaticBlocks)
    if all(s.exact for s in branch.blocks.segments):
        counts = _segment_counts(branch, seq)
        if counts is not None:
            return counts, True
    if not isinstance(model, M.MaskBranch):  # pragma: no cover - compress segments are exact
        raise ValueError(f"branch `{branch.name}` has no closed-form key count")
    return _mask_counts(model.mask, seq)


def _bound(expr: sympy.Basic):
    """A function of the formula environment computing one segment bound for a vector
    of rows (the IR printer's Python code, with element-wise min and max), ±inf allowed."""
    if expr in (sympy.oo, -sympy.oo):
        value = float(expr)
        return lambda env: value
    code = ExpressionPrinter("python")(expr)
    functions = {"__builtins__": {}, "min": _elementwise(torch.minimum), "max": _elementwise(torch.maximum), "abs": abs}
    formula = eval(f"lambda {', '.join(FORMULA_ARGUMENTS)}: {code}", functions)  # noqa: S307 - IR-generated
    return lambda env: formula(**env)


def _elementwise(op):
    def apply(*args):
        values = [torch.as_tensor(a, dtype=torch.float64) for a in args]
        result = values[0]
        for value in values[1:]:
            result = op(result, value)
        return result

    return apply


def _segment_counts(branch: BranchIR, seq: int) -> torch.Tensor | None:
    """Per-row counts as the union of the segments' key intervals, or None where a bound
    cannot be evaluated on vectors of rows."""
    n_keys = key_count(branch, seq)
    rows = torch.arange(seq, dtype=torch.float64)
    env = dict.fromkeys(FORMULA_ARGUMENTS)
    # Queries are the keys (Lq = Lk = seq), all of one document.
    env.update(i=rows, Lk=seq, Lq=seq, off=0, doc_start=lambda t: 0 * t, doc_end=lambda t: 0 * t + seq - 1)
    los, his = [], []
    try:
        for s in branch.blocks.segments:
            rows_lo, rows_hi, keys_lo, keys_hi = (
                torch.as_tensor(_bound(getattr(s, name))(env), dtype=torch.float64).expand(seq)
                for name in ("rows_lo", "rows_hi", "keys_lo", "keys_hi")
            )
            lo, hi = keys_lo.clamp(min=0), keys_hi.clamp(max=n_keys - 1)
            empty = (rows < rows_lo) | (rows > rows_hi) | (lo > hi)
            los.append(torch.where(empty, float(n_keys), lo))  # an empty interval sorts last
            his.append(torch.where(empty, float(n_keys) - 1, hi))
    except (TypeError, ValueError, RuntimeError):  # pragma: no cover - a bound not printable or not vectorisable
        return None
    return _union_lengths(torch.stack(los, -1), torch.stack(his, -1))


def _union_lengths(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """For each row of (rows, k) closed intervals [lo, hi] (empty where hi < lo): how
    many integers they cover together."""
    lo, order = lo.sort(-1)
    hi = hi.gather(-1, order)
    total = torch.zeros(lo.shape[0], dtype=torch.float64)
    reach = torch.full_like(total, -1.0)
    for n in range(lo.shape[1]):
        start = torch.maximum(lo[:, n], reach + 1)
        total += (hi[:, n] - start + 1).clamp(min=0)
        reach = torch.maximum(reach, hi[:, n])
    return total.round().long()


def _mask_counts(mask: M.Mask, seq: int) -> tuple[torch.Tensor, bool]:
    """Per-row counts from the element mask: every row, or evenly spaced rows (always
    including the last) for sequences longer than ``EXACT_ROWS_LIMIT``."""
    exact = seq <= EXACT_ROWS_LIMIT
    rows = torch.arange(seq) if exact else torch.linspace(0, seq - 1, SAMPLED_ROWS).round().long()
    mask = _one_document(mask)
    keys = torch.arange(seq)[None, :]
    counts = []
    for chunk in rows.split(max(1, (1 << 22) // seq)):  # about 4M elements at a time
        # The reference's element predicate at arbitrary rows (its public element_mask
        # takes the last rows only).
        counts.append(reference._mask(mask, chunk[:, None], keys, None, seq, seq).sum(-1))
    return torch.cat(counts), exact


def _one_document(mask: M.Mask) -> M.Mask:
    """``mask`` with ``document`` as one document spanning the sequence (every pair)."""
    if isinstance(mask, M.Document):
        return M.Full()
    if isinstance(mask, (M.And, M.Or)):
        return type(mask)(_one_document(mask.left), _one_document(mask.right))
    if isinstance(mask, M.Not):
        return M.Not(_one_document(mask.operand))
    return mask


# ---------------------------------------------------------------- the analytic columns
def analytic_columns(pattern: Pattern, seq: int, shape: Shape) -> dict:
    """The columns ``sparsedsl explore`` computes without running anything (see
    :data:`sparsedsl.tools.explore.COLUMNS` for their definitions)."""
    costs = branch_costs(pattern, seq)
    dense = causal_pairs(seq)
    output = [c for c in costs if c.output]
    pairs = sum(c.pairs for c in output)
    D, heads = shape.head_dim, shape.batch * shape.heads
    by_name = {c.name: c for c in costs}
    # Forward: 4 D per (query, key) pair (QK^T and PV) for every branch that runs, scoring
    # compress branches included; a selection also recomputes its score branch's
    # probabilities (2 D per pair). Backward: 10 D per pair of output branches (QK^T
    # again, dV, dP, dQ, dK); selections and scores take no gradient.
    forward = 4 * D * sum(c.pairs for c in costs)
    forward += sum(2 * D * by_name[b.blocks.score].pairs for b in pattern.ir.branches if isinstance(b.blocks, SelectedBlocks))
    backward = 10 * D * pairs
    # A decode step reads the K and V of every key each branch reads at the last position.
    tokens = sum(c.last_row for c in costs)
    step_bytes = 2 * D * shape.element_bytes * shape.batch * shape.kv_heads
    return {
        **dense_columns(seq, shape),
        "density": pairs / dense,
        "branch_density": {c.name: c.pairs / dense for c in output},
        "keys_per_query": pairs / seq,
        "exact": all(c.exact for c in costs),
        "fwd_gflop": forward * heads / 1e9,
        "bwd_gflop": backward * heads / 1e9,
        "decode_tokens": tokens,
        "decode_kv_bytes": tokens * step_bytes,
    }


def dense_columns(seq: int, shape: Shape) -> dict:
    """The analytic columns of dense causal attention itself (the same counts as above)."""
    D, heads, dense = shape.head_dim, shape.batch * shape.heads, causal_pairs(seq)
    return {
        "dense_fwd_gflop": 4 * D * dense * heads / 1e9,
        "dense_bwd_gflop": 10 * D * dense * heads / 1e9,
        "dense_decode_kv_bytes": seq * 2 * D * shape.element_bytes * shape.batch * shape.kv_heads,
    }
