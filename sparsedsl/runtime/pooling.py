"""A compress branch's mean or max pooling, by its generated kernels, with autograd.

(Learned ``mlp`` pooling belongs to :mod:`sparsedsl.nn`, which owns its weights.)
"""

from __future__ import annotations

import torch
import triton

from ..ir.nodes import PooledKeys
from .launch import BranchKernels, head_dims, interpretable, interpreting, output_like, rows_last

# Windows per forward program, keys per backward program: enough rows to keep a few
# warps busy; the interpreter runs fewer, larger programs faster.
GPU_ROWS, INTERPRETER_ROWS = 32, 128


class BlockPooling(torch.autograd.Function):
    """(B, H, L, D) keys or values to the (B, H, Nc, D) pooled ones of compress branch
    ``keys``; the gradient flows back to every key a window covers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: BranchKernels, keys: PooledKeys) -> torch.Tensor:
        dtype = x.dtype
        x = rows_last(interpretable(x))
        B, H, L, D = x.shape
        Nc = keys.count(L)
        out = output_like(x, (B, H, Nc, D))
        # 1 / (entries equal to the max) per pooled element, for splitting gradients among ties
        share = output_like(x, (B, H, Nc, D), torch.float32) if keys.pool == "max" else out
        rows = INTERPRETER_ROWS if interpreting() else GPU_ROWS
        if Nc:
            kernels.functions["pool"][(triton.cdiv(Nc, rows), B * H)](
                x, out, share, *x.stride()[:3], Nc, H, **head_dims(D), BLOCK_C=rows
            )
        ctx.save_for_backward(x, out, share)
        ctx.kernels, ctx.dtype = kernels, dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, out, share = ctx.saved_tensors
        B, H, L, D = x.shape
        dout = interpretable(dout).contiguous()
        dx = output_like(x, x.shape)  # contiguous
        rows = INTERPRETER_ROWS if interpreting() else GPU_ROWS
        ctx.kernels.functions["pool_backward"][(triton.cdiv(L, rows), B * H)](
            x, out, share, dout, dx, *x.stride()[:3], L, out.shape[2], H, **head_dims(D), BLOCK_T=rows
        )
        return dx.to(ctx.dtype), None, None
