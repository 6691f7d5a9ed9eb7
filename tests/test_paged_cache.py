"""Paged KV caches: rows hold pages of a shared :class:`PagePool`, and every output equals
the contiguous cache's exactly (the same kernels' arithmetic, read through page tables)
and, decoding through pages taken out of order or left by a freed row, the dense reference.

float32 runs the generated kernels on Triton's interpreter (the decode kernels, the
cache's append and pooling kernels, and the forward kernels of a long prefill); float64
the dense reference.
"""

from __future__ import annotations

import gc

import pytest
import torch

import sparsedsl
from sparsedsl import InputError, PagePool
from sparsedsl.frontend.resources import shipped_pattern_path

SMALL_NSA = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topk=4, window=8)
B, HQ, HKV, D, PAGE = 3, 4, 2, 16, 16
CAPACITY = 70  # not a multiple of the page


def shipped(name: str, **params):
    return sparsedsl.load(shipped_pattern_path(name), **params)


def generate(pattern, cache, dtype, seed=0):
    """Ragged prefills (one longer than a decode), uniform decode steps (the device path)
    and a ragged step; every output, in order."""
    torch.manual_seed(seed)
    n_out = len(pattern.ir.output_branches)
    outputs = []

    def step(n, lengths=None):
        q = torch.randn(B, HQ, n, D, dtype=dtype)
        k, v = (torch.randn(B, HKV, n, D, dtype=dtype) for _ in range(2))
        extra = {"gates": torch.rand(B, HQ, n, n_out, dtype=dtype)} if pattern.ir.combine == "gate" else {}
        call = pattern.decode if n <= 2 else pattern.prefill
        outputs.append(call(q, k, v, cache, lengths=lengths, **extra))

    step(21, [21, 5, 0])  # 21 > 16 tokens: row 0 runs the forward kernels over its gathered pages
    step(3, [3, 3, 2])
    for _ in range(12):
        step(1)  # every row one token: appended and pooled on the device
    step(2, [2, 0, 1])
    return outputs


def pages_needed(cache, lengths) -> int:
    """The pages rows of ``lengths`` hold: raw keys, and each compress branch's pooled ones."""
    counts = [n for n in lengths] + [keys.count(n) for n in lengths for keys in cache.pooled_keys.values()]
    return sum(-(-n // PAGE) for n in counts)


def paged(pattern, dtype, pages=20, batch=B):
    pool = PagePool(pattern, pages=pages, kv_heads=HKV, head_dim=D, page_size=PAGE, dtype=dtype)
    return pool, pattern.cache(batch=batch, kv_heads=HKV, head_dim=D, capacity=CAPACITY, dtype=dtype, pool=pool)


COMPRESSED_WINDOW = sparsedsl.compile_source(  # a row of 38 keys pools 18: its pooled keys cross pages
    """
    pattern compressed_window() {
        pooled = compress(block=4, stride=2, pool=max)
        return gate(pooled, causal & sliding(6))
    }
    """
)
KERNEL_CASES = {
    "nsa": lambda: shipped("nsa", **dict(SMALL_NSA, pool="mean")),
    "compressed_window": lambda: COMPRESSED_WINDOW,
    "streaming": lambda: shipped("streaming", sinks=2, window=8),
}


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_paged_outputs_equal_contiguous_ones_exactly_on_the_kernels(name):
    pattern = KERNEL_CASES[name]()
    contiguous = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=CAPACITY)
    pool, cache = paged(pattern, torch.float32)
    want, got = generate(pattern, contiguous, torch.float32), generate(pattern, cache, torch.float32)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert cache.seqlens == contiguous.seqlens == [38, 20, 15]
    for row in range(B):  # the pages hold what the contiguous rows hold, pooled keys included
        length = cache.seqlens[row]
        assert all(torch.equal(a, b) for a, b in zip(cache.read([row], 0, length), contiguous.read([row], 0, length)))
        for branch, keys in cache.pooled_keys.items():
            count = cache.pooled_count(branch, row)
            assert all(torch.equal(a, b) for a, b in zip(cache.read_pooled(branch, [row], count),
                                                         contiguous.read_pooled(branch, [row], count)))  # fmt: skip
    assert pool.free_pages == pool.pages - pages_needed(cache, cache.seqlens)


@pytest.mark.parametrize("name", ["nsa", "nsa_packed", "document"])
def test_paged_outputs_equal_contiguous_ones_on_the_reference_path(name):
    params = {"nsa": dict(SMALL_NSA, pool="mean"), "nsa_packed": dict(SMALL_NSA, pool="max"), "document": {}}[name]
    pattern = shipped(name, **params)
    contiguous = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=CAPACITY, dtype=torch.float64)
    _, cache = paged(pattern, torch.float64)
    want, got = generate(pattern, contiguous, torch.float64), generate(pattern, cache, torch.float64)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_an_engine_s_own_page_tensors_serve_through_a_transposed_view():
    """vLLM keeps (blocks, block_size, kv_heads, head_dim): its transpose(1, 2) view is a
    pool's (pages + 1, kv_heads, page_size, head_dim) with other strides."""
    pattern = KERNEL_CASES["streaming"]()
    contiguous = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=CAPACITY)
    pool = PagePool(pattern, pages=20, kv_heads=HKV, head_dim=D, page_size=PAGE)
    engine_k, engine_v = (torch.zeros(pool.pages + 1, PAGE, HKV, D) for _ in range(2))
    pool.k, pool.v = engine_k.transpose(1, 2), engine_v.transpose(1, 2)
    cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=CAPACITY, pool=pool)
    want, got = generate(pattern, contiguous, torch.float32), generate(pattern, cache, torch.float32)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    page = cache.table[0, 1]  # row 0's positions 16..31, in the engine's own layout
    assert torch.equal(engine_k[page], contiguous.k[0, :, 16:32].transpose(0, 1))


