"""Pages of keys and values that paged :class:`~.kvcache.KVCache` rows share.

A serving engine keeps keys and values in fixed-size pages and gives every sequence a
table of the pages it holds, so that sequences of different lengths share one block of
memory and a finished sequence's pages go back to the others. A :class:`PagePool` is that
block for one layer of one pattern: keys and values ``(pages + 1, kv_heads, page_size,
head_dim)``. A page holds ``page_size`` raw keys of a row or ``page_size`` pooled keys of
one of its compress branches (each with a page table of its own), so that a tile of pooled
keys meets one or two pages, as a tile of raw keys does, and rows of any length share the
pool with no fixed split between raw and pooled keys. Page 0 is the scratch page: a
table's unused entries point at it, and writes past a row's pages (a CUDA-graph replay
beyond what was reserved) land there instead of in another row's page.

An engine with its own allocator subclasses :class:`PagePool` and overrides
:meth:`allocate` and :meth:`release` (docs/api.md, "Paged caches", says how).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..ir.nodes import SelectedBlocks

SCRATCH = 0  # the page unused table entries point at


def check_positive(where: str, name: str, value) -> int:
    """``value`` if it is a positive int (not a bool), else an InputError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{where}: `{name}` must be a positive integer, got {value!r}")
    return value


def cache_device(where: str, device) -> torch.device:
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


def check_dtype(where: str, dtype) -> None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise InputError(f"{where}: `dtype` must be float16, bfloat16, float32 or float64, got {dtype}")


def check_page_size(where: str, pattern, page_size) -> int:
    """``page_size`` if every part of ``pattern`` can be paged by it, else an InputError
    saying which multiple it must be."""
    check_positive(where, "page_size", page_size)
    for branch in pattern.ir.branches:
        if isinstance(branch.blocks, SelectedBlocks) and page_size % branch.blocks.block:
            raise InputError(
                f"{where}: `page_size` {page_size} is not a multiple of select branch `{branch.name}`'s block "
                f"{branch.blocks.block} (a selected block is read from one page); use a multiple of {branch.blocks.block}"
            )
    return page_size


class PagePool:
    """``pages`` pages of ``page_size`` keys for paged KV caches of ``pattern``.

    ``k`` and ``v`` are (pages + 1, kv_heads, page_size, head_dim): a page holds raw keys
    and values, or pooled ones of a compress branch. Page 0 is scratch; pages 1 .. pages
    are handed out by :meth:`allocate`.
    """

    def __init__(
        self,
        pattern,
        *,
        pages: int,
        kv_heads: int,
        head_dim: int,
        page_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"PagePool for pattern `{pattern.checked.name}` ({pattern.checked.source_name}:{pattern.checked.line})"
        for name, value in (("pages", pages), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            check_positive(where, name, value)
        self.where = where
        self.pattern = pattern
        self.page_size = check_page_size(where, pattern, page_size)
        check_dtype(where, dtype)
        device = cache_device(where, device)
        try:
            self.k = torch.zeros(pages + 1, kv_heads, page_size, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            size = 2 * (pages + 1) * kv_heads * page_size * head_dim * dtype.itemsize
            raise InputError(
                f"{where}: cannot allocate {pages:,} pages of {page_size} keys ({size / 2**30:,.1f} GiB of keys "
                f"and values) on {device}: {str(exc).splitlines()[0][:200]}; use fewer `pages`"
            ) from None
        self._free = list(range(pages, 0, -1))  # kept in decreasing order: the lowest free page goes first

    @property
    def pages(self) -> int:
        """How many pages the pool hands out (the scratch page not counted)."""
        return self.k.shape[0] - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free pages, taken from the pool; an InputError (taking none) if fewer are free."""
        if n > len(self._free):
            raise InputError(
                f"{self.where}: {n} more page(s) of {self.page_size} keys are needed and {len(self._free)} of "
                f"{self.pages} are free; free finished sequences (cache.free(row)) or make a larger pool"
            )
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def release(self, pages: list[int]) -> None:
        """Give ``pages`` back to the pool (their contents are left as they are)."""
        free = set(self._free)
        for page in pages:
            if not isinstance(page, int) or not 0 < page <= self.pages or page in free:
                raise InputError(f"{self.where}: page {page!r} cannot be given back: it is not a page this pool handed out")
            free.add(page)
        self._free = sorted(free, reverse=True)

    def __repr__(self) -> str:
        _, H, P, D = self.k.shape
        return f"<PagePool {self.pattern.name}: {self.free_pages} of {self.pages} pages of {P} free, {H} KV heads, head dim {D}, {self.k.dtype}>"
