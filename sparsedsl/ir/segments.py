"""Element masks as unions of segments: the set algebra behind the block ranges.

A segment says: queries at positions ``rows_lo <= i <= rows_hi`` see the keys
``keys_lo(i) <= j <= keys_hi(i)``, with both bounds non-decreasing in ``i``. Every
primitive is a union of such segments, and so is every ``&``, ``|`` and ``~`` of them:
intersection intersects bounds pairwise, complement takes what lies outside. Bounds may be
infinite (clamped to the key range later). A segment that is not ``exact`` is a hull: some,
not all, of its keys are visible (a dilated window).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import sympy

from ..frontend import model as M
from .expressions import I, J, DocEnd, DocStart, FloorDiv, provably_le, simplify_with_facts

oo = sympy.oo

# Lowering refuses patterns whose complements multiply into more segments than this:
# every segment costs a few scalar operations per query block in the kernels.
MAX_SEGMENTS = 16
# While a mask is rewritten, no union (nor the candidate pieces of an intersection) may
# grow past this: each piece costs sympy work, and complements of unions multiply, so an
# unbounded intermediate could take minutes before the final count refused it.
MAX_INTERMEDIATE_SEGMENTS = 64


class TooManySegments(Exception):
    """A mask's rewriting passed :data:`MAX_INTERMEDIATE_SEGMENTS` pieces (lowering says so
    as a :class:`~sparsedsl.PatternError`)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"more than {count} interval pieces")
        self.count = count


@dataclass(frozen=True)
class Segment:
    rows_lo: sympy.Expr
    rows_hi: sympy.Expr
    keys_lo: sympy.Expr
    keys_hi: sympy.Expr
    exact: bool = True


def _keys(lo, hi, exact: bool = True) -> Segment:
    return Segment(-oo, oo, sympy.sympify(lo), sympy.sympify(hi), exact)


def mask_segments(mask: M.Mask) -> tuple[Segment, ...]:
    """The mask as a union of segments."""
    if isinstance(mask, M.Full):
        return (_keys(-oo, oo),)
    if isinstance(mask, M.Causal):
        return (_keys(-oo, I),)
    if isinstance(mask, M.Sliding):
        return (_keys(I - mask.window + 1, I + mask.window - 1),)
    if isinstance(mask, M.Sink):
        return (_keys(-oo, mask.size - 1),)
    if isinstance(mask, M.Global):
        rows = Segment(-oo, sympy.Integer(mask.size - 1), -oo, oo)
        return (_keys(-oo, mask.size - 1), rows)
    if isinstance(mask, M.Chunked):
        start = mask.size * FloorDiv(I, mask.size)
        return (_keys(start, start + mask.size - 1),)
    if isinstance(mask, M.Dilated):
        reach = (mask.window - 1) * mask.dilation
        return (_keys(I - reach, I + reach, exact=mask.dilation == 1),)
    if isinstance(mask, M.Document):
        return (_keys(DocStart(I), DocEnd(I)),)
    if isinstance(mask, M.And):
        return _intersect_unions(mask_segments(mask.left), mask_segments(mask.right))
    if isinstance(mask, M.Or):
        return _normalise((*mask_segments(mask.left), *mask_segments(mask.right)))
    if isinstance(mask, M.Not):
        return complement(mask_segments(mask.operand))
    raise TypeError(f"not a mask: {mask!r}")


