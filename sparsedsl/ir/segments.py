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
from typing import Any, Callable

import sympy

from ..frontend import model as M
from .expressions import (
    DocEnd,
    DocStart,
    FloorDiv,
    I,
    J,
    provably_le,
    simplify_with_facts,
)

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


# ---------------------------------------------------------------- the primitives
@dataclass(frozen=True)
class AtomLowering:
    """What lowering knows of one mask primitive: its visible set as a union of segments,
    and its element predicate over query position ``i`` and key position ``j`` (what the
    kernels evaluate in partial blocks). Both are functions of the model's mask."""

    segments: Callable[[Any], tuple[Segment, ...]]
    predicate: Callable[[Any], sympy.Basic]


def _global(mask: M.Global) -> tuple[Segment, ...]:
    rows = Segment(-oo, sympy.Integer(mask.size - 1), -oo, oo)
    return (_keys(-oo, mask.size - 1), rows)


def _chunked(mask: M.Chunked) -> tuple[Segment, ...]:
    start = mask.size * FloorDiv(I, mask.size)
    return (_keys(start, start + mask.size - 1),)


def _dilated(mask: M.Dilated) -> tuple[Segment, ...]:
    reach = (mask.window - 1) * mask.dilation
    return (_keys(I - reach, I + reach, exact=mask.dilation == 1),)


def _dilated_predicate(mask: M.Dilated) -> sympy.Basic:
    reach = mask.window * mask.dilation
    return sympy.And(sympy.Eq(sympy.Mod(I - J, mask.dilation), 0), I - J < reach, J - I < reach)


# One entry per mask primitive (the model class of primitives.PRIMITIVES): the only place
# lowering reads what a primitive means. Key bounds must be non-decreasing in i, of forms
# ir/inverse.py's last_at_most can invert.
ATOMS: dict[type[M.Atom], AtomLowering] = {
    M.Full: AtomLowering(lambda m: (_keys(-oo, oo),), lambda m: sympy.true),
    M.Causal: AtomLowering(lambda m: (_keys(-oo, I),), lambda m: J <= I),
    M.Sliding: AtomLowering(
        lambda m: (_keys(I - m.window + 1, I + m.window - 1),),
        lambda m: sympy.And(I - J < m.window, J - I < m.window),
    ),
    M.Sink: AtomLowering(lambda m: (_keys(-oo, m.size - 1),), lambda m: J < m.size),
    M.Global: AtomLowering(_global, lambda m: sympy.Or(J < m.size, I < m.size)),
    M.Chunked: AtomLowering(_chunked, lambda m: sympy.Eq(FloorDiv(I, m.size), FloorDiv(J, m.size))),
    M.Dilated: AtomLowering(_dilated, _dilated_predicate),
    M.Document: AtomLowering(
        lambda m: (_keys(DocStart(I), DocEnd(I)),),
        lambda m: sympy.And(J >= DocStart(I), J <= DocEnd(I)),
    ),
}


def _atom(mask: M.Mask) -> AtomLowering:
    lowering = ATOMS.get(type(mask))
    if lowering is None:
        raise TypeError(f"not a mask: {mask!r}")
    return lowering


# ---------------------------------------------------------------- the set algebra
def mask_segments(mask: M.Mask) -> tuple[Segment, ...]:
    """The mask as a union of segments."""
    if isinstance(mask, M.And):
        return _intersect_unions(mask_segments(mask.left), mask_segments(mask.right))
    if isinstance(mask, M.Or):
        return _normalise((*mask_segments(mask.left), *mask_segments(mask.right)))
    if isinstance(mask, M.Not):
        return complement(mask_segments(mask.operand))
    return _atom(mask).segments(mask)


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
    if isinstance(mask, M.And):
        return sympy.And(mask_predicate(mask.left), mask_predicate(mask.right))
    if isinstance(mask, M.Or):
        return sympy.Or(mask_predicate(mask.left), mask_predicate(mask.right))
    if isinstance(mask, M.Not):
        return sympy.Not(mask_predicate(mask.operand))
    return _atom(mask).predicate(mask)
