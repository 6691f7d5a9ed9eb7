"""Hugging Face ``transformers`` models running their attention through a pattern.

``register(pattern, name)`` adds ``name`` to transformers' attention registries; a model
created (or switched) with ``attn_implementation=name`` then computes each self-attention
as ``pattern(q, k, v, scale=...)``.

How a model's attention maps onto a pattern call:

- Keys and values. transformers updates its cache (a ``DynamicCache``) before it calls the
  attention function, which so receives every key of the sequence so far and the new
  queries. That is the pattern's end-aligned call (``Lq <= Lk``, the queries are the last
  ``Lq`` positions), so generation needs no cache of sparsedsl's own. Grouped-query heads
  go in as they are.
- Masks. The pattern decides which keys each query sees, in place of the model's mask.
  The mask function registered under the same name builds no mask: once per forward it
  checks that the model's mask asks for nothing the pattern would drop (padding in the
  middle of a row, a sliding window, packed sequences, a cache holding more than the past
  tokens), and hands the attention function where padding lies (left padding is served
  only through sparsedsl's generation cache). Whatever a pattern cannot serve raises :class:`~sparsedsl.errors.InputError`
  rather than computing something else.
- The output is (B, Lq, H, D) with no attention weights, as transformers expects.
- Generation through the decode kernels: ``generate(..., cache=generation_cache(model,
  capacity))`` (``past_key_values=`` in releases before ``cache=``) keeps each layer's
  keys in sparsedsl's :class:`~sparsedsl.serving.kvcache.KVCache`
  (:mod:`.transformers_cache`), so each step runs ``pattern.prefill``/``decode`` against
  it, and left padding (prompts of different lengths in one batch) is served: each row
  caches only its real tokens.

transformers is imported when :func:`register` runs, never by ``import sparsedsl``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError
from ..pattern import Pattern

# Names transformers gives a meaning of its own: its implementations ("eager", "sdpa",
# ...), hub kernels ("org/repo:fn"), the "paged|" prefix, and names that contain "flash"
# or "flex_attention" (they switch on those libraries' code paths; "flex" keeps clear).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_RESERVED_NAMES = ("eager", "sdpa")
_RESERVED_PARTS = ("flash", "flex", "paged")

# Attention-function keywords that ask for something a pattern does not compute.
_UNSUPPORTED_KWARGS = {
    "sliding_window": "the model's own sliding window; write the window in the pattern and set config.sliding_window = None",
    "softcap": "soft-capping of the attention scores",
    "s_aux": "learned attention sinks added to the softmax",
    "position_bias": "a bias added to the attention scores",
    "cu_seq_lens_q": "padding-free packed sequences; pass a batch of rows instead",
    "cu_seq_lens_k": "padding-free packed sequences; pass a batch of rows instead",
    "cache": "a paged cache (continuous batching); use generate() with the default DynamicCache",
}


def register(pattern: Pattern, name: str) -> str:
    """Register ``pattern`` as the transformers attention implementation ``name``.

    A model then runs it through ``from_pretrained(..., attn_implementation=name)``,
    ``from_config(config, attn_implementation=name)`` or
    ``model.set_attn_implementation(name)``. Registering a name again (with this or
    another pattern) replaces the earlier pattern, also for models already made with it.
    Returns ``name``.
    """
    attention_interface, mask_interface = _interfaces()
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"`pattern` must be a sparsedsl.Pattern (from sparsedsl.load('streaming') or "
            f"sparsedsl.compile_source(...)), got {type(pattern).__name__}"
        )
    _check_name(name, pattern, attention_interface)
    _check_pattern(pattern)
    attention_interface.register(name, attention_function(pattern, name))
    mask_interface.register(name, mask_function(pattern, name))
    return name


def generation_cache(model, capacity: int):
    """A transformers ``Cache`` for ``model.generate(..., cache=...)`` that keeps
    every layer's keys and values in a sparsedsl :class:`~sparsedsl.serving.kvcache.KVCache`
    of ``capacity`` real positions per row (prompt and new tokens, padding not counted):
    generation then runs the pattern's decode kernels against it, and prompts of different
    lengths may be batched with left padding. One cache per generation."""
    _interfaces()
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise InputError(f"generation_cache: `capacity` must be a positive integer (prompt + new tokens), got {capacity!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise InputError(f"generation_cache: `model` must be a transformers model, got {type(model).__name__}")
    from .transformers_cache import make_cache

    return make_cache(config.get_text_config().num_hidden_layers, capacity)


def unregister(name: str) -> None:
    """Remove an implementation that :func:`register` added (models still set to it fail
    on their next forward, as for any unknown implementation)."""
    attention_interface, mask_interface = _interfaces()
    if _registered_pattern(attention_interface, name) is None:
        raise ValueError(f"`name` {name!r} is not an attention implementation registered by sparsedsl")
    # transformers' registries have no public removal; their class-wide mapping is it.
    attention_interface._global_mapping.pop(name, None)
    mask_interface._global_mapping.pop(name, None)


def attention_function(pattern: Pattern, name: str) -> Callable:
    """The function transformers calls in each attention layer:
    ``(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)`` to
    ``(output (B, Lq, Hq, D), None)``."""
    where = _where(pattern, name)

    def sparsedsl_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        from .transformers_cache import CACHE_ATTRIBUTE

        layer = getattr(key, CACHE_ATTRIBUTE, None)
        padding = attention_mask if isinstance(attention_mask, _Padding) else None
        if attention_mask is not None and padding is None:
            # Our mask function returns None or a _Padding; a tensor here is a mask prepared
            # elsewhere (a 4D attention_mask passed to the model), which a pattern cannot apply.
            raise InputError(
                f"{where}: got an attention mask tensor of shape {tuple(attention_mask.shape)}; the pattern "
                "decides which keys each query sees and cannot apply a prepared (4D) mask: pass a 2D padding "
                "mask (batch, length) or none"
            )
        if dropout:
            raise InputError(
                f"{where}: attention dropout ({dropout}) is not supported: set config.attention_dropout = 0.0, "
                "or call model.eval() for inference"
            )
        for keyword, what in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(keyword) is not None:
                raise InputError(f"{where}: the model passes `{keyword}` ({what}), which a pattern does not support")
        if layer is not None:
            out = _attend_through_cache(where, pattern, layer.storage(pattern, key), query, key, value, padding, scaling)
        else:
            if padding is not None and padding.left_row is not None:
                raise InputError(
                    f"{where}: row {padding.left_row} of attention_mask has real tokens after padding (left padding, "
                    "as generate() uses for prompts of different lengths); with transformers' own cache a pattern "
                    "counts each row's positions from its first key: generate with "
                    "cache=sparsedsl.integrations.transformers.generation_cache(model, capacity) (past_key_values= in "
                    "older transformers), which serves left padding, or one prompt at a time"
                )
            out = pattern(query, key, value, scale=scaling)  # queries end-aligned on the cached keys
        return out.transpose(1, 2).contiguous(), None

    sparsedsl_attention.pattern = pattern
    return sparsedsl_attention


def mask_function(pattern: Pattern, name: str) -> Callable:
    """The mask function transformers calls once per forward to build the model's mask:
    it builds none (the attention function needs none) and raises where the model's mask
    asks for something the pattern would not do."""
    from transformers import masking_utils

    causal_pattern = not pattern.checked.later_keys()
    where = _where(pattern, name)

    def sparsedsl_mask(
        batch_size: int,
        q_length: int | None = None,
        kv_length: int | None = None,
        q_offset=0,
        kv_offset=0,
        mask_function: Callable | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> _Padding | None:
        _check_structure(where, pattern, causal_pattern, mask_function, masking_utils)
        if q_length is None:  # releases that describe the queries by their positions
            positions = kwargs.get("cache_position")
            if positions is None:
                raise InputError(f"{where}: this transformers release builds masks in a way the adapter does not know: use transformers 5")
            q_length, q_offset = positions.shape[0], positions[0]
        q_offset, kv_offset = int(q_offset), int(kv_offset)
        if kv_offset != 0 or kv_length != q_offset + q_length:
            raise InputError(
                f"{where}: the cache holds {kv_length} key positions (from {kv_offset}) for {q_offset} past and "
                f"{q_length} new tokens, as a StaticCache or a sliding-window cache layer does; the pattern takes "
                "the queries to be the last positions of exactly the keys seen so far: use the default "
                "DynamicCache (cache_implementation='dynamic')"
            )
        # No mask: the attention function receives None, or where tokens are padding, a _Padding.
        return _check_padding(where, causal_pattern, attention_mask, kv_length, q_length) if attention_mask is not None else None

    sparsedsl_mask.pattern = pattern
    return sparsedsl_mask


# ---------------------------------------------------------------- checks
def _interfaces():
    """transformers' two registries, imported here so that sparsedsl never needs it."""
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(
            "sparsedsl.integrations.transformers needs Hugging Face transformers >= 5: pip install 'transformers>=5'"
        ) from exc
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(
            f"sparsedsl.integrations.transformers needs transformers >= 5 (its mask interface), found "
            f"{transformers.__version__}: pip install -U 'transformers>=5'"
        )
    return AttentionInterface, AttentionMaskInterface


