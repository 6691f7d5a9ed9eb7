"""Where a call runs: the generated kernels, or the dense reference.

CUDA tensors run the kernels; CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them), and the dense
reference otherwise, with a one-time notice that this is the slow path. float64 inputs
run the reference.

On the kernel path a pattern runs branch by branch: compress branches first (mean or max
pooling by generated kernels, then attention over the pooled keys), then the
selections they score, then the masks; gates mix the outputs. A packed batch of a pattern
that works within documents runs in the aligned layout of :mod:`.documents`.
"""

from __future__ import annotations

import warnings

import torch

from .. import reference
from ..frontend.model import CheckedPattern
from ..ir.nodes import BranchIR, PatternIR, PooledKeys, SelectedBlocks
from .inputs import CallInputs
from .launch import BranchAttention, BranchKernels, document_tables, interpretable, rows_last, uses_kernels
from .gating import GatedSum
from .pooling import BlockPooling
from .selection import SelectedAttention, Selection, block_scores, choose_blocks


class SlowPathWarning(UserWarning):
    """A call ran the dense PyTorch reference instead of generated kernels."""


def attend(
    ir: PatternIR, checked: CheckedPattern, inputs: CallInputs, module, source_key: str | None, record: dict | None = None
) -> torch.Tensor:
    """The pattern's output for validated inputs, on the fastest path available.

    On the kernel path, ``record`` (a dict, if given) receives each branch's output and
    base-2 log-sum-exp under ``(name, "out")`` and ``(name, "lse")``, and each selection's
    block table under ``(name, "blocks")``.
    """
    if not uses_kernels(inputs.q, module):
        if module is not None and not inputs.q.is_cuda and inputs.q.dtype != torch.float64:
            warnings.warn(
                "sparsedsl: CPU tensors run the dense PyTorch reference (the slow path); "
                "use CUDA tensors, or set TRITON_INTERPRET=1 to run the generated kernels on the CPU",
                SlowPathWarning,
                stacklevel=3,
            )
        compute = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
        return reference.attention(checked, inputs, dtype=compute).out.to(inputs.q.dtype)

    record = {} if record is None else record
    layout = inputs.layout
    if layout is not None:  # documents padded onto the blocks' grid; tables stay in that layout
        aligned = CallInputs(
            *(layout.pad(t) for t in (inputs.q, inputs.k, inputs.v)),
            inputs.scale,
            layout.pad(inputs.gates) if inputs.gates is not None else None,
            layout.doc_ids,
            inputs.pooled,
        )
        return layout.unpad(_attend_kernels(ir, aligned, module, source_key, record))
    return _attend_kernels(ir, inputs, module, source_key, record)


def _attend_kernels(ir: PatternIR, inputs: CallInputs, module, source_key: str | None, record: dict) -> torch.Tensor:
    q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
    Lk = k.shape[2]
    docs = document_tables(inputs.doc_ids) if inputs.doc_ids is not None else None
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(index: int, branch: BranchIR):
        kernels = BranchKernels(module, index, source_key)
        if isinstance(branch.keys, PooledKeys):
            keys = branch.keys
            if branch.name in inputs.pooled:  # learned pooling, done by the caller
                kc, vc = inputs.pooled[branch.name]
            else:
                kc, vc = (BlockPooling.apply(x, kernels, keys) for x in (k, v))
            pooled[branch.name] = kc, vc
            # A compress branch that only scores a selection needs no gradient (selection has none).
            with torch.set_grad_enabled(torch.is_grad_enabled() and branch.output):
                return BranchAttention.apply(q, kc, vc, kernels, scale, docs if "doc_ids" in branch.runtime else None, Lk)
        if isinstance(branch.blocks, SelectedBlocks):
            score = ir.branch(branch.blocks.score)
            selection = Selection.of(branch, score)
            with torch.no_grad():
                q_, kc = (rows_last(interpretable(t.detach())) for t in (q, pooled[score.name][0]))
                scores = block_scores(kernels, selection, q_, kc, record[score.name, "lse"], Lk, scale,
                                      docs if "doc_ids" in branch.runtime else None)
                table = record[branch.name, "blocks"] = choose_blocks(kernels, scores, selection.topk)
            return SelectedAttention.apply(q, k, v, table, kernels, selection, scale)
        return BranchAttention.apply(q, k, v, kernels, scale, docs if "doc_ids" in branch.runtime else None, Lk)

    # Compress branches first: selections read their pooled keys and log-sum-exps.
    order = sorted(enumerate(ir.branches), key=lambda item: not isinstance(item[1].keys, PooledKeys))
    for index, branch in order:
        record[branch.name, "out"], record[branch.name, "lse"] = run(index, branch)

    outputs = [record[b.name, "out"] for b in ir.output_branches]
    if ir.combine != "gate":
        return outputs[0]
    return GatedSum.apply(module, rows_last(inputs.gates), *outputs)

