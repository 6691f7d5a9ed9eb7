"""Stage 6 of the pipeline: launching a branch's generated kernels, forward and backward.

:func:`attention_forward` runs one branch's forward kernel and :func:`attention_backward`
its three backward kernels (rowsum(dO * O), then dK/dV per key block, then dQ per query
tile); :mod:`.ops` makes them differentiable operators.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
import triton

from .tuning import TileConfig, candidates, interpreter_config, tuner, tuning_key

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_kernels(t: torch.Tensor, module) -> bool:
    """Whether tensors like ``t`` run the generated kernels (``module``): on a GPU, or on the
    CPU under Triton's interpreter; float64 always runs the dense reference."""
    return module is not None and t.dtype != torch.float64 and (t.is_cuda or interpreting())


@dataclass(frozen=True)
class BranchKernels:
    """The generated kernels of one branch and where they came from."""

    module: ModuleType
    index: int
    source_key: str

    @property
    def functions(self) -> dict:
        return self.module.BRANCHES[self.index]


def document_tables(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lk) int32 tables: the first and the last position of each position's document."""
    B, L = doc_ids.shape
    positions = torch.arange(L, device=doc_ids.device).expand(B, L)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(1).values
    last = torch.where(ends, positions, L).flip(1).cummin(1).values.flip(1)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def output_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An output buffer the kernels fill completely. With SPARSEDSL_POISON_OUTPUTS=1 it
    starts as NaN, so that an element a kernel forgot to write shows up in tests."""
    shape = t.shape if shape is None else shape
    dtype = t.dtype if dtype is None else dtype
    if os.environ.get("SPARSEDSL_POISON_OUTPUTS") == "1":
        return torch.full(shape, float("nan"), device=t.device, dtype=dtype)
    return torch.empty(shape, device=t.device, dtype=dtype)


def rows_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dimension with stride 1; any other layout is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def precision_of(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def choose_config(kind: str, kernels: BranchKernels, q, k, run, selection: tuple[int, bool] | None = None) -> TileConfig:
    """The tile configuration for one launch: forced, the interpreter's, or the fastest
    candidate (timed once per tuning key). ``selection`` is (block, per_block) for the
    kernels of a select branch."""
    group = q.shape[1] // k.shape[1]
    if tuner.forced is not None:
        return tuner.forced
    if interpreting() or not q.is_cuda:
        return interpreter_config(kind, group, selection)
    key = tuning_key(kind, kernels.source_key, kernels.index, q, k)
    return tuner.choose(key, candidates(kind, q.shape[-1], group, selection, q.dtype), run)


def head_dims(D: int) -> dict:
    return dict(HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)))


def run_forward(kernels: BranchKernels, q, k, v, scale: float, docs, Lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch's output and base-2 log-sum-exp; ``Lk`` positions, ``k.shape[2]`` keys."""
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = output_like(q)
    lse = output_like(q, (B, Hq, Lq), torch.float32)
    tables = list(docs) if docs is not None else []
    forward = kernels.functions["forward"]

    def run(c: TileConfig):
        grid = (triton.cdiv(Lq, c.rows), B * Hkv * (group // c.heads))
        forward[grid](
            q, k, v, out, lse, *tables,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            Lq, Lk, Nk, Hkv, scale * LOG2E,
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
    module.backward_preprocess[(triton.cdiv(Lq, block), B * Hq)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], Lq, Hq, **head_dims(D), BLOCK_M=block
    )
    return delta


def run_backward(kernels: BranchKernels, q, k, v, out, lse, dout, scale: float, docs, Lk: int):
    B, Hq, Lq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dout = rows_last(dout)
    tables = list(docs) if docs is not None else []
    delta = softmax_delta(kernels.module, out, dout)
    dq = output_like(q)
    common = dict(**head_dims(D), GROUP=group, PRECISION=precision_of(q.dtype))
    dkdv, dq_kernel = kernels.functions["backward_dkdv"], kernels.functions["backward_dq"]
    grads = {}

    def run_dkdv(c: TileConfig):
        # Share long query walks among programs; shared key blocks meet atomically.
        tiles_per_split = max(1, c.max_tiles // (group // c.heads))
        splits = triton.cdiv(triton.cdiv(Lq, c.rows), tiles_per_split)
        dtype = torch.float32 if splits > 1 else k.dtype
        dk = torch.zeros(k.shape, device=k.device, dtype=dtype)  # keys no query sees get 0
        dv = torch.zeros(v.shape, device=v.device, dtype=dtype)
        dkdv[(triton.cdiv(Nk, c.block_n), B * Hkv, splits)](
            q, k, v, dout, dk, dv, lse, delta, *tables,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            Lq, Lk, Nk, Hkv, scale * LOG2E, scale, tiles_per_split,
            HEADS=c.heads, BLOCK_M=c.block_m, BLOCK_N=c.block_n, ATOMIC=splits > 1,
            num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )  # fmt: skip
        grads["dk"], grads["dv"] = dk.to(k.dtype), dv.to(v.dtype)

    def run_dq(c: TileConfig):
        dq_kernel[(triton.cdiv(Lq, c.rows), B * Hkv * (group // c.heads))](
            q, k, v, dout, dq, lse, delta, *tables,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
            Lq, Lk, Nk, Hkv, scale * LOG2E, scale,
            HEADS=c.heads, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )  # fmt: skip

    run_dkdv(choose_config("dkdv", kernels, q, k, run_dkdv))
    run_dq(choose_config("dq", kernels, q, k, run_dq))
    return dq, grads["dk"], grads["dv"]


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
    inputs, its output ``out`` and log-sum-exp ``lse`` and the output's gradient ``dout``."""
    dtype = q.dtype
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    q, k, v, out, dout = (rows_last(interpretable(t)) for t in (q, k, v, out, dout))
    grads = run_backward(kernels, q, k, v, out, lse, dout, scale, docs, Lk)
    return tuple(g.to(dtype) for g in grads)


def interpretable(t: torch.Tensor) -> torch.Tensor:
    """Triton's CPU interpreter (3.9) multiplies bfloat16 tiles wrongly (a 16x16 tl.dot is
    off by 1e10), so interpreted runs compute bfloat16 inputs in float32. On GPUs the
    kernels take bfloat16 directly."""
    return t.float() if t.dtype == torch.bfloat16 and not t.is_cuda and interpreting() else t

