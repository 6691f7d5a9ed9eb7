"""Choosing tile sizes and warps per (kernel, head dim, dtype, GQA group, length, GPU).

On a GPU the first call for a new key times every candidate with
``triton.testing.do_bench`` (median) and keeps the fastest, in memory and in
``tuning.json`` beside the kernel cache. Compilation is most of a first call's time, so
the candidates are first compiled all at once (:func:`compiling_ahead`), those of every
kernel of a call together when the call is rehearsed (``dispatch.rehearse``), and then
timed one after another. Under Triton's CPU
interpreter one small tile is used. The candidate lists are what docs/performance.md
reports as tried.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import triton

from .cache import cache_dir, write_atomically


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program: heads * rows
    block_n: int  # keys per block
    heads: int  # query heads of one GQA group sharing the tile
    num_warps: int
    num_stages: int
    # dK/dV: at most this many query tiles (times head chunks) per program; longer walks
    # are split among programs, which then add their sums atomically.
    max_tiles: int = 512

    @property
    def rows(self) -> int:
        return self.block_m // self.heads


def interpreter_config(kind: str, group: int, selection: tuple[int, bool] | None = None) -> TileConfig:
    """The small tile Triton's CPU interpreter runs. Selected attention per token packs the
    group's heads (its only rows); elsewhere one head, so rows and heads are both tested."""
    if kind in ("select_forward", "select_dq") and selection is not None and not selection[1]:
        # Groups of 4 or more: one position (the table walk); smaller: several (the union walk).
        heads = largest_power_of_two_dividing(group, 16)
        return TileConfig(block_m=max(4, heads), block_n=16, heads=heads, num_warps=4, num_stages=1)
    # Small work items, so that blocks many queries chose are split and summed atomically.
    return TileConfig(block_m=16, block_n=16, heads=1, num_warps=4, num_stages=1, max_tiles=4 if kind == "select_dkdv" else 512)


def largest_power_of_two_dividing(n: int, cap: int) -> int:
    return max(h for h in (1, 2, 4, 8, 16, 32, 64) if n % h == 0 and h <= cap)


