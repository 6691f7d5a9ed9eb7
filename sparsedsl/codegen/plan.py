"""What the templates fill in: the IR's formulas printed as Triton code.

The templates never see sympy or user text. They get, per branch, the block-walk bounds
as Triton expressions over the kernel's own variable names (``q0``, ``ROWS``,
``BLOCK_N``...), the element predicate in both orientations, and the document-table
loads those need. Pattern and branch names appear only inside comments and string
literals, and only after :func:`comment` has made them safe there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy

from ..ir.expressions import (
    BK,
    BQ,
    K0,
    K1,
    LK,
    OFF,
    Q0,
    Q1,
    DocEnd,
    DocStart,
    ExpressionPrinter,
    I,
    J,
)
from ..ir.nodes import BranchIR, KeySegment, PatternIR, PooledKeys, SelectedBlocks
from ..ir.text import format_ir

# The kernels' names for the IR's symbols.
_KERNEL_NAMES = {Q0: "q0", Q1: "q1", K0: "k0", K1: "k1", BQ: "ROWS", BK: "BLOCK_N", LK: "Lk", OFF: "off"}


@dataclass(frozen=True)
class Bound:
    name: str
    code: str


@dataclass(frozen=True)
class SegmentCode:
    """One segment's four bounds, named ``seg<n>_start`` and so on."""

    comment: str
    start: Bound
    stop: Bound
    full_start: Bound
    full_stop: Bound

    @property
    def bounds(self) -> tuple[Bound, ...]:
        return (self.start, self.stop, self.full_start, self.full_stop)


@dataclass(frozen=True)
class Walk:
    """How one program walks its blocks: scalar table loads, then the segments."""

    loads: tuple[Bound, ...]
    segments: tuple[SegmentCode, ...]


@dataclass(frozen=True)
class SelectPlan:
    """A select branch's numbers, and its score branch's visibility test over pooled keys
    ``c`` for query positions ``q_pos``."""

    block: int
    topk: int
    keep_first: int
    keep_local: int
    per_block: bool
    score_title: str
    pool_block: int
    pool_stride: int
    pooled_visible: str
    pooled_count: str  # how many pooled keys the score branch has, as Triton code over Lk

    @property
    def topk_pad(self) -> int:
        """``topk`` rounded up to a power of two: the width of a tile of table rows."""
        return 1 << self.topk_log2

    @property
    def topk_log2(self) -> int:
        """log2 of ``topk_pad``: the stages of the top-k kernels' bitonic selection."""
        return (self.topk - 1).bit_length()


@dataclass(frozen=True)
class PoolPlan:
    """A compress branch's fixed pooling: ``how`` (mean or max) over windows of ``block``
    keys, one every ``stride``."""

    block: int
    stride: int
    how: str


@dataclass(frozen=True)
class Step:
    """An inner ``@triton.jit`` function that a walk calls on each run [lo, hi) of key
    blocks (or of query tiles): the parameters before lo and hi, the compile-time
    constants passed by keyword after them, and what it returns for the caller to
    reassign. ``arguments`` are (name, value) pairs a caller passes for parameters or
    constants instead of the variable of the same name."""

    function: str
    parameters: tuple[str, ...]
    constants: tuple[str, ...]
    carried: tuple[str, ...]
    arguments: tuple[tuple[str, str], ...] = ()

    def signature(self) -> str:
        """The parameter list of the function's ``def``."""
        constants = (f"{name}: tl.constexpr" for name in ("MASKED", *self.constants))
        return ", ".join((*self.parameters, "lo", "hi", *constants))

    def call(self, lo: str, hi: str, masked: bool) -> str:
        """One call over [lo, hi), as a statement."""
        given = dict(self.arguments)
        constants = (f"{name}={given.get(name, name)}" for name in self.constants)
        parameters = (given.get(name, name) for name in self.parameters)
        arguments = ", ".join((*parameters, lo, hi, *constants, f"MASKED={masked}"))
        return f"{', '.join(self.carried)} = {self.function}({arguments})"

    def passing(self, **arguments: str) -> Step:
        """The same function, called with other values for some parameters or constants."""
        return replace(self, arguments=tuple({**dict(self.arguments), **arguments}.items()))


