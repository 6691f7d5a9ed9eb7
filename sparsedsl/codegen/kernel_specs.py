"""Kernels described as data: each generated kernel's parameters by name and kind.

The template renders a kernel's ``def`` from its spec (``KernelSpec.signature``; the
renderer passes the specs as ``specs``) and the launcher's keyword arguments are checked
against the same spec (``runtime.launch.common.launch``), so the two cannot drift apart. Parameters come in the
order Triton receives them: tensors, the document tables of a branch that uses
documents, every tensor's strides (batch, head, position: the head dimension has stride 1),
run-time scalars, then compile-time constants.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

DOCUMENT_TABLES = ("DOC_START", "DOC_END")  # (B, Lk) int32: each position's document's first and last


@dataclass(frozen=True)
class Tensor:
    """A pointer parameter; ``strides`` names the strides passed with it, one per letter of
    ``axes`` (``Tensor("K", "k", "bhn")`` gives ``stride_kb, stride_kh, stride_kn``: batch,
    head, key position; the launcher passes the tensor's first ``len(axes)`` strides)."""

    name: str
    strides: str | None = None
    axes: str = "bhm"

    def stride_names(self) -> tuple[str, ...]:
        if self.strides is None:
            return ()
        return tuple(f"stride_{self.strides}{axis}" for axis in self.axes)


@dataclass(frozen=True, eq=False)  # each spec is one object: hashed by identity, cheaply, per launch
class KernelSpec:
    """One kernel's parameters. ``documents``: whether a branch that works within documents
    passes it the document tables."""

    name: str
    tensors: tuple[Tensor, ...]
    scalars: tuple[str, ...]
    constexprs: tuple[str, ...]
    documents: bool = False

    def groups(self, uses_documents: bool) -> tuple[tuple[str, ...], ...]:
        """The parameters' names in order, as four groups: pointers, strides, scalars, constants."""
        tables = DOCUMENT_TABLES if self.documents and uses_documents else ()
        strides = tuple(name for tensor in self.tensors for name in tensor.stride_names())
        return ((*(t.name for t in self.tensors), *tables), strides, self.scalars, self.constexprs)

    def parameters(self, uses_documents: bool) -> tuple[str, ...]:
        """Every parameter's name, in order."""
        return tuple(name for group in self.groups(uses_documents) for name in group)

    def signature(self, uses_documents: bool, indent: int, width: int = 120) -> str:
        """The parameter list of the kernel's ``def``: each group on lines of its own, at
        most ``width`` columns (one tensor's strides never split), continuation lines
        indented by ``indent``."""
        pointers, _, scalars, constants = self.groups(uses_documents)
        strides = tuple(", ".join(t.stride_names()) for t in self.tensors if t.strides)
        lines = []
        for group in (pointers, strides, scalars, constants):
            words = [f"{name}: tl.constexpr" if name in self.constexprs else name for name in group]
            line = ""
            for word in words:
                if line and indent + len(line) + len(word) + 4 > width:
                    lines.append(line + ",")
                    line = word
                else:
                    line = f"{line}, {word}" if line else word
            if line:
                lines.append(line + ",")
        return ("\n" + " " * indent).join(lines)[:-1]


_Q, _K, _V = Tensor("Q", "q"), Tensor("K", "k", "bhn"), Tensor("V", "v", "bhn")
_DO, _LSE, _DELTA = Tensor("DO", "do"), Tensor("LSE"), Tensor("DELTA")
_TILE = ("GROUP", "HEADS", "HEAD_DIM", "D_PAD", "BLOCK_M", "BLOCK_N", "PRECISION")
_HEAD = ("HEAD_DIM", "D_PAD")

# Static branches (static.j2): a mask over raw keys, or a compress branch over its pooled keys.
STATIC_FORWARD = KernelSpec(
    "static_forward",
    tensors=(_Q, _K, _V, Tensor("O", "o"), _LSE),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale"),
    constexprs=_TILE,
    documents=True,
)
STATIC_BACKWARD_DQ = KernelSpec(
    "static_backward_dq",
    tensors=(_Q, _K, _V, _DO, Tensor("DQ", "dq"), _LSE, _DELTA),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale", "sm_scale"),
    constexprs=_TILE,
    documents=True,
)
STATIC_BACKWARD_DKDV = KernelSpec(
    "static_backward_dkdv",
    tensors=(_Q, _K, _V, _DO, Tensor("DK", "dk", "bhn"), Tensor("DV", "dv", "bhn"), Tensor("DQ", "dq"), _LSE, _DELTA),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale", "sm_scale", "tiles_per_split"),
    constexprs=(*_TILE, "ATOMIC", "FUSED_DQ"),
    documents=True,
)  # DQ: with FUSED_DQ a float32 buffer every key block adds its dQ terms to; else unused

# Select branches (select.j2): block scores from the compress branch, top-k, and attention
# over the chosen blocks (a table row per query or query block; dK/dV over a reverse index).
_TABLE = Tensor("BLOCKS", "t", "bhu")
_SELECT_TILE = ("GROUP", "HEADS", "ROWS", "BLOCK_M", "HEAD_DIM", "D_PAD", "BLOCK_N", "PRECISION")
_SCORING = ("BLOCK_C", "BLOCK_S", "STEP_S", "PRECISION", "SUM_HALF", "SUM_PRECISION")
SELECT_SCORES = KernelSpec(
    "select_scores",
    tensors=(_Q, Tensor("KC", "k", "bhn"), _LSE, Tensor("SCORES", "s", "bhu")),
    scalars=("Lq", "Lk", "Nc", "num_kv_heads", "n_blocks", "qk_scale"),
    constexprs=("GROUP", "HEADS", "ROWS", *_HEAD, *_SCORING),
    documents=True,
)
SELECT_TOP = KernelSpec(
    "select_top", tensors=(Tensor("SCORES"), Tensor("TABLE")), scalars=("units", "n_blocks"), constexprs=("UNITS", "BLOCKS")
)
SELECT_FORWARD = KernelSpec(
    "select_forward",
    tensors=(_Q, _K, _V, Tensor("O", "o"), _LSE, _TABLE),
    scalars=("Lq", "Lk", "num_kv_heads", "qk_scale"),
    constexprs=_SELECT_TILE,
)
SELECT_BACKWARD_DQ = KernelSpec(
    "select_backward_dq",
    tensors=(_Q, _K, _V, _DO, Tensor("DQ", "dq"), _LSE, _DELTA, _TABLE),
    scalars=("Lq", "Lk", "num_kv_heads", "qk_scale", "sm_scale"),
    constexprs=_SELECT_TILE,
)
SELECT_BACKWARD_DKDV = KernelSpec(
    "select_backward_dkdv",
    tensors=(_Q, _K, _V, _DO, Tensor("DK", "dk", "bhn"), Tensor("DV", "dv", "bhn"), _LSE, _DELTA,
             Tensor("ENTRIES"), Tensor("WORK")),  # fmt: skip
    scalars=("Lq", "Lk", "num_kv_heads", "qk_scale", "sm_scale"),
    constexprs=_SELECT_TILE,
)

# Fixed pooling of a compress branch (pool.j2); the KV cache's pooling of its latest windows.
POOL = KernelSpec(
    "pool", tensors=(Tensor("X", "x", "bhn"), Tensor("OUT"), Tensor("SHARE")), scalars=("Nc", "num_heads"),
    constexprs=(*_HEAD, "BLOCK_C"),
)  # fmt: skip
POOL_BACKWARD = KernelSpec(
    "pool_backward",
    tensors=(Tensor("X", "x", "bhn"), Tensor("OUT"), Tensor("SHARE"), Tensor("DOUT"), Tensor("DX")),
    scalars=("L", "Nc", "num_heads"),
    constexprs=(*_HEAD, "BLOCK_T"),
)
_PAGES = Tensor("PAGES", "pg", "b")  # (B, columns) int32: a paged KV cache's page table per row
_NEW_KV = (Tensor("K_NEW", "n"), Tensor("V_NEW", "v"))  # (B, Hkv, n, D): a step's new keys and values
POOL_LATEST = KernelSpec(
    "pool_latest",
    tensors=(*_NEW_KV, Tensor("K", "c", "bhn"), Tensor("V"), Tensor("KC", "p", "bhn"), Tensor("VC"), Tensor("LENGTHS"),
             _PAGES, Tensor("POOLED_PAGES", "ppg", "b")),  # fmt: skip
    scalars=("n", "num_kv_heads", "capacity", "spare"),
    constexprs=(*_HEAD, "WINDOWS", "W_PAD", "CHUNK", "PAGE", "APPEND", "ROWS", "PDL"),
)  # K and V share one layout, KC and VC another; K_NEW and V_NEW are read with APPEND only

# Decoding against a KV cache (decode.j2, select_decode.j2): each kernel writes its splits'
# partial outputs O (splits, B, H, Lq, D) and log-sum-exps LSE (splits, B, H, Lq). Caches
# are contiguous (PAGE 0) or paged (PAGE positions to a page, through PAGES). The kernels
# of a decode step (these, the cache's append and pooling, and the merge) take PDL: launched
# as programmatic dependents of the step's previous kernel (launch.common.dependent_launches).
_PARTIALS = (Tensor("O", "o", "sbhm"), Tensor("LSE", "l", "s"))
_ROWS_OF_CACHE = (Tensor("LENGTHS"), Tensor("NEW"))
DECODE = KernelSpec(
    "decode",
    tensors=(_Q, _K, _V, *_PARTIALS, *_ROWS_OF_CACHE, _PAGES),
    scalars=("Lq", "num_kv_heads", "qk_scale", "doc_stride"),
    constexprs=(*_TILE, "PAGE", "PDL"),
    documents=True,
)
SELECT_DECODE = KernelSpec(
    "select_decode",
    tensors=(_Q, _K, _V, *_PARTIALS, _TABLE, *_ROWS_OF_CACHE, _PAGES),
    scalars=("Lq", "num_kv_heads", "qk_scale"),
    constexprs=(*_TILE, "PAGE", "PDL"),
)
SELECT_DECODE_POOLED = KernelSpec(
    "select_decode_pooled",
    tensors=(_Q, Tensor("KC", "k", "bhn"), Tensor("VC", "v", "bhn"), *_PARTIALS, Tensor("PLSE", "p", "bhm"),
             Tensor("TABLE", "t", "bhu"), Tensor("TICKETS"), *_ROWS_OF_CACHE, _PAGES),  # fmt: skip
    scalars=("Lq", "num_kv_heads", "n_blocks", "qk_scale"),
    constexprs=("GROUP", "HEADS", "ROWS", *_HEAD, *_SCORING, "PAGE", "TOP_HEADS", "BLOCKS", "LSE_SPLITS", "PDL"),
)

# Shared by every branch (attention.py.j2).
BACKWARD_PREPROCESS = KernelSpec(
    "backward_preprocess",
    tensors=(Tensor("O", "o"), _DO, _DELTA),
    scalars=("Lq", "num_heads"),
    constexprs=("HEAD_DIM", "D_PAD", "BLOCK_M"),
)
CACHE_APPEND = KernelSpec(
    "cache_append",
    tensors=(*_NEW_KV, Tensor("K", "c", "bhn"), Tensor("V"), Tensor("LENGTHS"), _PAGES),
    scalars=("n", "num_kv_heads", "capacity"),
    constexprs=(*_HEAD, "ROWS", "PAGE", "PDL"),
)  # K and V share one layout
_ROW_CONSTANTS = (*_HEAD, "ROWS")
_GATES = Tensor("G", "g", "bhmn")  # (B, H, Lq, N): one gate per branch


@functools.cache
def gate_forward(gates: int) -> KernelSpec:
    """The gated sum of ``gates`` branch outputs O0, O1, ...: OUT = sum_n G[..., n] * On."""
    return KernelSpec(
        "gate_forward",
        tensors=(*(Tensor(f"O{n}") for n in range(gates)), _GATES, Tensor("OUT")),
        scalars=("num_heads", "Lq", "rows"),
        constexprs=_ROW_CONSTANTS,
    )


@functools.cache
def gate_backward(gates: int) -> KernelSpec:
    """The gated sum's gradients: DO0, DO1, ... for the outputs and DG for the gates."""
    return KernelSpec(
        "gate_backward",
        tensors=(Tensor("DOUT", "d"), *(Tensor(f"O{n}") for n in range(gates)), _GATES,
                 *(Tensor(f"DO{n}") for n in range(gates)), Tensor("DG")),  # fmt: skip
        scalars=("num_heads", "Lq", "rows"),
        constexprs=_ROW_CONSTANTS,
    )


@functools.cache
def decode_merge(outputs: int, gated: bool) -> KernelSpec:
    """A decode step's last launch: each output branch n's partials On, LSEn (over its
    ``splits{n}`` splits) merged and, for a gated pattern, mixed by G."""
    partials = tuple(t for n in range(outputs) for t in (Tensor(f"O{n}", f"o{n}", "s"), Tensor(f"LSE{n}", f"l{n}", "s")))
    return KernelSpec(
        "decode_merge",
        tensors=(*partials, *((_GATES,) if gated else ()), Tensor("OUT")),
        scalars=(*(f"splits{n}" for n in range(outputs)), "num_heads", "Lq", "rows"),
        constexprs=(*_HEAD, "SPLITS", "ROWS", "PDL"),
    )


SPECS = {
    spec.name: spec
    for spec in (STATIC_FORWARD, STATIC_BACKWARD_DQ, STATIC_BACKWARD_DKDV, SELECT_SCORES, SELECT_TOP, SELECT_FORWARD,
                 SELECT_BACKWARD_DQ, SELECT_BACKWARD_DKDV, POOL, POOL_BACKWARD, POOL_LATEST, DECODE, SELECT_DECODE,
                 SELECT_DECODE_POOLED, BACKWARD_PREPROCESS, CACHE_APPEND)
}  # fmt: skip
# Kernels whose parameters depend on the pattern (how many branches it mixes or outputs).
SPEC_FAMILIES = {"gate_forward": gate_forward, "gate_backward": gate_backward, "decode_merge": decode_merge}