def _registered_pattern(attention_interface, name) -> Pattern | None:
    function = attention_interface._global_mapping.get(name)
    return getattr(function, "pattern", None) if function is not None else None


def _check_name(name, pattern: Pattern, attention_interface) -> None:
    example = f"'sparsedsl_{pattern.name}'"
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string such as {example}, got {type(name).__name__}")
    if not _NAME.match(name):
        raise ValueError(
            f"`name` {name!r} must be letters, digits, '_' and '-', starting with a letter or '_' "
            f"(transformers reads '/' and ':' as a hub kernel and '|' as a prefix): try {example}"
        )
    lowered = name.lower()
    if lowered in _RESERVED_NAMES or any(part in lowered for part in _RESERVED_PARTS):
        raise ValueError(
            f"`name` {name!r} has a meaning of its own in transformers ('eager', 'sdpa', and names containing "
            f"'flash', 'flex' or 'paged' switch on its own code paths): try {example}"
        )
    if name in attention_interface._global_mapping and _registered_pattern(attention_interface, name) is None:
        raise ValueError(
            f"`name` {name!r} is an attention implementation transformers (or another library) registered: try {example}"
        )


def _check_pattern(pattern: Pattern) -> None:
    """A model provides q, k and v only: no gates, documents or learned pooled keys."""
    checked = pattern.checked
    what = f"`pattern` {pattern.name}"
    if checked.gated:
        raise ValueError(
            f"{what} mixes branches with gate(...), whose gates a transformers model does not compute: use "
            "sparsedsl.nn.SparseAttention (which owns a gate projection), or a pattern that returns one branch"
        )
    if checked.needs_documents:
        raise ValueError(
            f"{what} uses `document`, whose document ids a transformers model does not pass: use a pattern "
            "without `document`"
        )
    learned = [c.name for c in checked.compress_branches() if c.pool == "mlp"]
    if learned:
        raise ValueError(
            f"{what}: compress branch `{learned[0]}` pools with a learned MLP a transformers model does not have: "
            "compile it with pool=mean or pool=max"
        )


