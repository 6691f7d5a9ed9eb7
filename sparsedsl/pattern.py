"""A compiled pattern: what ``compile_source``, ``load`` and ``.attn`` imports return."""

from __future__ import annotations

import inspect
from functools import cached_property

import torch

from . import reference
from .errors import InputError, PatternError, SourceFile
from .frontend import model as M
from .frontend import syntax as S
from .frontend.primitives import MAX_SIZE
from .frontend.printer import format_pattern
from .ir.nodes import PatternIR
from .ir.text import format_ir
from .runtime.dispatch import attend
from .runtime.inputs import validate_call
from .serving.compiled import compiled_decode, fits_one_operator
from .serving.generation import attend_cached
from .serving.kvcache import KVCache


class Pattern:
    """A checked and lowered attention pattern with its parameters resolved.

    Call it like ``scaled_dot_product_attention``: ``pat(q, k, v)`` with q ``(B, Hq, Lq, D)``
    and k, v ``(B, Hkv, Lk, D)``, ``Hq % Hkv == 0``, returning ``(B, Hq, Lq, D)``.
    """

    def __init__(self, definition: S.PatternDef, source: SourceFile, overrides: dict, checked: M.CheckedPattern,
                 ir: PatternIR, kernels, source_key: str | None) -> None:  # fmt: skip
        # Built by the driver (sparsedsl.compiler.compile_definition), not by hand.
        self._definition = definition
        self._source = source
        self._overrides = overrides
        self.checked = checked
        self.ir = ir
        self.kernels, self.source_key = kernels, source_key  # LazyKernels: generated on the first launch

    # ------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return self.checked.name

    @property
    def params(self) -> dict[str, object]:
        """The resolved parameter values (defaults with overrides applied)."""
        return dict(self.checked.params)

    @property
    def source(self) -> SourceFile:
        return self._source

    @property
    def definition(self) -> S.PatternDef:
        return self._definition

    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.checked.branches)

    def with_params(self, **overrides) -> Pattern:
        """The same pattern with some parameters changed (checked again)."""
        from .compiler import (
            compile_definition,  # the driver builds patterns; it imports this module
        )

        return compile_definition(self._definition, self._source, {**self._overrides, **overrides})

    def source_text(self) -> str:
        """The pattern's definition, printed canonically."""
        return format_pattern(self._definition)

    @cached_property
    def ir_text(self) -> str:
        return format_ir(self.ir)

    def __deepcopy__(self, memo) -> Pattern:
        return self  # immutable: copies of a model share its compiled patterns

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.checked.params)
        return f"<Pattern {self.name}({params}) from {self._source.name}:{self.checked.line}>"

    # ------------------------------------------------------------ masks
    def dense_mask(self, Lq: int, Lk: int | None = None, *, doc_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each static branch's boolean mask: (Lq, Lk) over raw keys, (Lq, Lc) over pooled
        keys for compress branches, (B, Lq, Lk) where ``doc_ids`` (B, Lk) is needed.
        Selections depend on the data and have no static mask."""
        Lk = Lq if Lk is None else Lk
        integers = all(isinstance(n, int) and not isinstance(n, bool) for n in (Lq, Lk))
        if not (integers and 0 < Lq <= Lk <= MAX_SIZE):
            raise InputError(f"dense_mask needs integer lengths 0 < Lq <= Lk <= {MAX_SIZE:,}, got Lq={Lq!r}, Lk={Lk!r}")
        masks = {}
        for branch in self.checked.branches:
            if isinstance(branch, M.MaskBranch):
                if M.uses_documents(branch.mask) and doc_ids is None:
                    raise ValueError(f"branch `{branch.name}` uses `document`: pass doc_ids=")
                masks[branch.name] = reference.element_mask(
                    branch.mask, Lq, Lk, doc_ids if M.uses_documents(branch.mask) else None
                )
            elif isinstance(branch, M.CompressBranch):
                masks[branch.name] = reference.compressed_mask(branch, Lq, Lk)
        return masks

    # ------------------------------------------------------------ calling
    def __call__(
        self,
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
        branch_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        cp_group=None,
        cp_layout: str = "zigzag",
        cp_plan: str = "auto",
    ) -> torch.Tensor:
        """Attention of ``q`` over ``k``/``v`` restricted to the pattern. ``branch_kv``
        gives named branches keys and values of their own, shaped like ``k`` (NSA's
        independent keys and values per branch). With ``cp_group`` (a ProcessGroup or a
        one-dimensional DeviceMesh) the tensors are this rank's shards of one sequence,
        placed by ``cp_layout``, and so is the output (:mod:`sparsedsl.distributed`;
        ``cp_plan="all-gather"`` gathers every key where another plan would fetch fewer); a
        learned compress branch's ``k_cmp``/``v_cmp`` are then the functions that pool raw
        keys and values (B, Hkv, L, D), since a pooled window may cross ranks."""
        # (imported here, as attend_sharded below: the distributed package imports what this module does)
        from .distributed.sequence import check_cp_options

        check_cp_options(cp_layout, cp_plan, self)  # with or without cp_group: a bad value never passes unseen
        if cp_group is not None:
            from .distributed import attend_sharded

            return attend_sharded(
                self, q, k, v, cp_group, cp_layout, cp_plan=cp_plan, scale=scale, gates=gates, doc_ids=doc_ids, cu_seqlens=cu_seqlens,
                k_cmp=k_cmp, v_cmp=v_cmp, branch_kv=branch_kv,
            )  # fmt: skip
        inputs = validate_call(
            self.ir, q, k, v, scale=scale, gates=gates, doc_ids=doc_ids, cu_seqlens=cu_seqlens, k_cmp=k_cmp, v_cmp=v_cmp,
            branch_kv=branch_kv,
        )  # fmt: skip
        return attend(self.ir, self.checked, inputs, self.kernels, self.source_key)

    def reference(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        dtype: torch.dtype = torch.float64,
        **call_arguments,
    ) -> reference.ReferenceResult:
        """The dense reference of a call (the oracle the kernels are tested against): the
        same arguments as calling the pattern, computed from the checked pattern (not the
        IR the kernels come from) in ``dtype``. The result's ``.out`` is the output; it
        also holds each branch's output and log-sum-exp, the selections and the pooled keys."""
        inputs = validate_call(self.ir, q, k, v, **call_arguments)
        return reference.attention(self.checked, inputs, dtype=dtype)

    # ------------------------------------------------------------ generation
    def cache(
        self, *, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype=None, device=None, pool=None
    ) -> KVCache:
        """An empty :class:`KVCache` for this pattern (one per layer): contiguous (float32 on
        the CPU by default), or paged from ``pool`` (a :class:`~sparsedsl.PagePool` of this
        pattern; its dtype and device by default)."""
        return KVCache(self, batch=batch, kv_heads=kv_heads, head_dim=head_dim, capacity=capacity, dtype=dtype,
                       device=device, pool=pool)  # fmt: skip

    # The KV cache keeps host-side state (its rows' lengths) and its steps launch kernels
    # directly: torch.compile runs prefill eagerly, with a graph break (decode steps are
    # one operator where they can be: serving/compiled.py).
    @torch.compiler.disable
    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        *,
        lengths=None,
        scale: float | None = None,
        gates: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        poolers: dict | None = None,
    ) -> torch.Tensor:
        """Append ``n`` new tokens per row to ``cache`` and return their outputs.

        ``q`` is (B, Hq, n, D), ``k`` and ``v`` (B, Hkv, n, D); ``lengths`` (B ints) says
        how many of the ``n`` are real in each row (the rest is padding: not cached, output
        0). Each query is the next position of its row and sees what the pattern lets it
        see among everything cached, so the outputs equal the matching rows of one forward
        over the whole sequence. Chunked prefill is several calls. ``gates`` (B, Hq, n, N)
        for gated patterns; ``doc_ids`` (B, n) for patterns with ``document`` (default: each
        row's current document); ``poolers`` maps each ``compress(pool=mlp)`` branch to its
        (pool_k, pool_v) functions of (n, Hkv, block, D) windows. Inference only: the
        output carries no gradient, on the kernel and the reference path alike, and no
        gradient flows into the cache.
        """
        with torch.no_grad():
            return attend_cached(
                self, q, k, v, cache, lengths=lengths, scale=scale, gates=gates, doc_ids=doc_ids, poolers=poolers
            )

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, **keywords) -> torch.Tensor:
        """:meth:`prefill` for a step of generation: one new token per row, or a few (at
        most 16, for speculative decoding); the same keywords. Inference only, like prefill.
        Under ``torch.compile`` a step with at most ``gates`` and ``scale`` is one operator
        (learned pooling by the cache's ``poolers``), so a compiled decode loop has no graph
        break and compiles once; other steps (ragged rows, documents, ``poolers=``) run
        eagerly behind a graph break."""
        unknown = sorted(set(keywords) - _STEP_KEYWORDS)
        if unknown:
            raise InputError(
                f"pattern `{self.name}`.decode: no keyword `{unknown[0]}`; it takes prefill's: {', '.join(sorted(_STEP_KEYWORDS))}"
            )
        if torch.compiler.is_compiling() and fits_one_operator(self, cache, keywords):
            return compiled_decode(q, k, v, cache, keywords)
        return self._decode_eagerly(q, k, v, cache, keywords)

    @torch.compiler.disable
    def _decode_eagerly(self, q, k, v, cache, keywords: dict) -> torch.Tensor:
        with torch.no_grad():
            return attend_cached(self, q, k, v, cache, decode=True, **keywords)


# The keywords of a generation step, said once: prefill's signature.
_STEP_KEYWORDS = frozenset(
    name for name, parameter in inspect.signature(Pattern.prefill).parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
)


def patterns_of(module: S.Module) -> list[S.PatternDef]:
    """The pattern definitions of a parsed file, checking that their names are unique."""
    seen: dict[str, S.PatternDef] = {}
    for definition in module.patterns:
        if definition.name in seen:
            raise PatternError(
                f"pattern `{definition.name}` is defined twice (first on line {seen[definition.name].span.line})",
                source=module.source,
                span=definition.name_span,
                hint="rename one of them",
            )
        seen[definition.name] = definition
    return list(seen.values())
