"""Evaluating the IR's formulas on numbers: block classifications for the mask pictures and
for the tests that hold the IR against the element mask.

The formulas are printed by the same printer code generation uses (python target) and
compiled once; they contain only the IR's own symbols, integers and operators.
"""

from __future__ import annotations

from functools import lru_cache

import sympy
import torch

from .expressions import ExpressionPrinter
from .nodes import BranchIR, PooledKeys, StaticBlocks

EMPTY, PARTIAL, FULL = 0, 1, 2

_ARGUMENTS = ("qb", "q0", "q1", "k0", "k1", "BQ", "BK", "Lq", "Lk", "off", "i", "j", "doc_start", "doc_end")


@lru_cache(maxsize=4096)
def compile_formula(expr: sympy.Basic):
    """A Python function of the IR's symbols (keyword arguments) computing ``expr``."""
    code = ExpressionPrinter("python")(expr)
    body = compile(f"lambda {', '.join(_ARGUMENTS)}: {code}", "<ir-formula>", "eval")
    return eval(body, {"__builtins__": {"min": min, "max": max, "abs": abs}})  # noqa: S307 - IR-generated


def document_runs(doc_ids: torch.Tensor) -> tuple[list[int], list[int]]:
    """For one row of document ids: the first and last position of each position's document."""
    ids = doc_ids.tolist()
    n = len(ids)
    start, end = [0] * n, [0] * n
    for t in range(n):
        start[t] = start[t - 1] if t and ids[t] == ids[t - 1] else t
    for t in reversed(range(n)):
        end[t] = end[t + 1] if t + 1 < n and ids[t] == ids[t + 1] else t
    return start, end


def key_count(branch: BranchIR, Lk: int) -> int:
    if isinstance(branch.keys, PooledKeys):
        return int(compile_formula(branch.keys.length)(**_env(Lk=Lk)))
    return Lk


def _env(**values):
    env = dict.fromkeys(_ARGUMENTS, None)
    env.update(values)
    return env


def block_classes(
    branch: BranchIR, Lq: int, Lk: int, BQ: int, BK: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """(query blocks, key blocks) tensor of EMPTY / PARTIAL / FULL, as the IR says.

    With several segments a block takes the strongest class any segment gives it, which
    is what the kernels' run-time merge does. ``doc_ids`` is one row (Lk,) of ids.
    """
    return _classes(branch, Lq, Lk, BQ, BK, doc_ids, by_key_block=False)


def block_classes_by_key_block(
    branch: BranchIR, Lq: int, Lk: int, BQ: int, BK: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The same classification as :func:`block_classes`, computed from the transposed
    ranges the backward pass walks (query blocks per key block)."""
    return _classes(branch, Lq, Lk, BQ, BK, doc_ids, by_key_block=True)


def _classes(branch, Lq, Lk, BQ, BK, doc_ids, by_key_block: bool) -> torch.Tensor:
    if not isinstance(branch.blocks, StaticBlocks):
        raise ValueError(f"branch `{branch.name}` selects its blocks at run time")
    n_keys = key_count(branch, Lk)
    n_q, n_k = -(-Lq // BQ), -(-n_keys // BK)
    classes = torch.zeros(n_q, max(1, n_k), dtype=torch.int8)
    tables = document_runs(doc_ids) if doc_ids is not None else None
    off = Lk - Lq
    common = dict(BQ=BQ, BK=BK, Lq=Lq, Lk=Lk, off=off)
    if tables is not None:
        common.update(doc_start=tables[0].__getitem__, doc_end=tables[1].__getitem__)
    bounds = "q_start q_stop q_full_start q_full_stop" if by_key_block else "start stop full_start full_stop"
    formulas = [[compile_formula(getattr(s, name)) for name in bounds.split()] for s in branch.blocks.segments]
    for outer in range(n_k if by_key_block else n_q):
        if by_key_block:  # key block `outer`, keys k0..k1
            k0 = outer * BK
            env = _env(k0=k0, k1=min(k0 + BK - 1, n_keys - 1), **common)
        else:  # query block `outer`, rows at positions q0..q1
            q0 = outer * BQ + off
            env = _env(qb=outer, q0=q0, q1=min(q0 + BQ - 1, Lk - 1), **common)
        for start, stop, full_start, full_stop in formulas:
            lo, hi, flo, fhi = start(**env), stop(**env), full_start(**env), full_stop(**env)
            for inner in range(lo, hi):
                qb, kb = (inner, outer) if by_key_block else (outer, inner)
                classes[qb, kb] = max(int(classes[qb, kb]), FULL if flo <= inner < fhi else PARTIAL)
    return classes[:, :n_k]


def predicate_mask(branch: BranchIR, Lq: int, Lk: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The IR's element predicate evaluated at every (query, key) pair: (Lq, keys) boolean."""
    predicate = compile_formula(branch.predicate)
    tables = document_runs(doc_ids) if doc_ids is not None else ([], [])
    n_keys = key_count(branch, Lk)
    out = torch.zeros(Lq, n_keys, dtype=torch.bool)
    for r in range(Lq):
        env = _env(i=r + Lk - Lq, doc_start=tables[0].__getitem__, doc_end=tables[1].__getitem__)
        for j in range(n_keys):
            env["j"] = j
            out[r, j] = bool(predicate(**env))
    return out
