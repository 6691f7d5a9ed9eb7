"""Stage 6 of the pipeline: launching a branch's generated kernels, forward and backward.

:func:`attention_forward` runs one branch's forward kernel and :func:`attention_backward`
its backward kernels: rowsum(dO * O), then dK/dV per key block, then dQ per query tile
or, with :func:`fused_dq` on, dQ added atomically inside the dK/dV kernel instead (five
matrix products per visible block pair rather than seven). :mod:`.ops` makes them
differentiable operators.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from ...codegen.kernel_specs import (
    BACKWARD_PREPROCESS,
    STATIC_BACKWARD_DKDV,
    STATIC_BACKWARD_DQ,
    STATIC_FORWARD,
)
from ..tuning import TileConfig
from .common import (
    LOG2E,
    BranchKernels,
    cdiv,
    choose_config,
    compile_together,
    documents,
    head_dims,
    interpretable,
    interpreting,
    launch,
    output_like,
    precision_of,
    rows_last,
)


def run_forward(kernels: BranchKernels, q, k, v, scale: float, docs, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch's output and base-2 log-sum-exp; ``Lk`` positions, ``k.shape[2]`` keys."""
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = output_like(q)
    lse = output_like(q, (B, Hq, Lq), torch.float32)
    tables = list(docs) if docs is not None else []
    forward = kernels.functions.forward

    def run(c: TileConfig):
        grid = (cdiv(Lq, c.rows), B * Hkv * (group // c.heads))
        launch(
            forward, STATIC_FORWARD, grid, Q=q, K=k, V=v, O=out, LSE=lse, **documents(tables),
            Lq=Lq, Lk=Lk, Nk=Nk, num_kv_heads=Hkv, qk_scale=scale * LOG2E,
            GROUP=group, HEADS=c.heads, **head_dims(D), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            PRECISION=precision_of(q.dtype), num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip

    run(choose_config("forward", kernels, q, k, run))
    return out, lse


def softmax_delta(module: ModuleType, out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) per query row: the softmax term every backward kernel needs."""
    B, Hq, Lq, D = out.shape
    delta = output_like(out, (B, Hq, Lq), torch.float32)
    block = 64 if not interpreting() else 16
    launch(
        module.backward_preprocess, BACKWARD_PREPROCESS, (cdiv(Lq, block), B * Hq),
        O=out, DO=dout, DELTA=delta, Lq=Lq, num_heads=Hq, **head_dims(D), BLOCK_M=block,
    )  # fmt: skip
    return delta


FUSED_DQ_VARIABLE = "SPARSEDSL_FUSED_DQ"


def fused_dq() -> bool:
    """Whether static branches' backward adds dQ inside the dK/dV kernel (one pass over the
    block pairs, atomics into a float32 dQ) rather than in a dQ kernel of its own:
    ``SPARSEDSL_FUSED_DQ=1``. Read at every backward, not at import, so that a benchmark
    can time both strategies in one process; the two-kernel path is the default (the
    fused one measured slower on an H100, docs/performance.md). Each
    strategy's dK/dV kernel is tuned under its own key ('dkdv' or 'dkdv_fused')."""
    return os.environ.get(FUSED_DQ_VARIABLE) == "1"


def run_backward(kernels: BranchKernels, q, k, v, out, lse, dout, scale: float, docs, Lk: int, fused: bool = False):
    """dq, dk, dv of one static branch; ``fused``: dQ from the dK/dV kernel (:func:`fused_dq`)."""
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dout = rows_last(dout)
    tables = list(docs) if docs is not None else []
    delta = softmax_delta(kernels.module, out, dout)
    dq = None if fused else output_like(q)  # the dQ kernel's (passed, unread, to the dK/dV kernel)
    common = dict(**head_dims(D), GROUP=group, PRECISION=precision_of(q.dtype))
    dkdv, dq_kernel = kernels.functions.backward_dkdv, kernels.functions.backward_dq
    grads = {"dq": dq}

    def run_dkdv(c: TileConfig):
        # Share long query walks among programs; shared key blocks meet atomically.
        tiles_per_split = max(1, c.max_tiles // (group // c.heads))
        splits = cdiv(cdiv(Lq, c.rows), tiles_per_split)
        dtype = torch.float32 if splits > 1 else k.dtype
        dk = torch.zeros(k.shape, device=k.device, dtype=dtype)  # keys no query sees get 0
        dv = torch.zeros(v.shape, device=v.device, dtype=dtype)
        # Fused: every key block adds to dQ; rows that see no key keep 0. Zeroed per launch
        # (the tuner launches several times).
        dq_sums = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fused else dq
        launch(
            dkdv, STATIC_BACKWARD_DKDV, (cdiv(Nk, c.block_n), B * Hkv, splits),
            Q=q, K=k, V=v, DO=dout, DK=dk, DV=dv, DQ=dq_sums, LSE=lse, DELTA=delta, **documents(tables),
            Lq=Lq, Lk=Lk, Nk=Nk, num_kv_heads=Hkv, qk_scale=scale * LOG2E, sm_scale=scale, tiles_per_split=tiles_per_split,
            HEADS=c.heads, BLOCK_M=c.block_m, BLOCK_N=c.block_n, ATOMIC=splits > 1, FUSED_DQ=fused,
            num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )  # fmt: skip
        grads["dk"], grads["dv"] = dk.to(k.dtype), dv.to(v.dtype)
        if fused:
            grads["dq"] = dq_sums.to(q.dtype)

    def run_dq(c: TileConfig):
        launch(
            dq_kernel, STATIC_BACKWARD_DQ, (cdiv(Lq, c.rows), B * Hkv * (group // c.heads)),
            Q=q, K=k, V=v, DO=dout, DQ=dq, LSE=lse, DELTA=delta, **documents(tables),
            Lq=Lq, Lk=Lk, Nk=Nk, num_kv_heads=Hkv, qk_scale=scale * LOG2E, sm_scale=scale,
            HEADS=c.heads, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )  # fmt: skip

    if fused:
        run_dkdv(choose_config("dkdv_fused", kernels, q, k, run_dkdv))
    else:
        compile_together(kernels, q, k, {"dkdv": run_dkdv, "dq": run_dq})
        run_dkdv(choose_config("dkdv", kernels, q, k, run_dkdv))
        run_dq(choose_config("dq", kernels, q, k, run_dq))
    return grads["dq"], grads["dk"], grads["dv"]


def attention_forward(kernels: BranchKernels, q, k, v, scale: float, docs, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One static branch's output (contiguous, in q's dtype) and base-2 log-sum-exp
    (contiguous float32, -inf where a row sees no key). ``k`` and ``v`` are the raw keys
    (``Lk`` of them) or a compress branch's pooled ones; ``Lk`` is always the number of
    positions; ``docs`` the document tables, or None."""
    dtype = q.dtype
    q, k, v = (rows_last(interpretable(t)) for t in (q, k, v))
    if k.shape[2] == 0:  # no pooled key exists yet: every row sees nothing
        return q.new_zeros(q.shape, dtype=dtype), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    out, lse = run_forward(kernels, q, k, v, scale, docs, Lk)
    return out.to(dtype), lse


def attention_backward(kernels: BranchKernels, q, k, v, out, lse, dout, scale: float, docs, Lk: int):
    """dq, dk, dv (contiguous, in q's dtype) of :func:`attention_forward`, from its
    inputs, its output ``out`` and log-sum-exp ``lse`` and the output's gradient ``dout``;
    dq from a kernel of its own, or with :func:`fused_dq` from the dK/dV kernel."""
    dtype = q.dtype
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    q, k, v, out, dout = (rows_last(interpretable(t)) for t in (q, k, v, out, dout))
    grads = run_backward(kernels, q, k, v, out, lse, dout, scale, docs, Lk, fused=fused_dq())
    return tuple(g.to(dtype) for g in grads)