def _check_structure(where: str, pattern: Pattern, causal_pattern: bool, mask_function, masking_utils) -> None:
    """The model's own mask must be plain causal or plain bidirectional: the pattern
    replaces that, and nothing else."""
    if mask_function is masking_utils.causal_mask_function:
        if not causal_pattern:
            later = ", ".join(f"`{b.name}`" for b in pattern.checked.later_keys())
            raise InputError(
                f"{where}: the model is causal but the pattern lets queries see later keys (branch {later}): "
                "use a causal pattern (`causal & ...`), or set model.config.is_causal = False to run the model "
                "without a causal mask"
            )
        return
    if mask_function is getattr(masking_utils, "bidirectional_mask_function", None):
        return
    shown = getattr(mask_function, "__qualname__", repr(mask_function))
    raise InputError(
        f"{where}: the model's mask is not plain causal or bidirectional (its mask function is `{shown}`: a "
        "sliding window, chunked attention, packed sequences found in position_ids, or an overlay such as "
        "image tokens); a pattern replaces only a plain mask: write the window or chunks in the pattern, turn "
        "them off in the model config, and pass one sequence per row"
    )


@dataclass(frozen=True)
class _Padding:
    """What the mask function hands the attention function in place of a mask when some
    tokens are padding: how many of this forward's new tokens are real in each row, (B,)
    on the device; the first row whose padding lies before real tokens (left padding), or
    None where padding only follows them (right padding)."""

    real_new: torch.Tensor
    left_row: int | None
    step_padded: bool  # whether any of this forward's new tokens is padding