@dataclass(frozen=True)
class BranchPlan:
    index: int
    title: str  # for comments: name and definition, already made safe
    uses_documents: bool
    predicate_rows: str  # queries along dim 0, keys along dim 1 (forward, dQ)
    predicate_cols: str  # keys along dim 0, queries along dim 1 (dK/dV)
    forward: Walk | None  # key blocks of a query tile (static branches)
    backward: Walk | None  # query tiles of a key block (static branches)
    select: SelectPlan | None  # select branches
    pool: PoolPlan | None  # compress branches pooling by mean or max (learned pooling is the module's)
    key_count: str  # how many keys the branch reads, as Triton code over Lk
    attend: Step  # the forward's online softmax over a run of key blocks
    attend_cached: Step  # the same over a KV cache's keys, contiguous or paged (decode)
    dq: Step  # dQ over a run of key blocks
    dkdv: Step | None  # dK/dV of a key block over a run of query tiles (static branches)


@dataclass(frozen=True)
class ModulePlan:
    pattern: str
    source: str
    line: int
    ir_text: tuple[str, ...]
    branches: tuple[BranchPlan, ...]
    gates: int  # outputs a gate(...) mixes; 0 for a single branch
    outputs: int  # output branches


def comment(text: object) -> str:
    """``text`` made safe for a comment or a string literal: one line, printable ASCII,
    no quotes or backslashes."""
    cleaned = "".join(c if c.isprintable() and c.isascii() and c not in "\"'\\" else "?" for c in str(text))
    return cleaned[:200]


def plan_module(ir: PatternIR) -> ModulePlan:
    """The template inputs for a pattern whose branches all have kernels; branch ``n`` of
    the IR becomes kernels ``b<n>_*``."""
    return ModulePlan(
        pattern=comment(ir.name),
        source=comment(ir.source_name),
        line=ir.line,
        ir_text=tuple(comment(line) for line in format_ir(ir).splitlines()),
        branches=tuple(_plan_branch(index, branch, ir) for index, branch in enumerate(ir.branches)),
        gates=len(ir.output_branches) if ir.combine == "gate" else 0,
        outputs=len(ir.output_branches),
    )


def _plan_branch(index: int, branch: BranchIR, ir: PatternIR) -> BranchPlan:
    """A static branch gets its block walks in both directions, a select branch its
    selection's numbers; both get the element predicate."""
    forward = backward = select = None
    if isinstance(branch.blocks, SelectedBlocks):
        select = _plan_selection(branch.blocks, ir.branch(branch.blocks.score))
    else:
        segments = branch.blocks.segments
        forward = _walk(segments, [(s.start, s.stop, s.full_start, s.full_stop) for s in segments])
        backward = _walk(segments, [(s.q_start, s.q_stop, s.q_full_start, s.q_full_stop) for s in segments])
    predicate_rows = _predicate(branch.predicate, rows_first=True)
    if select is not None:  # a tile's rows may have chosen different blocks: `chosen` says which did
        predicate_rows = f"chosen[:, None] & ({predicate_rows})"
    return BranchPlan(
        index=index,
        title=comment(f"{branch.name} = {branch.definition}"),
        uses_documents="doc_ids" in branch.runtime,
        predicate_rows=predicate_rows,
        predicate_cols=_predicate(branch.predicate, rows_first=False),
        forward=forward,
        backward=backward,
        select=select,
        pool=_plan_pool(branch.keys),
        key_count=ExpressionPrinter("triton", _KERNEL_NAMES)(branch.keys.length) if isinstance(branch.keys, PooledKeys) else "Lk",
        **_steps(index, "doc_ids" in branch.runtime, select is not None),
    )


