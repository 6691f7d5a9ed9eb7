"""Launching the generated decode kernels against a KV cache (flash-decoding).

A decode call has few query rows per sequence, so one program per query tile would leave
most of a GPU idle: every tile's key blocks are split among several programs, each
writing a partial output and log-sum-exp, and ``decode_combine`` merges them. Lengths
come from the cache's device tensor, so nothing here waits for the GPU.
"""

from __future__ import annotations

from functools import cache

import torch
import triton

from .launch import LOG2E, BranchKernels, head_dims, interpreting, output_like, precision_of
from .selection import Selection, choose_blocks

MAX_SPLITS = 32  # the combine kernel merges every split of a row in registers; more measured slower


@cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_tile(group: int, Lq: int) -> tuple[int, int]:
    """(HEADS, ROWS) of a decode tile: the whole GQA group (up to 16 heads) times the new
    rows, padded to the 16 rows the tensor cores take."""
    heads = max(h for h in (1, 2, 4, 8, 16) if group % h == 0)
    rows = max(triton.next_power_of_2(Lq), 16 // heads)
    return heads, rows


def choose_splits(programs: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """How many programs share a tile's keys: enough for two programs per multiprocessor,
    at least 4 key blocks each. Fixed by the cache's capacity, not its current lengths,
    so that a captured CUDA graph stays valid as the cache grows."""
    if device.type != "cuda":
        return 3 if interpreting() else 1  # the interpreter exercises splitting and merging
    wanted = triton.cdiv(2 * _multiprocessors(device.index or 0), programs)
    return max(1, min(wanted, triton.cdiv(max_keys, 4 * block_n), MAX_SPLITS))


class Partials:
    """Where a split kernel writes: the final output and log-sum-exp when there is one
    split, else float32 partials that :meth:`merge` combines into them."""

    def __init__(self, q: torch.Tensor, splits: int) -> None:
        B, Hq, Lq, D = q.shape
        self.splits = splits
        self.out = output_like(q)
        self.lse = output_like(q, (B, Hq, Lq), torch.float32)
        if splits == 1:
            self.o, self.l = self.out, self.lse
        else:
            self.o = output_like(q, (splits, B, Hq, Lq, D), torch.float32)
            self.l = output_like(q, (splits, B, Hq, Lq), torch.float32)

    def args(self) -> tuple:
        """O, LSE, stride_os, stride_ob, stride_oh, stride_om, stride_ls for the kernel."""
        split_o, split_l = (self.o.stride(0), self.l.stride(0)) if self.splits > 1 else (0, 0)
        return (self.o, self.l, split_o, *self.o.stride()[-4:-1], split_l)

    def merge(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        if self.splits > 1:
            B, Hq, Lq, D = self.out.shape
            module.decode_combine[(B * Hq * Lq,)](
                self.o, self.l, self.out, self.lse, self.splits, self.o.stride(0), self.l.stride(0), **head_dims(D),
                SPLITS=max(2, triton.next_power_of_2(self.splits)),
            )
        return self.out, self.lse


def run_decode(
    kernels: BranchKernels, q, k, v, lengths, new, docs, scale: float, max_keys: int,
    splits: int | None = None, block_n: int | None = None, num_stages: int = 3,
):  # fmt: skip
    """Output (B, Hq, Lq, D) and base-2 log-sum-exp (B, Hq, Lq) of a static branch's decode
    kernel. ``k``/``v`` are the cache's (B, Hkv, N, D) raw or pooled keys; ``lengths`` and
    ``new`` (B,) int32 tensors; ``docs`` the (start, end) tables over cache positions, or
    None. ``splits``, ``block_n`` and ``num_stages`` override the defaults (for benchmarks)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    heads, rows = decode_tile(group, Lq)
    block_n = block_n or (64 if q.is_cuda else 16)
    programs = B * Hkv * (group // heads)
    splits = splits or choose_splits(programs, max_keys, block_n, q.device)
    partials = Partials(q, splits)
    O, LSE, *out_strides = partials.args()
    tables = list(docs) if docs is not None else []
    doc_stride = docs[0].stride(0) if docs is not None else 0
    kernels.functions["decode"][(splits, programs)](
        q, k, v, O, LSE, lengths, new, *tables, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides,
        Lq, Hkv, scale * LOG2E, doc_stride,
        GROUP=group, HEADS=heads, **head_dims(D), BLOCK_M=heads * rows, BLOCK_N=block_n,
        PRECISION=precision_of(q.dtype), num_warps=4, num_stages=num_stages,
    )  # fmt: skip
    return partials.merge(kernels.module)


def decode_selection(kernels: BranchKernels, selection: Selection, q, kc, lse_c, lengths, new, scale: float, capacity: int):
    """The (B, Hkv, Lq, topk) table of blocks each new position selects, from its score
    branch's pooled keys ``kc`` (the cache's) and decode log-sum-exp ``lse_c``."""
    B, Hq, Lq, D = q.shape
    Hkv = kc.shape[1]
    group = Hq // Hkv
    heads, rows = decode_tile(group, Lq)
    n_blocks = triton.cdiv(capacity, selection.block)
    scores = output_like(q, (B, Hkv, Lq, n_blocks), torch.float32)
    # As block_scores: BLOCK_C pooled keys per step, as many selection blocks as they cover.
    block_c = max(64 if q.is_cuda else 16,
                  triton.next_power_of_2((selection.block + selection.pool_block - 2) // selection.pool_stride + 1))  # fmt: skip
    step = max(1, ((block_c - 1) * selection.pool_stride - selection.pool_block + 2) // selection.block)
    splits = choose_splits(B * Hkv, n_blocks, step, q.device)
    kernels.functions["decode_scores"][(splits, B * Hkv)](
        q, kc, lse_c, scores, lengths, new, *q.stride()[:3], *kc.stride()[:3], *scores.stride()[:3],
        Lq, Hkv, n_blocks, scale * LOG2E,
        GROUP=group, HEADS=heads, ROWS=rows, **head_dims(D), BLOCK_C=block_c,
        BLOCK_S=max(16, triton.next_power_of_2(step)), STEP_S=step, PRECISION=precision_of(q.dtype),
        SUM_HALF=q.dtype != torch.float32, SUM_PRECISION="ieee" if interpreting() else "tf32x3", num_warps=4,
    )  # fmt: skip
    return choose_blocks(kernels, scores, selection.topk)


def run_selected_decode(kernels: BranchKernels, selection: Selection, q, k, v, table, lengths, new, scale: float):
    """Output and base-2 log-sum-exp of a select branch's decode kernel over ``table``."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    heads = decode_tile(group, 1)[0]
    block_n = min(selection.block, 64 if q.is_cuda else 16)
    programs = B * Hkv * (group // heads) * Lq
    splits = choose_splits(programs, selection.topk * selection.block, block_n, q.device)
    partials = Partials(q, splits)
    O, LSE, *out_strides = partials.args()
    kernels.functions["decode"][(splits, programs)](
        q, k, v, O, LSE, table, lengths, new, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out_strides,
        *table.stride()[:3], Lq, Hkv, scale * LOG2E,
        GROUP=group, HEADS=heads, BLOCK_M=max(16, heads), **head_dims(D), BLOCK_N=block_n,
        PRECISION=precision_of(q.dtype), num_warps=4, num_stages=3,
    )  # fmt: skip
    return partials.merge(kernels.module)
