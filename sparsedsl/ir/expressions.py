"""The index algebra of the IR: sympy symbols, the functions it needs, and a printer.

Block ranges and element predicates are sympy expressions over the symbols below. The
printer turns them into code for two targets: ``python`` (exact integer semantics,
used by tests and the mask pictures) and ``triton`` (used by code generation), where
integer division truncates, so a division whose numerator sympy cannot prove
non-negative goes through a flooring helper.
"""

from __future__ import annotations

from itertools import product
from typing import Mapping

import sympy
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

# Positions: i of a query, j of a key (absolute; queries end-aligned with keys).
I = sympy.Symbol("i", integer=True)
J = sympy.Symbol("j", integer=True)
# Block-level symbols: query block index, tile sizes, lengths, and off = Lk - Lq.
QB = sympy.Symbol("qb", integer=True, nonnegative=True)
BQ = sympy.Symbol("BQ", integer=True, positive=True)
BK = sympy.Symbol("BK", integer=True, positive=True)
LQ = sympy.Symbol("Lq", integer=True, positive=True)
LK = sympy.Symbol("Lk", integer=True, positive=True)
# Queries are the last Lq of the Lk positions, so off >= 0 (the runtime checks Lq <= Lk).
OFF = sympy.Symbol("off", integer=True, nonnegative=True)
# Positions of the first and last real query row of block qb:
#   q0 = qb*BQ + off,  q1 = min(q0 + BQ - 1, Lk - 1).
Q0 = sympy.Symbol("q0", integer=True, nonnegative=True)
Q1 = sympy.Symbol("q1", integer=True, nonnegative=True)
# Positions of the first and last real key of key block kb (the backward pass walks query
# blocks per key block): k0 = kb*BK, k1 = min(k0 + BK - 1, Lk - 1).
K0 = sympy.Symbol("k0", integer=True, nonnegative=True)
K1 = sympy.Symbol("k1", integer=True, nonnegative=True)



