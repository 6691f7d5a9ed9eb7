"""The abstract syntax tree of ``.attn`` files: frozen dataclasses, one per construct.

Source positions are kept for diagnostics but excluded from equality, so a pattern
printed and parsed again compares equal to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from ..errors import SourceFile, Span

_NO_SPAN = Span(0, 0, 0, 0)


def _span() -> Span:
    return field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class Number:
    value: int | float
    span: Span = _span()


@dataclass(frozen=True)
class Boolean:
    value: bool
    span: Span = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]
    span: Span = _span()
    func_span: Span = _span()


@dataclass(frozen=True)
class BinaryOp:
    """``op`` is one of ``| & + - * // / %``."""

    op: str
    left: Expr
    right: Expr
    span: Span = _span()


@dataclass(frozen=True)
class UnaryOp:
    """``op`` is ``-`` (negation) or ``~`` (complement)."""

    op: str
    operand: Expr
    span: Span = _span()


Expr = Union[Number, Boolean, Name, Call, BinaryOp, UnaryOp]


@dataclass(frozen=True)
class Param:
    name: str
    type_name: str
    default: Expr | None
    span: Span = _span()


@dataclass(frozen=True)
class Assign:
    target: str
    value: Expr
    span: Span = _span()


@dataclass(frozen=True)
class Return:
    value: Expr
    span: Span = _span()


Statement = Union[Assign, Return]


@dataclass(frozen=True)
class PatternDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Statement, ...]
    span: Span = _span()
    name_span: Span = _span()


@dataclass(frozen=True)
class Module:
    """A parsed ``.attn`` file: its patterns, in order, and the source they came from."""

    patterns: tuple[PatternDef, ...]
    source: SourceFile | None = field(default=None, compare=False, repr=False)
