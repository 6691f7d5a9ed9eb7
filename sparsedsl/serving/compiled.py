"""A decode step under ``torch.compile``: one custom operator, ``sparsedsl::decode_step``.

A step appends to the cache and reads its host-side lengths, which a traced graph would
either bake in as constants (recompiling at every step) or break on. So the compiled
graph holds the whole step as one opaque operator that names its cache by key and
declares the cache's tensors as mutated: the step's checks, appends and kernel launches
run inside it, every call, as in an eager step. Caches are known by the key they are
made with (:func:`~.kvcache.live_cache`; a weak reference: a dropped cache leaves no trace).

(``custom_op`` reads the schema from the annotations, which older torch releases only
read as ``typing`` objects: hence no ``from __future__ import annotations`` here.)
"""

from typing import List, Optional

import torch
from torch import Tensor

from .kvcache import KVCache, live_cache


def cache_tensors(cache: KVCache) -> List[Tensor]:
    """Every tensor a step writes, each once: keys, values, lengths, the page tables, and
    the pooled keys and values (a paged cache keeps those in its pages and their tables)."""
    if cache.page_size:
        return [cache.k, cache.v, cache.lengths, *cache.tables.values()]
    return [cache.k, cache.v, cache.lengths, cache.table, *(t for pair in cache.pooled.values() for t in pair)]


def _set_storage(cache: KVCache, tensors: List[Tensor]) -> None:
    cache.k, cache.v, cache.lengths = tensors[:3]
    rest = iter(tensors[3:])
    if cache.page_size:
        cache.tables = {name: next(rest) for name in cache.tables}
        cache.table = cache.tables[None]
        cache.pooled = dict.fromkeys(cache.pooled, (cache.k, cache.v))
    else:
        cache.table = next(rest)
        cache.tables = dict.fromkeys(cache.tables, cache.table)
        cache.pooled = {name: (next(rest), next(rest)) for name in cache.pooled}


@torch.library.custom_op("sparsedsl::decode_step", mutates_args=("storage",))
def decode_step(cache: str, q: Tensor, k: Tensor, v: Tensor, gates: Optional[Tensor], scale: Optional[float],
                storage: List[Tensor]) -> Tensor:  # fmt: skip
    """The eager decode step of the live cache with key ``cache``, appending ``k``/``v``."""
    from .generation import attend_cached

    held = live_cache(cache)
    # The step writes into the tensors it is given, which a compiled graph may have
    # copied (functionalization writes them back after): the cache reads and writes
    # those for the step.
    own = cache_tensors(held)
    copied = any(a.data_ptr() != b.data_ptr() for a, b in zip(storage, own))
    _set_storage(held, storage)
    try:
        with torch.no_grad():
            return attend_cached(held.pattern, q, k, v, held, gates=gates, scale=scale, decode=True).clone()
    finally:
        _set_storage(held, own)
        if copied:  # a step recorded over copies of the storage (replay.py) would keep them alive
            held.step_plans.clear()


@decode_step.register_fake
def _(cache, q, k, v, gates, scale, storage):
    return q.new_empty(q.shape)


def fits_one_operator(pattern, cache, keywords: dict) -> bool:
    """Whether a decode step can be the one operator: a cache of this pattern without
    document ids, and no keywords beyond gates= and scale= (learned pooling by the cache's
    ``poolers``; ragged rows, documents and ``poolers=`` run as eager steps, behind a
    graph break)."""
    return (set(keywords) <= {"gates", "scale"} and isinstance(cache, KVCache) and cache.doc_ids is None
            and cache.pattern.source_key == pattern.source_key)  # fmt: skip


def compiled_decode(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, keywords: dict) -> Tensor:
    """A decode step as the one operator, while torch.compile traces it."""
    scale = keywords.get("scale")
    return torch.ops.sparsedsl.decode_step(cache.key, q, k, v, keywords.get("gates"),
                                           None if scale is None else float(scale), cache_tensors(cache))  # fmt: skip
