"""Mixing a gated pattern's branch outputs: ``out = sum_n gates[..., n] * out_n``.

One generated kernel reads every branch output once and writes the sum, in float32; its
backward writes each branch's output gradient and every gate's gradient in one pass.
(In PyTorch the same mix takes a product and a sum per branch, each a full pass over
memory, and as many again backward.)
"""

from __future__ import annotations

import torch

from ...codegen.kernel_specs import gate_backward, gate_forward
from .common import cdiv, head_dims, launch, output_like, rows_last

ROWS = 16  # rows per program: small enough for any head dim's registers


def gated_sum_forward(module, gates: torch.Tensor, outputs) -> torch.Tensor:
    """``sum_n gates[..., n] * outputs[n]`` (contiguous) for (B, H, L, D) ``outputs`` and
    (B, H, L, N) ``gates``; ``module`` holds the pattern's kernels."""
    outputs = [o.contiguous() for o in outputs]
    gates = rows_last(gates)
    B, H, L, D = outputs[0].shape
    out = output_like(outputs[0])
    rows = B * H * L
    launch(
        module.gate_forward, gate_forward(len(outputs)), (cdiv(rows, ROWS),),
        **{f"O{n}": o for n, o in enumerate(outputs)}, G=gates, OUT=out, num_heads=H, Lq=L, rows=rows,
        **head_dims(D), ROWS=ROWS,
    )  # fmt: skip
    return out


def gated_sum_backward(module, dout: torch.Tensor, gates: torch.Tensor, outputs) -> list[torch.Tensor]:
    """The gradients of :func:`gated_sum_forward`: the gates' (contiguous, in their
    dtype), then each output's (contiguous), in one pass."""
    outputs = [o.contiguous() for o in outputs]
    gates = rows_last(gates)
    dout = rows_last(dout)
    B, H, L, D = outputs[0].shape
    douts = [output_like(o) for o in outputs]
    dgates = output_like(gates, gates.shape, torch.float32)  # contiguous (B, H, L, N)
    rows = B * H * L
    launch(
        module.gate_backward, gate_backward(len(outputs)), (cdiv(rows, ROWS),),
        DOUT=dout, **{f"O{n}": o for n, o in enumerate(outputs)}, G=gates,
        **{f"DO{n}": d for n, d in enumerate(douts)}, DG=dgates, num_heads=H, Lq=L, rows=rows,
        **head_dims(D), ROWS=ROWS,
    )  # fmt: skip
    return [dgates.to(gates.dtype), *douts]
