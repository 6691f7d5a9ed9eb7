"""The block IR: what code generation needs to know about each branch of a pattern.

For every branch it says where the keys come from (:class:`RawKeys` or
:class:`PooledKeys`), how a query block walks over key blocks (closed-form
:class:`BlockRange` runs for static patterns, a run-time table for selections), and the
element predicate evaluated inside partial blocks. All expressions are sympy, over the
symbols of :mod:`.expressions`; parameters are already numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import sympy

from ..frontend.kinds import Kind, Per, Pool


class BlockKind(Kind):
    """How a run of key blocks is processed."""

    FULL = "full"  # every element visible: no mask arithmetic
    PARTIAL = "partial"  # evaluate the element predicate


class Combine(Kind):
    """How a pattern's output branches make its output."""

    SINGLE = "single"  # one branch, its output as it is
    GATE = "gate"  # separate softmaxes mixed by call-time gates


@dataclass(frozen=True)
class BlockRange:
    """Key blocks ``start <= kb < stop`` of query block ``qb``, all of one ``kind``:
    ``full`` (every element visible: no mask arithmetic) or ``partial`` (evaluate the
    element predicate)."""

    start: sympy.Expr
    stop: sympy.Expr
    kind: BlockKind

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", BlockKind(self.kind))


@dataclass(frozen=True)
class KeySegment:
    """One conjunctive piece of a branch's visible set, and the key blocks it gives.

    Queries at positions ``rows_lo <= i <= rows_hi`` see keys ``keys_lo(i) <= j <=
    keys_hi(i)`` (both non-decreasing in ``i``): all of them when ``exact``, some of them
    otherwise (the interval is then a hull, such as a dilated window's).

    For query block ``qb`` (rows at positions ``q0..q1``) the segment touches key blocks
    ``start <= kb < stop``, of which ``full_start <= kb < full_stop`` are entirely visible.
    Transposed, for the backward pass: key block ``kb`` (keys ``k0..k1``) is touched by
    query blocks ``q_start <= qb < q_stop``, and entirely visible to
    ``q_full_start <= qb < q_full_stop``.
    """

    rows_lo: sympy.Expr
    rows_hi: sympy.Expr
    keys_lo: sympy.Expr
    keys_hi: sympy.Expr
    exact: bool
    start: sympy.Expr
    stop: sympy.Expr
    full_start: sympy.Expr
    full_stop: sympy.Expr
    q_start: sympy.Expr
    q_stop: sympy.Expr
    q_full_start: sympy.Expr
    q_full_stop: sympy.Expr

    @property
    def ranges(self) -> tuple[BlockRange, ...]:
        """The touched blocks as disjoint runs: partial, then full, then partial."""
        if not self.exact:
            return (BlockRange(self.start, self.stop, BlockKind.PARTIAL),)
        return (
            BlockRange(self.start, sympy.Min(self.full_start, self.stop), BlockKind.PARTIAL),
            BlockRange(self.full_start, self.full_stop, BlockKind.FULL),
            BlockRange(sympy.Max(self.full_start, self.full_stop), self.stop, BlockKind.PARTIAL),
        )


@dataclass(frozen=True)
class RawKeys:
    """The keys and values as given (length ``Lk``)."""


@dataclass(frozen=True)
class PooledKeys:
    """Pooled keys and values: pooled key ``c`` summarises keys ``[c*stride, c*stride+block)``;
    there are ``length`` of them (in terms of ``Lk``)."""

    block: int
    stride: int
    pool: Pool
    length: sympy.Expr

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool", Pool(self.pool))

    def count(self, Lk: int) -> int:
        """``length`` at ``Lk`` keys."""
        return max(0, (Lk - self.block) // self.stride + 1)


@dataclass(frozen=True)
class StaticBlocks:
    """Key blocks given by closed-form ranges. With several segments (a union), a query
    block's runs are the segments' ranges merged into disjoint runs at run time; a block is
    full when some segment makes it full."""

    segments: tuple[KeySegment, ...]


@dataclass(frozen=True)
class SelectedBlocks:
    """Key blocks chosen at run time: the ``topk`` blocks of ``block`` keys with the highest
    score from the compress branch ``score``, the first ``keep_first`` and the
    ``keep_local`` most recent always included. One choice per query (``per="token"``) or
    per query block of ``block`` positions (``per="block"``). ``index`` names the run-time
    table: (B, Hkv, units, topk) block numbers."""

    block: int
    topk: int
    keep_first: int
    keep_local: int
    score: str
    index: str
    per: Per = Per.TOKEN

    def __post_init__(self) -> None:
        object.__setattr__(self, "per", Per(self.per))


@dataclass(frozen=True)
class BranchIR:
    """One separately normalised attention of a pattern.

    ``definition`` is the branch in the language's syntax; ``predicate`` the element mask
    in ``i`` and ``j`` (for pooled keys ``j`` is the pooled index); ``runtime`` names the
    call-time tensors the branch reads; ``output`` is false for a compress branch that
    only scores a selection.
    """

    name: str
    definition: str
    keys: Union[RawKeys, PooledKeys]
    blocks: Union[StaticBlocks, SelectedBlocks]
    predicate: sympy.Basic
    runtime: tuple[str, ...]
    output: bool


@dataclass(frozen=True)
class PatternIR:
    """A lowered pattern: its branches and how their outputs combine (``single`` or ``gate``)."""

    name: str
    params: tuple[tuple[str, object], ...]
    branches: tuple[BranchIR, ...]
    combine: Combine
    source_name: str
    line: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "combine", Combine(self.combine))

    def branch(self, name: str) -> BranchIR:
        for branch in self.branches:
            if branch.name == name:
                return branch
        raise KeyError(name)

    @property
    def output_branches(self) -> tuple[BranchIR, ...]:
        return tuple(b for b in self.branches if b.output)

    @property
    def learned_pooling(self) -> tuple[BranchIR, ...]:
        """The compress branches that pool with a learned MLP (``pool=mlp``), whose pooled
        keys and values the caller provides."""
        return tuple(b for b in self.branches if isinstance(b.keys, PooledKeys) and b.keys.pool == "mlp")

    @property
    def packed(self) -> bool:
        """Compress branches work within documents (``compress(within=document)``)."""
        return any(isinstance(b.keys, PooledKeys) and "doc_ids" in b.runtime for b in self.branches)

    @property
    def document_alignment(self) -> int:
        """What a packed batch's documents are padded to a multiple of, so that every
        document's pooled and selection blocks fall on the whole row's grid."""
        sizes = [b.keys.stride for b in self.branches if isinstance(b.keys, PooledKeys)]
        sizes += [b.blocks.block for b in self.branches if isinstance(b.blocks, SelectedBlocks)]
        return math.lcm(*sizes) if self.packed else 1
