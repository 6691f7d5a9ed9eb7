"""Inverting a segment's key bounds: which query rows see a given key.

The backward pass computes dK and dV per key block, so it walks query blocks; it needs,
for key ``j``, the rows ``i`` with ``L(i) <= j <= H(i)``. For a non-decreasing bound
``f``, ``f(i) <= x`` holds exactly for ``i <= last_at_most(f, x)``, and ``f(i) >= x`` exactly
for ``i > last_at_most(f, x - 1)``. ``last_at_most`` is derived for every bound form
lowering produces (shifts of ``i``, chunk starts, pooled indices, document tables, and
their max/min), so the transposed ranges are closed-form too.
"""

from __future__ import annotations

import sympy

from .expressions import LK, DocEnd, DocStart, FloorDiv, I, Where

oo = sympy.oo


def last_at_most(f: sympy.Expr, x: sympy.Expr) -> sympy.Expr:
    """``max{i : f(i) <= x}`` for a non-decreasing ``f`` of ``i`` (``+oo``: every row,
    ``-oo``: none). ``x`` is a key position or one less, so ``-1 <= x <= Lk - 1``."""
    if f == -oo:
        return oo
    if f == oo:
        return -oo
    if not f.has(I):
        return Where(f <= x, oo, -oo)
    if isinstance(f, sympy.Max):  # all bounds at most x
        return sympy.Min(*(last_at_most(a, x) for a in f.args))
    if isinstance(f, sympy.Min):  # some bound at most x
        return sympy.Max(*(last_at_most(a, x) for a in f.args))
    term, shift = _split_shift(f)
    if shift != 0:  # term(i) + shift <= x  <=>  term(i) <= x - shift
        return last_at_most(term, x - shift)
    y = x
    if term == I:
        return y
    if isinstance(term, DocStart) and term.args[0] == I:
        # doc_start(i) <= y: i is in y's document or an earlier one.
        return Where(y < 0, -oo, DocEnd(sympy.Min(y, LK - 1)))
    if isinstance(term, DocEnd) and term.args[0] == I:
        # doc_end(i) <= y: i's document ends by y, i.e. i is before the document of y + 1.
        return Where(y >= LK - 1, oo, DocStart(sympy.Max(y + 1, 0)) - 1)
    if isinstance(term, FloorDiv) and term.args[1].is_Integer:
        inner, d = term.args
        inner_term, inner_shift = _split_shift(inner)
        if inner_term == I:  # floor((i + a) / d) <= y  <=>  i + a < d (y + 1)
            return d * (y + 1) - 1 - inner_shift
        if isinstance(inner_term, DocStart):  # likewise, a document's first pooled key
            return last_at_most(inner_term, d * (y + 1) - 1 - inner_shift)
    if isinstance(term, sympy.Mul) and len(term.args) == 2 and term.args[0].is_Integer:
        c, div = term.args
        if isinstance(div, FloorDiv) and div.args[1] == c:
            inner_term, inner_shift = _split_shift(div.args[0])
            if inner_term == I:  # c floor((i + a) / c) <= y  <=>  floor((i + a) / c) <= floor(y / c)
                return c * FloorDiv(y, c) + c - 1 - inner_shift
    raise ValueError(f"cannot invert the key bound {f}")


def _split_shift(f: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr]:
    """``f`` as ``term + shift`` where ``shift`` does not depend on ``i``."""
    if isinstance(f, sympy.Add):
        dependent = [t for t in f.args if t.has(I)]
        if len(dependent) == 1:
            return dependent[0], f - dependent[0]
    return f, sympy.Integer(0)


def push_into_where(e: sympy.Expr) -> sympy.Expr:
    """Move max, min and sums inside ``Where``, so infinities in its branches can fold:
    ``min(Where(c, oo, -oo), h)`` becomes ``Where(c, h, -oo)``."""
    if not e.args or isinstance(e, sympy.Symbol):
        return e
    args = [push_into_where(a) for a in e.args]
    if isinstance(e, (sympy.Max, sympy.Min, sympy.Add, sympy.Mul, FloorDiv)):
        for n, arg in enumerate(args):
            if isinstance(arg, Where):
                condition, then, otherwise = arg.args
                rest = args[:n] + args[n + 1 :]
                return Where(condition, push_into_where(e.func(then, *rest)), push_into_where(e.func(otherwise, *rest)))
    return e.func(*args) if tuple(args) != e.args else e
