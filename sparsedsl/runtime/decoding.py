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


def run_decode(
    kernels: BranchKernels, q, k, v, lengths, new, docs, scale: float, max_keys: int,
    splits: int | None = None, block_n: int | None = None, num_stages: int = 3,
):  # fmt: skip
    """Output (B, Hq, Lq, D) and base-2 log-sum-exp (B, Hq, Lq) of a branch's decode kernel.
    ``k``/``v`` are the cache's (B, Hkv, N, D) raw or pooled keys; ``lengths`` and ``new``
    (B,) int32 tensors; ``docs`` the (start, end) tables over cache positions, or None.
    ``splits``, ``block_n`` and ``num_stages`` override the defaults (for benchmarks)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    heads, rows = decode_tile(group, Lq)
    block_n = block_n or (64 if q.is_cuda else 16)
    programs = B * Hkv * (group // heads)
    splits = splits or choose_splits(programs, max_keys, block_n, q.device)
    out = output_like(q)
    lse = output_like(q, (B, Hq, Lq), torch.float32)
    if splits == 1:
        part_o, part_lse, stride_os, stride_ls = out, lse, 0, 0
    else:
        part_o = output_like(q, (splits, B, Hq, Lq, D), torch.float32)
        part_lse = output_like(q, (splits, B, Hq, Lq), torch.float32)
        stride_os, stride_ls = part_o.stride(0), part_lse.stride(0)
    tables = list(docs) if docs is not None else []
    doc_stride = docs[0].stride(0) if docs is not None else 0
    kernels.functions["decode"][(splits, programs)](
        q, k, v, part_o, part_lse, lengths, new, *tables,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], stride_os, *part_o.stride()[-4:-1], stride_ls,
        Lq, Hkv, scale * LOG2E, doc_stride,
        GROUP=group, HEADS=heads, **head_dims(D), BLOCK_M=heads * rows, BLOCK_N=block_n,
        PRECISION=precision_of(q.dtype), num_warps=4, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        kernels.module.decode_combine[(B * Hq * Lq,)](
            part_o, part_lse, out, lse, splits, part_o.stride(0), part_lse.stride(0), **head_dims(D),
            SPLITS=max(2, triton.next_power_of_2(splits)),
        )
    return out, lse