class FloorDiv(sympy.Function):
    """``floor(a / b)`` for integers, kept whole so it prints as one division."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(int(a) // int(b))
        if b == 1 or a == 0:
            return a
        return None

    def _eval_is_nonnegative(self):
        a, b = self.args
        if a.is_nonnegative and b.is_positive:
            return True
        return None


class DocStart(sympy.Function):
    """The first position of the document holding position ``i`` (a run-time table)."""

    is_integer = True
    # Even at a constant position (DocStart(0)) it is a run-time value, not a number that
    # sympy could compare: Min and Max refuse numbers they cannot compare.
    is_number = False


class DocEnd(sympy.Function):
    """The last position of the document holding position ``i`` (a run-time table)."""

    is_integer = True
    is_number = False


class Where(sympy.Function):
    """``then if condition else otherwise``, with the condition left as written (sympy's
    Piecewise would rescale it, and it prints as one ``tl.where``)."""

    @classmethod
    def eval(cls, condition, then, otherwise):
        if condition is sympy.true or then == otherwise:
            return then
        if condition is sympy.false:
            return otherwise
        return None


def ceil_div(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    return sympy.Integer(0) if a == 0 else FloorDiv(a + b - 1, b)


# --------------------------------------------------------------------- proofs
# Tile sizes are at least 1: write them as 1 + (something non-negative).
_BQ1 = sympy.Symbol("_bq", integer=True, nonnegative=True)
_BK1 = sympy.Symbol("_bk", integer=True, nonnegative=True)
_TILE_FACTS = {BQ: _BQ1 + 1, BK: _BK1 + 1}


def provably_le(x: sympy.Expr, y: sympy.Expr, facts: Mapping | None = None) -> bool:
    """True when ``x <= y`` holds for every integer value of the symbols.

    ``facts`` substitutes symbols by expressions in non-negative unknowns (such as
    ``q1 -> q0 + r``), which is how relations between symbols are stated. False means
    "not proved", not "false".
    """
    return _le(sympy.sympify(x), sympy.sympify(y), {**_TILE_FACTS, **(facts or {})})


def _distribute(e):
    """``max(a, b) + c`` as ``max(a + c, b + c)`` (likewise min), so the rules below see it."""
    if isinstance(e, sympy.Add):
        inner = [t for t in e.args if isinstance(t, (sympy.Max, sympy.Min))]
        if len(inner) == 1:
            rest = e - inner[0]
            return inner[0].func(*(a + rest for a in inner[0].args), evaluate=False)
    return e


def _le(x, y, facts) -> bool:
    x, y = _distribute(x), _distribute(y)
    if x == y or x == -sympy.oo or y == sympy.oo:
        return True
    if x.has(sympy.oo, -sympy.oo) or y.has(sympy.oo, -sympy.oo):
        return False
    if _nonnegative(y - x, facts):
        return True
    if isinstance(x, sympy.Max):
        return all(_le(a, y, facts) for a in x.args)
    if isinstance(y, sympy.Min):
        return all(_le(x, b, facts) for b in y.args)
    if isinstance(x, sympy.Min) and any(_le(a, y, facts) for a in x.args):
        return True
    if isinstance(y, sympy.Max) and any(_le(x, b, facts) for b in y.args):
        return True
    if isinstance(x, FloorDiv) and isinstance(y, FloorDiv) and x.args[1] == y.args[1]:
        return _le(x.args[0], y.args[0], facts)  # floor division is monotone
    # A document starts at or before, and ends at or after, each of its positions.
    if isinstance(x, DocStart) and _le(x.args[0], y, facts):
        return True
    if isinstance(y, DocEnd) and _le(x, y.args[0], facts):
        return True
    return False


def _nonnegative(e, facts) -> bool:
    e = sympy.expand(e.subs(facts))
    if e.is_nonnegative:
        return True
    # floor(x / k) = (x - m) / k with 0 <= m < k; where the result is linear in the
    # remainders m, checking their extreme values decides it.
    divisions = [f for f in e.atoms(FloorDiv) if f.args[1].is_Integer and f.args[1] > 1]
    if not divisions or len(divisions) > 3:
        return False
    remainders = [sympy.Dummy(integer=True, nonnegative=True) for _ in divisions]
    g = sympy.expand(e.subs({f: (f.args[0] - m) / f.args[1] for f, m in zip(divisions, remainders)}))
    if g.has(FloorDiv, Where) or not g.is_polynomial(*remainders):
        return False
    try:
        if any(sympy.degree(g, m) > 1 for m in remainders):
            return False
    except sympy.PolynomialError:  # e.g. a min/max around a remainder
        return False
    corners = product(*[(0, int(f.args[1]) - 1) for f in divisions])
    return all(g.subs(dict(zip(remainders, corner))).is_nonnegative for corner in corners)


_ORDER = (sympy.LessThan, sympy.StrictLessThan, sympy.GreaterThan, sympy.StrictGreaterThan)


def simplify_with_facts(expr: sympy.Basic, facts: dict) -> sympy.Basic:
    """Drop the min/max arguments and decide the comparisons that ``facts`` settle
    (see :func:`provably_le`)."""

    def le(x, y):
        return provably_le(x, y, facts)

    def visit(e):
        if not e.args or isinstance(e, sympy.Symbol):
            return e
        args = tuple(visit(a) for a in e.args)
        if args != e.args:
            e = e.func(*args)
        if isinstance(e, (sympy.Min, sympy.Max)):
            keep = list(e.args)
            for a in e.args:
                # In a Min, `a` is redundant if another argument is provably <= a.
                others = [b for b in keep if b is not a]
                if any(le(b, a) if isinstance(e, sympy.Min) else le(a, b) for b in others):
                    keep.remove(a)
            return e.func(*keep) if len(keep) != len(e.args) else e
        if isinstance(e, _ORDER):
            small, large = (e.lhs, e.rhs) if isinstance(e, (sympy.LessThan, sympy.StrictLessThan)) else (e.rhs, e.lhs)
            strict = isinstance(e, (sympy.StrictLessThan, sympy.StrictGreaterThan))
            if le(small + (1 if strict else 0), large):
                return sympy.true
            if le(large + (0 if strict else 1), small):
                return sympy.false
        return e

    previous = None
    while previous != expr:
        previous, expr = expr, visit(expr)
    return expr


# --------------------------------------------------------------------- printing
_RELATIONS = {
    sympy.LessThan: "<=",
    sympy.StrictLessThan: "<",
    sympy.GreaterThan: ">=",
    sympy.StrictGreaterThan: ">",
    sympy.Equality: "==",
    sympy.Unequality: "!=",
}


class ExpressionPrinter:
    """Prints IR expressions as code.

    ``names`` maps symbols (and applied functions such as ``DocStart(i)``) to the code
    that holds their value; anything unmapped prints under its own name.
    """

    def __init__(self, target: str, names: Mapping[sympy.Basic, str] | None = None) -> None:
        if target not in ("python", "triton"):
            raise ValueError(f"unknown target {target!r}")
        self.target = target
        self.names = dict(names or {})

    def __call__(self, expr: sympy.Basic) -> str:
        return self._print(sympy.sympify(expr))

    # Each _print returns an expression safe to embed anywhere: composite results are
    # parenthesised.
    def _print(self, e: sympy.Basic) -> str:
        if e in self.names:
            return self.names[e]
        if isinstance(e, BooleanTrue):
            return "True"
        if isinstance(e, BooleanFalse):
            return "False"
        if e.is_Integer:
            return str(int(e)) if e >= 0 else f"({int(e)})"
        if e.is_Symbol:
            return e.name
        if isinstance(e, sympy.Add):
            return self._add(e)
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, FloorDiv):
            return self._floordiv(*e.args)
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._minmax(e)
        if isinstance(e, Where):
            condition, then, otherwise = (self._print(a) for a in e.args)
            if self.target == "python":
                return f"({then} if {condition} else {otherwise})"
            return f"tl.where({condition}, {then}, {otherwise})"
        if isinstance(e, sympy.Mod):
            a, b = (self._print(x) for x in e.args)
            return f"({a} % {b})"
        if isinstance(e, sympy.Abs):
            inner = self._print(e.args[0])
            return f"abs({inner})" if self.target == "python" else f"tl.abs({inner})"
        if type(e) in _RELATIONS:
            return f"({self._print(e.lhs)} {_RELATIONS[type(e)]} {self._print(e.rhs)})"
        if isinstance(e, sympy.And):
            return "(" + " & ".join(self._print(a) for a in _ordered(e.args)) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " | ".join(self._print(a) for a in _ordered(e.args)) + ")"
        if isinstance(e, sympy.Not):
            return f"(~{self._print(e.args[0])})" if self.target == "triton" else f"(not {self._print(e.args[0])})"
        if isinstance(e, (DocStart, DocEnd)) and self.target == "python":
            return f"{'doc_start' if isinstance(e, DocStart) else 'doc_end'}({self._print(e.args[0])})"
        raise TypeError(f"cannot print {type(e).__name__}: {e}")

    def _add(self, e: sympy.Add) -> str:
        # Symbols first, the constant last: `qb*BQ + off - 511`.
        terms = sorted(e.args, key=lambda t: (t.is_Number, sympy.default_sort_key(t)))
        text = ""
        for term in terms:
            coefficient, rest = term.as_coeff_Mul()
            negative = coefficient < 0
            body = self._print(-term) if negative else self._print(term)
            if not text:
                text = f"-{body}" if negative else body
            else:
                text += f" - {body}" if negative else f" + {body}"
        return f"({text})"

    def _mul(self, e: sympy.Mul) -> str:
        coefficient, rest = e.as_coeff_Mul()
        if coefficient < 0:
            return f"(-{self._print(-e)})"
        factors = [] if coefficient == 1 else [self._print(coefficient)]
        for factor in sympy.Mul.make_args(rest):
            if not (factor.is_Integer or factor.is_Symbol or factor.func in (FloorDiv, sympy.Max, sympy.Min)):
                if factor.is_Pow:
                    raise TypeError(f"cannot print a power or a fraction: {e}")
            factors.append(self._print(factor))
        return "(" + " * ".join(factors) + ")"

    def _floordiv(self, a: sympy.Expr, b: sympy.Expr) -> str:
        num, den = self._print(a), self._print(b)
        if self.target == "python" or provably_le(0, a):
            return f"({num} // {den})"
        return f"floordiv({num}, {den})"  # the template defines this helper

    def _minmax(self, e: sympy.Basic) -> str:
        args = [self._print(a) for a in _ordered(e.args)]
        if self.target == "python":
            return f"{'max' if isinstance(e, sympy.Max) else 'min'}({', '.join(args)})"
        fn = "tl.maximum" if isinstance(e, sympy.Max) else "tl.minimum"
        text = args[0]
        for arg in args[1:]:
            text = f"{fn}({text}, {arg})"
        return text


def _ordered(args):
    return sorted(args, key=sympy.default_sort_key)
