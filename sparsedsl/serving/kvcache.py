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
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
import triton

from .. import reference
from ..codegen.kernel_specs import CACHE_APPEND, POOL_LATEST
from ..errors import InputError
from ..frontend.model import SelectBranch, mask_text
from ..frontend.primitives import MAX_SIZE
from ..ir.nodes import PooledKeys
from ..runtime.launch.common import (
    BranchKernels,
    head_dims,
    launch,
    uses_kernels,
)
from ..runtime.launch.pooling import BlockPooling

# (n, Hkv, block, D) windows of raw keys or values -> (n, Hkv, D) pooled ones
WindowPool = Callable[[torch.Tensor], torch.Tensor]


def _cache_device(where: str, device) -> torch.device:
    """``device`` as a torch.device where sparsedsl runs (the CPU, or an available GPU)."""
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise InputError(f"{where}: `device` {device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{where}: `device` {device}: sparsedsl runs on CUDA GPUs and on the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{where}: `device` {device} was asked for, but CUDA is not available here; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"{where}: `device` {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


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

    ``k`` and ``v`` are (batch, kv_heads, capacity, head_dim); position ``t`` of row ``b``
    is valid for ``t < seqlens[b]``. ``pooled[name]`` holds compress branch ``name``'s
    (k_cmp, v_cmp), (batch, kv_heads, pooled capacity, head_dim), valid up to
    ``pooled_count(name, b)``. ``lengths`` is ``seqlens`` as an int32 tensor on the device
    (what kernels read); ``seqlens`` is its host copy.
    """

    def __init__(
        self,
        pattern,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        checked = pattern.checked
        where = f"KVCache for pattern `{checked.name}` ({checked.source_name}:{checked.line})"
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{where}: `{name}` must be a positive integer, got {value!r}")
        if capacity > MAX_SIZE:
            raise InputError(
                f"{where}: `capacity` {capacity:,} is more positions than the kernels index with 32-bit integers "
                f"(at most {MAX_SIZE:,})"
            )
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise InputError(f"{where}: `dtype` must be float16, bfloat16, float32 or float64, got {dtype}")
        device = _cache_device(where, device)
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
        self.key = f"kvcache-{next(_numbers)}"
        _live[self.key] = self
        try:
            self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            size = 2 * batch * kv_heads * capacity * head_dim * dtype.itemsize
            raise InputError(
                f"{where}: cannot allocate the keys and values ({batch} x {kv_heads} x {capacity:,} x {head_dim} each, "
                f"{size / 2**30:,.1f} GiB together) on {device}: {str(exc).splitlines()[0][:200]}; "
                "use a smaller `capacity` or `batch`"
            ) from None
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self.seqlens: list[int] = [0] * batch
        self.doc_ids = torch.zeros(batch, capacity, dtype=torch.int64, device=self.k.device) if checked.needs_documents else None
        # Where each row's current document starts (packed patterns restart pooling there).
        self.doc_starts: list[int] = [0] * batch
        self.packed = pattern.ir.packed
        self.pooled_keys = {b.name: b.keys for b in pattern.ir.branches if isinstance(b.keys, PooledKeys)}
        # One spare pooled slot past the capacity: where a step's pooling writes the windows
        # a row has not completed yet (see append_step).
        self.pooled = {
            name: tuple(t.new_zeros(batch, kv_heads, keys.count(capacity) + 1, head_dim) for t in (self.k, self.v))
            for name, keys in self.pooled_keys.items()
        }
        self._rows = torch.arange(batch, device=self.k.device)[:, None]
        self._new_rows: dict[int, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def pooled_count(self, name: str, row: int) -> int:
        """How many pooled keys of compress branch ``name`` row ``row`` holds."""
        return self.pooled_keys[name].count(self.seqlens[row] - self.pooled_origin(row))

    def pooled_origin(self, row: int) -> int:
        """The position row ``row``'s pooled windows count from: its document's start in a
        pattern that works within documents, else 0."""
        return self.doc_starts[row] if self.packed else 0

    def reset(self) -> None:
        """Forget every sequence (the storage is kept)."""
        self.seqlens = [0] * self.batch
        self.doc_starts = [0] * self.batch
        self.lengths.zero_()

    def __repr__(self) -> str:
        B, H, N, D = self.k.shape
        return f"<KVCache {self.pattern.name}: batch {B}, {H} KV heads, head dim {D}, {N} positions, {self.k.dtype}, seqlens {self.seqlens}>"

    # ------------------------------------------------------------ appending
    def check_room(self, new: list[int]) -> None:
        """Raise, changing nothing, if appending ``new[b]`` positions to row ``b`` would pass the capacity."""
        for row, n in enumerate(new):
            if self.seqlens[row] + n > self.capacity:
                raise InputError(
                    f"{self.where}: row {row} holds {self.seqlens[row]} of {self.capacity} positions and cannot take "
                    f"{n} more; allocate a larger cache (capacity=) or start the row again (reset())"
                )

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
        this completes. The caller has checked room, shapes and dtypes."""
        start, n = self.seqlens[row], k.shape[1]
        stop = start + n
        self.k[row, :, start:stop] = k
        self.v[row, :, start:stop] = v
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
        so a replay past it never writes outside the cache (its outputs are then wrong)."""
        n = k.shape[2]
        if uses_kernels(k, kernels):  # one launch for the keys and values, one per pooled branch below
            B, H, _, D = k.shape
            launch(
                kernels.cache_append, CACHE_APPEND, (B * H,), K_NEW=k, V_NEW=v, K=self.k, V=self.v, LENGTHS=self.lengths,
                n=n, num_kv_heads=H, capacity=self.capacity, **head_dims(D), ROWS=max(2, triton.next_power_of_2(n)),
            )  # fmt: skip
        else:
            positions = (self.lengths[:, None] + torch.arange(n, device=self.k.device)).clamp(max=self.capacity - 1)
            self.k[self._rows, :, positions] = k.transpose(1, 2)
            self.v[self._rows, :, positions] = v.transpose(1, 2)
        for index, branch in enumerate(self.pattern.ir.branches):
            if branch.name in self.pooled:
                self._pool_latest(index, branch.keys, n, poolers.get(branch.name), kernels, source_key)
        self.lengths.add_(n).clamp_(max=self.capacity)
        self.seqlens = [length + n for length in self.seqlens]

    def _pool_latest(self, index: int, keys: PooledKeys, n: int, pooler, kernels, source_key) -> None:
        """Pool each row's latest ceil(n / stride) complete windows once n keys are appended
        (``lengths`` not yet advanced); windows a row has not completed go to the spare slot."""
        name = self.pattern.ir.branches[index].name
        spare = keys.count(self.capacity)
        windows = -(-n // keys.stride)
        if uses_kernels(self.k, kernels) and keys.pool != "mlp":
            B, H, _, D = self.k.shape
            kc, vc = self.pooled[name]
            launch(
                kernels.KERNELS[index].pool_latest, POOL_LATEST, (B * H,), K=self.k, V=self.v, KC=kc, VC=vc,
                LENGTHS=self.lengths, n=n, num_kv_heads=H, capacity=self.capacity, spare=spare, **head_dims(D),
                WINDOWS=windows, W_PAD=max(2, triton.next_power_of_2(windows)),
            )  # fmt: skip
            return
        length = (self.lengths + n).clamp(max=self.capacity)
        latest = torch.div(length - keys.block, keys.stride, rounding_mode="floor")
        c = latest[:, None] - torch.arange(windows, device=self.k.device)  # (B, W)
        slot = torch.where((c >= 0) & (c < spare), c, spare)
        positions = c.clamp(min=0)[..., None] * keys.stride + torch.arange(keys.block, device=self.k.device)
        positions = positions.clamp(max=self.capacity - 1)  # (B, W, block)
        for store, raw, pool in zip(self.pooled[name], (self.k, self.v), pooler or (None, None)):
            gathered = raw[self._rows[..., None], :, positions]  # (B, W, block, Hkv, D)
            B, W, block, H, D = gathered.shape
            gathered = gathered.permute(0, 1, 3, 2, 4).reshape(B * W, H, block, D)
            pooled = self._pool_windows(gathered, index, keys, pool, kernels, source_key)
            store[self._rows, :, slot] = pooled.reshape(B, W, H, D).to(store.dtype)

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
        positions = offsets + torch.arange(keys.block, device=self.k.device)  # (n, block)
        for store, raw, pooler in zip(self.pooled[name], (self.k, self.v), poolers.get(name, (None, None))):
            windows = raw[row][:, positions].transpose(0, 1)  # (n, Hkv, block, D)
            pooled = self._pool_windows(windows, index, keys, pooler, kernels, source_key)
            store[row, :, first:stop] = pooled.transpose(0, 1).to(store.dtype)

    def _pool_windows(self, windows: torch.Tensor, index: int, keys: PooledKeys, pooler, kernels, source_key) -> torch.Tensor:
        """(n, Hkv, block, D) windows to (n, Hkv, D) pooled keys or values."""
        if keys.pool == "mlp":
            return pooler(windows)
        if uses_kernels(windows, kernels):
            # A window is a sequence of one pooled block for the generated pooling kernel.
            return BlockPooling.apply(windows, BranchKernels(kernels, index, source_key), keys)[:, :, 0]
        return reference.pool(windows, keys.block, keys.stride, keys.pool)[:, :, 0]
