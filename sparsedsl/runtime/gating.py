"""Mixing a gated pattern's branch outputs: ``out = sum_n gates[..., n] * out_n``.

One generated kernel reads every branch output once and writes the sum, in float32; its
backward writes each branch's output gradient and every gate's gradient in one pass.
(In PyTorch the same mix takes a product and a sum per branch, each a full pass over
memory, and as many again backward.)
"""

from __future__ import annotations

import torch
import triton

from .launch import head_dims, output_like, rows_last

ROWS = 16  # rows per program: small enough for any head dim's registers


class GatedSum(torch.autograd.Function):
    """``sum_n gates[..., n] * outputs[n]`` for (B, H, L, D) outputs and (B, H, L, N) gates."""

    @staticmethod
    def forward(ctx, module, gates: torch.Tensor, *outputs: torch.Tensor) -> torch.Tensor:
        outputs = tuple(o.contiguous() for o in outputs)
        B, H, L, D = outputs[0].shape
        out = output_like(outputs[0])
        rows = B * H * L
        module.gate_forward[(triton.cdiv(rows, ROWS),)](
            *outputs, gates, out, *gates.stride(), H, L, rows, **head_dims(D), ROWS=ROWS
        )
        ctx.save_for_backward(gates, *outputs)
        ctx.module = module
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gates, *outputs = ctx.saved_tensors
        dout = rows_last(dout)
        B, H, L, D = outputs[0].shape
        douts = [output_like(o) for o in outputs]
        dgates = output_like(gates, gates.shape, torch.float32)  # contiguous (B, H, L, N)
        rows = B * H * L
        ctx.module.gate_backward[(triton.cdiv(rows, ROWS),)](
            dout, *outputs, gates, *douts, dgates, *dout.stride()[:3], *gates.stride(), H, L, rows,
            **head_dims(D), ROWS=ROWS,
        )  # fmt: skip
        return (None, dgates.to(gates.dtype), *douts)
