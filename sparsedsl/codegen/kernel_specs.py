"""Kernels described as data: each generated kernel's parameters by name and kind.

The template renders a kernel's ``def`` from its spec (``KernelSpec.signature``; the
renderer passes the specs as ``specs``) and the launcher's keyword arguments are checked
against the same spec (``runtime.launch.common.launch``), so the two cannot drift apart. Parameters come in the
order Triton receives them: tensors, the document tables of a branch that uses
documents, every tensor's strides (batch, head, position: the head dimension has stride 1),
run-time scalars, then compile-time constants.
"""

from __future__ import annotations

from dataclasses import dataclass

DOCUMENT_TABLES = ("DOC_START", "DOC_END")  # (B, Lk) int32: each position's document's first and last


@dataclass(frozen=True)
class Tensor:
    """A pointer parameter; ``strides`` names the strides passed with it (``"q"`` gives
    ``stride_qb, stride_qh, stride_qm``; ``rows`` is the position axis's letter)."""

    name: str
    strides: str | None = None
    rows: str = "m"

    def stride_names(self) -> tuple[str, ...]:
        if self.strides is None:
            return ()
        return tuple(f"stride_{self.strides}{axis}" for axis in ("b", "h", self.rows))


@dataclass(frozen=True)
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
        most ``width`` columns, continuation lines indented by ``indent``."""
        lines = []
        for group in self.groups(uses_documents):
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


_Q, _K, _V = Tensor("Q", "q"), Tensor("K", "k", "n"), Tensor("V", "v", "n")
_TILE = ("GROUP", "HEADS", "HEAD_DIM", "D_PAD", "BLOCK_M", "BLOCK_N", "PRECISION")

# Static branches (static.j2): a mask over raw keys, or a compress branch over its pooled keys.
STATIC_FORWARD = KernelSpec(
    "static_forward",
    tensors=(_Q, _K, _V, Tensor("O", "o"), Tensor("LSE")),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale"),
    constexprs=_TILE,
    documents=True,
)
STATIC_BACKWARD_DQ = KernelSpec(
    "static_backward_dq",
    tensors=(_Q, _K, _V, Tensor("DO", "do"), Tensor("DQ", "dq"), Tensor("LSE"), Tensor("DELTA")),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale", "sm_scale"),
    constexprs=_TILE,
    documents=True,
)
STATIC_BACKWARD_DKDV = KernelSpec(
    "static_backward_dkdv",
    tensors=(_Q, _K, _V, Tensor("DO", "do"), Tensor("DK", "dk", "n"), Tensor("DV", "dv", "n"), Tensor("LSE"), Tensor("DELTA")),
    scalars=("Lq", "Lk", "Nk", "num_kv_heads", "qk_scale", "sm_scale", "tiles_per_split"),
    constexprs=(*_TILE, "ATOMIC"),
    documents=True,
)
# Shared by every branch (attention.py.j2).
BACKWARD_PREPROCESS = KernelSpec(
    "backward_preprocess",
    tensors=(Tensor("O", "o"), Tensor("DO", "do"), Tensor("DELTA")),
    scalars=("Lq", "num_heads"),
    constexprs=("HEAD_DIM", "D_PAD", "BLOCK_M"),
)

SPECS = {spec.name: spec for spec in (STATIC_FORWARD, STATIC_BACKWARD_DQ, STATIC_BACKWARD_DKDV, BACKWARD_PREPROCESS)}
