"""KV caches, prefill and decode: every output equals the matching row of one forward pass
over the whole sequence, for every shipped pattern and ragged batches.

float64 runs the dense reference (exact to 1e-10); float32 runs the generated kernels on
Triton's interpreter.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import sparsedsl
from sparsedsl import InputError, KVCache, reference
from sparsedsl.frontend.resources import shipped_pattern_path
from sparsedsl.ir.nodes import SelectedBlocks
from sparsedsl.nn import CompressionMLP, NativeSparseAttention, SparseAttention
from sparsedsl.runtime.launch.common import BranchKernels, cdiv
from sparsedsl.runtime.launch.selection import Selection
from sparsedsl.serving.decoding import CachedKeys, CacheRows, decode_selection

SMALL_NSA = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topk=4, window=8)
# Every shipped pattern, shrunk so that short sequences reach all of its parts.
SHIPPED = {
    "causal": {},
    "chunked": dict(chunk=8),
    "document": {},
    "moba": dict(block=16, topk=1),
    "nsa": dict(SMALL_NSA, pool="mlp"),
    "nsa_packed": dict(SMALL_NSA, pool="max"),
    "sliding_window": dict(window=8),
    "streaming": dict(sinks=2, window=8),
}
B, HQ, HKV, D = 3, 4, 2, 16


def shipped(name: str, **params):
    return sparsedsl.load(shipped_pattern_path(name), **params)


def test_every_shipped_pattern_is_covered():
    names = {p.stem for p in shipped_pattern_path("nsa").parent.glob("*.attn")}
    assert names == set(SHIPPED) | {"longformer"}  # longformer: see the test below


def learned_poolers(pattern, seed=0):
    torch.manual_seed(seed)
    poolers = {}
    for branch in pattern.checked.compress_branches():
        if branch.pool == "mlp":
            mlps = [CompressionMLP(branch.block, branch.stride, D).double() for _ in range(2)]
            for mlp in mlps:  # away from the mean-pooling start, so that the MLP matters
                torch.nn.init.normal_(mlp.mlp[2].weight, std=0.3)
            poolers[branch.name] = tuple(m.pool_windows for m in mlps)
    return poolers


def full_forward(pattern, q, k, v, gates, doc_ids, poolers, T: int) -> torch.Tensor:
    """One sequence's forward over its first T positions (the oracle)."""
    extra = {}
    if pattern.ir.combine == "gate":
        extra["gates"] = gates[:, :, :T]
    if pattern.checked.needs_documents:
        extra["doc_ids"] = doc_ids[:, :T]
    if poolers:
        extra["k_cmp"] = {}
        extra["v_cmp"] = {}
        for name, (pool_k, pool_v) in poolers.items():
            branch = next(b for b in pattern.checked.compress_branches() if b.name == name)
            for key, t, pool in (("k_cmp", k, pool_k), ("v_cmp", v, pool_v)):
                extra[key][name] = pool(reference.key_windows(t[:, :, :T], branch.block, branch.stride))
    with torch.no_grad():
        return pattern(q[:, :, :T], k[:, :, :T], v[:, :, :T], **extra)


