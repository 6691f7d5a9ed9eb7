"""A transformers ``Cache`` whose layers keep their keys and values in sparsedsl's
:class:`~sparsedsl.serving.kvcache.KVCache`, so that ``generate()`` decodes through the
decode kernels (and a compress branch's pooled keys are kept as they complete) instead
of running the forward kernel over every key at each step.

The layer does not append in ``update``: it returns the new keys and values as they
are, marked with itself (an attribute of the key tensor, which the model hands on to the
attention function unchanged, in every transformers 5 release; keyword arguments reach
the cache only in some), and the attention function appends and attends in one
``pattern.prefill`` or ``pattern.decode`` call. Each row's cache holds only its
real tokens, so left padding (generate()'s way of batching prompts of different
lengths) costs nothing and every row counts its positions from its first real token.

This module imports transformers; :func:`sparsedsl.integrations.transformers.generation_cache`
imports it when called.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import InputError
from ..serving.kvcache import KVCache

# The attribute of the new keys by which a layer hands itself to the attention function.
CACHE_ATTRIBUTE = "sparsedsl_cache_layer"


class PatternCacheLayer(CacheLayerMixin):
    """One model layer's cache: a :class:`KVCache` of ``capacity`` real positions per row,
    made at the first call (when the pattern, shapes, dtype and device are known).
    ``seen`` counts every position the model has fed, padding included: transformers sizes
    its masks and positions by it."""

    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.kv: KVCache | None = None
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        setattr(key_states, CACHE_ATTRIBUTE, self)
        self.seen += key_states.shape[2]
        return key_states, value_states

    def storage(self, pattern, key: torch.Tensor) -> KVCache:
        """The layer's KVCache for ``pattern``, made for ``key``'s (B, Hkv, n, D) at the first call."""
        if self.kv is None:
            B, Hkv, _, D = key.shape
            self.kv = KVCache(pattern, batch=B, kv_heads=Hkv, head_dim=D, capacity=self.capacity, dtype=key.dtype,
                              device=key.device)  # fmt: skip
        elif self.kv.pattern is not pattern:
            raise InputError(
                f"sparsedsl's generation cache holds keys of pattern `{self.kv.pattern.name}`, but the model now runs "
                f"`{pattern.name}`: start a new cache (generation_cache(...)) after switching the attention"
            )
        return self.kv

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1  # the real tokens are bounded by `capacity`; the count with padding is not

    def reset(self) -> None:
        self.seen = 0
        if self.kv is not None:
            self.kv.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InputError("sparsedsl's generation cache does not reorder rows (beam search): use num_beams=1")

    def offload(self) -> None:
        raise InputError("sparsedsl's generation cache does not offload to the CPU: create it without offloading")

    def prefetch(self) -> None:
        pass  # nothing is ever offloaded


def make_cache(layers: int, capacity: int) -> Cache:
    return Cache(layers=[PatternCacheLayer(capacity) for _ in range(layers)])
