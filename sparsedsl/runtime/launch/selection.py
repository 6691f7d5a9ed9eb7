"""Launching a select branch: block scores, top-k, and attention over the chosen blocks.

A selection is made once per query (``per="token"``) or per query block (``per="block"``),
its *unit*. The scores kernel writes (B, Hkv, units, n_blocks) block scores in which
forced blocks are +inf and blocks after the unit's own are -inf; the ``top`` kernel turns
them into the table the attention kernels walk. Selection is not differentiated; the
attention over the chosen blocks is (its operators are in ``ops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...codegen.kernel_specs import (
    SELECT_BACKWARD_DKDV,
    SELECT_BACKWARD_DQ,
    SELECT_FORWARD,
    SELECT_SCORES,
    SELECT_TOP,
)
from ...ir.nodes import BranchIR, PooledKeys, SelectedBlocks
from ..tuning import TileConfig
from .common import (
    LOG2E,
    BranchKernels,
    cdiv,
    choose_config,
    compile_together,
    documents,
    head_dims,
    interpreting,
    launch,
    next_power_of_2,
    output_like,
    precision_of,
    rows_last,
)
from .static import softmax_delta


@dataclass(frozen=True)
class Selection:
    """A select branch's numbers, and those of the compress branch that scores it."""

    block: int
    topk: int
    per_block: bool
    pool_block: int
    pool_stride: int

    @staticmethod
    def of(branch: BranchIR, score: BranchIR) -> Selection:
        blocks, pooled = branch.blocks, score.keys
        assert isinstance(blocks, SelectedBlocks) and isinstance(pooled, PooledKeys)
        return Selection(blocks.block, blocks.topk, blocks.per == "block", pooled.block, pooled.stride)

    @property
    def key(self) -> tuple[int, bool]:
        return (self.block, self.per_block)

    def score_step(self, least_keys: int) -> tuple[int, int]:
        """(BLOCK_C, STEP_S) of a kernel scoring blocks a step at a time: BLOCK_C pooled keys
        per step, at least ``least_keys`` and at least those meeting one selection block;
        STEP_S selection blocks per step, as many as leave every step's pooled keys within
        one tile."""
        block_c = max(least_keys, next_power_of_2((self.block + self.pool_block - 2) // self.pool_stride + 1))
        return block_c, max(1, ((block_c - 1) * self.pool_stride - self.pool_block + 2) // self.block)

    def units(self, Lq: int, Lk: int) -> int:
        """Rows of the selection table: the queries, or the query blocks holding a query."""
        if not self.per_block:
            return Lq
        return (Lk - 1) // self.block - (Lk - Lq) // self.block + 1

    def own_blocks(self, Lq: int, Lk: int, device) -> torch.Tensor:
        """The block each unit lies in: the last it may select."""
        off = Lk - Lq
        units = torch.arange(self.units(Lq, Lk), device=device)
        return off // self.block + units if self.per_block else (off + units) // self.block

    def tile(self, c: TileConfig) -> dict:
        """The attention kernels' tile: HEADS heads x ROWS positions of one selection block,
        padded to at least 16 rows; BLOCK_N keys per step. Per block the positions share one
        selection; per token with ROWS > 1 the tile walks the union of theirs."""
        rows = min(c.rows, self.block)
        return dict(HEADS=c.heads, ROWS=rows, BLOCK_M=max(16, c.heads * rows), BLOCK_N=min(c.block_n, self.block))


# ---------------------------------------------------------------- choosing blocks
# The most bytes of float32 block scores one scoring launch writes: (queries x KV heads x
# blocks) grows with the square of the length (16 GiB for a chunk of 64k queries at 1M), so
# longer calls score their queries in slices of whole selection blocks.
SCORES_BYTES = 1 << 30


def chosen_blocks(kernels: BranchKernels, selection: Selection, q, kc, lse_c, Lk: int, scale: float, docs=None) -> torch.Tensor:
    """The (B, Hkv, units, topk) table of :func:`choose_blocks` over :func:`block_scores`,
    with at most :data:`SCORES_BYTES` of scores at a time. A slice's queries see no key
    after its last one, so it is scored as a call that ends there, over fewer blocks: the
    same scores and choice (on a GPU, up to the tile each slice's size is tuned to, which may
    round near-ties differently), the table's filler (n_blocks: none chosen) set to the call's."""
    B, _, Lq, _ = q.shape
    n_blocks = cdiv(Lk, selection.block)
    slices = score_slices(selection, Lq, Lk, B * kc.shape[1] * n_blocks * 4)
    if len(slices) == 1:
        return choose_blocks(kernels, block_scores(kernels, selection, q, kc, lse_c, Lk, scale, docs), selection.topk)
    off = Lk - Lq
    tables = []
    for start, stop in slices:
        rows = slice(start - off, stop - off)
        slice_docs = [t[:, :stop].contiguous() for t in docs] if docs else None  # (B, Lk) tables
        scores = block_scores(kernels, selection, q[:, :, rows], kc, lse_c[:, :, rows].contiguous(), stop, scale, slice_docs)
        table = choose_blocks(kernels, scores, selection.topk)
        tables.append(table.masked_fill(table == scores.shape[-1], n_blocks))
        del scores  # before the next slice's: one buffer of scores at a time
    return torch.cat(tables, 2)


def score_slices(selection: Selection, Lq: int, Lk: int, unit_bytes: int) -> list[tuple[int, int]]:
    """The query positions (start, stop) of each scoring launch of a call (queries Lk - Lq ..
    Lk - 1) whose units weigh ``unit_bytes`` of scores each: one launch within
    :data:`SCORES_BYTES`, else slices that end on selection blocks."""
    if selection.units(Lq, Lk) * unit_bytes <= SCORES_BYTES:
        return [(Lk - Lq, Lk)]
    positions = SCORES_BYTES // unit_bytes * (selection.block if selection.per_block else 1)
    step = max(1, positions // selection.block) * selection.block
    off = Lk - Lq
    edges = [off, *range((off // step + 1) * step, Lk, step), Lk]
    return list(zip(edges, edges[1:]))


def block_scores(kernels: BranchKernels, selection: Selection, q, kc, lse_c, Lk: int, scale: float, docs=None) -> torch.Tensor:
    """(B, Hkv, units, n_blocks) float32 block scores, forced +inf and ineligible -inf.
    ``kc`` are the score branch's pooled keys and ``lse_c`` its base-2 log-sum-exp;
    ``docs`` the document tables where blocks count from each document's start."""
    B, Hq, Lq, D = q.shape
    Hkv, Nc = kc.shape[1], kc.shape[2]
    n_blocks = cdiv(Lk, selection.block)
    units = selection.units(Lq, Lk)
    scores = output_like(q, (B, Hkv, units, n_blocks), torch.float32)
    if Nc == 0:  # nothing pooled yet: every block scores 0 (forced and ineligible aside)
        kc = kc.new_zeros(B, Hkv, 1, D)
    function = kernels.functions.scores

    def run(c: TileConfig):
        # Per block only the block's first position scores: its tile's other rows only pad
        # the matrix products to 16 rows.
        rows = min(c.rows, max(1, 16 // c.heads)) if selection.per_block else c.rows
        block_c, step = selection.score_step(c.block_n)
        grid = (units if selection.per_block else cdiv(Lq, rows), B * Hkv)
        launch(
            function, SELECT_SCORES, grid, Q=q, KC=kc, LSE=lse_c, SCORES=scores, **documents(docs),
            Lq=Lq, Lk=Lk, Nc=Nc, num_kv_heads=Hkv, n_blocks=n_blocks, qk_scale=scale * LOG2E,
            GROUP=Hq // Hkv, HEADS=c.heads, ROWS=rows, **head_dims(D), BLOCK_C=block_c,
            BLOCK_S=max(16, next_power_of_2(step)), STEP_S=step, PRECISION=precision_of(q.dtype),
            SUM_HALF=q.dtype != torch.float32, SUM_PRECISION="ieee" if interpreting() else "tf32x3",
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip

    run(choose_config("scores", kernels, q, kc, run, selection.key))
    return scores


def choose_blocks(kernels: BranchKernels, scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The (B, Hkv, units, topk) int32 table of chosen blocks, best first. Where fewer
    than topk blocks are eligible the rest are n_blocks, past every unit's own block,
    which the kernels skip."""
    *lead, n_blocks = scores.shape
    table = output_like(scores, (*lead, topk), torch.int32)
    rows = scores.numel() // n_blocks
    width = next_power_of_2(max(n_blocks, topk))  # top_blocks takes topk's power of two
    per_program = max(1, 4096 // width)  # rows held in registers at once
    launch(
        kernels.functions.top, SELECT_TOP, (cdiv(rows, per_program),), SCORES=scores, TABLE=table,
        units=rows, n_blocks=n_blocks, UNITS=per_program, BLOCKS=width, num_warps=4 if width <= 4096 else 8,
    )  # fmt: skip
    return table


def selection_mask(selection: Selection, table: torch.Tensor, Lq: int, Lk: int) -> torch.Tensor:
    """A table as a (B, Hkv, Lq, n_blocks) boolean: which blocks each query attends to
    (the form :func:`sparsedsl.reference.attention` takes and reports)."""
    n_blocks = cdiv(Lk, selection.block)
    chosen = torch.zeros(*table.shape[:3], n_blocks + 1, dtype=torch.bool, device=table.device)
    chosen.scatter_(-1, table.long().clamp(max=n_blocks), True)
    own = selection.own_blocks(Lq, Lk, table.device)
    chosen = chosen[..., :n_blocks] & (torch.arange(n_blocks, device=table.device) <= own[:, None])
    if selection.per_block:  # one row per query block: repeat it for the block's queries
        rows = torch.arange(Lk - Lq, Lk, device=table.device) // selection.block - (Lk - Lq) // selection.block
        chosen = chosen[:, :, rows]
    return chosen


def reverse_index(selection: Selection, table: torch.Tensor, Lq: int, Lk: int, per_item: int):
    """For dK/dV: the query positions that chose each block, and work items over them.

    Returns ``entries`` (int32 positions, grouped by (batch x KV head, block)) and
    ``work`` (n_items, 5) int32 rows (batch x KV head, block, first, end, shared): each
    item covers at most ``per_item`` entries; a block with several items has shared = 1.
    One host synchronisation (the number of items sizes the grid).
    """
    B, Hkv, units, topk = table.shape
    device = table.device
    n_blocks = cdiv(Lk, selection.block)
    own = selection.own_blocks(Lq, Lk, device)
    valid = table.long() <= own[:, None]
    pair = torch.arange(B * Hkv, device=device).view(B, Hkv, 1, 1)
    key = torch.where(valid, pair * n_blocks + table.long(), B * Hkv * n_blocks)  # invalid ones sort last
    ordered, order = torch.sort(key.flatten(), stable=True)
    unit = (torch.arange(units, device=device).view(1, 1, units, 1).expand_as(table).flatten())[order]
    # Entries per (batch x KV head, block), from the sorted keys (bincount's atomics are slow
    # when few blocks take many entries).
    counts = torch.diff(torch.searchsorted(ordered, torch.arange(B * Hkv * n_blocks + 1, device=device)))
    if selection.per_block:  # a unit is a whole query block of positions
        first_position = own[unit] * selection.block
        entries = (first_position[:, None] + torch.arange(selection.block, device=device)).flatten()
        counts = counts * selection.block
    else:
        entries = unit + (Lk - Lq)
    starts = torch.cumsum(counts, 0) - counts
    pieces = (counts + per_item - 1) // per_item
    n_items = int(pieces.sum())  # the synchronisation
    group = torch.repeat_interleave(torch.arange(B * Hkv * n_blocks, device=device), pieces, output_size=n_items)
    piece = torch.arange(n_items, device=device) - (torch.cumsum(pieces, 0) - pieces)[group]
    first = starts[group] + piece * per_item
    end = torch.minimum(first + per_item, starts[group] + counts[group])
    work = torch.stack([group // n_blocks, group % n_blocks, first, end, (pieces[group] > 1).long()], 1)
    return entries.to(torch.int32).contiguous(), work.to(torch.int32).contiguous()


# ---------------------------------------------------------------- attention
def _attention_grid(tile: dict, Lq: int, Lk: int, batch_heads: int, chunks: int):
    """Aligned runs of ROWS positions covering the queries, by batch x KV head x head chunk."""
    rows = tile["ROWS"]
    return ((Lk - 1) // rows - (Lk - Lq) // rows + 1, batch_heads * chunks)


def run_selected_forward(kernels: BranchKernels, selection: Selection, q, k, v, table, scale: float):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = output_like(q)
    lse = output_like(q, (B, Hq, Lq), torch.float32)
    forward = kernels.functions.forward

    def run(c: TileConfig):
        tile = selection.tile(c)
        launch(
            forward, SELECT_FORWARD, _attention_grid(tile, Lq, Lk, B * Hkv, group // c.heads),
            Q=q, K=k, V=v, O=out, LSE=lse, BLOCKS=table, Lq=Lq, Lk=Lk, num_kv_heads=Hkv, qk_scale=scale * LOG2E,
            GROUP=group, **tile, **head_dims(D), PRECISION=precision_of(q.dtype),
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip

    run(choose_config("select_forward", kernels, q, k, run, selection.key))
    return out, lse


def run_selected_backward(kernels: BranchKernels, selection: Selection, q, k, v, out, lse, dout, table, scale: float):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dout = rows_last(dout)
    delta = softmax_delta(kernels.module, out, dout)
    dq = output_like(q)
    common = dict(GROUP=group, **head_dims(D), PRECISION=precision_of(q.dtype))
    dq_kernel, dkdv = kernels.functions.backward_dq, kernels.functions.backward_dkdv

    def run_dq(c: TileConfig):
        tile = selection.tile(c)
        launch(
            dq_kernel, SELECT_BACKWARD_DQ, _attention_grid(tile, Lq, Lk, B * Hkv, group // c.heads),
            Q=q, K=k, V=v, DO=dout, DQ=dq, LSE=lse, DELTA=delta, BLOCKS=table,
            Lq=Lq, Lk=Lk, num_kv_heads=Hkv, qk_scale=scale * LOG2E, sm_scale=scale, **tile, **common,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip

    grads = {}

    def run_dkdv(c: TileConfig):
        rows = c.rows
        entries, work = reverse_index(selection, table, Lq, Lk, c.max_tiles * rows)
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)  # keys nobody chose get 0
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        block_n = min(c.block_n, selection.block)
        if work.shape[0]:
            launch(
                dkdv, SELECT_BACKWARD_DKDV, (work.shape[0], selection.block // block_n),
                Q=q, K=k, V=v, DO=dout, DK=dk, DV=dv, LSE=lse, DELTA=delta, ENTRIES=entries, WORK=work,
                Lq=Lq, Lk=Lk, num_kv_heads=Hkv, qk_scale=scale * LOG2E, sm_scale=scale,
                HEADS=c.heads, ROWS=rows, BLOCK_M=max(16, c.block_m), BLOCK_N=block_n, **common,
                num_warps=c.num_warps, num_stages=c.num_stages,
            )  # fmt: skip
        grads["dk"], grads["dv"] = dk, dv

    compile_together(kernels, q, k, {"select_dq": run_dq, "select_dkdv": run_dkdv}, selection.key)
    run_dq(choose_config("select_dq", kernels, q, k, run_dq, selection.key))
    run_dkdv(choose_config("select_dkdv", kernels, q, k, run_dkdv, selection.key))
    return dq, grads["dk"], grads["dv"]
