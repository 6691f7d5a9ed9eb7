"""Attention of new queries against a :class:`~.kvcache.KVCache`: prefill and decode.

A call appends the new keys and values of every row to the cache, then attends each new
query to everything its row holds: the queries are the last positions of their row, as
the semantics align them (``Lq <= Lk``, end-aligned), so an output equals the matching
row of one forward pass over the whole sequence. Rows may hold different lengths and take
different numbers of new tokens (``lengths``); rows that share both run in one call of
the pattern's kernels. In a pattern that works within documents, a row's new tokens run
document by document, each over its own document's keys only.
"""

from __future__ import annotations

import numbers
from collections import defaultdict

import torch

from ..errors import InputError
from ..ir.nodes import PooledKeys, SelectedBlocks
from ..runtime.dispatch import attend
from ..runtime.inputs import CallInputs, check_scale, document_ids
from ..runtime.launch.common import (
    BranchKernels,
    document_tables,
    interpretable,
    interpreting,
    rows_last,
    uses_kernels,
)
from ..runtime.launch.selection import Selection
from .compiled import cache_tensors
from .decoding import (
    CachedKeys,
    CacheRows,
    decode_selection,
    merge_outputs,
    run_decode,
    run_selected_decode,
)
from .kvcache import KVCache
from .replay import plan_key, planned_step

# Decode takes a few tokens per row (speculative decoding); more is a prefill.
MAX_DECODE_TOKENS = 16


def attend_cached(
    pattern,
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
    decode: bool = False,
) -> torch.Tensor:
    """The output (B, Hq, n, D) of ``n`` new queries per row; see :meth:`Pattern.prefill`."""
    where = f"pattern `{pattern.name}`.{'decode' if decode else 'prefill'}"
    new, scale, poolers = _check(where, pattern, q, k, v, cache, lengths, scale, gates, doc_ids, poolers, decode)
    B, Hq, n, D = q.shape
    ir = pattern.ir
    uniform = all(count == n for count in new)  # (lengths of n for every row are no lengths)
    if uniform and cache.doc_ids is None and n <= MAX_DECODE_TOKENS and uses_kernels(q, pattern.kernels):
        # Every row takes n tokens: a step on the device alone (what a CUDA graph captures),
        # replayed from its recorded launches after the first (replay.py).
        k, v = k.detach(), v.detach()
        with torch.no_grad():
            if not _replayable(q, poolers):
                cache.append_step(k, v, poolers, pattern.kernels, pattern.source_key)
                return decode_step(pattern, cache, q, gates, cache.new_rows(n), scale)
            return planned_step(
                cache, plan_key(q, k, v, gates, scale, tuple(cache_tensors(cache))), (q, k, v, gates),
                lambda: cache.write_step(k, v, poolers, pattern.kernels, pattern.source_key),
                lambda: decode_step(pattern, cache, q, gates, cache.new_rows(n), scale),
                lambda: cache.advance(n),
            )  # fmt: skip

    out = q.new_zeros(B, Hq, n, D)  # padding positions (beyond a row's `lengths`) stay 0
    with torch.no_grad():  # the cache holds values, not a graph
        ids = _new_doc_ids(cache, doc_ids, new, n) if cache.doc_ids is not None else None

    def append(row, lo, hi):
        with torch.no_grad():
            cache.append(row, k[row, :, lo:hi].detach(), v[row, :, lo:hi].detach(),
                         ids[row, lo:hi] if ids is not None else None, poolers, pattern.kernels, pattern.source_key)  # fmt: skip

    if ir.packed:
        for row in range(B):
            for lo, hi in _runs(ids[row, : new[row]].tolist()):
                append(row, lo, hi)
                start, stop = cache.doc_starts[row], cache.seqlens[row]
                piece = _attend_rows(pattern, cache, [row], q[row : row + 1, :, lo:hi], _rows(gates, [row], lo, hi),
                                     start, stop, scale, one_document=True)  # fmt: skip
                out[row, :, lo:hi] = piece[0]
        return out

    for row in range(B):
        if new[row]:
            append(row, 0, new[row])
    if n <= MAX_DECODE_TOKENS and uses_kernels(q, pattern.kernels):  # longer prefills: the forward kernels
        out = decode_step(pattern, cache, q, gates, torch.tensor(new, dtype=torch.int32, device=q.device), scale)  # ragged
        for row in range(B):
            out[row, :, new[row] :] = 0  # padding rows
        return out
    groups = defaultdict(list)  # rows with the same new count and length run together
    for row in range(B):
        if new[row]:
            groups[new[row], cache.seqlens[row]].append(row)
    for (count, stop), rows in groups.items():
        index = slice(None) if len(rows) == B else rows
        piece = _attend_rows(pattern, cache, index, q[index, :, :count], _rows(gates, index, 0, count), 0, stop, scale)
        out[index, :, :count] = piece
    return out


