"""Stage 3 of the pipeline: a checked pattern to the block IR, with sympy doing the algebra.

For a segment (see :mod:`.segments`) and a query block whose real rows sit at positions
``q0 <= i <= q1``, the key positions any row touches are ``[max(L(q0), 0), min(H(q1),
n - 1)]`` and the positions every row sees are ``[max(L(q1), 0), min(H(q0), n - 1)]``,
where ``L``/``H`` are the segment's (non-decreasing) key bounds and ``n`` the number of
keys. Dividing by the key tile ``BK`` gives the touched blocks and, inside them, the full
ones; what lies between is partial. sympy substitutes, simplifies what the facts
``q0 <= q1 <= Lk - 1`` allow, and the results print as closed-form kernel code.
"""

from __future__ import annotations

import sympy

from ..errors import PatternError, SourceFile, Span
from ..frontend import model as M
from ..frontend.kinds import Pool, Within
from . import nodes as N
from .expressions import (
    BK,
    BQ,
    K0,
    K1,
    LK,
    OFF,
    Q0,
    Q1,
    DocStart,
    FloorDiv,
    I,
    J,
    Where,
    ceil_div,
    simplify_with_facts,
)
from .inverse import last_at_most, push_into_where
from .segments import (
    MAX_SEGMENTS,
    Segment,
    TooManySegments,
    mask_predicate,
    mask_segments,
)

# What every query block satisfies, stated for the prover: q1 = q0 + r and
# Lk = q1 + 1 + s, with r, s >= 0.
_R = sympy.Symbol("_r", integer=True, nonnegative=True)
_S = sympy.Symbol("_s", integer=True, nonnegative=True)
_FACTS = {LK: Q0 + _R + 1 + _S, Q1: Q0 + _R}
# Likewise for a key block: k1 = k0 + r (and, over raw keys, Lk = k1 + 1 + s).
# off = Lk - Lq <= Lk - 1 is written off = k0 + r + s - t.
_T = sympy.Symbol("_t", integer=True, nonnegative=True)
_TRANSPOSED_FACTS = {K1: K0 + _R}


def lower_pattern(checked: M.CheckedPattern) -> N.PatternIR:
    """Lower a checked pattern to its block IR."""
    branches: list[N.BranchIR] = []
    for branch in checked.branches:
        branches.append(_lower_branch(branch, checked, output=True))
    output_names = {b.name for b in branches}
    for compress in checked.compress_branches():
        if compress.name not in output_names:
            branches.append(_lower_branch(compress, checked, output=False))
    return N.PatternIR(
        name=checked.name,
        params=checked.params,
        branches=tuple(branches),
        combine=N.Combine.GATE if checked.gated else N.Combine.SINGLE,
        source_name=checked.source_name,
        line=checked.line,
    )


def _lower_branch(branch: M.Branch, checked: M.CheckedPattern, output: bool) -> N.BranchIR:
    if isinstance(branch, M.MaskBranch):
        try:
            segments = mask_segments(branch.mask)
            count = str(len(segments))
        except TooManySegments as exc:
            segments, count = None, f"more than {exc.count}"
        if segments is None or len(segments) > MAX_SEGMENTS:
            raise PatternError(
                f"the mask of branch `{branch.name}` splits into {count} interval pieces "
                f"(at most {MAX_SEGMENTS} are supported)",
                source=SourceFile(checked.source_name, ""),
                span=Span(checked.line, 1, checked.line, 1),
                hint=_pieces_hint(branch.mask),
            )
        return N.BranchIR(
            name=branch.name,
            definition=M.branch_text(branch),
            keys=N.RawKeys(),
            blocks=N.StaticBlocks(tuple(lower_segment(s, LK) for s in segments)),
            predicate=mask_predicate(branch.mask),
            runtime=("doc_ids",) if M.uses_documents(branch.mask) else (),
            output=output,
        )
    if isinstance(branch, M.CompressBranch):
        keys = N.PooledKeys(
            branch.block,
            branch.stride,
            branch.pool,
            length=sympy.Max(0, FloorDiv(LK - branch.block, branch.stride) + 1),
        )
        # Pooled key c is visible once its whole block is in the past: c*stride + block - 1 <= i;
        # within documents, only from the query's document on: c*stride >= doc_start(i).
        last = FloorDiv(I - branch.block + 1, branch.stride)
        predicate = J * branch.stride + branch.block - 1 <= I
        runtime = ("k_cmp", "v_cmp") if branch.pool == Pool.MLP else ()
        if branch.within == Within.DOCUMENT:
            visible = Segment(-sympy.oo, sympy.oo, FloorDiv(DocStart(I) + branch.stride - 1, branch.stride), last)
            predicate = sympy.And(predicate, J * branch.stride >= DocStart(I))
            runtime = ("doc_ids", *runtime)
        else:
            visible = Segment(-sympy.oo, sympy.oo, -sympy.oo, last)
        return N.BranchIR(
            name=branch.name,
            definition=M.branch_text(branch),
            keys=keys,
            blocks=N.StaticBlocks((lower_segment(visible, keys.length),)),
            predicate=predicate,
            runtime=runtime,
            output=output,
        )
    assert isinstance(branch, M.SelectBranch)
    return N.BranchIR(
        name=branch.name,
        definition=M.branch_text(branch),
        keys=N.RawKeys(),
        blocks=N.SelectedBlocks(
            block=branch.block,
            topk=branch.topk,
            keep_first=branch.keep_first,
            keep_local=branch.keep_local,
            score=branch.score.name,
            index=f"{branch.name}_blocks",
            per=branch.per,
        ),
        predicate=J <= I,
        runtime=("doc_ids",) if branch.within == Within.DOCUMENT else (),
        output=output,
    )


