"""Choosing tile sizes and warps per (kernel, head dim, dtype, GQA group, length, GPU).

On a GPU the first call for a new key times every candidate with
``triton.testing.do_bench`` (median) and keeps the fastest, in memory and in
``tuning.json`` beside the kernel cache. Under Triton's CPU interpreter one small tile
is used. The candidate lists are what docs/performance.md reports as tried.
"""

from __future__ import annotations

import json
import os
import time
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch

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
        heads = largest_power_of_two_dividing(group, 16)
        return TileConfig(block_m=heads, block_n=16, heads=heads, num_warps=4, num_stages=1)
    # Small work items, so that blocks many queries chose are split and summed atomically.
    return TileConfig(block_m=16, block_n=16, heads=1, num_warps=4, num_stages=1, max_tiles=4 if kind == "select_dkdv" else 512)


def largest_power_of_two_dividing(n: int, cap: int) -> int:
    return max(h for h in (1, 2, 4, 8, 16, 32, 64) if n % h == 0 and h <= cap)


def packed_heads(group: int, block_m: int) -> int:
    """The most query heads of a GQA group one tile can hold with at least 8 rows each."""
    return max(h for h in (1, 2, 4, 8, 16) if group % h == 0 and block_m // h >= 8)


def candidates(kind: str, head_dim: int, group: int, selection: tuple[int, bool] | None = None) -> list[TileConfig]:
    """Tile configurations worth timing for one kernel kind: 'forward', 'dq' (both walk
    key blocks per query tile) or 'dkdv' (query tiles per key block, BLOCK_N keys); for a
    select branch ('select_*', 'scores') see :func:`selection_candidates`.
    Kept short: each candidate costs a compilation on first use."""
    if selection is not None:
        return selection_candidates(kind, head_dim, group, *selection)
    if head_dim > 128:  # registers: smaller tiles only
        return [TileConfig(64, 32, 1, 4, 2), TileConfig(32, 64, 1, 4, 2)]
    if kind == "dkdv":
        configs = [
            TileConfig(64, 128, 1, 8, 3),
            TileConfig(64, 128, 1, 8, 3, max_tiles=2048),
            TileConfig(128, 64, packed_heads(group, 128), 8, 2),
            TileConfig(64, 128, packed_heads(group, 64), 8, 2),
        ]
    elif kind == "dq":
        heads = packed_heads(group, 128)
        configs = [TileConfig(128, 64, 1, 8, 3), TileConfig(128, 64, heads, 8, 3), TileConfig(128, 64, heads, 4, 3)]
    else:
        heads = packed_heads(group, 128)
        configs = [
            TileConfig(128, 128, 1, 8, 3),
            TileConfig(128, 64, heads, 8, 3),
            TileConfig(128, 64, heads, 4, 3),
            TileConfig(128, 128, heads, 8, 2),
        ]
    return list(dict.fromkeys(configs))  # without packing (group 1) the two may coincide


def selection_candidates(kind: str, head_dim: int, group: int, block: int, per_block: bool) -> list[TileConfig]:
    """Tiles for a select branch's kernels. Per token, a forward or dQ tile is the heads of
    one group at one position (the paper's group-centric loading), padded to 16 rows; per
    block it is HEADS x ROWS positions of one query block. dK/dV tiles gather ROWS query
    positions x HEADS heads; `max_tiles` tiles make one work item. Scores take HEADS x ROWS
    rows and BLOCK_C = block_n pooled keys per step."""
    heads = largest_power_of_two_dividing(group, 16)
    stages = 2 if head_dim > 128 else 3
    if kind in ("select_forward", "select_dq") and not per_block:
        return [TileConfig(heads, min(64, block), heads, 4, stages), TileConfig(heads, min(32, block), heads, 2, stages)]
    if kind in ("select_forward", "select_dq"):
        wide = min(128, heads * block)
        return [TileConfig(wide, min(64, block), heads, 8, stages), TileConfig(wide, min(64, block), heads, 4, stages)]
    if kind == "select_dkdv":
        return [TileConfig(max(16, heads * 8), min(64, block), heads, 8, 2, max_tiles=64),
                TileConfig(max(16, heads * 4), min(64, block), heads, 4, 2, max_tiles=128)]
    # scores
    rows = max(1, 128 // heads) if not per_block else min(block, max(1, 128 // heads))
    return [TileConfig(heads * rows, 64, heads, 8, 2), TileConfig(heads * rows, 128, heads, 8, 2)]


class Tuner:
    """Remembers the fastest configuration per key; times candidates on a miss."""

    def __init__(self) -> None:
        self._chosen: dict[str, TileConfig] = {}
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
            self._chosen.update({k: TileConfig(**v) for k, v in stored.items()})
        except (OSError, ValueError, TypeError):
            pass

    def choose(self, key: str, configs: list[TileConfig], run: Callable[[TileConfig], None]) -> TileConfig:
        """The fastest of ``configs`` for ``key``; ``run(config)`` launches once."""
        with self._lock:
            self._load()
            if key in self._chosen:
                return self._chosen[key]
        from triton.testing import do_bench

        timings = {}
        for config in configs:
            try:
                started = time.perf_counter()
                timings[config] = do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
                if os.environ.get("SPARSEDSL_TUNING_LOG"):
                    print(f"sparsedsl tuning {key}: {config} {timings[config]:.3f} ms "
                          f"(compile and timing {time.perf_counter() - started:.1f} s)", flush=True)
            except Exception as exc:  # a tile that does not fit (shared memory, registers)
                if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
                    raise
                if os.environ.get("SPARSEDSL_TUNING_LOG"):
                    print(f"sparsedsl tuning {key}: {config} does not fit: {str(exc)[:120]}", flush=True)
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


def tuning_key(kind: str, source_key: str, branch: int, q: torch.Tensor, k: torch.Tensor) -> str:
    """Lengths are bucketed to powers of two so that nearby lengths share a choice."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else "cpu"
    bucket = lambda n: 1 << max(0, (n - 1).bit_length())  # noqa: E731
    return f"{source_key}/{branch}/{kind}/{device}/{q.dtype}/D{D}/G{Hq // k.shape[1]}/Lq{bucket(Lq)}/Lk{bucket(Lk)}"
