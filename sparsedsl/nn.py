"""Attention layers for model authors: any pattern as a drop-in ``nn.Module``.

``SparseAttention`` owns the projections around a pattern: query/key/value/output, an
optional rotary position embedding, the learned compression MLPs of every
``compress(pool=mlp)`` branch, and the gate projection of a ``gate(...)``.
``NativeSparseAttention`` is that layer with ``patterns/nsa.attn``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .compiler import load
from .distributed.attention import sharded_document_ids
from .distributed.sequence import (
    check_cp_options,
    gather_sequence,
    process_group,
    sequence_chunks,
)
from .errors import InputError
from .ir.nodes import PooledKeys
from .pattern import Pattern
from .reference import key_windows
from .runtime.dispatch import attend
from .runtime.documents import DocumentLayout
from .runtime.inputs import document_ids, validate_call
from .runtime.launch.common import document_tables
from .serving.generation import MAX_DECODE_TOKENS
from .serving.kvcache import KVCache


class Addend(nn.Module):
    """``x + weight``, ``weight`` broadcast over the leading dimensions of ``x``: a learned
    position embedding as a layer of its own (so that training can stack seeds of it)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class CompressionMLP(nn.Module):
    """NSA's learned compression: each window of ``block`` keys (every ``stride``) plus a
    learned intra-block position embedding, flattened, through a two-layer MLP to one key."""

    def __init__(self, block: int, stride: int, head_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.block, self.stride = block, stride
        hidden = hidden or 2 * head_dim
        self.position = Addend(block, head_dim)
        self.mlp = nn.Sequential(nn.Linear(block * head_dim, hidden), nn.GELU(), nn.Linear(hidden, head_dim))
        # Start as mean pooling plus a small learned correction.
        nn.init.normal_(self.mlp[0].weight, std=(block * head_dim) ** -0.5)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) keys or values to (B, H, Lc, D) pooled ones."""
        return self.pool_windows(key_windows(x, self.block, self.stride))

    def pool_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(..., block, D) windows of keys or values to (..., D) pooled ones."""
        return windows.mean(-2) + self.mlp(self.position(windows).flatten(-2))


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of (B, H, L, D) ``x`` at ``positions``,
    (L,) or per batch row (B, L)."""
    D = x.shape[-1]
    inverse = base ** (-torch.arange(0, D // 2 * 2, 2, device=x.device, dtype=torch.float32) / D)
    angles = positions.to(torch.float32)[..., None] * inverse  # (L, D/2) or (B, L, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # broadcast over heads
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : D // 2], x[..., D // 2 : D // 2 * 2]
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], -1)
    return torch.cat([rotated, x[..., D // 2 * 2 :]], -1)


def rope_positions(positions: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Rotary positions of the sequence's ``positions`` (L,): themselves, or with the
    sequence's (B, length) ``doc_ids`` counted from each one's document start (B, L), as
    the document would count alone."""
    return positions if doc_ids is None else positions - document_tables(doc_ids)[0][:, positions]