def _replayable(q: torch.Tensor, poolers: dict) -> bool:
    """Whether a uniform step can replay recorded launches: compiled kernels on a GPU, and
    no learned pooling (its poolers are Python, not launches)."""
    return not poolers and q.is_cuda and not interpreting()


def decode_step(pattern, cache: KVCache, q, gates, new_rows: torch.Tensor, scale: float) -> torch.Tensor:
    """The attention of a decode step whose keys the cache already holds: every branch
    through its decode kernels over the whole cache (each row reads only its own length;
    a selection's pass over its score branch's pooled keys gives that branch too), then
    the gated mix.
    ``new_rows`` (B,) int32 says how many of the ``q.shape[2]`` rows are new in each row.
    Kernel launches only, with no host synchronisation: a CUDA graph can capture it."""
    ir = pattern.ir
    dtype = q.dtype
    q = rows_last(interpretable(q))
    docs = document_tables(cache.doc_ids) if cache.doc_ids is not None else None
    raw = CachedKeys(interpretable(cache.k), interpretable(cache.v), cache.page_size, cache.table)
    rows = CacheRows(cache.lengths, new_rows, cache.tickets)

    def pooled(name: str) -> CachedKeys:
        kc, vc = (interpretable(t) for t in cache.pooled[name])
        return CachedKeys(kc, vc, cache.page_size, cache.tables[name])

    partials = {}
    # Selections first: each one's pass over its score branch's pooled keys also gives
    # that branch's attention.
    for index, branch in enumerate(ir.branches):
        if isinstance(branch.blocks, SelectedBlocks):
            kernels = BranchKernels(pattern.kernels, index, pattern.source_key)
            score = ir.branch(branch.blocks.score)
            selection = Selection.of(branch, score)
            table, partials[score.name] = decode_selection(kernels, selection, q, pooled(score.name), rows, scale, cache.capacity)
            partials[branch.name] = run_selected_decode(kernels, selection, q, raw, table, rows, scale)
    for index, branch in enumerate(ir.branches):
        if branch.name in partials:
            continue
        kernels = BranchKernels(pattern.kernels, index, pattern.source_key)
        if isinstance(branch.keys, PooledKeys):
            keys, max_keys = pooled(branch.name), branch.keys.count(cache.capacity)
        else:
            keys, max_keys = raw, cache.capacity
        branch_docs = docs if "doc_ids" in branch.runtime else None
        partials[branch.name] = run_decode(kernels, q, keys, rows, branch_docs, scale, max_keys)
    mix = rows_last(interpretable(gates)) if ir.combine == "gate" else None
    return merge_outputs(pattern.kernels, q, [partials[b.name] for b in ir.output_branches], mix).to(dtype)


def _rows(t: torch.Tensor | None, rows, lo: int, hi: int) -> torch.Tensor | None:
    return None if t is None else t[rows, :, lo:hi]


def _attend_rows(pattern, cache: KVCache, rows, q, gates, start: int, stop: int, scale: float, one_document=False):
    """Queries ``q`` of ``rows``, the last of positions ``start .. stop - 1`` of each."""
    pooled = {name: cache.read_pooled(name, rows, keys.count(stop - start)) for name, keys in cache.pooled_keys.items()}
    doc_ids = None
    if cache.doc_ids is not None:
        doc_ids = cache.doc_ids[rows, start:stop]
        if one_document:  # the slice is one document: number it as one sequence
            doc_ids = torch.zeros_like(doc_ids)
        else:  # an id that comes back after another document is refused, as in a full call
            doc_ids = document_ids(f"pattern `{pattern.name}`", doc_ids, None, *doc_ids.shape, doc_ids.device)
    inputs = CallInputs(q, *cache.read(rows, start, stop), scale, gates, doc_ids, pooled)
    return attend(pattern.ir, pattern.checked, inputs, pattern.kernels, pattern.source_key)


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) runs of equal ids."""
    runs, lo = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[lo]:
            runs.append((lo, t))
            lo = t
    return runs


def _new_doc_ids(cache: KVCache, doc_ids, new: list[int], n: int) -> torch.Tensor:
    """(B, n) document ids of the new tokens: as given, or each row's current document."""
    if doc_ids is not None:
        return doc_ids.to(torch.int64)
    last = [int(cache.doc_ids[row, length - 1]) if length else 0 for row, length in enumerate(cache.seqlens)]
    return torch.tensor(last, device=cache.k.device, dtype=torch.int64)[:, None].expand(len(new), n)