def run_generation(pattern, dtype, totals, prefixes, chunk, seed=0):
    """Prefill ragged prefixes, then feed the rest ``chunk`` tokens at a time (decode when
    1); returns the outputs gathered per row and the inputs."""
    torch.manual_seed(seed)
    T = max(totals)
    q = torch.randn(B, HQ, T, D, dtype=dtype)
    k, v = (torch.randn(B, HKV, T, D, dtype=dtype) for _ in range(2))
    gates = torch.rand(B, HQ, T, len(pattern.ir.output_branches), dtype=dtype)
    doc_ids = torch.tensor([[min(t // 11, 2) for t in range(T)], [0] * T, [t // 7 for t in range(T)]])
    poolers = learned_poolers(pattern) if dtype == torch.float64 else {}
    cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=T + 3, dtype=dtype)
    outputs = torch.full((B, HQ, T, D), float("nan"), dtype=dtype)
    done = [0] * B
    position = list(prefixes)
    plan = [prefixes]
    while any(p < t for p, t in zip(position, totals)):
        n = [min(chunk, t - p) for p, t in zip(position, totals)]
        plan.append(n)
        position = [p + m for p, m in zip(position, n)]
    for n in plan:
        width = max(max(n), 1)
        index = torch.tensor([[min(done[b] + t, T - 1) for t in range(width)] for b in range(B)])

        def take(t, rows=index):
            return torch.stack([t[b][:, rows[b]] for b in range(B)])

        extra = {}
        if pattern.ir.combine == "gate":
            extra["gates"] = take(gates)
        if pattern.checked.needs_documents:
            extra["doc_ids"] = torch.stack([doc_ids[b][index[b]] for b in range(B)])
        if poolers:
            extra["poolers"] = poolers
        call = pattern.decode if width <= 2 else pattern.prefill
        out = call(take(q), take(k), take(v), cache, lengths=n, **extra)
        for b in range(B):
            outputs[b, :, done[b] : done[b] + n[b]] = out[b, :, : n[b]]
            assert not n[b] or out[b, :, n[b] :].abs().sum() == 0  # padding positions output 0
            done[b] += n[b]
    assert cache.seqlens == list(totals)
    return outputs, (q, k, v, gates, doc_ids, poolers), cache


def check_rows(pattern, outputs, inputs, totals, tolerance):
    q, k, v, gates, doc_ids, poolers = inputs
    for b, T in enumerate(totals):
        row = slice(b, b + 1)
        want = full_forward(pattern, q[row], k[row], v[row], gates[row], doc_ids[row], poolers, T)
        err = (outputs[row, :, :T].double() - want.double()).abs().max().item()
        assert err < tolerance, f"row {b}: {err}"


@pytest.mark.parametrize("name", list(SHIPPED))
@pytest.mark.parametrize("chunk", [1, 3])
def test_prefill_then_decode_equals_one_forward(name, chunk):
    pattern = shipped(name, **SHIPPED[name])
    rng = random.Random(f"{name}{chunk}")
    totals = [rng.randint(30, 72) for _ in range(B)]
    prefixes = [rng.randint(1, t - 1) for t in totals]
    prefixes[1] = 0  # a row that starts empty: its first tokens come by decode
    outputs, inputs, cache = run_generation(pattern, torch.float64, totals, prefixes, chunk)
    check_rows(pattern, outputs, inputs, totals, 1e-10)
    check_pooled_cache(pattern, cache, inputs)


def check_pooled_cache(pattern, cache: KVCache, inputs, tolerance=1e-12):
    """Pooled keys kept incrementally equal pooling every window from scratch."""
    _, k, v, _, doc_ids, poolers = inputs
    for branch in pattern.checked.compress_branches():
        for b, T in enumerate(cache.seqlens):
            origin = cache.pooled_origin(b)
            n = cache.pooled_count(branch.name, b)
            assert n == reference.pooled_length(T - origin, branch.block, branch.stride)
            if n == 0:
                continue
            for stored, raw, which in zip(cache.pooled[branch.name], (k, v), (0, 1)):
                windows = reference.key_windows(raw[b : b + 1, :, origin:T], branch.block, branch.stride)
                if branch.pool == "mlp":
                    want = poolers[branch.name][which](windows)
                else:
                    want = reference.pool(raw[b : b + 1, :, origin:T], branch.block, branch.stride, branch.pool)
                assert (stored[b : b + 1, :, :n] - want).abs().max() < tolerance


COMPRESSED_WINDOW = sparsedsl.compile_source(
    """
    pattern compressed_window() {
        pooled = compress(block=8, stride=4, pool=max)
        return gate(pooled, causal & sliding(6))
    }
    """
)


@pytest.mark.parametrize("name", ["nsa", "streaming", "causal", "document", "compressed_window"])
def test_generation_on_the_kernels(name):
    """float32 through the generated kernels (interpreted: the decode kernels with their
    keys split three ways) against float64 forward passes."""
    if name == "compressed_window":
        pattern = COMPRESSED_WINDOW
    else:
        pattern = shipped(name, **(dict(SMALL_NSA, pool="mean") if name == "nsa" else SHIPPED[name]))
    totals, prefixes = [26, 21, 30], [17, 0, 9]
    outputs, inputs, _ = run_generation(pattern, torch.float32, totals, prefixes, chunk=1 if name in ("nsa", "causal") else 4)
    exact = [t.double() if t.is_floating_point() else t for t in inputs[:5]] + [{}]
    check_rows(pattern, outputs, exact, totals, 2e-4)


@pytest.mark.parametrize("name, hq, hkv", [("nsa", HQ, HKV), ("compressed_window", HQ, HKV), ("nsa", 32, 1)])
def test_uniform_steps_on_the_device_path(name, hq, hkv):
    """Steps where every row takes the same number of tokens append and pool on the device
    alone (the CUDA-graph path): outputs and pooled keys as a forward from scratch. A group
    of 32 heads takes two chunks of 16 in the decode kernels."""
    pattern = COMPRESSED_WINDOW if name == "compressed_window" else shipped("nsa", **dict(SMALL_NSA, pool="mean"))
    torch.manual_seed(1)
    T, B = 30, 1 if hq >= 32 else 2  # one row suffices for the two chunks of 16
    q = torch.randn(B, hq, T, D)
    k, v = (torch.randn(B, hkv, T, D) for _ in range(2))
    gates = torch.rand(B, hq, T, len(pattern.ir.output_branches))
    cache = pattern.cache(batch=B, kv_heads=hkv, head_dim=D, capacity=T)
    pieces, t = [], 0
    for n in [12, 1, 1, 3, *[1] * 13]:
        call = pattern.prefill if n > 2 else pattern.decode
        pieces.append(call(q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n], cache, gates=gates[:, :, t : t + n]))
        t += n
    assert cache.seqlens == [T] * B and cache.lengths.tolist() == [T] * B
    want = full_forward(pattern, q.double(), k.double(), v.double(), gates.double(), None, {}, T)
    assert (torch.cat(pieces, 2).double() - want).abs().max() < 2e-4
    check_pooled_cache(pattern, cache, (None, k, v, None, None, {}), tolerance=1e-6)


@pytest.mark.parametrize("name, launches", [
    ("nsa", ["pool_latest", "select_decode_pooled", "select_decode", "decode", "decode_merge"]),
    ("causal", ["cache_append", "decode", "decode_merge"]),
])  # fmt: skip
def test_a_uniform_step_launches_each_stage_once(name, launches, monkeypatch):
    """A decode step on the device path: NSA's append rides on its pooling's launch and its
    top-k on the pooled pass's, so five launches (a pattern with no pooling appends alone)."""
    import sparsedsl.serving.decoding as decoding
    import sparsedsl.serving.kvcache as kvcache

    pattern = shipped(name, **(dict(SMALL_NSA, pool="mean") if name == "nsa" else {}))
    cache = pattern.cache(batch=2, kv_heads=HKV, head_dim=D, capacity=40)
    gates = {"gates": torch.rand(2, HQ, 1, 3)} if name == "nsa" else {}
    q, k, v = torch.randn(2, HQ, 20, D), torch.randn(2, HKV, 20, D), torch.randn(2, HKV, 20, D)
    pattern.prefill(q, k, v, cache, gates=torch.rand(2, HQ, 20, 3) if gates else None)
    names = []

    def counted(launch):
        def counting(kernel, spec, *args, **kwargs):
            names.append(spec.name)
            return launch(kernel, spec, *args, **kwargs)

        return counting

    for module in (decoding, kvcache):
        monkeypatch.setattr(module, "launch", counted(module.launch))
    pattern.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], cache, **gates)
    assert names == launches