def complement(segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """The complement of a union: the intersection of each segment's complement."""
    result: tuple[Segment, ...] = (_keys(-oo, oo),)
    for segment in segments:
        result = _intersect_unions(result, _complement_one(segment))
    return result


def _intersect_unions(left: tuple[Segment, ...], right: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """The intersection of two unions: every pair's intersection, as a union."""
    if len(left) * len(right) > MAX_INTERMEDIATE_SEGMENTS**2 // 4:
        raise TooManySegments(MAX_INTERMEDIATE_SEGMENTS)
    pieces = (_intersect(a, b) for a, b in product(left, right))
    return _normalise(p for p in pieces if p is not None)


def _complement_one(s: Segment) -> tuple[Segment, ...]:
    out = []
    if s.rows_lo != -oo:
        out.append(Segment(-oo, s.rows_lo - 1, -oo, oo))
    if s.rows_hi != oo:
        out.append(Segment(s.rows_hi + 1, oo, -oo, oo))
    if s.keys_lo != -oo:
        out.append(Segment(s.rows_lo, s.rows_hi, -oo, s.keys_lo - 1))
    if s.keys_hi != oo:
        out.append(Segment(s.rows_lo, s.rows_hi, s.keys_hi + 1, oo))
    if not s.exact:  # the holes inside a hull stay partly visible
        out.append(Segment(s.rows_lo, s.rows_hi, s.keys_lo, s.keys_hi, exact=False))
    return tuple(out)


def _intersect(a: Segment, b: Segment) -> Segment | None:
    segment = Segment(
        simplify_with_facts(sympy.Max(a.rows_lo, b.rows_lo), {}),
        simplify_with_facts(sympy.Min(a.rows_hi, b.rows_hi), {}),
        simplify_with_facts(sympy.Max(a.keys_lo, b.keys_lo), {}),
        simplify_with_facts(sympy.Min(a.keys_hi, b.keys_hi), {}),
        a.exact and b.exact,
    )
    return None if _provably_empty(segment) else segment


def _provably_empty(s: Segment) -> bool:
    return provably_le(s.rows_hi + 1, s.rows_lo) or provably_le(s.keys_hi + 1, s.keys_lo)


def _normalise(segments) -> tuple[Segment, ...]:
    """A union without empty pieces and without pieces another exact piece contains
    (``sliding(8) | sliding(16)`` is ``sliding(16)``)."""
    unique: list[Segment] = []
    for segment in segments:
        if segment in unique or _provably_empty(segment) or any(_contains(u, segment) for u in unique):
            continue
        unique = [u for u in unique if not _contains(segment, u)]
        unique.append(segment)
        if len(unique) > MAX_INTERMEDIATE_SEGMENTS:
            raise TooManySegments(MAX_INTERMEDIATE_SEGMENTS)
    return tuple(unique)


def _contains(outer: Segment, inner: Segment) -> bool:
    """Whether every pair of ``inner`` is provably visible through ``outer``: outer is
    exact (a hull has holes) and its rows and, row by row, its keys include inner's."""
    return (
        outer.exact
        and provably_le(outer.rows_lo, inner.rows_lo)
        and provably_le(inner.rows_hi, outer.rows_hi)
        and provably_le(outer.keys_lo, inner.keys_lo)
        and provably_le(inner.keys_hi, outer.keys_hi)
    )


def mask_predicate(mask: M.Mask) -> sympy.Basic:
    """The element predicate of a mask, over query position ``i`` and key position ``j``."""
    if isinstance(mask, M.Full):
        return sympy.true
    if isinstance(mask, M.Causal):
        return J <= I
    if isinstance(mask, M.Sliding):
        return sympy.And(I - J < mask.window, J - I < mask.window)
    if isinstance(mask, M.Sink):
        return J < mask.size
    if isinstance(mask, M.Global):
        return sympy.Or(J < mask.size, I < mask.size)
    if isinstance(mask, M.Chunked):
        return sympy.Eq(FloorDiv(I, mask.size), FloorDiv(J, mask.size))
    if isinstance(mask, M.Dilated):
        reach = mask.window * mask.dilation
        return sympy.And(sympy.Eq(sympy.Mod(I - J, mask.dilation), 0), I - J < reach, J - I < reach)
    if isinstance(mask, M.Document):
        return sympy.And(J >= DocStart(I), J <= DocEnd(I))
    if isinstance(mask, M.And):
        return sympy.And(mask_predicate(mask.left), mask_predicate(mask.right))
    if isinstance(mask, M.Or):
        return sympy.Or(mask_predicate(mask.left), mask_predicate(mask.right))
    if isinstance(mask, M.Not):
        return sympy.Not(mask_predicate(mask.operand))
    raise TypeError(f"not a mask: {mask!r}")
