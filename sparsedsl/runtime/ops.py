"""The generated kernels as PyTorch custom operators, ``torch.ops.sparsedsl.*``.

A pattern call launches Triton kernels (through a tuner, or Triton's CPU interpreter) and
its selection's backward sizes a grid from a count on the device: nothing ``torch.compile``
can trace. Each launch a call makes is therefore an operator that the compiler keeps
opaque, with a fake implementation giving its outputs' shapes, dtypes and strides without
running anything, and with its backward another opaque operator; the Python that strings
them together (documents, pooling, selection, gates) is plain tensor code. So
``torch.compile(fullgraph=True)`` traces a pattern call, forward and backward, as one
graph, and eager calls go through the same operators.

An operator names its pattern by source key (:mod:`.registry`) and a branch by its index.
Every output is a new contiguous tensor. The operators, with their backward ones:

* ``pool(pattern, branch, x) -> (pooled, share)``: a compress branch's mean or max pooling;
  ``pool_backward(pattern, branch, x, pooled, share, dpooled) -> dx``.
* ``attention(pattern, branch, q, k, v, scale, docs, positions) -> (out, lse)``: a branch
  over its static blocks (raw or pooled keys), ``docs`` its document tables (none, or the
  first and last position of each position's document); ``attention_backward(..., out,
  lse, dout, ...) -> (dq, dk, dv)``. ``lse`` is not differentiable.
* ``select_blocks(pattern, branch, q, k_cmp, lse_cmp, scale, docs, positions) -> table``: the
  (B, Hkv, units, topk) int32 blocks a select branch attends to; not differentiable.
* ``selected_attention(pattern, branch, q, k, v, table, scale) -> (out, lse)`` and
  ``selected_attention_backward(..., out, lse, dout, table, scale) -> (dq, dk, dv)``.
* ``gated_sum(pattern, gates, outputs) -> out`` and
  ``gated_sum_backward(pattern, dout, gates, outputs) -> [dgates, *doutputs]``.

(``custom_op`` reads the operators' schemas from their annotations, which older torch
releases only read as objects of the ``typing`` module: hence no ``from __future__ import
annotations`` and ``typing.List`` here.)
"""

from typing import List, Sequence

import torch
from torch import Tensor

from .launch.common import interpretable, rows_last
from .launch.gating import gated_sum_backward as _gated_sum_backward
from .launch.gating import gated_sum_forward
from .launch.pooling import pool_backward as _pool_backward
from .launch.pooling import pool_forward
from .launch.selection import (
    chosen_blocks,
    run_selected_backward,
    run_selected_forward,
)
from .launch.static import attention_backward as _attention_backward
from .launch.static import attention_forward
from .registry import registered


def _new(t: Tensor, shape, dtype=None) -> Tensor:
    """A fake output: contiguous ``shape`` on t's device, in ``dtype`` (t's by default)."""
    return t.new_empty(shape, dtype=t.dtype if dtype is None else dtype)


def _output_and_lse(q: Tensor) -> tuple[Tensor, Tensor]:
    return _new(q, q.shape), _new(q, q.shape[:3], torch.float32)


def _input_grads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _new(q, q.shape), _new(k, k.shape), _new(v, v.shape)


