"""Where a call runs: the generated kernels, or the dense reference.

CUDA tensors run the kernels; CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them), and the dense
reference otherwise, with a one-time notice that this is the slow path. float64 inputs,
and patterns whose branches have no kernels yet, run the reference.
"""

from __future__ import annotations

import warnings

import torch

from .. import reference
from ..frontend.model import CheckedPattern
from ..ir.nodes import PatternIR
from .inputs import CallInputs
from .launch import BranchAttention, BranchKernels, document_tables, interpreting


class SlowPathWarning(UserWarning):
    """A call ran the dense PyTorch reference instead of generated kernels."""


def uses_kernels(inputs: CallInputs, module) -> bool:
    if module is None or inputs.q.dtype == torch.float64:
        return False
    return inputs.q.is_cuda or interpreting()


def attend(ir: PatternIR, checked: CheckedPattern, inputs: CallInputs, module, source_key: str | None) -> torch.Tensor:
    """The pattern's output for validated inputs, on the fastest path available."""
    if not uses_kernels(inputs, module):
        if module is not None and not inputs.q.is_cuda and inputs.q.dtype != torch.float64:
            warnings.warn(
                "sparsedsl: CPU tensors run the dense PyTorch reference (the slow path); "
                "use CUDA tensors, or set TRITON_INTERPRET=1 to run the generated kernels on the CPU",
                SlowPathWarning,
                stacklevel=3,
            )
        compute = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
        return reference.attention(checked, inputs, dtype=compute).out.to(inputs.q.dtype)

    tables = document_tables(inputs.doc_ids) if inputs.doc_ids is not None else None
    outputs = []
    for index, branch in enumerate(ir.output_branches):
        docs = tables if "doc_ids" in branch.runtime else None
        kernels = BranchKernels(module, index, source_key)
        out, _ = BranchAttention.apply(inputs.q, inputs.k, inputs.v, kernels, inputs.scale, docs)
        outputs.append(out)
    if ir.combine != "gate":
        return outputs[0]
    gates = inputs.gates.to(inputs.q.dtype)
    return sum(gates[..., n, None] * out for n, out in enumerate(outputs))