def test_rows_share_the_pool_and_freed_pages_serve_the_next_sequence():
    pattern = shipped("nsa", **dict(SMALL_NSA, pool="mean"))
    pool, cache = paged(pattern, torch.float32, pages=9, batch=2)
    torch.manual_seed(0)

    def prefill(cache, lengths, seed):
        torch.manual_seed(seed)
        n = max(lengths)
        q = torch.randn(2, HQ, n, D)
        k, v = (torch.randn(2, HKV, n, D) for _ in range(2))
        return pattern.prefill(q, k, v, cache, lengths=lengths, gates=torch.rand(2, HQ, n, 3))

    prefill(cache, [50, 10], seed=1)  # row 0: 4 pages of keys, 1 of pooled keys; row 1: 1 and 1
    assert pool.free_pages == 2 and cache.table[0, :4].tolist() == [1, 2, 3, 4] and cache.table[1, 0] == 6
    assert cache.tables["cmp"][:, 0].tolist() == [5, 7]
    with pytest.raises(InputError) as error:
        prefill(cache, [0, 40], seed=3)  # row 1 would need 3 more pages: none is taken
    assert str(error.value) == (
        f"{pool.where}: 3 more page(s) of 16 keys are needed and 2 of 9 are free; "
        "free finished sequences (cache.free(row)) or make a larger pool"
    )
    assert cache.seqlens == [50, 10] and pool.free_pages == 2  # the refused call changed nothing
    prefill(cache, [0, 20], seed=2)  # row 1 takes one more page
    cache.free(0)
    assert pool.free_pages == 6 and cache.seqlens == [0, 30] and cache.lengths.tolist() == [0, 30]
    # A new sequence in row 0 takes the freed pages, and sees nothing of the old one.
    got = prefill(cache, [20, 0], seed=4)
    assert cache.table[0, :2].tolist() == [1, 2] and cache.tables["cmp"][0, 0] == 3
    fresh = pattern.cache(batch=2, kv_heads=HKV, head_dim=D, capacity=CAPACITY)
    assert torch.equal(got[0], prefill(fresh, [20, 0], seed=4)[0])
    del cache, error  # (the error's traceback holds the cache too)
    gc.collect()
    assert pool.free_pages == pool.pages  # a dropped cache gives its pages back


def test_reserve_takes_the_pages_a_cuda_graph_replay_needs():
    pool, cache = paged(sparsedsl.load("causal"), torch.float32, pages=20)
    cache.reserve(40)
    assert pool.free_pages == 20 - 3 * 3 and cache.table[:, :3].flatten().tolist() == list(range(1, 10))
    cache.reset()
    assert pool.free_pages == 20 and cache.table.eq(0).all()


