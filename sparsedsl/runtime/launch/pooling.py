"""A compress branch's mean or max pooling, by its generated kernels, with autograd.

(Learned ``mlp`` pooling belongs to :mod:`sparsedsl.nn`, which owns its weights.)
"""

from __future__ import annotations

import torch

from ...codegen.kernel_specs import POOL, POOL_BACKWARD
from ...ir.nodes import PooledKeys
from .common import (
    BranchKernels,
    cdiv,
    head_dims,
    interpretable,
    interpreting,
    launch,
    output_like,
    rows_last,
)

# Windows per forward program, keys per backward program: enough rows to keep a few
# warps busy; the interpreter runs fewer, larger programs faster.
GPU_ROWS, INTERPRETER_ROWS = 32, 128


def pool_forward(kernels: BranchKernels, keys: PooledKeys, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) keys or values to the (B, H, Nc, D) pooled ones of compress branch
    ``keys`` (contiguous, in x's dtype), and what the backward needs besides: for max
    pooling the (B, H, Nc, D) float32 share of each pooled element's gradient that each of
    its tied maxima gets, for mean pooling an empty float32 tensor."""
    dtype = x.dtype
    x = rows_last(interpretable(x))
    B, H, L, D = x.shape
    Nc = keys.count(L)
    out = output_like(x, (B, H, Nc, D))
    # 1 / (entries equal to the max) per pooled element, for splitting gradients among ties
    share = output_like(x, (B, H, Nc, D), torch.float32) if keys.pool == "max" else x.new_empty(0, dtype=torch.float32)
    rows = INTERPRETER_ROWS if interpreting() else GPU_ROWS
    if Nc:
        launch(
            kernels.functions.pool, POOL, (cdiv(Nc, rows), B * H), X=x, OUT=out,
            SHARE=share if keys.pool == "max" else out, Nc=Nc, num_heads=H, **head_dims(D), BLOCK_C=rows,
        )  # fmt: skip
    return out.to(dtype), share


def pool_backward(kernels: BranchKernels, keys: PooledKeys, x, out, share, dout) -> torch.Tensor:
    """dx (contiguous, in x's dtype) of :func:`pool_forward`, from its input ``x``, its
    outputs ``out`` and ``share`` and the pooled gradient ``dout``: the gradient flows back
    to every key a window covers."""
    dtype = x.dtype
    x = rows_last(interpretable(x))
    out, dout = (interpretable(t).contiguous() for t in (out, dout))
    B, H, L, D = x.shape
    dx = output_like(x, x.shape)  # contiguous
    rows = INTERPRETER_ROWS if interpreting() else GPU_ROWS
    launch(
        kernels.functions.pool_backward, POOL_BACKWARD, (cdiv(L, rows), B * H), X=x, OUT=out,
        SHARE=share if keys.pool == "max" else out, DOUT=dout, DX=dx, L=L, Nc=out.shape[2], num_heads=H,
        **head_dims(D), BLOCK_T=rows,
    )  # fmt: skip
    return dx.to(dtype)


class BlockPooling(torch.autograd.Function):
    """:func:`pool_forward` with autograd, for callers outside a pattern call (the KV
    cache's pooling); a pattern call pools through ``sparsedsl::pool`` (:mod:`.ops`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: BranchKernels, keys: PooledKeys) -> torch.Tensor:
        out, share = pool_forward(kernels, keys, x)
        ctx.save_for_backward(x, out, share)
        ctx.kernels, ctx.keys = kernels, keys
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, out, share = ctx.saved_tensors
        return pool_backward(ctx.kernels, ctx.keys, x, out, share, dout), None, None
