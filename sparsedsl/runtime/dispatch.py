"""Where a call runs: the generated kernels, or the dense reference.

CUDA tensors run the kernels; CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them), and the dense
reference otherwise, with a one-time notice that this is the slow path. float64 inputs
run the reference.

On the kernel path a pattern runs branch by branch: compress branches first (mean or max
pooling by generated kernels, then attention over the pooled keys), then the
selections they score, then the masks; gates mix the outputs. A packed batch of a pattern
that works within documents runs in the aligned layout of :mod:`.documents`. Every launch
is an operator of :mod:`.ops`, so that ``torch.compile`` traces a call as one graph.
"""

from __future__ import annotations

import warnings

import torch

from .. import reference
from ..frontend.model import CheckedPattern
from ..ir.nodes import BranchIR, PatternIR, PooledKeys, SelectedBlocks
from . import ops
from .inputs import CallInputs
from .launch.common import document_tables, uses_kernels


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
            _notice_slow_path()
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
            branch_kv={name: tuple(layout.pad(t) for t in kv) for name, kv in inputs.branch_kv.items()},
        )
        return layout.unpad(_attend_kernels(ir, aligned, source_key, record))
    return _attend_kernels(ir, inputs, source_key, record)


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing: no graph break
def _notice_slow_path() -> bool:
    warnings.warn(
        "sparsedsl: CPU tensors run the dense PyTorch reference (the slow path); "
        "use CUDA tensors, or set TRITON_INTERPRET=1 to run the generated kernels on the CPU",
        SlowPathWarning,
        stacklevel=4,
    )
    return True


def _attend_kernels(ir: PatternIR, inputs: CallInputs, key: str, record: dict) -> torch.Tensor:
    # Each launch is an operator of .ops (opaque to torch.compile); the rest is tensor code.
    q, scale = inputs.q, inputs.scale
    Lk = inputs.k.shape[2]
    docs = list(document_tables(inputs.doc_ids)) if inputs.doc_ids is not None else []
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(branch: BranchIR) -> list[torch.Tensor]:
        return docs if "doc_ids" in branch.runtime else []

    def run(index: int, branch: BranchIR):
        k, v = inputs.kv(branch.name)
        if isinstance(branch.keys, PooledKeys):
            if branch.name in inputs.pooled:  # learned pooling, done by the caller
                kc, vc = inputs.pooled[branch.name]
            else:
                kc, vc = (ops.pool(key, index, x)[0] for x in (k, v))
            pooled[branch.name] = kc, vc
            # A compress branch that only scores a selection needs no gradient (selection has none).
            with torch.set_grad_enabled(torch.is_grad_enabled() and branch.output):
                return ops.attention(key, index, q, kc, vc, scale, tables(branch), Lk)
        if isinstance(branch.blocks, SelectedBlocks):
            score = branch.blocks.score
            table = record[branch.name, "blocks"] = ops.select_blocks(
                key, index, q.detach(), pooled[score][0].detach(), record[score, "lse"], scale, tables(branch), Lk
            )
            return ops.selected_attention(key, index, q, k, v, table, scale)
        return ops.attention(key, index, q, k, v, scale, tables(branch), Lk)

    # Compress branches first: selections read their pooled keys and log-sum-exps.
    order = sorted(enumerate(ir.branches), key=lambda item: not isinstance(item[1].keys, PooledKeys))
    for index, branch in order:
        record[branch.name, "out"], record[branch.name, "lse"] = run(index, branch)

    outputs = [record[b.name, "out"] for b in ir.output_branches]
    if ir.combine != "gate":
        return outputs[0]
    return ops.gated_sum(key, inputs.gates, outputs)