def _pieces_hint(mask: M.Mask) -> str:
    if any(isinstance(m, M.Not) for m in _submasks(mask)):
        return "complements (~) of unions multiply; write the mask without nested complements"
    return (
        "every piece of a union is its own range of keys (nested ranges merge: sliding(8) | sliding(16) is "
        "sliding(16)); write the union with fewer distinct ranges"
    )


def _submasks(mask: M.Mask):
    """``mask`` and every mask inside it."""
    stack = [mask]
    while stack:
        m = stack.pop()
        yield m
        stack.extend(getattr(m, f) for f in ("left", "right", "operand") if hasattr(m, f))


def lower_segment(segment: Segment, key_length: sympy.Expr) -> N.KeySegment:
    """The key blocks one segment gives query block [q0, q1], over ``key_length`` keys
    (``Lk``, or a compress branch's pooled length, a function of ``Lk``)."""
    facts = _FACTS

    def simplify(expr):
        return simplify_with_facts(expr, facts)

    def keys_lo(i):
        return segment.keys_lo.subs(I, i)

    def keys_hi(i):
        return segment.keys_hi.subs(I, i)

    first = simplify(sympy.Max(Q0, segment.rows_lo))
    last = simplify(sympy.Min(Q1, segment.rows_hi))
    touch_lo = simplify(sympy.Max(keys_lo(first), 0))
    touch_hi = simplify(sympy.Min(keys_hi(last), key_length - 1))
    start = simplify(FloorDiv(touch_lo, BK))
    touched = simplify(sympy.And(first <= last, touch_lo <= touch_hi))
    stop = simplify(Where(touched, FloorDiv(touch_hi, BK) + 1, start))
    transposed = _transposed_ranges(segment, key_length)
    if not segment.exact:
        return N.KeySegment(*_bounds(segment), False, start, stop, stop, stop, *transposed)

    # Every row sees [L(q1), H(q0)]; a block is full when it lies inside, and only when the
    # segment holds for every row of the query block. Since L(q1) >= L(q0) and
    # H(q0) <= H(q1), these blocks lie inside [start, stop).
    full_lo = simplify(sympy.Max(keys_lo(Q1), 0))
    full_hi = simplify(sympy.Min(keys_hi(Q0), key_length - 1))
    whole_block = simplify(sympy.And(segment.rows_lo <= Q0, Q1 <= segment.rows_hi))
    full_start = simplify(ceil_div(full_lo, BK))
    full_stop = simplify(Where(whole_block, FloorDiv(full_hi + 1, BK), full_start))
    return N.KeySegment(*_bounds(segment), True, start, stop, full_start, full_stop, *transposed)


def _transposed_ranges(segment: Segment, key_length: sympy.Expr) -> tuple[sympy.Expr, ...]:
    """The query blocks that touch, and that fully see, key block [k0, k1]."""
    facts = dict(_TRANSPOSED_FACTS)
    if key_length == LK:
        facts.update({LK: K0 + _R + 1 + _S, OFF: K0 + _R + _S - _T})

    def simplify(expr):
        # Infinite row bounds mean "from the first row" or "none": past the real rows.
        expr = push_into_where(simplify_with_facts(expr, facts)).xreplace({sympy.oo: LK, -sympy.oo: OFF - 1})
        return simplify_with_facts(expr, facts)

    def rows_seeing(j):  # rows i with L(i) <= j <= H(i), as [lo, hi]
        lo = sympy.Max(segment.rows_lo, last_at_most(segment.keys_hi, j - 1) + 1)
        hi = sympy.Min(segment.rows_hi, last_at_most(segment.keys_lo, j))
        return lo, hi

    first_row, last_row = OFF, LK - 1  # the positions real queries have
    touch_lo = simplify(sympy.Max(rows_seeing(K0)[0], first_row))
    touch_hi = simplify(sympy.Min(rows_seeing(K1)[1], last_row))
    q_start = simplify(FloorDiv(touch_lo - OFF, BQ))
    q_stop = simplify(Where(touch_lo <= touch_hi, FloorDiv(touch_hi - OFF, BQ) + 1, q_start))
    if not segment.exact:
        return q_start, q_stop, q_stop, q_stop
    full_lo = simplify(sympy.Max(rows_seeing(K1)[0], first_row))
    full_hi = simplify(rows_seeing(K0)[1])
    query_blocks = FloorDiv(LK - OFF + BQ - 1, BQ)
    # The last query block ends at Lk - 1, wherever its tile would end.
    last_full = Where(last_row <= full_hi, query_blocks, FloorDiv(full_hi + 1 - OFF, BQ))
    whole_key_block = K0 + BK <= key_length
    q_full_start = simplify(ceil_div(full_lo - OFF, BQ))
    q_full_stop = simplify(Where(whole_key_block, last_full, q_full_start))
    return q_start, q_stop, q_full_start, q_full_stop


def _bounds(segment: Segment):
    return segment.rows_lo, segment.rows_hi, segment.keys_lo, segment.keys_hi