def test_paging_errors_name_the_argument():
    nsa = shipped("nsa", **dict(SMALL_NSA, pool="mean"))
    where = f"PagePool for pattern `nsa` ({shipped_pattern_path('nsa')}:{nsa.checked.line})"
    with pytest.raises(InputError) as error:
        PagePool(nsa, pages=4, kv_heads=HKV, head_dim=D, page_size=8)
    assert str(error.value) == (
        f"{where}: `page_size` 8 is not a multiple of select branch `sel`'s block 16 (a selected block is read from "
        "one page); use a multiple of 16"
    )
    PagePool(COMPRESSED_WINDOW, pages=4, kv_heads=HKV, head_dim=D, page_size=6)  # pooled keys need no multiple
    with pytest.raises(InputError, match="`pages` must be a positive integer, got 0"):
        PagePool(nsa, pages=0, kv_heads=HKV, head_dim=D, page_size=16)
    pool = PagePool(nsa, pages=4, kv_heads=HKV, head_dim=D, page_size=16)
    with pytest.raises(InputError, match="the pool holds 2 KV heads of dimension 16, torch.float32 on cpu; the cache asks for 1"):
        nsa.cache(batch=1, kv_heads=1, head_dim=D, capacity=32, pool=pool)
    with pytest.raises(InputError, match=r"the pool holds .* torch.float32 on cpu; the cache asks for 2 of 16, torch.float64"):
        nsa.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=32, dtype=torch.float64, pool=pool)
    gated = nsa.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=32, pool=pool)
    with pytest.raises(InputError, match="pass gates="):  # a call refused for its gates takes no page
        nsa.prefill(*(torch.randn(1, h, 20, D) for h in (HQ, HKV, HKV)), gated)
    assert pool.free_pages == pool.pages and not gated.table.any()
    with pytest.raises(InputError, match="the pool was made for pattern `nsa` with other parameters"):
        nsa.with_params(window=16).cache(batch=1, kv_heads=HKV, head_dim=D, capacity=32, pool=pool)
    with pytest.raises(InputError, match="`pool` must be a sparsedsl.PagePool, got dict"):
        nsa.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=32, pool={})
    with pytest.raises(InputError, match="page 3 cannot be given back: it is not a page this pool handed out"):
        pool.release([3])
    cache = nsa.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=32, pool=pool)
    with pytest.raises(InputError, match=r"`row` must be an int in 0..0, got 1"):
        cache.free(1)
    with pytest.raises(InputError, match=r"`length` must be an int in 0..32, got 33"):
        cache.reserve(33)
    with pytest.raises(InputError, match=r"read positions 0..40 of rows \[0\]: the cache holds rows 0..0 and 32 positions"):
        cache.read([0], 0, 40)
    with pytest.raises(InputError, match=r"no compress branch `win`; the cache pools \['cmp'\]"):
        cache.read_pooled("win", [0], 1)


def test_a_layer_generates_through_a_paged_cache():
    """sparsedsl.nn's make_cache(pool=): learned pooling (the layer's MLPs) over pages."""
    from sparsedsl.nn import NativeSparseAttention

    torch.manual_seed(0)
    layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=16, **SMALL_NSA).double()
    hidden = torch.randn(2, 30, 32, dtype=torch.float64)
    pool = PagePool(layer.pattern, pages=8, kv_heads=2, head_dim=16, page_size=16, dtype=torch.float64)
    with torch.no_grad():
        want = layer(hidden)
        cache = layer.make_cache(batch=2, capacity=32, pool=pool)
        steps = [layer(hidden[:, :12], cache=cache)]
        steps += [layer(hidden[:, t : t + 1], cache=cache) for t in range(12, 30)]
    assert (torch.cat(steps, 1) - want).abs().max() < 1e-10
    assert pool.free_pages == 8 - 2 * (2 + 1)  # each row: 2 pages of raw keys, 1 of pooled ones


# ------------------------------------------------- paged decoding against the reference
REFERENCE_CASES = {
    "causal": lambda: shipped("causal"),
    "sliding_window": lambda: shipped("sliding_window", window=8),
    "nsa": lambda: shipped("nsa", **dict(SMALL_NSA, sel_topk=3, pool="mean")),  # 3 of 4 blocks at 49 keys
}


