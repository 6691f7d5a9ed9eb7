"""Launching the generated decode kernels against a KV cache (flash-decoding).

A decode call has few query rows per sequence, so one program per query tile would leave
most of a GPU idle: every tile's key blocks are split among several programs, each
writing a partial output and log-sum-exp, and ``decode_merge`` merges them (and mixes
gated branches) in one launch at the end of the step. Lengths come from the cache's
device tensor, so nothing here waits for the GPU.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch

from ..codegen.kernel_specs import (
    DECODE,
    SELECT_DECODE,
    SELECT_DECODE_POOLED,
    decode_merge,
)
from ..runtime.launch.common import (
    LOG2E,
    BranchKernels,
    cdiv,
    dependent_launches,
    documents,
    head_dims,
    interpreting,
    launch,
    next_power_of_2,
    output_like,
    precision_of,
)
from ..runtime.launch.selection import Selection

MAX_SPLITS = 32  # the merge holds every split of a row in registers; more measured slower


class CachedKeys(NamedTuple):
    """Keys and values a decode kernel reads from a KV cache: raw or pooled, (B, Hkv, N, D)
    in a contiguous cache (``page`` 0), (pages, Hkv, page, D) in a paged one, whose rows
    find them through the (B, columns) int32 page tables ``pages`` (unread when contiguous)."""

    k: torch.Tensor
    v: torch.Tensor
    page: int
    pages: torch.Tensor


class CacheRows(NamedTuple):
    """What a decode step knows of its cache's rows, on the device: ``lengths`` (B,) int32
    positions held (the new ones included), ``new`` (B,) int32 of them new, and
    ``tickets`` (B * Hkv,) int32 zeros, the counters of kernels whose last program
    finishes a stage."""

    lengths: torch.Tensor
    new: torch.Tensor
    tickets: torch.Tensor


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_tile(group: int, Lq: int) -> tuple[int, int]:
    """(HEADS, ROWS) of a decode tile: the whole GQA group (up to 16 heads) times the new
    rows, padded to the 16 rows the tensor cores take."""
    heads = max(h for h in (1, 2, 4, 8, 16) if group % h == 0)
    rows = max(next_power_of_2(Lq), 16 // heads)
    return heads, rows


def choose_splits(programs: int, max_keys: int, block_n: int, device: torch.device, least: int = 4) -> int:
    """How many programs share a tile's keys: enough for two programs per multiprocessor,
    at least ``least`` key blocks each. Fixed by the cache's capacity, not its current lengths,
    so that a captured CUDA graph stays valid as the cache grows."""
    if device.type != "cuda":
        return 3 if interpreting() else 1  # the interpreter exercises splitting and merging
    wanted = cdiv(2 * _multiprocessors(device.index or 0), programs)
    return max(1, min(wanted, cdiv(max_keys, least * block_n), MAX_SPLITS))


class Partials:
    """Where a split kernel writes: float32 partial outputs (splits, B, Hq, Lq, D) and base-2
    log-sum-exps (splits, B, Hq, Lq); with one split, the branch's output and log-sum-exp
    themselves. :func:`merge_outputs` (or a selection's scores) reads them as they are."""

    def __init__(self, q: torch.Tensor, splits: int) -> None:
        B, Hq, Lq, D = q.shape
        self.splits = splits
        dtype = q.dtype if splits == 1 else torch.float32
        self.o = output_like(q, (splits, B, Hq, Lq, D), dtype)
        self.lse = output_like(q, (splits, B, Hq, Lq), torch.float32)

    def merge_arguments(self, n: int) -> dict:
        """decode_merge's keywords for output branch ``n``: On, LSEn, splitsn."""
        return {f"O{n}": self.o, f"LSE{n}": self.lse, f"splits{n}": self.splits}


def merge_outputs(module, q: torch.Tensor, outputs: list[Partials], gates: torch.Tensor | None) -> torch.Tensor:
    """A decode step's output (B, Hq, Lq, D) in q's dtype: each output branch's partials
    merged and, for a gated pattern, mixed by ``gates`` (B, Hq, Lq, N), in one launch."""
    B, Hq, Lq, D = q.shape
    out = output_like(q)
    rows = B * Hq * Lq
    if q.is_cuda:  # several rows per program once there are rows for four per multiprocessor
        per_program = min(16, next_power_of_2(max(1, rows // (4 * _multiprocessors(q.device.index or 0)))))
    else:
        per_program = 2 if interpreting() else 1  # the interpreter exercises a partial last program
    partials = {name: value for n, p in enumerate(outputs) for name, value in p.merge_arguments(n).items()}
    launch(
        module.decode_merge, decode_merge(len(outputs), gates is not None), (cdiv(rows, per_program),),
        **partials, **({"G": gates} if gates is not None else {}), OUT=out, num_heads=Hq, Lq=Lq, rows=rows,
        **head_dims(D), SPLITS=max(2, next_power_of_2(max(p.splits for p in outputs))), ROWS=per_program,
        PDL=dependent_launches(q),
    )  # fmt: skip
    return out


def run_decode(
    kernels: BranchKernels, q, keys: CachedKeys, rows: CacheRows, docs, scale: float, max_keys: int,
    splits: int | None = None, block_n: int | None = None, num_stages: int = 3,
):  # fmt: skip
    """The :class:`Partials` of a static branch's decode kernel over the cache's raw or
    pooled ``keys``; ``docs`` the (start, end) tables over cache positions, or None.
    ``splits``, ``block_n`` and ``num_stages`` override the defaults (for benchmarks)."""
    B, Hq, Lq, D = q.shape
    Hkv = keys.k.shape[1]
    group = Hq // Hkv
    heads, tile_rows = decode_tile(group, Lq)
    block_n = block_n or (64 if q.is_cuda else 16)
    programs = B * Hkv * (group // heads)
    splits = splits or choose_splits(programs, max_keys, block_n, q.device)
    partials = Partials(q, splits)
    doc_stride = docs[0].stride(0) if docs is not None else 0
    launch(
        kernels.functions.decode, DECODE, (splits, programs), Q=q, K=keys.k, V=keys.v, O=partials.o, LSE=partials.lse,
        LENGTHS=rows.lengths, NEW=rows.new, PAGES=keys.pages, **documents(docs), Lq=Lq, num_kv_heads=Hkv,
        qk_scale=scale * LOG2E, doc_stride=doc_stride, GROUP=group, HEADS=heads, **head_dims(D),
        BLOCK_M=heads * tile_rows, BLOCK_N=block_n, PRECISION=precision_of(q.dtype), PAGE=keys.page,
        PDL=dependent_launches(q), num_warps=4, num_stages=num_stages,
    )  # fmt: skip
    return partials


def decode_selection(
    kernels: BranchKernels, selection: Selection, q, pooled: CachedKeys, rows: CacheRows, scale: float, capacity: int,
    splits: int | None = None,
):  # fmt: skip
    """The (B, Hkv, Lq, topk) int32 table of the blocks each new position selects, best
    first (n_blocks past the eligible ones and for padding positions), and the
    :class:`Partials` of its score branch's attention, in one launch: its pass over the
    cache's ``pooled`` keys gives that attention and every block's log-sum-exp, and the
    pass's last program of each row and KV head scores the blocks and takes the top-k.
    ``splits`` overrides the programs that share a row's pooled keys (for tests)."""
    B, Hq, Lq, D = q.shape
    Hkv = pooled.k.shape[1]
    group = Hq // Hkv
    heads, tile_rows = decode_tile(group, Lq)
    n_blocks = cdiv(capacity, selection.block)
    # Small steps on the CPU, so that short tests cross steps and splits.
    block_c, step = selection.score_step(64 if q.is_cuda else 8)
    programs = B * Hkv * (group // heads)
    score = Partials(q, splits or choose_splits(programs, n_blocks, step, q.device))
    block_lse = output_like(q, (B, Hq, Lq, n_blocks), torch.float32)
    table = torch.empty(B, Hkv, Lq, selection.topk, dtype=torch.int32, device=q.device)
    width = next_power_of_2(max(n_blocks, selection.topk))  # top_blocks takes topk's power of two
    top_heads = max(h for h in (1, 2, 4, 8, 16) if group % h == 0 and h * width <= 8192)  # no register spills
    launch(
        kernels.functions.decode_pooled, SELECT_DECODE_POOLED, (score.splits, programs), Q=q, KC=pooled.k, VC=pooled.v,
        O=score.o, LSE=score.lse, PLSE=block_lse, TABLE=table, TICKETS=rows.tickets, LENGTHS=rows.lengths,
        NEW=rows.new, PAGES=pooled.pages, Lq=Lq, num_kv_heads=Hkv, n_blocks=n_blocks, qk_scale=scale * LOG2E,
        GROUP=group, HEADS=heads, ROWS=tile_rows, **head_dims(D), BLOCK_C=block_c, BLOCK_S=max(16, next_power_of_2(step)),
        STEP_S=step, PRECISION=precision_of(q.dtype), SUM_HALF=q.dtype != torch.float32,
        SUM_PRECISION="ieee" if interpreting() else "tf32x3", PAGE=pooled.page, TOP_HEADS=top_heads, BLOCKS=width,
        LSE_SPLITS=max(2, next_power_of_2(score.splits)), PDL=dependent_launches(q), num_warps=4 if width <= 2048 else 8,
    )  # fmt: skip
    return table, score


def run_selected_decode(kernels: BranchKernels, selection: Selection, q, keys: CachedKeys, table, rows: CacheRows, scale: float):
    """The :class:`Partials` of a select branch's decode kernel over ``table``."""
    B, Hq, Lq, D = q.shape
    Hkv = keys.k.shape[1]
    group = Hq // Hkv
    heads = decode_tile(group, 1)[0]
    block_n = min(selection.block, 64 if q.is_cuda else 16)
    programs = B * Hkv * (group // heads) * Lq
    splits = choose_splits(programs, selection.topk, 1, q.device, least=1)  # down to one selected block each
    partials = Partials(q, splits)
    launch(
        kernels.functions.decode, SELECT_DECODE, (splits, programs), Q=q, K=keys.k, V=keys.v, O=partials.o,
        LSE=partials.lse, BLOCKS=table, LENGTHS=rows.lengths, NEW=rows.new, PAGES=keys.pages, Lq=Lq, num_kv_heads=Hkv,
        qk_scale=scale * LOG2E, GROUP=group, HEADS=heads, BLOCK_M=max(16, heads), **head_dims(D), BLOCK_N=block_n,
        PRECISION=precision_of(q.dtype), PAGE=keys.page, PDL=dependent_launches(q), num_warps=4, num_stages=3,
    )  # fmt: skip
    return partials