def _check_padding(where: str, causal_pattern: bool, attention_mask: torch.Tensor, kv_length: int, q_length: int) -> _Padding | None:
    """Padding is served where no real query can see it: on the right of each row with a
    causal pattern (a real query then sees only earlier keys, all real; outputs at padding
    positions are unspecified), and on the left with sparsedsl's generation cache (which
    caches only the real tokens). A few host synchronisations per forward, none per layer."""
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length:
        raise InputError(
            f"{where}: attention_mask must be (batch, {kv_length}) (past and new tokens), got "
            f"{tuple(attention_mask.shape)}"
        )
    real = attention_mask.to(torch.bool)
    if bool(real.all()):
        return None
    if not causal_pattern:
        raise InputError(
            f"{where}: attention_mask has padding, which the pattern would let queries see (it lets queries see "
            "later keys): pass rows of one length without padding"
        )
    real_after_padding = (real[:, 1:] & ~real[:, :-1]).any(-1)
    padding_after_real = (~real[:, 1:] & real[:, :-1]).any(-1)
    mixed = real_after_padding & padding_after_real.any()  # left padding beside right padding anywhere
    if bool(mixed.any()):
        row = int(mixed.nonzero()[0, 0])
        raise InputError(
            f"{where}: row {row} of attention_mask has real tokens after padding, and padding after real tokens "
            "(right padding followed by generated tokens, or padding on both sides); a pattern counts each row's "
            "positions from its first key: pad prompts on the left (with generation_cache) or only on the right "
            "(for a forward pass)"
        )
    left = real_after_padding.nonzero()
    real_new = real[:, kv_length - q_length :].sum(-1)
    return _Padding(real_new, int(left[0, 0]) if left.numel() else None, not bool((real_new == q_length).all()))


def _attend_through_cache(where: str, pattern: Pattern, cache, q, k, v, padding: _Padding | None, scale):
    """The (B, Hq, n, D) outputs of n new tokens per row, appended to ``cache``; with left
    padding each row's real tokens are its last and are moved first, as prefill takes them."""
    if padding is not None and padding.left_row is None:
        raise InputError(
            f"{where}: with sparsedsl's generation cache, padding must come before each row's real tokens (generate() "
            "pads prompts on the left for decoder-only models): pad on the left"
        )
    if padding is None or not padding.step_padded:
        return pattern.prefill(q, k, v, cache, scale=scale)  # a few tokens per row: the decode kernels
    n = q.shape[2]
    shift = (n - padding.real_new)[:, None]
    real_first = (torch.arange(n, device=q.device) + shift) % n  # (B, n)

    def moved(t, index):
        return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))

    out = pattern.prefill(*(moved(t, real_first) for t in (q, k, v)), cache, lengths=padding.real_new, scale=scale)
    return moved(out, (torch.arange(n, device=q.device) - shift) % n)


def _where(pattern: Pattern, name: str) -> str:
    return f"attention implementation `{name}` (pattern `{pattern.name}`)"