@pytest.mark.parametrize("splits", [1, 2, 3, 4])
@pytest.mark.parametrize("new", [1, 2])
def test_last_program_chooses_the_blocks_however_the_pooled_pass_is_split(splits, new):
    """The pooled pass's last program of each row and KV head (a ticket counts splits x head
    tiles) takes the top-k: under the interpreter, with rows whose lengths end exactly on a
    selection block (32, 48) or not, and a split with no block at all (4 splits of at most
    3 steps), the table holds the reference's choice and the merged partials the compressed
    attention; the tickets are zero again afterwards, ready for the next launch."""
    pattern = shipped("nsa", **dict(SMALL_NSA, pool="mean"))
    index = next(i for i, b in enumerate(pattern.ir.branches) if isinstance(b.blocks, SelectedBlocks))
    branch = pattern.ir.branches[index]
    selection = Selection.of(branch, pattern.ir.branch(branch.blocks.score))
    checked = {b.name: b for b in pattern.checked.branches}
    select, compress = checked[branch.name], checked[branch.blocks.score]
    lengths, capacity = [32, 48, 41, 17], 96
    hq, hkv = (32, 1) if new == 2 else (8, 2)  # a group of 32 heads is two tiles of 16
    torch.manual_seed(splits)
    B = len(lengths)
    q = torch.randn(B, hq, new, D)
    k, v = (torch.randn(B, hkv, capacity, D) for _ in range(2))
    kc, vc = (reference.pool(t, compress.block, compress.stride, "mean") for t in (k, v))  # what a cache holds
    rows = CacheRows(torch.tensor(lengths, dtype=torch.int32), torch.full((B,), new, dtype=torch.int32),
                     torch.zeros(B * hkv, dtype=torch.int32))  # fmt: skip
    kernels = BranchKernels(pattern.kernels, index, pattern.source_key)
    pooled = CachedKeys(kc, vc, 0, torch.zeros(B, 1, dtype=torch.int32))  # contiguous: the page table is unread
    table, score = decode_selection(kernels, selection, q, pooled, rows, 0.25, capacity, splits=splits)
    assert score.splits == splits and rows.tickets.abs().sum() == 0
    weights = torch.softmax(score.lse.double() * math.log(2), 0).nan_to_num()  # the splits' base-2 log-sum-exps
    attention = (weights[..., None] * score.o.double()).sum(0)

    for b, Lk in enumerate(lengths):
        n = reference.pooled_length(Lk, compress.block, compress.stride)
        kc_b, vc_b = (t[b : b + 1, :, :n].double().repeat_interleave(hq // hkv, 1) for t in (kc, vc))
        logits = q[b : b + 1].double() @ kc_b.transpose(-1, -2) * 0.25
        logits = logits.masked_fill(~reference.compressed_mask(compress, new, Lk), float("-inf"))
        p = torch.softmax(logits, -1).nan_to_num()  # a position before any complete window sees none
        assert (attention[b : b + 1] - p @ vc_b).abs().max() < 1e-5
        chosen, _ = reference.select_blocks(select, p, new, Lk, hq // hkv)
        for h in range(hkv):
            for r in range(new):
                got = {int(x) for x in table[b, h, r] if x < cdiv(capacity, select.block)}
                assert got == set(chosen[0, h, r].nonzero().flatten().tolist()), (b, h, r)


def test_layer_generates_token_by_token_as_one_forward():
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=16, **SMALL_NSA).double()
    for mlp in [*layer.compress_k.values(), *layer.compress_v.values()]:
        torch.nn.init.normal_(mlp.mlp[2].weight, std=0.3)
    hidden = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        want = layer(hidden)
        cache = layer.make_cache(batch=2, capacity=32)
        steps = [layer(hidden[:, :12], cache=cache)]
        steps += [layer(hidden[:, t : t + 1], cache=cache) for t in range(12, 30)]
    assert (torch.cat(steps, 1) - want).abs().max() < 1e-10


def test_packed_layer_restarts_positions_at_each_document():
    torch.manual_seed(0)
    layer = SparseAttention("document", 24, num_heads=2).double()
    hidden = torch.randn(1, 20, 24, dtype=torch.float64)
    doc_ids = torch.tensor([[0] * 9 + [1] * 11])
    with torch.no_grad():
        want = layer(hidden, doc_ids=doc_ids)
        cache = layer.make_cache(batch=1, capacity=20)
        got = [layer(hidden[:, :5], cache=cache, doc_ids=doc_ids[:, :5])]
        got += [layer(hidden[:, t : t + 1], cache=cache, doc_ids=doc_ids[:, t : t + 1]) for t in range(5, 20)]
    assert (torch.cat(got, 1) - want).abs().max() < 1e-10


def test_appending_past_capacity_is_refused_and_changes_nothing():
    pattern = shipped("streaming", sinks=2, window=8)
    cache = pattern.cache(batch=2, kv_heads=1, head_dim=8, capacity=10, dtype=torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    pattern.prefill(x, x, x, cache, lengths=[8, 3])
    before = (cache.k.clone(), cache.v.clone(), cache.lengths.clone(), list(cache.seqlens))
    with pytest.raises(InputError, match=r"row 0 holds 8 of 10 positions and cannot take 3 more; allocate a larger cache"):
        pattern.prefill(x[:, :, :3], x[:, :, :3], x[:, :, :3], cache)
    assert cache.seqlens == before[3] and (cache.lengths == before[2]).all()
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])


def test_patterns_that_see_later_keys_cannot_be_cached():
    with pytest.raises(InputError, match=r"branch `longformer` = sliding\(512\) \| global\(16\) lets a query see keys after it"):
        shipped("longformer").cache(batch=1, kv_heads=1, head_dim=8, capacity=8)
    with pytest.raises(InputError, match=r"branch `sel` selects per block: .* use per=token to generate with it"):
        shipped("nsa", per="block").cache(batch=1, kv_heads=1, head_dim=8, capacity=8)


def test_call_errors_name_the_argument():
    nsa = shipped("nsa", **SMALL_NSA)
    cache = nsa.cache(batch=2, kv_heads=1, head_dim=8, capacity=64, dtype=torch.float64)
    q, kv = torch.randn(2, 2, 1, 8, dtype=torch.float64), torch.randn(2, 1, 1, 8, dtype=torch.float64)
    gates = torch.rand(2, 2, 1, 3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"compress branch `cmp` pools with a learned MLP: pass poolers="):
        nsa.decode(q, kv, kv, cache, gates=gates)
    poolers = learned_poolers(nsa)
    with pytest.raises(InputError, match=r"mixes 3 branches: pass gates= of shape \(2, 2, 1, 3\)"):
        nsa.decode(q, kv, kv, cache, poolers=poolers)
    with pytest.raises(InputError, match=r"`k` and `v` must have shape \(2, 1, 1, 8\)"):
        nsa.decode(q, kv[:, :, :, :4], kv, cache, gates=gates, poolers=poolers)
    with pytest.raises(InputError, match=r"`q` is torch.float32 on cpu, the cache torch.float64 on cpu"):
        nsa.decode(q.float(), kv, kv, cache, gates=gates, poolers=poolers)
    with pytest.raises(InputError, match=r"`lengths` must give, for each of the 2 rows"):
        nsa.decode(q, kv, kv, cache, gates=gates, poolers=poolers, lengths=[1, 2])
    many = torch.randn(2, 2, 17, 8, dtype=torch.float64)
    with pytest.raises(InputError, match=r"17 new tokens per row; decode takes at most 16 \(use prefill for more\)"):
        nsa.decode(many, many[:, :1], many[:, :1], cache, poolers=poolers)
    with pytest.raises(InputError, match=r"the cache was made for pattern `nsa` with other parameters"):
        shipped("nsa", **dict(SMALL_NSA, sel_topk=3)).decode(q, kv, kv, cache, gates=gates, poolers=poolers)
    with pytest.raises(InputError, match=r"`capacity` must be a positive integer, got 0"):
        KVCache(nsa, batch=1, kv_heads=1, head_dim=8, capacity=0)
    with pytest.raises(InputError, match=r"decode: no keyword `gate`; it takes prefill's: doc_ids, gates, lengths, poolers, scale"):
        nsa.decode(q, kv, kv, cache, gate=gates, poolers=poolers)
    assert cache.seqlens == [0, 0]


# ---------------------------------------------------------------- hostile arguments
@pytest.mark.parametrize(
    "lengths, got",
    [
        ([2.5], "got 2.5 in [2.5]"),  # it stored 2 tokens
        (torch.tensor([3.9]), "a list of ints or a 1-D integer tensor, got a torch.float32 tensor of shape (1,)"),  # 3
        ([True], "got True in [True]"),  # 1
        (torch.tensor([True]), "a list of ints or a 1-D integer tensor, got a torch.bool tensor of shape (1,)"),
        (3, "a list of ints or a 1-D integer tensor, got int 3"),  # a TypeError
        ([4], "got [4]"),
    ],
)
def test_lengths_must_be_ints(lengths, got):
    pattern = shipped("sliding_window", window=8)
    cache = pattern.cache(batch=1, kv_heads=1, head_dim=8, capacity=16, dtype=torch.float64)
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    with pytest.raises(InputError) as info:
        pattern.prefill(x, x, x, cache, lengths=lengths)
    expected = "pattern `sliding_window`.prefill: `lengths` must give, for each of the 1 rows, how many of the 3 new tokens are real (ints 0..3)"
    assert str(info.value) in (f"{expected}, {got}", f"{expected}: {got}")
    assert cache.seqlens == [0]
    pattern.prefill(x, x, x, cache, lengths=torch.tensor([2]))  # an integer tensor is fine
    assert cache.seqlens == [2]


@pytest.mark.parametrize("scale", [0.0, -1.0, -1e-30, float("nan")])
def test_prefill_and_decode_refuse_a_scale_the_kernels_cannot_serve(scale):
    pattern = shipped("causal")
    cache = pattern.cache(batch=1, kv_heads=1, head_dim=8, capacity=16)
    x = torch.randn(1, 1, 2, 8)
    for step in (pattern.prefill, pattern.decode):  # decode(scale=-1.0) returned NaN
        with pytest.raises(InputError, match=rf"\.{step.__name__}: `scale` must be positive and finite, got {scale!r}"):
            step(x, x, x, cache, scale=scale)
    assert cache.seqlens == [0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # the reference path, the kernels
def test_prefill_outputs_carry_no_gradient_on_either_path(dtype):
    pattern = shipped("sliding_window", window=8)
    cache = pattern.cache(batch=1, kv_heads=1, head_dim=8, capacity=16, dtype=dtype)
    q = torch.randn(1, 1, 20, 8, dtype=dtype, requires_grad=True)
    first = pattern.prefill(q[:, :, :12], q[:, :, :12].detach(), q[:, :, :12].detach(), cache, lengths=[12])
    step = pattern.decode(q[:, :, 12:13], q[:, :, 12:13].detach(), q[:, :, 12:13].detach(), cache)
    assert not first.requires_grad and not step.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cuda"), "`device` cuda was asked for, but CUDA is not available here; use device='cpu'"),
        (dict(device="meta"), "`device` meta: sparsedsl runs on CUDA GPUs and on the CPU"),
        (dict(device="tpu"), "`device` 'tpu' is not a device torch knows; use 'cpu' or 'cuda'"),
        (dict(capacity=10**12), "`capacity` 1,000,000,000,000 is more positions than the kernels index with 32-bit integers (at most 1,073,741,824)"),
        (dict(capacity=2**30, batch=2**20), "cannot allocate the keys and values (1048576 x 1 x 1,073,741,824 x 8 each, 67,108,864.0 GiB together) on cpu"),
    ],
)
def test_cache_arguments_are_named(kwargs, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pattern = shipped("causal")
    arguments = {**dict(batch=1, kv_heads=1, head_dim=8, capacity=16), **kwargs}
    with pytest.raises(InputError) as info:
        pattern.cache(**arguments)
    where = f"KVCache for pattern `causal` ({pattern.checked.source_name}:{pattern.checked.line})"
    assert str(info.value).startswith(f"{where}: {message}")
