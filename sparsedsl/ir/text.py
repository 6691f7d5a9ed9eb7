"""The block IR as text: what ``sparsedsl show --ir`` prints, and the kernel cache's key."""

from __future__ import annotations

import sympy

from ..frontend.kinds import Per
from .expressions import ExpressionPrinter
from .nodes import (
    BranchIR,
    Combine,
    PatternIR,
    PooledKeys,
    SelectedBlocks,
    StaticBlocks,
)

_print = ExpressionPrinter("python")


def _bound(e: sympy.Expr) -> str:
    if e == sympy.oo:
        return "+inf"
    if e == -sympy.oo:
        return "-inf"
    return _print(e)


def format_ir(ir: PatternIR) -> str:
    """A stable, readable rendering of the IR (equal IRs give equal text)."""
    params = ", ".join(f"{k}={v}" for k, v in ir.params)
    combine = f"gate({', '.join(b.name for b in ir.output_branches)})" if ir.combine == Combine.GATE else ir.branches[0].name
    lines = [
        f"pattern {ir.name}({params})  # {ir.source_name}:{ir.line}",
        f"  output = {combine}",
        "  query block qb: rows at positions q0 = qb*BQ + off .. q1 = min(q0 + BQ - 1, Lk - 1), off = Lk - Lq",
        "  key block kb: keys k0 = kb*BK .. k1 = min(k0 + BK - 1, number of keys - 1)",
    ]
    for branch in ir.branches:
        lines += _branch_lines(branch)
    return "\n".join(lines) + "\n"


def _branch_lines(branch: BranchIR) -> list[str]:
    role = "" if branch.output else "  (scores a selection only)"
    lines = [f"  branch {branch.name} = {branch.definition}{role}"]
    if isinstance(branch.keys, PooledKeys):
        pk = branch.keys
        lines.append(
            f"    keys: pooled ({pk.pool} over [c*{pk.stride}, c*{pk.stride} + {pk.block})), Lc = {_print(pk.length)}"
        )
    else:
        lines.append("    keys: raw (Lk)")
    lines.append(f"    predicate: {_print(branch.predicate)}")
    if branch.runtime:
        lines.append(f"    runtime inputs: {', '.join(branch.runtime)}")
    blocks = branch.blocks
    if isinstance(blocks, SelectedBlocks):
        lines.append(
            f"    blocks: selected at run time into `{blocks.index}`: top {blocks.topk} of {blocks.block}-key blocks "
            f"scored by `{blocks.score}`, keep_first={blocks.keep_first}, keep_local={blocks.keep_local}, "
            f"one choice per {'query' if blocks.per == Per.TOKEN else 'query block'}"
        )
        lines.append("      a selected block is full if it ends at or before q0, else partial")
        return lines
    assert isinstance(blocks, StaticBlocks)
    if len(blocks.segments) > 1:
        lines.append(f"    blocks: union of {len(blocks.segments)} segments, merged into disjoint runs at run time")
    for n, seg in enumerate(blocks.segments):
        rows = "all rows" if (seg.rows_lo, seg.rows_hi) == (-sympy.oo, sympy.oo) else f"rows {_bound(seg.rows_lo)} <= i <= {_bound(seg.rows_hi)}"
        kind = "every key" if seg.exact else "some keys (hull)"
        lines.append(f"    segment {n}: {rows} see {kind} in [{_bound(seg.keys_lo)}, {_bound(seg.keys_hi)}]")
        lines.append(f"      key blocks of qb:   touched [{_print(seg.start)}, {_print(seg.stop)})")
        if seg.exact:
            lines.append(f"                          full    [{_print(seg.full_start)}, {_print(seg.full_stop)})")
        lines.append(f"      query blocks of kb: touched [{_print(seg.q_start)}, {_print(seg.q_stop)})")
        if seg.exact:
            lines.append(f"                          full    [{_print(seg.q_full_start)}, {_print(seg.q_full_stop)})")
    return lines
