"""Checking the arguments of a pattern call, once, for every backend.

Every problem raises :class:`~sparsedsl.errors.InputError` naming the argument, what
was expected and what came; nothing reaches a kernel or the reference unchecked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..frontend.primitives import MAX_SIZE
from ..ir.nodes import PatternIR
from . import checks
from .documents import DocumentLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CallInputs:
    """Validated call arguments. ``doc_ids`` is (B, Lk) whatever form documents came in;
    ``pooled`` maps each learned-pooling compress branch to its (k_cmp, v_cmp); ``layout``
    places a packed batch's documents on the blocks' grid (patterns that work within
    documents), and learned pooled keys are then those of the aligned rows."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    gates: torch.Tensor | None
    doc_ids: torch.Tensor | None
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layout: DocumentLayout | None = None
    branch_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def kv(self, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values branch ``branch`` attends to: its own, or the shared k and v."""
        return self.branch_kv.get(branch, (self.k, self.v))

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def validate_call(
    ir: PatternIR,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    gates: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    k_cmp: torch.Tensor | dict | None = None,
    v_cmp: torch.Tensor | dict | None = None,
    layout: DocumentLayout | None = None,
    branch_kv: dict | None = None,
) -> CallInputs:
    """Check a call of pattern ``ir`` and bring documents and pooled keys to one form.
    ``layout``, for a pattern that works within documents, is the one ``doc_ids`` make,
    when the caller has made it already (to pool keys over it). ``branch_kv`` maps branch
    names to their own (k, v), each shaped like ``k``: NSA's independent keys and values
    per branch; the other branches attend to ``k`` and ``v``."""
    where = f"pattern `{ir.name}`"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(
                f"{where}: `{name}` must have 4 dimensions (batch, heads, length, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise InputError(f"{where}: `{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"{where}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"{where}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    check_device(where, "q", q.device)
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise InputError(f"{where}: `k` and `v` must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise InputError(f"{where}: q has batch {B} but k and v have batch {Bk}")
    if Dk != D:
        raise InputError(f"{where}: q has head_dim {D} but k and v have head_dim {Dk}")
    if Hq == 0 or Hkv == 0:
        raise InputError(f"{where}: empty input: q has {Hq} heads and k and v have {Hkv}; both need at least one")
    if Lk > MAX_SIZE:
        raise InputError(
            f"{where}: k and v have {Lk:,} positions; the kernels index positions with 32-bit integers, "
            f"so at most {MAX_SIZE:,}"
        )
    if Hq % Hkv:
        raise InputError(
            f"{where}: q has {Hq} heads, not a multiple of the {Hkv} heads of k and v "
            "(grouped-query attention needs Hq % Hkv == 0)"
        )
    if Lq > Lk:
        raise InputError(
            f"{where}: q is longer ({Lq}) than k and v ({Lk}); queries are the last Lq of the Lk "
            "positions, so Lq <= Lk"
        )
    if Lq == 0 or D == 0 or B == 0:
        raise InputError(f"{where}: empty input (q has shape {tuple(q.shape)})")
    scale = check_scale(where, scale, D)

    n_out = len(ir.output_branches)
    if ir.combine == "gate":
        if gates is None:
            names = ", ".join(b.name for b in ir.output_branches)
            raise InputError(f"{where} mixes {n_out} branches ({names}): pass gates= of shape {(B, Hq, Lq, n_out)}")
        _check_tensor(where, "gates", gates, (B, Hq, Lq, n_out), q.device)
        if not gates.is_floating_point():
            raise InputError(f"{where}: `gates` must be a floating-point tensor, got {gates.dtype}")
    elif gates is not None:
        raise InputError(f"{where} has a single branch and takes no `gates`")

    needs_docs = any("doc_ids" in b.runtime for b in ir.branches)
    if doc_ids is not None and cu_seqlens is not None:
        raise InputError(f"{where}: pass either `doc_ids` or `cu_seqlens`, not both")
    if needs_docs:
        if doc_ids is None and cu_seqlens is None:
            raise InputError(
                f"{where} uses `document`: pass doc_ids= (a ({B}, {Lk}) integer tensor) or cu_seqlens="
            )
        doc_ids = document_ids(where, doc_ids, cu_seqlens, B, Lk, q.device)
    elif doc_ids is not None or cu_seqlens is not None:
        raise InputError(f"{where} does not use `document`; drop `doc_ids`/`cu_seqlens`")

    layout = None
    if ir.packed:
        if Lq != Lk:
            raise InputError(
                f"{where} works within documents, which needs every position queried: q has {Lq} positions "
                f"but k and v have {Lk} (for a prefix of cached keys, use prefill with a KV cache)"
            )
        layout = layout if layout is not None else DocumentLayout.of(doc_ids, ir.document_alignment)
    pooled = _pooled_inputs(where, ir, k_cmp, v_cmp, k, layout)
    return CallInputs(q, k, v, scale, gates, doc_ids, pooled, layout, _branch_kv(where, ir, branch_kv, k))


def check_scale(where: str, scale, head_dim: int) -> float:
    """The softmax scale of a call: ``head_dim ** -0.5`` by default, else a positive finite
    number. The kernels' online softmax assumes a positive scale (0 and negative scales gave
    NaN there, finite numbers in the reference), so other scales are refused on every
    path: calls, the reference, prefill and decode."""
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InputError(f"{where}: `scale` must be a number, got {scale!r}")
    if not (0 < scale < math.inf):
        raise InputError(
            f"{where}: `scale` must be positive and finite, got {scale!r}; leave it out for the default "
            f"1/sqrt(head_dim) = {head_dim**-0.5:.4g}"
        )
    return float(scale)


def check_device(where: str, name: str, device: torch.device) -> None:
    """Tensors run on a CUDA GPU or on the CPU; other devices (meta, mps...) have neither
    kernels nor a reference here."""
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{where}: `{name}` is on {device}; sparsedsl runs on CUDA GPUs and on the CPU")


def _branch_kv(where, ir: PatternIR, branch_kv, k: torch.Tensor) -> dict:
    if branch_kv is None:
        return {}
    if not isinstance(branch_kv, dict):
        raise InputError(f"{where}: `branch_kv` must be a dict {{branch name: (k, v)}}, got {type(branch_kv).__name__}")
    branches = {b.name: b for b in ir.branches}
    checked = {}
    for name, pair in branch_kv.items():
        if name not in branches:
            raise InputError(f"{where}: `branch_kv` names `{name}`, which is not a branch (branches: {', '.join(branches)})")
        if branches[name] in ir.learned_pooling:
            raise InputError(
                f"{where}: branch `{name}` pools with a learned MLP: pool its own keys and values yourself and pass "
                "them as k_cmp=/v_cmp= instead of `branch_kv`"
            )
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"{where}: `branch_kv[{name!r}]` must be a pair (k, v)")
        for part, t in zip("kv", pair):
            _check_tensor(where, f"branch_kv[{name!r}] {part}", t, tuple(k.shape), k.device)
            if t.dtype != k.dtype:
                raise InputError(f"{where}: `branch_kv[{name!r}]` {part} has dtype {t.dtype} but k has {k.dtype}")
        checked[name] = (pair[0], pair[1])
    return checked


def _check_tensor(where, name, t, shape, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{where}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{where}: `{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise InputError(f"{where}: `{name}` is on {t.device} but q is on {device}")


def document_ids(where: str, doc_ids, cu_seqlens, B: int, Lk: int, device) -> torch.Tensor:
    """Checked documents as (B, Lk) int64 ids, whichever form they came in. The checks of
    their values are operators (:mod:`.checks`), which ``torch.compile`` keeps opaque."""
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise InputError(f"{where}: `cu_seqlens` must be a 1-D integer tensor [0, len1, len1+len2, ..., {Lk}]")
        return checks.documents_from_bounds(where, cu_seqlens.to(device=device, dtype=torch.int64), B, Lk)
    _check_tensor(where, "doc_ids", doc_ids, (B, Lk), device)
    if doc_ids.is_floating_point() or doc_ids.dtype == torch.bool:
        raise InputError(f"{where}: `doc_ids` must be an integer tensor, got {doc_ids.dtype}")
    return checks.document_ids(where, doc_ids)


def learned_pooling_by_branch(where: str, ir: PatternIR, k_cmp, v_cmp, is_one, missing: str, wrong: str) -> dict:
    """``{branch: (k_cmp, v_cmp)}`` of the learned compress branches from what a call was
    given: one of each (``is_one`` tells one from a dict) where there is one such branch,
    or dicts keyed by branch name. ``missing`` and ``wrong`` say what to pass instead."""
    names = [b.name for b in ir.learned_pooling]
    if not names:
        if k_cmp is not None or v_cmp is not None:
            raise InputError(f"{where} has no compress(pool=mlp) branch; drop `k_cmp`/`v_cmp`")
        return {}
    if k_cmp is None or v_cmp is None:
        raise InputError(f"{where}: compress branch `{names[0]}` pools with a learned MLP: {missing}")
    if is_one(k_cmp) and is_one(v_cmp):
        if len(names) != 1:
            raise InputError(f"{where} has several learned compress branches; pass k_cmp/v_cmp as dicts keyed by {names}")
        k_cmp, v_cmp = {names[0]: k_cmp}, {names[0]: v_cmp}
    keyed = isinstance(k_cmp, dict) and isinstance(v_cmp, dict) and set(k_cmp) == set(names) == set(v_cmp)
    if not keyed or not all(map(is_one, (*k_cmp.values(), *v_cmp.values()))):
        raise InputError(f"{where}: compress branch `{names[0]}` pools with a learned MLP; {wrong}")
    return {name: (k_cmp[name], v_cmp[name]) for name in names}


def _pooled_inputs(where, ir: PatternIR, k_cmp, v_cmp, k: torch.Tensor, layout: DocumentLayout | None) -> dict:
    given = learned_pooling_by_branch(
        where, ir, k_cmp, v_cmp, lambda t: isinstance(t, torch.Tensor),
        missing="pass its pooled keys and values as k_cmp= and v_cmp= (or use sparsedsl.nn.SparseAttention, which "
                "owns the pooling weights)",
        wrong=f"k_cmp and v_cmp must be tensors, or dicts keyed by {[b.name for b in ir.learned_pooling]}",
    )  # fmt: skip
    B, Hkv, Lk, D = k.shape
    for branch in ir.learned_pooling:
        length = branch.keys.count(Lk if layout is None else layout.length)
        for name, t in zip((f"k_cmp[{branch.name}]", f"v_cmp[{branch.name}]"), given[branch.name]):
            _check_tensor(where, name, t, (B, Hkv, length, D), k.device)
            if t.dtype != k.dtype:
                raise InputError(f"{where}: `{name}` has dtype {t.dtype} but k has {k.dtype}")
    return given
