"""Small decoder-only models for measuring how well an attention layer trains.

The same pre-norm transformer is built around either dense causal attention (PyTorch's
``scaled_dot_product_attention``, the baseline) or a :class:`~sparsedsl.nn.SparseAttention`
of a pattern, so two models differ in their attention alone: same widths, rotary
positions and initialisation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SparseAttention, rotary
from ..pattern import Pattern

DENSE = "dense"  # ModelSpec.attention of the SDPA baseline
DENSE_LABEL = "dense SDPA"  # its label in logs and tables


@dataclass(frozen=True)
class ModelSpec:
    """A model: vocabulary, widths, and its attention: ``"dense"`` (SDPA) or a pattern
    (a :class:`Pattern`, a ``.attn`` path or a shipped pattern's name) with ``params``
    overriding its parameters."""

    vocab: int
    attention: str | Path | Pattern = DENSE
    params: dict = field(default_factory=dict)
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    kv_per_branch: bool = False
    normalize_gates: bool = False

    @property
    def label(self) -> str:
        if isinstance(self.attention, Pattern):
            name = self.attention.name
        else:
            name = Path(str(self.attention)).stem
        options = {"kv_per_branch": self.kv_per_branch, "normalize_gates": self.normalize_gates}
        given = " ".join([f"{k}={v}" for k, v in self.params.items()] + [k for k, on in options.items() if on])
        return f"{name} {given}".strip() if name != DENSE else DENSE_LABEL


class DenseAttention(nn.Module):
    """Causal grouped-query attention through SDPA, with rotary positions; with ``doc_ids``
    each token sees only earlier tokens of its own document, positions counted from the
    document's start (as :class:`SparseAttention` does)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        positions = torch.arange(L, device=x.device)
        mask = None
        if doc_ids is not None:
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same & torch.ones(L, L, dtype=torch.bool, device=x.device).tril())[:, None]
            first = torch.cummax(torch.where(torch.diff(doc_ids, prepend=doc_ids[:, :1] - 1) != 0, positions, 0), 1).values
            positions = positions - first  # (B, L): counted from each document's start
        q, k = rotary(q, positions, 10000.0), rotary(k, positions, 10000.0)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    """Pre-norm residual block: attention, then a 4x MLP."""

    def __init__(self, hidden: int, attention: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), doc_ids=doc_ids)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    """Embedding, ``layers`` blocks, a final norm and an output head; ``forward`` returns
    the logits of the ``scored`` positions only (N, vocab), or of all positions."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.blocks = nn.ModuleList([Block(spec.hidden, attention_layer(spec)) for _ in range(spec.layers)])
        self.norm = nn.LayerNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab, bias=False)

    @property
    def keeps_documents_apart(self) -> bool:
        """Whether ``doc_ids`` stop attention between documents: dense attention's mask
        does, a pattern does when it uses ``document``."""
        attention = self.blocks[0].attention
        return not isinstance(attention, SparseAttention) or attention.pattern.checked.needs_documents

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None, scored: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, doc_ids)
        return self.head(self.norm(x[scored] if scored is not None else x))


def attention_layer(spec: ModelSpec) -> nn.Module:
    """The attention module of one block of ``spec``."""
    if isinstance(spec.attention, str) and spec.attention == DENSE:
        return DenseAttention(spec.hidden, spec.heads, spec.kv_heads)
    return SparseAttention(
        spec.attention, spec.hidden, spec.heads, spec.kv_heads, kv_per_branch=spec.kv_per_branch,
        normalize_gates=spec.normalize_gates, **spec.params
    )