class SparseAttention(nn.Module):
    """Multi-head (grouped-query) attention restricted to a pattern.

    ``pattern`` is a :class:`Pattern`, a ``.attn`` path or a shipped pattern's name
    (``"nsa"``), with ``params`` overriding its parameters. Input and output are
    ``(batch, length, hidden_size)``. A ``gate(...)`` pattern's branches are mixed by
    sigmoid gates from the layer's input, summed as the NSA paper does, or divided by their
    sum with ``normalize_gates=True`` (docs/training.md compares the two);
    ``kv_per_branch=True`` gives every gated branch after the first its own keys and values.
    """

    def __init__(
        self,
        pattern: Pattern | str | Path,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        rope: bool = True,
        rope_base: float = 10000.0,
        bias: bool = False,
        kv_per_branch: bool = False,
        normalize_gates: bool = False,
        **params,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):  # fmt: skip
            if (value is not None or name in ("hidden_size", "num_heads")) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise InputError(f"SparseAttention: `{name}` must be a positive integer, got {value!r}")
        if head_dim is None and hidden_size % num_heads:
            # hidden_size // num_heads would silently drop hidden_size % num_heads features.
            raise InputError(
                f"SparseAttention: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}; "
                f"pass head_dim= explicitly (e.g. head_dim={max(1, hidden_size // num_heads)})"
            )
        pattern = pattern if isinstance(pattern, Pattern) else load(pattern)
        self.pattern = pattern.with_params(**params) if params else pattern
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise InputError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base = rope, rope_base
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        ir = self.pattern.ir
        learned = [b for b in ir.branches if isinstance(b.keys, PooledKeys) and b.keys.pool == "mlp"]
        self.compress_k = nn.ModuleDict({b.name: CompressionMLP(b.keys.block, b.keys.stride, head_dim) for b in learned})
        self.compress_v = nn.ModuleDict({b.name: CompressionMLP(b.keys.block, b.keys.stride, head_dim) for b in learned})
        self.n_gates = len(ir.output_branches) if ir.combine == "gate" else 0
        self.gate_proj = nn.Linear(hidden_size, num_heads * self.n_gates, bias=True) if self.n_gates else None
        # The paper sums the gated branches; normalize_gates=True divides by the gates' sum,
        # so the output is a weighted mean of the branches (one branch gains what another loses).
        self.normalize_gates = normalize_gates
        # Independent keys and values per branch (NSA, section 3.3.3): the first output
        # branch (and a branch that only scores a selection) reads k_proj/v_proj, every
        # other output branch projections of its own.
        own = [b.name for b in ir.output_branches[1:]] if kv_per_branch else []
        self.branch_kv_proj = nn.ModuleDict({name: nn.Linear(hidden_size, 2 * num_kv_heads * head_dim, bias=bias) for name in own})

    def make_cache(
        self, batch: int, capacity: int, *, dtype: torch.dtype | None = None, device=None, pool=None
    ) -> KVCache:
        """An empty :class:`~sparsedsl.KVCache` for this layer (in its weights' dtype and
        device by default); paged from ``pool``, a :class:`~sparsedsl.PagePool` of the
        layer's pattern, KV heads and head dim."""
        weight = self.k_proj.weight
        cache = self.pattern.cache(
            batch=batch, kv_heads=self.num_kv_heads, head_dim=self.head_dim, capacity=capacity,
            dtype=dtype or weight.dtype, device=device or weight.device, pool=pool,
        )  # fmt: skip
        cache.poolers = self._poolers() or None  # its steps pool as this layer does, compiled too
        cache.poolers_of = self._poolers_id()
        return cache

    def _poolers(self) -> dict:
        """{compress branch: (pool_k, pool_v)} of the learned poolers, for a cache's steps."""
        return {name: (self.compress_k[name].pool_windows, self.compress_v[name].pool_windows) for name in self.compress_k}

    def _poolers_id(self) -> int | None:
        """Which poolers these are: the id of the first one, unique while a cache holding
        them lives (a copy of the layer has poolers of its own, and another id)."""
        return id(next(iter(self.compress_k.values()))) if len(self.compress_k) else None

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        lengths=None,
        cp_group=None,
        cp_layout: str = "zigzag",
        cp_plan: str = "auto",
    ) -> torch.Tensor:
        """(B, L, hidden_size) to (B, L, hidden_size). With ``cache`` (from :meth:`make_cache`)
        the ``L`` tokens continue the cached sequences: their keys and values are appended
        and each attends to its row's whole past (prefill, or decode with ``L`` = 1);
        ``lengths`` (B ints) marks how many of the ``L`` are real per row, and ``doc_ids``
        (B, L) gives their documents. With ``cp_group`` (context parallelism,
        docs/distributed.md) ``hidden`` and ``doc_ids`` are this rank's shards of one
        sequence, placed by ``cp_layout`` and exchanged by ``cp_plan`` (``"auto"`` or
        ``"all-gather"``: :func:`~sparsedsl.distributed.attend_sharded`); rotary positions
        are the positions in the whole sequence, counted from each document's start there,
        and the output is this rank's shard of the layer's output."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = f"shape {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise InputError(f"SparseAttention: `hidden` must be (batch, length, hidden_size), got {got}")
        weight = self.q_proj.weight
        if hidden.shape[-1] != weight.shape[-1]:  # [-1]: a stacked layer (training) has (seeds, out, in)
            raise InputError(f"SparseAttention: `hidden` must be (batch, length, hidden_size {weight.shape[-1]}), got shape {tuple(hidden.shape)}")  # fmt: skip
        autocast = torch.is_autocast_enabled(hidden.device.type) if hidden.device.type in ("cpu", "cuda") else False
        if not hidden.is_floating_point():
            raise InputError(f"SparseAttention: `hidden` must be floating-point hidden states (token ids go through an embedding first), got {hidden.dtype}")  # fmt: skip
        if hidden.dtype != weight.dtype and not autocast:
            raise InputError(
                f"SparseAttention: `hidden` is {hidden.dtype} but the layer's weights are {weight.dtype}; "
                f"convert one of them (hidden.to({weight.dtype}) or layer.to({hidden.dtype}))"
            )
        if hidden.device != weight.device:
            raise InputError(f"SparseAttention: `hidden` is on {hidden.device} but the layer's weights are on {weight.device}; move one of them")  # fmt: skip
        check_cp_options(cp_layout, cp_plan, self.pattern)
        B, L, _ = hidden.shape
        q = self.q_proj(hidden).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        gates = None
        if self.gate_proj is not None:
            # The sigmoid in float32 at least: in bf16 a gate above 0.998 rounds to 1 and its
            # gradient, g * (1 - g), to 0, so a saturated gate could never move again.
            logits = self.gate_proj(hidden)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            gates = torch.sigmoid(logits).view(B, L, self.num_heads, self.n_gates).transpose(1, 2)
            if self.normalize_gates:
                gates = gates / gates.sum(-1, keepdim=True)
        branch_kv = {
            name: tuple(t.view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2) for t in proj(hidden).chunk(2, -1))
            for name, proj in self.branch_kv_proj.items()
        }
        if cache is not None:
            if branch_kv:
                raise InputError(
                    "SparseAttention(kv_per_branch=True) has no KV-cache path yet (a cache holds one set of keys and "
                    "values); generate with kv_per_branch=False or without a cache"
                )
            return self._forward_cached(q, k, v, gates, cache, lengths, doc_ids, cu_seqlens)
        if cp_group is not None:
            return self._forward_sharded(q, k, v, gates, branch_kv, doc_ids, cu_seqlens, cp_group, cp_layout, cp_plan)
        ir = self.pattern.ir
        ids = None
        if doc_ids is not None or cu_seqlens is not None:
            ids = document_ids(f"pattern `{ir.name}`", doc_ids, cu_seqlens, B, L, hidden.device)
        if self.rope:
            positions = rope_positions(torch.arange(L, device=hidden.device), ids)
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
            branch_kv = {name: (rotary(bk, positions, self.rope_base), bv) for name, (bk, bv) in branch_kv.items()}
        extra = {}
        layout = DocumentLayout.of(ids, ir.document_alignment) if ir.packed and ids is not None else None
        if len(self.compress_k):
            # Each compress branch pools its own keys and values (then passed pooled, not as
            # branch_kv); a packed batch pools each document on its own, over the layout
            # that aligns documents to blocks.
            aligned = layout.pad if layout is not None else (lambda t: t)
            own = {name: branch_kv.pop(name, (k, v)) for name in self.compress_k}
            extra["k_cmp"] = {name: mlp(aligned(own[name][0])) for name, mlp in self.compress_k.items()}
            extra["v_cmp"] = {name: mlp(aligned(own[name][1])) for name, mlp in self.compress_v.items()}
        if branch_kv:
            extra["branch_kv"] = branch_kv
        if gates is not None:
            extra["gates"] = gates
        # Documents converted and laid out once, above (a layout costs a host
        # synchronisation, and under torch.compile a graph break).
        pattern = self.pattern
        inputs = validate_call(ir, q, k, v, doc_ids=ids, layout=layout, **extra)
        return self._output(attend(ir, pattern.checked, inputs, pattern.kernels, pattern.source_key))

    def _forward_sharded(self, q, k, v, gates, branch_kv, doc_ids, cu_seqlens, cp_group, cp_layout: str,
                         cp_plan: str) -> torch.Tensor:  # fmt: skip
        """This rank's shard of the layer's output; ``cu_seqlens`` are the whole sequence's
        boundaries, ``doc_ids`` this rank's shard of its ids."""
        B, _, L, _ = q.shape
        group = process_group(cp_group, "cp_group")
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        where = f"pattern `{self.pattern.name}`"
        if cu_seqlens is not None and doc_ids is not None:
            raise InputError(f"{where}: pass documents as doc_ids= or as cu_seqlens=, not both")
        if cu_seqlens is not None:
            ids = sharded_document_ids(where, cu_seqlens, k, group, cp_layout)
        else:
            ids = document_ids(where, doc_ids, None, B, L, q.device) if doc_ids is not None else None
        if self.rope:
            chunks = sequence_chunks(L * world, world, rank, cp_layout)
            positions = torch.cat([torch.arange(start, stop, device=q.device) for start, stop in chunks])
            whole = gather_sequence(ids, group, dim=1, layout=cp_layout) if ids is not None else None
            positions = rope_positions(positions, whole)
            q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
            branch_kv = {name: (rotary(bk, positions, self.rope_base), bv) for name, (bk, bv) in branch_kv.items()}
        # Learned pooling runs on the gathered keys (a window may cross the ranks' boundary),
        # a compress branch's own keys (kv_per_branch) where it has them.
        poolers = {"k_cmp": dict(self.compress_k), "v_cmp": dict(self.compress_v)} if len(self.compress_k) else {}
        out = self.pattern(q, k, v, gates=gates, doc_ids=ids, cp_group=group, cp_layout=cp_layout, cp_plan=cp_plan,
                           branch_kv=branch_kv or None, **poolers)  # fmt: skip
        return self._output(out)

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def _forward_cached(self, q, k, v, gates, cache: KVCache, lengths, doc_ids, cu_seqlens) -> torch.Tensor:
        if cu_seqlens is not None:
            raise InputError("SparseAttention with a cache takes documents as doc_ids= (batch, new tokens), not cu_seqlens")
        if self.rope:
            positions = self._cached_positions(cache, q.shape[2], doc_ids)
            q, k = (rotary(t, positions, self.rope_base) for t in (q, k))
        poolers = self._poolers()
        if lengths is None and doc_ids is None and q.shape[2] <= MAX_DECODE_TOKENS and (
            not poolers or getattr(cache, "poolers_of", None) == self._poolers_id()  # the cache pools as this layer does
        ):
            # A step of generation: under torch.compile one operator (serving/compiled.py),
            # so a compiled model decodes without a graph break.
            return self._output(self.pattern.decode(q, k, v, cache, gates=gates))
        out = self.pattern.prefill(q, k, v, cache, lengths=lengths, gates=gates, doc_ids=doc_ids, poolers=poolers)
        return self._output(out)

    def _cached_positions(self, cache: KVCache, L: int, doc_ids) -> torch.Tensor:
        """(B, L) rotary positions of new tokens: after each row's cached ones, counted from
        the start of their document when there are documents (as in a forward pass).
        Without documents they come from the device lengths alone (a CUDA graph can
        capture the step)."""
        if cache.doc_ids is None:
            return cache.lengths[:, None] + torch.arange(L, device=cache.lengths.device)
        rows = []
        for row, length in enumerate(cache.seqlens):
            start = cache.doc_starts[row]
            previous = int(cache.doc_ids[row, length - 1]) if doc_ids is not None and length else None
            positions = []
            for t, doc in enumerate(doc_ids[row].tolist() if doc_ids is not None else [None] * L):
                if doc != previous:
                    start, previous = length + t, doc  # a new document starts here
                positions.append(length + t - start)
            rows.append(positions)
        return torch.tensor(rows, device=cache.lengths.device)


class NativeSparseAttention(SparseAttention):
    """Native Sparse Attention (Yuan et al., 2025) from ``patterns/nsa.attn``; ``params``
    override its hyperparameters (``sel_topk=8``, ``per="block"``, ``pool="mean"``...).
    With ``packed=True`` it is ``patterns/nsa_packed.attn``: calls pass ``doc_ids`` or
    ``cu_seqlens`` and every document of a packed row is attended as its own sequence."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        packed: bool = False,
        **kwargs,
    ) -> None:
        super().__init__("nsa_packed" if packed else "nsa", hidden_size, num_heads, num_kv_heads, head_dim, **kwargs)