def packed_heads(group: int, block_m: int) -> int:
    """The most query heads of a GQA group one tile can hold with at least 8 rows each."""
    return max(h for h in (1, 2, 4, 8, 16) if group % h == 0 and block_m // h >= 8)


# float32 tiles: at most this many candidates (each costs a compilation on first use, and
# float32 compilations of tiles that spill are slow).
FLOAT32_CANDIDATES = 2


def candidates(
    kind: str, head_dim: int, group: int, selection: tuple[int, bool] | None = None, dtype: torch.dtype | None = None
) -> list[TileConfig]:
    """Tile configurations worth timing for one kernel kind: 'forward', 'dq' (both walk
    key blocks per query tile) or 'dkdv' and 'dkdv_fused' (query tiles per key block,
    BLOCK_N keys; fused, adding dQ as well); for a
    select branch ('select_*', 'scores') see :func:`selection_candidates`. float32
    inputs get :func:`float32_tiles` of these. Kept short: each candidate costs a
    compilation on first use."""
    configs = _candidates(kind, head_dim, group, selection)
    return float32_tiles(configs) if dtype == torch.float32 else configs


def float32_tiles(configs: list[TileConfig]) -> list[TileConfig]:
    """The 16-bit candidates cut to what float32 affords: its elements take twice the
    registers and shared memory, so each tile has half the keys (BLOCK_N, at least 16) and,
    where it holds several positions per head, half the rows (at least 16), with the same
    heads and at most two pipeline stages. The first :data:`FLOAT32_CANDIDATES` tiles of
    distinct shapes are kept: a float32 tile of the 16-bit sizes spills registers or does
    not fit in shared memory, and each such candidate costs a slow compilation first."""
    chosen: dict[tuple[int, int, int], TileConfig] = {}
    for c in configs:
        block_m = max(16, c.heads, c.block_m // 2) if c.block_m > c.heads else c.block_m
        config = replace(c, block_m=block_m, block_n=max(16, c.block_n // 2), num_stages=min(2, c.num_stages))
        chosen.setdefault((config.block_m, config.block_n, config.heads), config)
    return list(chosen.values())[:FLOAT32_CANDIDATES]


def _candidates(kind: str, head_dim: int, group: int, selection: tuple[int, bool] | None) -> list[TileConfig]:
    if selection is not None:
        return selection_candidates(kind, head_dim, group, *selection)
    if head_dim > 128:  # registers: smaller tiles only
        return [TileConfig(64, 32, 1, 4, 2), TileConfig(32, 64, 1, 4, 2)]
    if kind in ("dkdv", "dkdv_fused"):  # fused: the same walk, adding dQ too
        configs = [
            TileConfig(64, 128, 1, 8, 3),
            TileConfig(64, 128, 1, 8, 3, max_tiles=2048),
            TileConfig(128, 64, packed_heads(group, 128), 8, 2),
            TileConfig(64, 128, packed_heads(group, 64), 8, 2),
        ]
    elif kind == "dq":
        heads = packed_heads(group, 128)
        configs = [TileConfig(128, 64, 1, 8, 3), TileConfig(128, 64, heads, 8, 3)]
    else:
        heads = packed_heads(group, 128)
        # 4-warp tiles never won on the H200 (docs/performance.md) and compile twice as long.
        configs = [TileConfig(128, 128, 1, 8, 3), TileConfig(128, 64, heads, 8, 3), TileConfig(128, 128, heads, 8, 2)]
    return list(dict.fromkeys(configs))  # without packing (group 1) the two may coincide


def selection_candidates(kind: str, head_dim: int, group: int, block: int, per_block: bool) -> list[TileConfig]:
    """Tiles for a select branch's kernels. Per token, a forward or dQ tile is the heads of
    one group at one position (the paper's group-centric loading) where the group fills 16
    rows; a smaller group takes 16 or 32 rows of several positions, which walk the union of
    their selections (a group of one at one position would leave 15 of 16 rows idle). Per
    block it is HEADS x ROWS positions of one query block. dK/dV tiles gather ROWS query
    positions x HEADS heads; `max_tiles` tiles make one work item. Scores take HEADS x ROWS
    rows (per block: the block's first position, padded to 16 rows) and BLOCK_C = block_n
    pooled keys per step."""
    heads = largest_power_of_two_dividing(group, 16)
    stages = 2 if head_dim > 128 else 3
    if kind in ("select_forward", "select_dq") and not per_block:
        if heads >= 16:
            return [TileConfig(heads, min(64, block), heads, 4, stages), TileConfig(heads, min(32, block), heads, 2, stages)]
        return [TileConfig(16, min(64, block), heads, 4, stages), TileConfig(32, min(64, block), heads, 4, stages)]
    if kind in ("select_forward", "select_dq"):
        wide = min(128, heads * block)
        return [TileConfig(wide, min(64, block), heads, 8, stages), TileConfig(wide, min(64, block), heads, 4, stages)]
    if kind == "select_dkdv":
        return [TileConfig(max(16, heads * 8), min(64, block), heads, 8, 2, max_tiles=64),
                TileConfig(max(16, heads * 4), min(64, block), heads, 4, 2, max_tiles=128)]
    # scores
    rows = max(1, 128 // heads) if not per_block else max(1, 16 // heads)  # per block: one position scores
    return [TileConfig(heads * rows, 64, heads, 8, 2), TileConfig(heads * rows, 128, heads, 8, 2)]


_ahead = threading.local()


def compiling_only() -> bool:
    """Whether launches on this thread should compile their kernel and not run it (inside
    :func:`compiling_ahead`); ``launch`` and the output buffers ask."""
    return getattr(_ahead, "active", False)


@contextmanager
def compiling_ahead():
    """Inside the block, launches on this thread only queue the compilation of their kernel
    (Triton's ``warmup``), and output buffers start zeroed, so that host code reading a
    kernel's result (a selection's block table) stays in bounds. The compilations run at
    once, one thread each (Triton's ``AsyncCompileMode``: its compiler and ``ptxas`` release
    the GIL); leaving the block waits for all of them. A compilation that fails is dropped:
    the launch that needs it compiles it again and reports the error there."""
    if compiling_only():  # nested: the outer block already collects the compilations
        yield
        return
    asynchronous = getattr(triton, "AsyncCompileMode", None)  # Triton >= 3.4
    _ahead.active = True
    try:
        if asynchronous is None or triton.runtime._async_compile.active_mode.get() is not None:
            yield  # compilations run one after another, in the launches
        else:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, asynchronous(pool, ignore_errors=True):
                yield
    finally:
        _ahead.active = False


Compile = tuple[str, TileConfig, Callable[[TileConfig], None]]  # (tuning key, candidate, its launch)


def precompile(jobs: list[Compile]) -> None:
    """Compile the kernels of every (key, candidate, run) at once, without running them:
    ``run(config)`` launches as usual inside :func:`compiling_ahead`. A candidate whose
    launcher fails here is left to the timed pass, which compiles it as before."""
    if len(jobs) < 2:
        return
    with compiling_ahead():
        for job in jobs:
            _compile_quietly(job)


def _compile_quietly(job: Compile) -> None:
    key, config, run = job
    try:
        run(config)
    except Exception as exc:  # the timed pass raises or skips it as it should
        log(f"{key}: {config} not compiled ahead: {str(exc)[:120]}")


def log(message: str) -> None:
    """A line of the tuning log (``SPARSEDSL_TUNING_LOG=1``)."""
    if os.environ.get("SPARSEDSL_TUNING_LOG"):
        print(f"sparsedsl tuning {message}", flush=True)


class Tuner:
    """Remembers the fastest configuration per key; compiles and times candidates on a miss."""

    def __init__(self) -> None:
        self._chosen: dict[str, TileConfig] = {}
        self._compiled: set[str] = set()  # keys whose candidates were compiled ahead
        self._rehearsed: set[tuple] = set()  # call signatures compiled ahead (rehearsal_due)
        self._loaded = False
        self._lock = threading.Lock()
        self.forced: TileConfig | None = None

    @contextmanager
    def force(self, config: TileConfig):
        """Use ``config`` for every launch inside the block (tests, benchmarks)."""
        previous, self.forced = self.forced, config
        try:
            yield
        finally:
            self.forced = previous

    def _path(self):
        return cache_dir() / "tuning.json"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            stored = json.loads(self._path().read_text())
        except (OSError, ValueError):  # missing, unreadable or not JSON: tune again
            return
        if isinstance(stored, dict):  # entries that are not tile configurations are skipped
            self._chosen.update({k: c for k, c in ((k, _stored_config(v)) for k, v in stored.items()) if c is not None})

    def rehearsal_due(self, signature: tuple) -> bool:
        """True the first time a call of this signature (pattern, device, dtype, shapes
        and the inputs' kinds) is seen in this process: then every kernel it will launch,
        forward and backward, is compiled ahead at once (``dispatch.rehearse``)."""
        with self._lock:
            due = signature not in self._rehearsed
            self._rehearsed.add(signature)
            return due

    def knows(self, key: str) -> bool:
        return self.chosen(key) is not None

    def chosen(self, key: str) -> TileConfig | None:
        """The configuration tuned for ``key`` already, if any (a launch's fast path)."""
        if not self._loaded:
            with self._lock:
                self._load()
        return self._chosen.get(key)

    def prepare(self, requests: list[tuple[str, list[TileConfig], Callable[[TileConfig], None]]]) -> None:
        """Compile the candidates of every request (key, configs, run) whose key is not
        tuned yet, all at once: for kernels that launch one after another on inputs that
        exist already (a branch's dK/dV and dQ), so that one's compilations do not wait
        for the other's timings. :meth:`choose` then only times them. Inside
        :func:`compiling_ahead`, :meth:`choose` queues each kernel's candidates itself."""
        if compiling_only():
            return
        pending = [(key, configs, run) for key, configs, run in requests if not self.knows(key)]
        precompile([(key, c, run) for key, configs, run in pending for c in configs])
        self._compiled.update(key for key, _, _ in pending)

    def choose(self, key: str, configs: list[TileConfig], run: Callable[[TileConfig], None]) -> TileConfig:
        """The fastest of ``configs`` for ``key``; ``run(config)`` launches once.

        Inside :func:`compiling_ahead` nothing is timed: the candidates after the first are
        queued for compilation and the first is returned, for the caller's launch to queue."""
        with self._lock:
            self._load()
            if key in self._chosen:
                return self._chosen[key]
        if compiling_only():
            if key not in self._compiled:
                self._compiled.add(key)
                for config in configs[1:]:
                    _compile_quietly((key, config, run))
            return configs[0]
        from triton.testing import do_bench

        started = time.perf_counter()
        if key not in self._compiled:
            precompile([(key, config, run) for config in configs])
        log(f"{key}: {len(configs)} candidates compiled in {time.perf_counter() - started:.1f} s")
        timings = {}
        for config in configs:
            try:
                started = time.perf_counter()
                timings[config] = do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
                log(f"{key}: {config} {timings[config]:.3f} ms (compile and timing {time.perf_counter() - started:.1f} s)")
            except Exception as exc:  # a tile that does not fit (shared memory, registers)
                if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
                    raise
                log(f"{key}: {config} does not fit: {str(exc)[:120]}")
        if not timings:
            raise RuntimeError(f"no tile configuration could run for {key}")
        best = min(timings, key=timings.get)
        with self._lock:
            self._chosen[key] = best
            try:
                write_atomically(self._path(), json.dumps({k: asdict(v) for k, v in self._chosen.items()}, indent=1))
            except OSError:
                pass
        return best


tuner = Tuner()


def _stored_config(value) -> TileConfig | None:
    """A tile configuration read back from ``tuning.json``, or None if it is not one (an
    edited or damaged file must not reach a kernel launch)."""
    names = TileConfig.__dataclass_fields__
    if not isinstance(value, dict) or not set(value) <= set(names):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        return None
    try:
        return TileConfig(**value)
    except TypeError:  # a field missing
        return None


def length_bucket(n: int) -> int:
    """The power of four at or above ``n``: lengths within a factor of four share a tuning
    choice (a tile's speed changes slowly with the length; every new key costs a compilation
    and a timing of each candidate)."""
    bucket = 1
    while bucket < n:
        bucket *= 4
    return bucket


@functools.cache
def _device_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def tuning_key(kind: str, source_key: str, branch: int, q: torch.Tensor, k: torch.Tensor) -> str:
    """Lengths are bucketed (:func:`length_bucket`) so that nearby lengths share a choice."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    device = _device_name(q.device.index) if q.is_cuda else "cpu"
    return f"{source_key}/{branch}/{kind}/{device}/{q.dtype}/D{D}/G{Hq // k.shape[1]}/Lq{length_bucket(Lq)}/Lk{length_bucket(Lk)}"