def _steps(index: int, uses_documents: bool, select: bool) -> dict[str, Step | None]:
    """The inner functions a branch's walks call. A select branch's attention reads raw
    keys (Nk is Lk) and needs no documents inside a step: its table already respects them.
    The attention step reads a KV cache's pages where PAGE > 0 (``attend_cached``, for the
    decode kernels); the forward kernels pass PAGE = 0, which compiles the paging away."""
    documents = ("doc_start_q", "doc_end_q") if uses_documents and not select else ()
    keys = ("k_base", "v_base", "stride_kn", "stride_vn", "Nk", "qk_scale")
    pages = ("pages", "stride_kp", "stride_vp")
    tile = ("BLOCK_N", "HEAD_DIM", "D_PAD", "PRECISION")
    chosen = ("chosen",) if select else ()  # the rows of a select tile that chose the block walked
    attend = Step(f"b{index}_attend_keys", ("acc", "m_i", "l_i", "q", "q_pos", *chosen, *documents, *keys, *pages),
                  (*tile, "PAGE"), ("acc", "m_i", "l_i"))  # fmt: skip
    dq = Step(f"b{index}_dq_keys", ("dq", "q", "do", "lse", "delta", "q_pos", *chosen, *documents, *keys), tile, ("dq",))
    if select:
        attend, dq = attend.passing(Nk="Lk"), dq.passing(Nk="Lk")
    steps = dict(
        attend=attend.passing(pages="k_base", stride_kp="0", stride_vp="0", PAGE="0"),
        attend_cached=attend.passing(stride_kp="stride_kb", stride_vp="stride_vb"),
        dq=dq,
    )
    if select:
        return dict(steps, dkdv=None)
    tables = ("DOC_START", "DOC_END", "doc_row") if uses_documents else ()
    queries = ("dk", "dv", "k", "v", "k_pos", "k_ok", "q_base", "do_base", "stat_base", *tables, "LSE", "DELTA",
               "dq_base", "stride_qh", "stride_qm", "stride_doh", "stride_dom", "stride_dqh", "stride_dqm",
               "Lq", "Lk", "qk_scale", "sm_scale", "q_lo", "q_hi")  # fmt: skip
    constants = ("ROWS", "BLOCK_M", "HEAD_DIM", "D_PAD", "PRECISION", "FUSED_DQ")  # FUSED_DQ: add dQ as well
    dkdv = Step(f"b{index}_dkdv_queries", queries, constants, ("dk", "dv"))
    return dict(steps, dkdv=dkdv)


def _plan_pool(keys) -> PoolPlan | None:
    if isinstance(keys, PooledKeys) and keys.pool in ("mean", "max"):
        return PoolPlan(keys.block, keys.stride, keys.pool)
    return None


def _plan_selection(blocks: SelectedBlocks, score: BranchIR) -> SelectPlan:
    pooled = score.keys
    names = {I: "q_pos[:, None]", J: "c[None, :]", DocStart(I): "doc_start_q[:, None]"}
    return SelectPlan(
        block=blocks.block,
        topk=blocks.topk,
        keep_first=blocks.keep_first,
        keep_local=blocks.keep_local,
        per_block=blocks.per == "block",
        score_title=comment(f"{score.name} = {score.definition}"),
        pool_block=pooled.block,
        pool_stride=pooled.stride,
        pooled_visible=ExpressionPrinter("triton", names)(score.predicate),
        pooled_count=ExpressionPrinter("triton", _KERNEL_NAMES)(pooled.length),
    )


def _predicate(predicate: sympy.Basic, rows_first: bool) -> str:
    rows, cols = ("[:, None]", "[None, :]") if rows_first else ("[None, :]", "[:, None]")
    names = {
        I: f"q_pos{rows}",
        J: f"k_pos{cols}",
        DocStart(I): f"doc_start_q{rows}",
        DocEnd(I): f"doc_end_q{rows}",
    }
    return ExpressionPrinter("triton", names)(predicate)


def _walk(segments: tuple[KeySegment, ...], exprs: list[tuple]) -> Walk:
    # Document-table lookups in the bounds become scalar loads, named once each.
    lookups = sorted(
        {atom for bounds in exprs for e in bounds for atom in e.atoms(DocStart, DocEnd)}, key=sympy.default_sort_key
    )
    names = dict(_KERNEL_NAMES)
    loads = []
    for n, atom in enumerate(lookups):
        table = "DOC_START" if isinstance(atom, DocStart) else "DOC_END"
        index = ExpressionPrinter("triton", names)(atom.args[0])
        name = f"doc_{'start' if isinstance(atom, DocStart) else 'end'}_{n}"
        loads.append(Bound(name, f"tl.load({table} + doc_row + {index})"))
        names[atom] = name
    printer = ExpressionPrinter("triton", names)
    coded = []
    for n, (segment, bounds) in enumerate(zip(segments, exprs)):
        start, stop, full_start, full_stop = (
            Bound(f"seg{n}_{part}", printer(e)) for part, e in zip(("start", "stop", "full_start", "full_stop"), bounds)
        )
        coded.append(SegmentCode(comment(_describe(segment)), start, stop, full_start, full_stop))
    return Walk(tuple(loads), tuple(coded))


def _describe(segment: KeySegment) -> str:
    show = ExpressionPrinter("python")

    def bound(e):
        return "-inf" if e == -sympy.oo else "+inf" if e == sympy.oo else show(e)

    rows = "" if (segment.rows_lo, segment.rows_hi) == (-sympy.oo, sympy.oo) else f"rows {bound(segment.rows_lo)}..{bound(segment.rows_hi)}: "
    return f"{rows}keys [{bound(segment.keys_lo)}, {bound(segment.keys_hi)}]{'' if segment.exact else ' (hull)'}"