# ---------------------------------------------------------------- pooling
@torch.library.custom_op("sparsedsl::pool", mutates_args=())
def pool(pattern: str, branch: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Compress branch ``branch``'s mean or max pooling of (B, H, L, D) ``x``."""
    entry = registered(pattern)
    return pool_forward(entry.kernels(branch), entry.pooled_keys(branch), x)


@pool.register_fake
def _(pattern, branch, x):
    keys = registered(pattern).pooled_keys(branch)
    B, H, L, D = x.shape
    pooled = _new(x, (B, H, keys.count(L), D))
    share = _new(x, (B, H, keys.count(L), D) if keys.pool == "max" else (0,), torch.float32)
    return pooled, share


@torch.library.custom_op("sparsedsl::pool_backward", mutates_args=())
def pool_backward(pattern: str, branch: int, x: Tensor, pooled: Tensor, share: Tensor, dpooled: Tensor) -> Tensor:
    """dx of :func:`pool`."""
    entry = registered(pattern)
    return _pool_backward(entry.kernels(branch), entry.pooled_keys(branch), x, pooled, share, dpooled)


@pool_backward.register_fake
def _(pattern, branch, x, pooled, share, dpooled):
    return _new(x, x.shape)


def _pool_context(ctx, inputs, output):
    ctx.pattern, ctx.branch, x = inputs
    ctx.save_for_backward(x, *output)
    ctx.mark_non_differentiable(output[1])


def _pool_grad(ctx, dpooled, _dshare):
    x, pooled, share = ctx.saved_tensors
    return None, None, pool_backward(ctx.pattern, ctx.branch, x, pooled, share, dpooled)


pool.register_autograd(_pool_grad, setup_context=_pool_context)


# ---------------------------------------------------------------- static blocks
@torch.library.custom_op("sparsedsl::attention", mutates_args=())
def attention(
    pattern: str, branch: int, q: Tensor, k: Tensor, v: Tensor, scale: float, docs: Sequence[Tensor], positions: int
) -> tuple[Tensor, Tensor]:
    """Branch ``branch`` over its static blocks: its output and base-2 log-sum-exp."""
    return attention_forward(registered(pattern).kernels(branch), q, k, v, scale, docs or None, positions)


@attention.register_fake
def _(pattern, branch, q, k, v, scale, docs, positions):
    return _output_and_lse(q)


@torch.library.custom_op("sparsedsl::attention_backward", mutates_args=())
def attention_backward(
    pattern: str, branch: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    scale: float, docs: Sequence[Tensor], positions: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dq, dk, dv of :func:`attention`."""
    kernels = registered(pattern).kernels(branch)
    return _attention_backward(kernels, q, k, v, out, lse, dout, scale, docs or None, positions)


@attention_backward.register_fake
def _(pattern, branch, q, k, v, out, lse, dout, scale, docs, positions):
    return _input_grads(q, k, v)


def _attention_context(ctx, inputs, output):
    ctx.pattern, ctx.branch, q, k, v, ctx.scale, docs, ctx.positions = inputs
    ctx.save_for_backward(q, k, v, *output, *docs)
    ctx.mark_non_differentiable(output[1])


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse, *docs = ctx.saved_tensors
    dq, dk, dv = attention_backward(ctx.pattern, ctx.branch, q, k, v, out, lse, dout, ctx.scale, docs, ctx.positions)
    return None, None, dq, dk, dv, None, [None] * len(docs), None


attention.register_autograd(_attention_grad, setup_context=_attention_context)


# ---------------------------------------------------------------- selections
@torch.library.custom_op("sparsedsl::select_blocks", mutates_args=())
def select_blocks(
    pattern: str, branch: int, q: Tensor, k_cmp: Tensor, lse_cmp: Tensor, scale: float, docs: Sequence[Tensor], positions: int
) -> Tensor:
    """The (B, Hkv, units, topk) int32 table of the blocks select branch ``branch`` attends
    to, scored by its compress branch's pooled keys ``k_cmp`` and log-sum-exp ``lse_cmp``.
    Not differentiable: pass tensors that need no gradient."""
    entry = registered(pattern)
    kernels, selection = entry.kernels(branch), entry.selection(branch)
    q, k_cmp = (rows_last(interpretable(t)) for t in (q, k_cmp))
    return chosen_blocks(kernels, selection, q, k_cmp, lse_cmp, positions, scale, docs or None)


@select_blocks.register_fake
def _(pattern, branch, q, k_cmp, lse_cmp, scale, docs, positions):
    selection = registered(pattern).selection(branch)
    B, _, Lq, _ = q.shape
    return _new(q, (B, k_cmp.shape[1], selection.units(Lq, positions), selection.topk), torch.int32)


@torch.library.custom_op("sparsedsl::selected_attention", mutates_args=())
def selected_attention(pattern: str, branch: int, q: Tensor, k: Tensor, v: Tensor, table: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Select branch ``branch`` over the blocks of ``table``: its output and base-2 log-sum-exp."""
    entry = registered(pattern)
    dtype = q.dtype
    q, k, v = (rows_last(interpretable(t)) for t in (q, k, v))
    out, lse = run_selected_forward(entry.kernels(branch), entry.selection(branch), q, k, v, table, scale)
    return out.to(dtype), lse


@selected_attention.register_fake
def _(pattern, branch, q, k, v, table, scale):
    return _output_and_lse(q)


@torch.library.custom_op("sparsedsl::selected_attention_backward", mutates_args=())
def selected_attention_backward(
    pattern: str, branch: int, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
    table: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """dq, dk, dv of :func:`selected_attention` (the selection's own backward host-synchronises
    once: the number of work items sizes its grid)."""
    entry = registered(pattern)
    dtype = q.dtype
    q, k, v, out, dout = (rows_last(interpretable(t)) for t in (q, k, v, out, dout))
    grads = run_selected_backward(entry.kernels(branch), entry.selection(branch), q, k, v, out, lse, dout, table, scale)
    return tuple(g.to(dtype) for g in grads)


@selected_attention_backward.register_fake
def _(pattern, branch, q, k, v, out, lse, dout, table, scale):
    return _input_grads(q, k, v)


def _selected_context(ctx, inputs, output):
    ctx.pattern, ctx.branch, q, k, v, table, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, table)
    ctx.mark_non_differentiable(output[1])


def _selected_grad(ctx, dout, _dlse):
    q, k, v, out, lse, table = ctx.saved_tensors
    dq, dk, dv = selected_attention_backward(ctx.pattern, ctx.branch, q, k, v, out, lse, dout, table, ctx.scale)
    return None, None, dq, dk, dv, None, None


selected_attention.register_autograd(_selected_grad, setup_context=_selected_context)


# ---------------------------------------------------------------- gates
@torch.library.custom_op("sparsedsl::gated_sum", mutates_args=())
def gated_sum(pattern: str, gates: Tensor, outputs: Sequence[Tensor]) -> Tensor:
    """``sum_n gates[..., n] * outputs[n]`` for (B, H, L, D) outputs and (B, H, L, N) gates."""
    return gated_sum_forward(registered(pattern).module, gates, outputs)


@gated_sum.register_fake
def _(pattern, gates, outputs):
    return _new(outputs[0], outputs[0].shape)


@torch.library.custom_op("sparsedsl::gated_sum_backward", mutates_args=())
def gated_sum_backward(pattern: str, dout: Tensor, gates: Tensor, outputs: Sequence[Tensor]) -> List[Tensor]:
    """The gradients of :func:`gated_sum`: the gates', then each output's."""
    return _gated_sum_backward(registered(pattern).module, dout, gates, outputs)


@gated_sum_backward.register_fake
def _(pattern, dout, gates, outputs):
    return [_new(gates, gates.shape), *(_new(o, o.shape) for o in outputs)]


def _gated_context(ctx, inputs, output):
    ctx.pattern, gates, outputs = inputs
    ctx.save_for_backward(gates, *outputs)


def _gated_grad(ctx, dout):
    gates, *outputs = ctx.saved_tensors
    dgates, *doutputs = gated_sum_backward(ctx.pattern, dout, gates, outputs)
    return None, dgates, doutputs


gated_sum.register_autograd(_gated_grad, setup_context=_gated_context)
