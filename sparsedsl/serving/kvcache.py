"""The keys and values a pattern keeps for generation: one :class:`KVCache` per layer.

A cache holds, for each sequence of a batch, the keys and values seen so far (``seqlens``
of them, up to ``capacity``), the document id of every position when the pattern uses
``document``, and the pooled keys and values of every compress branch: pooled key ``c``
is added as soon as its window ``[c*stride, c*stride + block)`` is complete. Mean and max
pooling run the pattern's generated pooling kernel over just the new windows; learned
(``mlp``) pooling calls the functions the caller passes (``sparsedsl.nn`` passes its
compression MLPs).

In a pattern that works within documents (``compress(within=document)``) every document
is its own sequence: a row's pooled keys restart with each document, and a query only
ever reads its own document's keys.

A cache is contiguous (each row owns ``capacity`` positions) or paged (``pool=``, a
:class:`~.pages.PagePool`): a row then holds pages of the pool, taken as it grows and
given back by :meth:`KVCache.free`, and a page table per row says which. The decode
kernels read either layout through the same code (``cache_offsets`` in the kernels), so a
paged cache's outputs equal a contiguous one's exactly.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from .. import reference
from ..codegen.kernel_specs import CACHE_APPEND, POOL_LATEST
from ..errors import InputError
from ..frontend.model import SelectBranch, mask_text
from ..frontend.primitives import MAX_SIZE
from ..ir.nodes import PooledKeys
from ..runtime.launch.common import (
    BranchKernels,
    dependent_launches,
    head_dims,
    launch,
    next_power_of_2,
    uses_kernels,
)
from ..runtime.launch.pooling import BlockPooling
from .pages import SCRATCH, PagePool, cache_device, check_dtype, check_positive

# (n, Hkv, block, D) windows of raw keys or values -> (n, Hkv, D) pooled ones
WindowPool = Callable[[torch.Tensor], torch.Tensor]


# Every live cache by its key: a compiled decode step names its cache so (serving/compiled.py).
_live: weakref.WeakValueDictionary[str, KVCache] = weakref.WeakValueDictionary()
_numbers = itertools.count()


def live_cache(key: str) -> KVCache:
    """The cache made with ``key``, while it lives."""
    cache = _live.get(key)
    if cache is None:
        raise InputError(f"sparsedsl: no KV cache lives under key {key!r}; run the compiled step with a live cache")
    return cache


class KVCache:
    """Per-layer key/value storage for ``batch`` sequences of one pattern.

    Contiguous (``pool=None``): ``k`` and ``v`` are (batch, kv_heads, capacity, head_dim),
    and ``pooled[name]`` holds compress branch ``name``'s (k_cmp, v_cmp), (batch, kv_heads,
    pooled capacity + 1, head_dim). Paged (``pool=`` a :class:`~.pages.PagePool`): they are
    the pool's pages, row ``b``'s position ``t`` is slot ``t % page_size`` of page
    ``table[b, t // page_size]``, and its pooled key ``c`` of branch ``name`` slot
    ``c % page_size`` of page ``tables[name][b, c // page_size]`` (``tables[None]`` is
    ``table``). Either way position ``t`` of row ``b`` is valid for ``t < seqlens[b]`` and
    pooled key ``c`` for ``c < pooled_count(name, b)``; :meth:`read` and
    :meth:`read_pooled` return them as contiguous tensors. ``lengths`` is ``seqlens`` as an
    int32 tensor on the device (what kernels read); ``seqlens`` is its host copy.
    ``poolers`` ({branch: (pool_k, pool_v)}, or None) pool the learned compress branches
    in steps that pass no ``poolers=`` (``SparseAttention.make_cache`` sets the layer's),
    which lets such a step be one operator under torch.compile.
    """

    def __init__(
        self,
        pattern,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pool: PagePool | None = None,
    ) -> None:
        checked = pattern.checked
        where = f"KVCache for pattern `{checked.name}` ({checked.source_name}:{checked.line})"
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity)):
            check_positive(where, name, value)
        if capacity > MAX_SIZE:
            raise InputError(
                f"{where}: `capacity` {capacity:,} is more positions than the kernels index with 32-bit integers "
                f"(at most {MAX_SIZE:,})"
            )
        if pool is not None and isinstance(pool, PagePool):  # by default, where and as the pool keeps them
            dtype = pool.k.dtype if dtype is None else dtype
            device = pool.k.device if device is None else device
        dtype = torch.float32 if dtype is None else dtype
        check_dtype(where, dtype)
        device = cache_device(where, device)
        later = checked.later_keys()
        if later and isinstance(later[0], SelectBranch):
            raise InputError(
                f"{where}: branch `{later[0].name}` selects per block: a block's queries share the choice of its "
                "first query, which the cache does not keep; use per=token to generate with it"
            )
        if later:
            raise InputError(
                f"{where}: branch `{later[0].name}` = {mask_text(later[0].mask)} lets a query see keys after it, "
                "which a cache of past keys cannot serve; intersect it with `causal` to generate with it"
            )
        self.pattern = pattern
        self.where = where
        self.batch, self.kv_heads, self.head_dim, self.capacity = batch, kv_heads, head_dim, capacity
        self.key = f"kvcache-{next(_numbers)}"
        _live[self.key] = self
        self.pooled_keys = {b.name: b.keys for b in pattern.ir.branches if isinstance(b.keys, PooledKeys)}
        self.pool = pool
        if pool is None:
            self.page_size = 0
            self._allocate_rows(where, dtype, device)
            # (B, 1): the kernels' page-table argument, never read in a contiguous cache
            self.table = torch.zeros(batch, 1, dtype=torch.int32, device=self.k.device)
            self.tables = dict.fromkeys([None, *self.pooled_keys], self.table)
        else:
            self._check_pool(where, pool, dtype, device)
            self.page_size = pool.page_size
            self.k, self.v = pool.k, pool.v
            self.pooled = dict.fromkeys(self.pooled_keys, (pool.k, pool.v))  # in pages of their own
            # A table per kind of key: raw ones, and each compress branch's pooled ones (the
            # spare slot past the capacity included: see append_step).
            counts = {None: capacity, **{name: keys.count(capacity) + 1 for name, keys in self.pooled_keys.items()}}
            self.tables = {
                name: torch.full((batch, -(-n // pool.page_size)), SCRATCH, dtype=torch.int32, device=self.k.device)
                for name, n in counts.items()
            }
            self.table = self.tables[None]
        # Each row's pages of each kind (None: raw keys; a compress branch's name), in order.
        self._pages: list[dict[str | None, list[int]]] = [{name: [] for name in self.tables} for _ in range(batch)]
        if pool is not None:  # a cache dropped without free() still gives its pages back
            weakref.finalize(self, _give_back, pool, self._pages)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        # A counter per row and KV head for the decode kernels whose last program finishes a
        # stage (serving/decoding.py); each launch leaves it zero.
        self.tickets = torch.zeros(batch * kv_heads, dtype=torch.int32, device=self.k.device)
        self.seqlens: list[int] = [0] * batch
        self.doc_ids = torch.zeros(batch, capacity, dtype=torch.int64, device=self.k.device) if checked.needs_documents else None
        # Where each row's current document starts (packed patterns restart pooling there).
        self.doc_starts: list[int] = [0] * batch
        self.packed = pattern.ir.packed
        self._rows = torch.arange(batch, device=self.k.device)[:, None]
        self._new_rows: dict[int, torch.Tensor] = {}
        self.step_plans: OrderedDict = OrderedDict()  # recorded decode steps (serving/replay.py)
        self.poolers: dict | None = None
        self.poolers_of: int | None = None  # which poolers those are (SparseAttention._poolers_id)

    def _allocate_rows(self, where: str, dtype: torch.dtype, device: torch.device) -> None:
        B, H, N, D = self.batch, self.kv_heads, self.capacity, self.head_dim
        try:
            self.k = torch.zeros(B, H, N, D, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            size = 2 * B * H * N * D * dtype.itemsize
            raise InputError(
                f"{where}: cannot allocate the keys and values ({B} x {H} x {N:,} x {D} each, "
                f"{size / 2**30:,.1f} GiB together) on {device}: {str(exc).splitlines()[0][:200]}; "
                "use a smaller `capacity` or `batch`, or a paged cache (pool=)"
            ) from None
        # One spare pooled slot past the capacity: where a step's pooling writes the windows
        # a row has not completed yet (see append_step).
        self.pooled = {
            name: tuple(t.new_zeros(B, H, keys.count(N) + 1, D) for t in (self.k, self.v))
            for name, keys in self.pooled_keys.items()
        }

    def _check_pool(self, where: str, pool, dtype: torch.dtype, device: torch.device) -> None:
        if not isinstance(pool, PagePool):
            raise InputError(f"{where}: `pool` must be a sparsedsl.PagePool, got {type(pool).__name__}")
        if pool.pattern.ir != self.pattern.ir:
            raise InputError(f"{where}: the pool was made for pattern `{pool.pattern.name}` with other parameters or branches; make one with PagePool(pattern, ...)")  # fmt: skip
        _, H, _, D = pool.k.shape
        same_device = pool.k.device.type == device.type and device.index in (None, pool.k.device.index)
        if (H, D, pool.k.dtype) != (self.kv_heads, self.head_dim, dtype) or not same_device:
            raise InputError(
                f"{where}: the pool holds {H} KV heads of dimension {D}, {pool.k.dtype} on {pool.k.device}; the cache "
                f"asks for {self.kv_heads} of {self.head_dim}, {dtype} on {device}: pass the pool's"
            )

    def pooled_count(self, name: str, row: int) -> int:
        """How many pooled keys of compress branch ``name`` row ``row`` holds."""
        return self.pooled_keys[name].count(self.seqlens[row] - self.pooled_origin(row))

    def pooled_origin(self, row: int) -> int:
        """The position row ``row``'s pooled windows count from: its document's start in a
        pattern that works within documents, else 0."""
        return self.doc_starts[row] if self.packed else 0

    def reset(self) -> None:
        """Forget every sequence (the storage is kept; a paged cache gives its pages back)."""
        for row in range(self.batch):
            self._forget(row)
        self.lengths.zero_()
        self.tickets.zero_()  # (each launch leaves them zero; a launch that failed midway may not)

    def free(self, row: int) -> None:
        """Forget row ``row``'s sequence, so that the row can start another; a paged cache
        gives the row's pages back to its pool."""
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < self.batch:
            raise InputError(f"{self.where}: `row` must be an int in 0..{self.batch - 1}, got {row!r}")
        self._forget(row)
        self.lengths[row] = 0

    def _forget(self, row: int) -> None:
        self.seqlens[row] = 0
        self.doc_starts[row] = 0
        held = [page for pages in self._pages[row].values() for page in pages]
        if held:
            self.pool.release(held)
            for name, pages in self._pages[row].items():
                pages.clear()
                self.tables[name][row] = SCRATCH

    def reserve(self, length: int) -> None:
        """Take, now, the pages every row needs to hold ``length`` positions (a paged cache
        otherwise takes them as rows grow, on the host). Steps replayed from a CUDA graph
        run no host code, so reserve their length before capturing them."""
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= self.capacity:
            raise InputError(f"{self.where}: `length` must be an int in 0..{self.capacity}, got {length!r}")
        self._take_pages([length] * self.batch)

    def _take_pages(self, lengths: Sequence[int]) -> None:
        """Give every row the pages its first ``lengths[row]`` positions need, raw and pooled
        keys (all or none). A row that works within documents pools from its document's
        start, so counting pooled keys from 0 asks for enough."""
        if not self.page_size:
            return
        wanted = []  # (row, kind, pages it lacks)
        for row, n in enumerate(lengths):
            n = min(n, self.capacity)
            counts = {None: n, **{name: keys.count(n) for name, keys in self.pooled_keys.items()}}
            for name, count in counts.items():
                lacking = -(-count // self.page_size) - len(self._pages[row][name])
                if lacking > 0:
                    wanted.append((row, name, lacking))
        if not wanted:
            return
        taken = self.pool.allocate(sum(n for _, _, n in wanted))
        for row, name, n in wanted:
            held = self._pages[row][name]
            self.tables[name][row, len(held) : len(held) + n] = torch.tensor(taken[:n], dtype=torch.int32)
            held.extend(taken[:n])
            del taken[:n]

    def _where(self, rows: torch.Tensor | int, positions: torch.Tensor, name: str | None = None):
        """The index of rows ``rows``' positions ``positions`` (broadcast together) into the
        raw keys (``name`` None) or compress branch ``name``'s pooled keys: ``x[i, :, j]``
        with (i, j) returned is (..., kv_heads, head_dim), in either layout."""
        if isinstance(rows, int):  # (not a 0-d tensor: torch indexes with that as with an int)
            rows = torch.full((1,) * positions.dim(), rows, device=positions.device)
        if not self.page_size:
            return rows, positions
        return self.tables[name][rows, positions // self.page_size].long(), positions % self.page_size

    def read(self, rows, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rows``' (a slice or list) keys and values at positions ``start .. stop - 1``,
        (len(rows), kv_heads, stop - start, head_dim): views of a contiguous cache's rows
        (copies for a list of rows), copies gathered from a paged one's pages."""
        self._check_read("positions", rows, start, stop, self.capacity)
        if not self.page_size:
            return self.k[rows, :, start:stop], self.v[rows, :, start:stop]
        return self._gather(self.k, self.v, rows, torch.arange(start, stop, device=self.k.device), None)

    def read_pooled(self, name: str, rows, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`read` of compress branch ``name``'s first ``count`` pooled keys and values."""
        if name not in self.pooled_keys:
            raise InputError(f"{self.where}: no compress branch `{name}`; the cache pools {sorted(self.pooled_keys)}")
        self._check_read("pooled keys", rows, 0, count, self.pooled_keys[name].count(self.capacity))
        kc, vc = self.pooled[name]
        if not self.page_size:
            return kc[rows, :, :count], vc[rows, :, :count]
        return self._gather(kc, vc, rows, torch.arange(count, device=self.k.device), name)

    def _check_read(self, what: str, rows, start, stop, limit: int) -> None:
        numbers = [start, stop] + (list(rows) if isinstance(rows, (list, tuple)) else [])
        if not isinstance(rows, (slice, list, tuple)) or any(not isinstance(x, int) or isinstance(x, bool) for x in numbers):
            raise InputError(f"{self.where}: read {what} of `rows` (a slice or a list of ints) from `start` to `stop` (ints)")
        if not 0 <= start <= stop <= limit or any(not 0 <= r < self.batch for r in numbers[2:]):
            raise InputError(f"{self.where}: read {what} {start}..{stop} of rows {rows}: the cache holds rows "
                             f"0..{self.batch - 1} and {limit} {what}")  # fmt: skip

    def _gather(self, k, v, rows, positions, name):
        rows = torch.arange(self.batch, device=self.k.device)[rows][:, None]
        i, j = self._where(rows, positions[None, :], name)
        return tuple(x[i, :, j].permute(0, 2, 1, 3) for x in (k, v))

    def __repr__(self) -> str:
        paged = f" in pages of {self.page_size}" if self.page_size else ""
        return (f"<KVCache {self.pattern.name}: batch {self.batch}, {self.kv_heads} KV heads, head dim {self.head_dim}, "
                f"{self.capacity} positions{paged}, {self.k.dtype}, seqlens {self.seqlens}>")  # fmt: skip

    # ------------------------------------------------------------ appending
    def check_room(self, new: list[int]) -> None:
        """Raise, changing nothing, if appending ``new[b]`` positions to row ``b`` would pass
        the capacity, or need more pages than the pool has free."""
        for row, n in enumerate(new):
            if self.seqlens[row] + n > self.capacity:
                raise InputError(
                    f"{self.where}: row {row} holds {self.seqlens[row]} of {self.capacity} positions and cannot take "
                    f"{n} more; allocate a larger cache (capacity=) or start the row again (free(row))"
                )
        self._take_pages([length + n for length, n in zip(self.seqlens, new)])

    def append(
        self,
        row: int,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids: torch.Tensor | None,
        poolers: dict[str, tuple[WindowPool, WindowPool]],
        kernels,
        source_key: str | None,
    ) -> None:
        """Append (Hkv, n, D) keys and values to row ``row``, all of one document when the
        pattern works within documents (``doc_ids`` (n,) then says which); pool the windows
        this completes. The caller has checked room (which took the pages), shapes and dtypes."""
        start, n = self.seqlens[row], k.shape[1]
        stop = start + n
        i, j = self._where(row, torch.arange(start, stop, device=self.k.device))
        self.k[i, :, j] = k.transpose(0, 1)
        self.v[i, :, j] = v.transpose(0, 1)
        if self.doc_ids is not None and doc_ids is not None:
            self.doc_ids[row, start:stop] = doc_ids
            changes = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten()
            if start == 0 or bool(self.doc_ids[row, start - 1] != doc_ids[0]):
                self.doc_starts[row] = start  # a new document (packed patterns restart pooling)
            if changes.numel():
                self.doc_starts[row] = start + 1 + int(changes[-1])
        # Pooled keys already held (0 when this append starts a packed row's new document).
        first = {name: self.pooled_count(name, row) for name in self.pooled}
        self.seqlens[row] = stop
        self.lengths[row] = stop
        for index, branch in enumerate(self.pattern.ir.branches):
            if branch.name in self.pooled:
                self._pool(row, index, branch.keys, first[branch.name], poolers, kernels, source_key)

    def append_step(self, k: torch.Tensor, v: torch.Tensor, poolers, kernels, source_key) -> None:
        """Append (B, Hkv, n, D) keys and values, n to every row, entirely on the device:
        positions come from ``lengths``, and each row's latest ceil(n / stride) complete
        windows are pooled again and written in place (a window already pooled gets the
        same value), so that the step has fixed shapes and no host synchronisation and a
        CUDA graph can capture it. The host copy ``seqlens`` advances here, which a graph
        replay does not do: :meth:`sync` reloads it. Positions are clamped to the capacity,
        so a replay past it never writes outside the cache (its outputs are then wrong);
        in a paged cache, positions past a row's pages go to the scratch page. The caller
        has checked room (which took the pages)."""
        self.write_step(k, v, poolers, kernels, source_key)
        self.advance(k.shape[2])

    def write_step(self, k: torch.Tensor, v: torch.Tensor, poolers, kernels, source_key) -> None:
        """:meth:`append_step`'s writes: the keys, values and pooled windows, with
        ``lengths`` not yet advanced. On the kernels the first compress branch pooled by a
        kernel appends the keys too, in the same launch."""
        n = k.shape[2]
        pooled_here = [index for index, branch in enumerate(self.pattern.ir.branches) if branch.name in self.pooled]
        on_kernels = uses_kernels(self.k, kernels)  # as _pool_latest decides
        fused = next((i for i in pooled_here if on_kernels and self.pattern.ir.branches[i].keys.pool != "mlp"), None)
        if on_kernels and fused is None:
            B, H, _, D = k.shape
            launch(
                kernels.cache_append, CACHE_APPEND, (B * H,), K_NEW=k, V_NEW=v, K=self.k, V=self.v, LENGTHS=self.lengths,
                PAGES=self.table, n=n, num_kv_heads=H, capacity=self.capacity, **head_dims(D),
                ROWS=max(2, next_power_of_2(n)), PAGE=self.page_size, PDL=dependent_launches(self.k),
            )  # fmt: skip
        elif not on_kernels:
            positions = (self.lengths[:, None] + torch.arange(n, device=self.k.device)).clamp(max=self.capacity - 1)
            i, j = self._where(self._rows, positions)
            self.k[i, :, j] = k.transpose(1, 2)
            self.v[i, :, j] = v.transpose(1, 2)
        for index in sorted(pooled_here, key=lambda i: i != fused):  # the appending one first
            branch = self.pattern.ir.branches[index]
            self._pool_latest(index, branch.keys, k, v, poolers.get(branch.name), kernels, source_key, append=index == fused)

    def advance(self, n: int) -> None:
        """Every row's length grows by n (clamped to the capacity on the device)."""
        self.lengths.add_(n).clamp_(max=self.capacity)
        self.seqlens = [length + n for length in self.seqlens]

    def _pool_latest(self, index: int, keys: PooledKeys, k, v, pooler, kernels, source_key, append: bool) -> None:
        """Pool each row's latest ceil(n / stride) complete windows once the step's n keys
        ``k``, ``v`` are appended (``lengths`` not yet advanced; with ``append``, the
        pooling kernel appends them first); windows a row has not completed go to the spare
        slot."""
        name = self.pattern.ir.branches[index].name
        n = k.shape[2]
        spare = keys.count(self.capacity)
        windows = -(-n // keys.stride)
        if uses_kernels(self.k, kernels) and keys.pool != "mlp":
            H, D = self.kv_heads, self.head_dim
            kc, vc = self.pooled[name]
            w_pad = max(2, next_power_of_2(windows))
            # Positions of every window per load, as many as keep a load within 8,192 values
            # (a paged cache's window then costs one round trip to its page table, not one a
            # key). The same in both layouts: the sum's order, and so its rounding, too.
            chunk = min(next_power_of_2(keys.block), max(1, 8192 // (w_pad * head_dims(D)["D_PAD"])))
            launch(
                kernels.KERNELS[index].pool_latest, POOL_LATEST, (self.batch * H,), K_NEW=k, V_NEW=v, K=self.k, V=self.v,
                KC=kc, VC=vc, LENGTHS=self.lengths, PAGES=self.table, POOLED_PAGES=self.tables[name], n=n,
                num_kv_heads=H, capacity=self.capacity, spare=spare, **head_dims(D), WINDOWS=windows, W_PAD=w_pad,
                CHUNK=chunk, PAGE=self.page_size, APPEND=append,
                ROWS=max(2, next_power_of_2(n)) if append else 2,  # (unread without APPEND: one variant)
                PDL=dependent_launches(self.k),
            )  # fmt: skip
            return
        length = (self.lengths + n).clamp(max=self.capacity)
        latest = torch.div(length - keys.block, keys.stride, rounding_mode="floor")
        c = latest[:, None] - torch.arange(windows, device=self.k.device)  # (B, W)
        slot = torch.where((c >= 0) & (c < spare), c, spare)
        positions = c.clamp(min=0)[..., None] * keys.stride + torch.arange(keys.block, device=self.k.device)
        positions = positions.clamp(max=self.capacity - 1)  # (B, W, block)
        i, j = self._where(self._rows[..., None], positions)
        stored = self._where(self._rows, slot, name)
        for store, raw, pool in zip(self.pooled[name], (self.k, self.v), pooler or (None, None)):
            gathered = raw[i, :, j]  # (B, W, block, Hkv, D)
            B, W, block, H, D = gathered.shape
            gathered = gathered.permute(0, 1, 3, 2, 4).reshape(B * W, H, block, D)
            pooled = self._pool_windows(gathered, index, keys, pool, kernels, source_key)
            store[stored[0], :, stored[1]] = pooled.reshape(B, W, H, D).to(store.dtype)

    def new_rows(self, n: int) -> torch.Tensor:
        """A (B,) int32 device tensor of n, made once per n (a step allocates nothing)."""
        if n not in self._new_rows:
            self._new_rows[n] = torch.full((self.batch,), n, dtype=torch.int32, device=self.k.device)
        return self._new_rows[n]

    def sync(self) -> None:
        """Reload the host copy ``seqlens`` from the device lengths (one synchronisation),
        after CUDA-graph replays of steps."""
        self.seqlens = [int(x) for x in self.lengths.tolist()]

    def _pool(self, row: int, index: int, keys: PooledKeys, first: int, poolers, kernels, source_key) -> None:
        stop = self.pooled_count(self.pattern.ir.branches[index].name, row)
        if stop <= first:
            return
        name = self.pattern.ir.branches[index].name
        origin = self.pooled_origin(row)
        offsets = origin + torch.arange(first, stop, device=self.k.device)[:, None] * keys.stride
        i, j = self._where(row, offsets + torch.arange(keys.block, device=self.k.device))  # (n, block) positions
        stored = self._where(row, torch.arange(first, stop, device=self.k.device), name)
        for store, raw, pooler in zip(self.pooled[name], (self.k, self.v), poolers.get(name, (None, None))):
            windows = raw[i, :, j].transpose(1, 2)  # (n, Hkv, block, D)
            pooled = self._pool_windows(windows, index, keys, pooler, kernels, source_key)
            store[stored[0], :, stored[1]] = pooled.to(store.dtype)

    def _pool_windows(self, windows: torch.Tensor, index: int, keys: PooledKeys, pooler, kernels, source_key) -> torch.Tensor:
        """(n, Hkv, block, D) windows to (n, Hkv, D) pooled keys or values."""
        if keys.pool == "mlp":
            return pooler(windows)
        if uses_kernels(windows, kernels):
            # A window is a sequence of one pooled block for the generated pooling kernel.
            return BlockPooling.apply(windows, BranchKernels(kernels, index, source_key), keys)[:, :, 0]
        return reference.pool(windows, keys.block, keys.stride, keys.pool)[:, :, 0]


def _give_back(pool: PagePool, pages: list[dict[str | None, list[int]]]) -> None:
    """A dropped paged cache's pages, back to its pool."""
    held = [page for row in pages for kind in row.values() for page in kind]
    if held:
        pool.release(held)
