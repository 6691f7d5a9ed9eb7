"""Where a call runs: the generated kernels, or the dense reference.

CUDA tensors run the kernels; CPU tensors run the same kernels through Triton's
interpreter when ``TRITON_INTERPRET=1`` is set (how CI tests them), and the dense
reference otherwise, with a one-time notice that this is the slow path. float64 inputs
run the reference.

On the kernel path a pattern runs branch by branch: compress branches first (mean or max
pooling by generated kernels, then attention over the pooled keys), then the
selections they score, then the masks; gates mix the outputs. A packed batch of a pattern
that works within documents runs in the aligned layout of :mod:`.documents`. Every launch
is an operator of :mod:`.ops`, so that ``torch.compile`` traces a call as one graph. On
a GPU the first call of each kind is rehearsed first (:func:`rehearse`), so that all its
kernels compile at once.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from .. import reference
from ..frontend.model import CheckedPattern
from ..ir.nodes import BranchIR, PatternIR, PooledKeys, SelectedBlocks
from . import ops
from .inputs import CallInputs
from .launch.common import document_tables, uses_kernels
from .tuning import compiling_ahead, length_bucket, log, tuner


class SlowPathWarning(UserWarning):
    """A call ran the dense PyTorch reference instead of generated kernels."""


def attend(
    ir: PatternIR, checked: CheckedPattern, inputs: CallInputs, module, source_key: str | None, record: dict | None = None,
    compressed: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """The pattern's output for validated inputs, on the fastest path available.

    On the kernel path, ``record`` (a dict, if given) receives each branch's output and
    base-2 log-sum-exp under ``(name, "out")`` and ``(name, "lse")``, and each selection's
    block table under ``(name, "blocks")``. A choice already there, as
    :func:`selected_blocks` gives it, is imposed instead of choosing again (on either path);
    so are, on the kernel path, the compress branches' outputs that :func:`selected_blocks`
    left in ``compressed`` with that choice, instead of computing them again.
    """
    if not uses_kernels(inputs.q, module):
        if module is not None and not inputs.q.is_cuda and inputs.q.dtype != torch.float64:
            _notice_slow_path()
        compute = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
        imposed = {name: t for (name, what), t in (record or {}).items() if what == "blocks"}
        return reference.attention(checked, inputs, dtype=compute, selections=imposed or None).out.to(inputs.q.dtype)

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
        assert not compressed, "compress outputs are reused on unpadded calls only (the pooled plan's)"
        return layout.unpad(_rehearsed_call(ir, aligned, source_key, record))
    return _rehearsed_call(ir, inputs, source_key, record, compressed)


def selected_blocks(
    ir: PatternIR, checked: CheckedPattern, inputs: CallInputs, module, source_key: str | None, compressed: dict | None = None,
) -> dict:  # fmt: skip
    """{select branch: (choice, (n_blocks,) boolean)}: the blocks the call would choose
    (pooled keys, scores, top-k) without attending to them, and which blocks any query,
    head or row chose: what a caller that must first fetch those blocks needs (context
    parallelism). The choice (a kernel's block table, or the reference's mask) is what
    ``attend(..., record={(name, "blocks"): choice})`` imposes. The choice has no gradient;
    with ``compressed`` (a dict) on the kernel path, the compress branches (those that
    scored it and any others) run as the call runs them, gradient included, and stay there as {branch: (out, lse)}
    for ``attend(..., compressed=compressed)``, which then does not run them again."""
    if not uses_kernels(inputs.q, module):
        compute = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            chosen = reference.attention(checked, inputs, dtype=compute).selections
        return {name: (blocks, blocks.flatten(0, -2).any(0)) for name, blocks in chosen.items()}
    record: dict = {}
    with torch.set_grad_enabled(compressed is not None and torch.is_grad_enabled()):
        _attend_kernels(ir, inputs, source_key, record, ops, choose_only=True)
    if compressed is not None:
        compressed.update({b.name: (record[b.name, "out"], record[b.name, "lse"]) for b in ir.branches
                           if isinstance(b.keys, PooledKeys)})  # fmt: skip
    result = {}
    for branch in ir.branches:
        if isinstance(branch.blocks, SelectedBlocks):
            table = record[branch.name, "blocks"]
            n_blocks = -(-inputs.k.shape[2] // branch.blocks.block)  # table entries of n_blocks: none chosen
            chosen = torch.zeros(n_blocks + 1, dtype=torch.bool, device=table.device)
            chosen.index_fill_(0, table.flatten().long().clamp(max=n_blocks), True)
            result[branch.name] = (table, chosen[:n_blocks])
    return result


def _rehearsed_call(ir: PatternIR, inputs: CallInputs, key: str, record: dict, compressed: dict | None = None) -> torch.Tensor:
    """The kernel path, after a rehearsal the first time a call of its kind comes."""
    if _rehearses(inputs.q):  # the signature only where a rehearsal can happen: not on every call
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in _leaves(inputs))
        if tuner.rehearsal_due(_signature(inputs, key, backward)):
            rehearse(ir, inputs, key, backward)
    return _attend_kernels(ir, inputs, key, record, ops, compressed=compressed)


def _rehearses(q: torch.Tensor) -> bool:
    # On a GPU, where kernels compile; not while torch.compile traces (fake tensors).
    return q.is_cuda and not torch.compiler.is_compiling()


def rehearse(ir: PatternIR, inputs: CallInputs, key: str, backward: bool) -> None:
    """Compile every kernel a call launches, forward and (with ``backward``) backward, at
    once: the call runs with launches that only queue their compilation
    (:func:`~.tuning.compiling_ahead`, each kernel's tile candidates included) and with
    every operator's backward taken right after it on a zero gradient. A first call
    compiles this way in the time of its slowest few kernels instead of their sum; the
    call itself then times the candidates and runs. The rehearsal's outputs are zeros
    and are dropped; if it fails, the call compiles as it goes, as without one."""
    detached = dataclasses.replace(
        inputs, **{name: getattr(inputs, name).detach() for name in ("q", "k", "v")},
        gates=inputs.gates.detach() if inputs.gates is not None else None,
        pooled={name: tuple(t.detach() for t in kv) for name, kv in inputs.pooled.items()},
        branch_kv={name: tuple(t.detach() for t in kv) for name, kv in inputs.branch_kv.items()},
    )  # fmt: skip
    started = time.perf_counter()
    try:
        with compiling_ahead(), torch.enable_grad():
            _attend_kernels(ir, detached, key, {}, _WithBackward(backward))
    except Exception as exc:  # noqa: BLE001 - the call itself reports what is wrong
        log(f"rehearsal of {key} stopped: {type(exc).__name__}: {str(exc)[:200]}")
    log(f"rehearsal of {key}: {time.perf_counter() - started:.1f} s")


def _leaves(inputs: CallInputs) -> list[torch.Tensor]:
    kv = [t for pair in (*inputs.pooled.values(), *inputs.branch_kv.values()) for t in pair]
    return [inputs.q, inputs.k, inputs.v, *([inputs.gates] if inputs.gates is not None else []), *kv]


def _signature(inputs: CallInputs, key: str, backward: bool) -> tuple:
    """What decides which kernels a call compiles and which tiles it tunes."""
    q, k = inputs.q, inputs.k
    return (
        key, str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[3], length_bucket(q.shape[2]),
        length_bucket(k.shape[2]), backward, inputs.doc_ids is not None, inputs.gates is not None,
        tuple(sorted(inputs.pooled)), tuple(sorted(inputs.branch_kv)),
    )  # fmt: skip


class _WithBackward:
    """The operators of :mod:`.ops` for a rehearsal: each differentiable one is followed
    by its backward on a zero gradient while gradients are on (``backward`` and not
    inside a branch that needs none), so that those kernels compile with the others."""

    def __init__(self, backward: bool) -> None:
        self.backward = backward

    def _taken(self) -> bool:
        return self.backward and torch.is_grad_enabled()

    def pool(self, key, index, x):
        pooled, share = ops.pool(key, index, x)
        if self._taken():
            ops.pool_backward(key, index, x, pooled, share, torch.zeros_like(pooled))
        return pooled, share

    def attention(self, key, index, q, k, v, scale, docs, positions):
        out, lse = ops.attention(key, index, q, k, v, scale, docs, positions)
        if self._taken():
            ops.attention_backward(key, index, q, k, v, out, lse, torch.zeros_like(out), scale, docs, positions)
        return out, lse

    def select_blocks(self, *arguments):
        return ops.select_blocks(*arguments)

    def selected_attention(self, key, index, q, k, v, table, scale):
        out, lse = ops.selected_attention(key, index, q, k, v, table, scale)
        if self._taken():
            ops.selected_attention_backward(key, index, q, k, v, out, lse, torch.zeros_like(out), table, scale)
        return out, lse

    def gated_sum(self, key, gates, outputs):
        out = ops.gated_sum(key, gates, outputs)
        if self._taken():
            ops.gated_sum_backward(key, torch.zeros_like(out), gates, outputs)
        return out


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing: no graph break
def _notice_slow_path() -> bool:
    warnings.warn(
        "sparsedsl: CPU tensors run the dense PyTorch reference (the slow path); "
        "use CUDA tensors, or set TRITON_INTERPRET=1 to run the generated kernels on the CPU",
        SlowPathWarning,
        stacklevel=4,
    )
    return True


def _attend_kernels(ir: PatternIR, inputs: CallInputs, key: str, record: dict, ops, choose_only: bool = False,
                    compressed: dict | None = None):  # fmt: skip
    # Each launch is an operator of ``ops`` (.ops, opaque to torch.compile, or a rehearsal's
    # _WithBackward); the rest is tensor code. ``choose_only``: stop once the selections'
    # tables are in ``record`` (the compress branches, then the choice; no output).
    # ``compressed``: compress branches' (out, lse) already computed, with the selections
    # they score imposed in ``record`` (selected_blocks).
    q, scale = inputs.q, inputs.scale
    Lk = inputs.k.shape[2]
    docs = list(document_tables(inputs.doc_ids)) if inputs.doc_ids is not None else []
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(branch: BranchIR) -> list[torch.Tensor]:
        return docs if "doc_ids" in branch.runtime else []

    def run(index: int, branch: BranchIR):
        if compressed and branch.name in compressed:
            return compressed[branch.name]
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
            table = record.get((branch.name, "blocks"))  # imposed by the caller, or chosen here
            if table is None:
                assert not compressed or score not in compressed, "compress outputs come with the choice they scored (selected_blocks)"
                table = record[branch.name, "blocks"] = ops.select_blocks(
                    key, index, q.detach(), pooled[score][0].detach(), record[score, "lse"], scale, tables(branch), Lk
                )
            if choose_only:
                return None, None
            return ops.selected_attention(key, index, q, k, v, table, scale)
        return ops.attention(key, index, q, k, v, scale, tables(branch), Lk)

    # Compress branches first: selections read their pooled keys and log-sum-exps.
    order = sorted(enumerate(ir.branches), key=lambda item: not isinstance(item[1].keys, PooledKeys))
    for index, branch in order:
        if choose_only and not isinstance(branch.keys, PooledKeys) and not isinstance(branch.blocks, SelectedBlocks):
            continue
        record[branch.name, "out"], record[branch.name, "lse"] = run(index, branch)
    if choose_only:
        return None

    outputs = [record[b.name, "out"] for b in ir.output_branches]
    if ir.combine != "gate":
        return outputs[0]
    return ops.gated_sum(key, inputs.gates, outputs)