def _check(where, pattern, q, k, v, cache, lengths, scale, gates, doc_ids, poolers, decode):
    if not isinstance(cache, KVCache):
        raise InputError(f"{where}: `cache` must be a sparsedsl.KVCache, got {type(cache).__name__}")
    if cache.pattern.ir != pattern.ir:
        raise InputError(f"{where}: the cache was made for pattern `{cache.pattern.name}` with other parameters or branches; make one with KVCache(pattern, ...)")
    B, Hkv, D = cache.batch, cache.kv_heads, cache.head_dim
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{where}: `{name}` must be a 4-dimensional tensor (batch, heads, new tokens, head_dim)")
        if t.dtype != cache.k.dtype or t.device != cache.k.device:
            raise InputError(f"{where}: `{name}` is {t.dtype} on {t.device}, the cache {cache.k.dtype} on {cache.k.device}")
    n = q.shape[2]
    if tuple(k.shape) != (B, Hkv, n, D) or k.shape != v.shape:
        raise InputError(f"{where}: `k` and `v` must have shape {(B, Hkv, n, D)} (the cache's batch, KV heads and head dim, and q's {n} new tokens), got {tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if q.shape[0] != B or q.shape[3] != D or q.shape[1] % Hkv or q.shape[1] == 0:
        raise InputError(f"{where}: `q` must be (batch {B}, a multiple of {Hkv} heads, new tokens, head_dim {D}), got {tuple(q.shape)}")  # fmt: skip
    if n == 0:
        raise InputError(f"{where}: no new tokens (q has shape {tuple(q.shape)})")
    if decode and n > MAX_DECODE_TOKENS:
        raise InputError(f"{where}: {n} new tokens per row; decode takes at most {MAX_DECODE_TOKENS} (use prefill for more)")
    new = [n] * B if lengths is None else _new_counts(where, lengths, B, n)
    scale = check_scale(where, scale, D)
    ir = pattern.ir
    n_out = len(ir.output_branches)
    if ir.combine == "gate":
        if gates is None or not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (B, q.shape[1], n, n_out):
            raise InputError(f"{where} mixes {n_out} branches: pass gates= of shape {(B, q.shape[1], n, n_out)}")
    elif gates is not None:
        raise InputError(f"{where}: the pattern has a single branch and takes no `gates`")
    if doc_ids is not None:
        if cache.doc_ids is None:
            raise InputError(f"{where}: the pattern does not use `document`; drop `doc_ids`")
        if not isinstance(doc_ids, torch.Tensor) or tuple(doc_ids.shape) != (B, n) or doc_ids.is_floating_point():
            raise InputError(f"{where}: `doc_ids` must be a ({B}, {n}) integer tensor: the document of each new token")
    poolers = dict(poolers or cache.poolers or {})  # the cache's own where the call passes none
    learned = [b.name for b in ir.learned_pooling]
    for name in learned:
        if name not in poolers:
            raise InputError(
                f"{where}: compress branch `{name}` pools with a learned MLP: pass poolers={{'{name}': (pool_k, pool_v)}}, "
                "functions from (n, kv_heads, block, head_dim) windows to (n, kv_heads, head_dim) "
                "(sparsedsl.nn.SparseAttention passes its own)"
            )
    if set(poolers) - set(learned):
        raise InputError(f"{where}: `poolers` names {sorted(set(poolers) - set(learned))}, which are not learned-pooling compress branches")
    cache.check_room(new)  # last: it takes a paged cache's pages, which a refused call must not hold
    return new, scale, poolers


def _new_counts(where: str, lengths, B: int, n: int) -> list[int]:
    """``lengths`` as B ints in 0..n: a list or tuple of ints, or a 1-D integer tensor.
    Floats and bools are refused, not rounded: 2.5 tokens is a bug in the caller."""
    expected = f"`lengths` must give, for each of the {B} rows, how many of the {n} new tokens are real (ints 0..{n})"
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise InputError(f"{where}: {expected}: a list of ints or a 1-D integer tensor, got a {lengths.dtype} tensor of shape {tuple(lengths.shape)}")  # fmt: skip
        values = lengths.tolist()
    elif isinstance(lengths, (list, tuple)):
        bad = [x for x in lengths if not isinstance(x, numbers.Integral) or isinstance(x, bool)]
        if bad:
            raise InputError(f"{where}: {expected}, got {bad[0]!r} in {lengths!r}")
        values = [int(x) for x in lengths]
    else:
        raise InputError(f"{where}: {expected}: a list of ints or a 1-D integer tensor, got {type(lengths).__name__} {lengths!r}")  # fmt: skip
    if len(values) != B or any(x < 0 or x > n for x in values):
        raise InputError(f"{where}: {expected}, got {values}")
    return values