class Rows:
    """What each row of a cache was given and gave back since its sequence began, fed step
    by step (float32, on the kernels); :meth:`check` compares each row with the dense
    reference over its whole sequence."""

    def __init__(self, pattern, cache):
        self.pattern, self.cache = pattern, cache
        self.gated = pattern.ir.combine == "gate"
        self.seen = [[] for _ in range(cache.batch)]  # per row: (q, k, v, gates, out) pieces

    def step(self, lengths, loud=None):
        """Row b's next lengths[b] tokens; its keys and values scaled by loud[b] if given."""
        n, batch = max(lengths), self.cache.batch
        scale = torch.tensor([1.0] * batch if loud is None else loud)[:, None, None, None]
        q = torch.randn(batch, HQ, n, D)
        k, v = (scale * torch.randn(batch, HKV, n, D) for _ in range(2))
        gates = torch.rand(batch, HQ, n, len(self.pattern.ir.output_branches))
        extra = {"gates": gates} if self.gated else {}
        call = self.pattern.decode if n <= 2 else self.pattern.prefill
        out = call(q, k, v, self.cache, lengths=lengths, **extra)
        for b, m in enumerate(lengths):
            if m:
                self.seen[b].append(tuple(t[b : b + 1, :, :m] for t in (q, k, v, gates, out)))

    def free(self, row):
        self.cache.free(row)
        self.seen[row] = []

    def check(self):
        for b, pieces in enumerate(self.seen):
            q, k, v, gates, out = (torch.cat(t, 2).double() for t in zip(*pieces))
            assert q.shape[2] == self.cache.seqlens[b]
            want = self.pattern.reference(q, k, v, **({"gates": gates} if self.gated else {})).out
            err = (out - want).abs().max().item()
            assert err < 2e-4, f"row {b}: {err}"


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_paged_decode_equals_the_reference(name):
    """Ragged rows whose pages come out of order (another cache took the first ones and gave
    them back midway), decoded a few steps on the kernels: each row as the dense reference."""
    pattern = REFERENCE_CASES[name]()
    torch.manual_seed(0)
    pool = PagePool(pattern, pages=14, kv_heads=HKV, head_dim=D, page_size=PAGE)
    other = pattern.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=64, pool=pool)
    other.reserve(40)  # the first pages
    freed = set(other.table[0, :3].tolist())
    rows = Rows(pattern, pattern.cache(batch=2, kv_heads=HKV, head_dim=D, capacity=64, pool=pool))
    rows.step([15, 47])  # the next ones
    other.free(0)
    for lengths in ([1, 1], [2, 1], [1, 0], [2, 2]):  # row 0 crosses into a freed page, and row 1
        rows.step(lengths)
    assert rows.cache.seqlens == [21, 51]
    table = rows.cache.table
    assert int(table[0, 1]) in freed and int(table[1, 3]) in freed and table[0, 0] > table[0, 1]  # out of order
    rows.check()


def test_a_freed_row_s_pages_serve_another_row_without_its_keys():
    """Row 0's pages, full of loud keys, go back to the pool and row 1 grows into them (and a
    new sequence in row 0 into the rest): no output reads a key left there."""
    pattern = REFERENCE_CASES["nsa"]()
    torch.manual_seed(1)
    pool = PagePool(pattern, pages=6, kv_heads=HKV, head_dim=D, page_size=PAGE)
    rows = Rows(pattern, pattern.cache(batch=2, kv_heads=HKV, head_dim=D, capacity=48, pool=pool))
    rows.step([32, 15], loud=[30.0, 1.0])  # row 0: pages 1, 2, pooled keys in 3 | row 1: 4, pooled keys in 5
    rows.free(0)
    # Row 1 into page 1 (slot 0 on), row 0 into page 2, then its pooled keys into page 3.
    for lengths in ([0, 2], [3, 1], [6, 1]):
        rows.step(lengths)
    assert rows.cache.table[:, :2].tolist() == [[2, 0], [4, 1]] and rows.cache.seqlens == [9, 19]
    assert rows.cache.tables["cmp"][:, 0].tolist() == [3, 5]
    rows.check()
