"""Decode steps against a KV cache: the generated decode kernels against dense SDPA decode.

bf16, 64 query heads, 4 KV heads, head dim 128, one new token per sequence, contexts of
8k to 128k and batches 1, 8 and 32 (as memory allows). For each: dense SDPA with one
query (its fastest backend); the decode kernels of `causal` (the same work as SDPA: a
check of the flash-decoding kernels), of `sliding_window` (window 4096: time should stay
flat as the context grows) and of NSA (paper hyperparameters, mean pooling: compressed
attention and block log-sum-exps in one pass, top-k, selected blocks, window and gate
mix), after a check of the NSA decode path against the forward kernels. Times are medians of
CUDA-graph replays of the kernels (what a serving loop runs), with the bytes each step
must read and the bandwidth that makes; for NSA also the whole `pattern.decode` call
(appending the token, pooling, checks) without a graph.

    python bench/bench_decode.py --contexts 8192,16384,32768,65536,131072 --batches 1,8,32 --out DIR
    python bench/bench_decode.py --paged --contexts 65536 --batches 1,32 --out DIR   # paged against contiguous
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    Log,
    back_to_back_us,
    ceilings,
    environment,
    graph_us,
    kernel_times,
    print_environment,
)

import sparsedsl
from sparsedsl import reference
from sparsedsl.runtime.launch.common import BranchKernels
from sparsedsl.serving.decoding import CachedKeys, CacheRows, merge_outputs, run_decode
from sparsedsl.serving.generation import decode_step

HQ, HKV, D = 64, 4, 128


def flex_decode(q, k, v, L: int, window: int | None):
    """FlexAttention (compiled) for one query at position L - 1 over the same mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    last = L - 1
    if window is None:
        mask = lambda b, h, qi, ki: ki <= qi + last  # noqa: E731
    else:
        mask = lambda b, h, qi, ki: (ki <= qi + last) & (ki > qi + last - window)  # noqa: E731
    block_mask = create_block_mask(mask, None, None, 1, L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def bench_context(log: Log, B: int, L: int, ceiling: dict, flex_too: bool = False) -> None:
    torch.manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    for name, params in (("causal", {}), ("sliding_window", {"window": 4096})):
        pattern = sparsedsl.load(name, **params)
        cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=L, dtype=torch.bfloat16, device="cuda")
        cache.k.normal_()
        cache.v.normal_()
        cache.lengths.fill_(L)  # as if L tokens had been appended
        new = torch.ones(B, dtype=torch.int32, device="cuda")
        kernels = BranchKernels(pattern.kernels, 0, pattern.source_key)
        scale = D**-0.5

        def ours():
            parts = run_decode(kernels, q, CachedKeys(cache.k, cache.v, 0, cache.table), CacheRows(cache.lengths, new, cache.tickets), None, scale, L)
            return merge_outputs(pattern.kernels, q, [parts], None)

        keys = L if name == "causal" else min(L, 4096)
        want = F.scaled_dot_product_attention(q, cache.k[:, :, L - keys :], cache.v[:, :, L - keys :], enable_gqa=True)
        err = float((ours().float() - want.float()).abs().max())
        us = graph_us(ours)
        read = B * HKV * keys * D * 2 * 2
        log.add(kind="decode", B=B, L=L, method=f"sparsedsl_{name}", us=us, bytes=read, tbps=read / us / 1e6,
                copy_tbps=ceiling["copy_tbps"], max_err_vs_sdpa=err)  # fmt: skip
        if flex_too:
            try:
                flex = flex_decode(q, cache.k, cache.v, L, None if name == "causal" else 4096)
                flex_err = float((flex().float() - want.float()).abs().max())
                flex_us = graph_us(flex)
                log.add(kind="decode", B=B, L=L, method=f"flex_{name}", us=flex_us, bytes=read, tbps=read / flex_us / 1e6,
                        copy_tbps=ceiling["copy_tbps"], max_err_vs_sdpa=flex_err)  # fmt: skip
            except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                log.add(kind="decode_error", B=B, L=L, method=f"flex_{name}", error=f"{type(exc).__name__}: {str(exc)[-300:]}")
        if name == "causal":
            k, v = cache.k, cache.v
            dense_us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            log.add(kind="decode", B=B, L=L, method="sdpa_dense", us=dense_us, bytes=read, tbps=read / dense_us / 1e6,
                    copy_tbps=ceiling["copy_tbps"])  # fmt: skip
    bench_nsa(log, B, L, ceiling)


def paged_copy(cache, L: int, page_size: int = 64):
    """A paged cache (pages of ``page_size``, from a pool with room for every row) holding
    what ``cache`` holds in its first ``L`` positions, pooled keys included."""
    pattern = cache.pattern
    per_row = -(-cache.capacity // page_size) + sum(-(-keys.count(cache.capacity) // page_size)
                                                    for keys in cache.pooled_keys.values())  # fmt: skip
    pages = cache.batch * per_row
    pool = sparsedsl.PagePool(pattern, pages=pages, kv_heads=HKV, head_dim=D, page_size=page_size, dtype=cache.k.dtype,
                              device=cache.k.device)  # fmt: skip
    paged = pattern.cache(batch=cache.batch, kv_heads=HKV, head_dim=D, capacity=cache.capacity, dtype=cache.k.dtype,
                          device=cache.k.device, pool=pool)  # fmt: skip
    paged.reserve(min(L + 1, cache.capacity))  # and the page of the token a step appends
    positions = torch.arange(L, device="cuda")
    for row in range(cache.batch):
        i, j = paged._where(row, positions)
        paged.k[i, :, j], paged.v[i, :, j] = (x[row, :, :L].transpose(0, 1) for x in (cache.k, cache.v))
        for name in cache.pooled:
            count = cache.pooled_count(name, row)
            i, j = paged._where(row, torch.arange(count, device="cuda"), name)
            for store, held in zip(paged.pooled[name], cache.pooled[name]):
                store[i, :, j] = held[row, :, :count].transpose(0, 1)
    paged.lengths.fill_(L)
    paged.seqlens = [L] * cache.batch
    return paged


def bench_nsa(log: Log, B: int, L: int, ceiling: dict, paged: bool = False) -> None:
    torch.manual_seed(0)
    pattern = sparsedsl.load("nsa", pool="mean")
    cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=L + 4096, dtype=torch.bfloat16, device="cuda")
    cache.k[:, :, :L].normal_()
    cache.v[:, :, :L].normal_()
    Nc = reference.pooled_length(L, 32, 16)
    for store, raw in zip(cache.pooled["cmp"], (cache.k, cache.v)):
        store[:, :, :Nc] = reference.pool(raw[:, :, :L], 32, 16, "mean")
    cache.lengths.fill_(L)
    cache.seqlens = [L] * B
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    gates = torch.rand(B, HQ, 1, 3, device="cuda", dtype=torch.bfloat16)
    new = torch.ones(B, dtype=torch.int32, device="cuda")
    if paged:
        bench_nsa_steps(log, pattern, cache, q, gates, new, L, ceiling, read=None, layout="contiguous")
        bench_nsa_steps(log, pattern, paged_copy(cache, L), q, gates, new, L, ceiling, read=None, layout="paged")
        return
    us = graph_us(lambda: decode_step(pattern, cache, q, gates, new, D**-0.5))
    # Keys read per query group: pooled K and V (once, for the compressed attention and the
    # block scores together), 16 selected blocks of 64 and the window of 512 (K and V each).
    tokens = 2 * Nc + 2 * (16 * 64 + 512)
    read = B * HKV * tokens * D * 2
    log.add(kind="decode", B=B, L=L, method="sparsedsl_nsa", us=us, bytes=read, tbps=read / us / 1e6,
            copy_tbps=ceiling["copy_tbps"], tokens_per_group=tokens / 2, paper_tokens_per_group=Nc + 16 * 64 + 512)  # fmt: skip
    if L == 65536:
        log.add(kind="profile", B=B, L=L, kernels_us=kernel_times(lambda: decode_step(pattern, cache, q, gates, new, D**-0.5), 10))
    bench_nsa_steps(log, pattern, cache, q, gates, new, L, ceiling, read)


def bench_nsa_steps(log: Log, pattern, cache, q, gates, new, L: int, ceiling: dict, read, layout: str | None = None) -> None:
    """The whole decode step (append, pool, attend) in a CUDA graph and eagerly; with
    ``layout``, also the kernels alone and the output, to compare layouts."""
    B = cache.batch
    suffix = f"_{layout}" if layout else ""
    if layout:
        torch.manual_seed(2)
        kernels_out = decode_step(pattern, cache, q, gates, new, D**-0.5)
        us = graph_us(lambda: decode_step(pattern, cache, q, gates, new, D**-0.5))
        log.add(kind="layout", B=B, L=L, method=f"nsa_kernels{suffix}", us=us, output_sum=float(kernels_out.float().sum()))
    k1, v1 = (torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def step():  # the whole decode step from the same context every time: append, pool, attend
        cache.seqlens = [L] * B
        cache.lengths.fill_(L)
        return pattern.decode(q, k1, v1, cache, gates=gates)

    eager = step().float()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    err = float((captured.float() - eager).abs().max())
    step_us = graph_us(step)
    eager_us = back_to_back_us(step)  # as an eager loop runs it (not median_ms's flushed, event-timed calls)
    if layout:
        log.add(kind="layout", B=B, L=L, method=f"nsa_step_graph{suffix}", us=step_us, graph_vs_eager=err,
                output_sum=float(eager.sum()))  # fmt: skip
        log.add(kind="layout", B=B, L=L, method=f"nsa_step_eager{suffix}", us=eager_us)
        log.add(kind="layout_profile", B=B, L=L, layout=layout, kernels_us=kernel_times(step, 10))
        return
    log.add(kind="decode", B=B, L=L, method="sparsedsl_nsa_step_graph", us=step_us, bytes=read,
            tbps=read / step_us / 1e6, copy_tbps=ceiling["copy_tbps"], graph_vs_eager=err)  # fmt: skip
    log.add(kind="decode", B=B, L=L, method="sparsedsl_nsa_step_eager", us=eager_us, bytes=read,
            tbps=read / eager_us / 1e6, copy_tbps=ceiling["copy_tbps"])  # fmt: skip


def check_nsa(log: Log, dtype: torch.dtype = torch.bfloat16, B: int = 2, L: int = 4133, steps: int = 4) -> None:
    """NSA decode against the forward kernels: a ragged batch is prefilled, then decodes
    ``steps`` tokens one by one through the device path; the outputs equal the last rows
    of one forward per sequence, in ``dtype`` on both sides (in bf16 a block whose scores
    nearly tie may be chosen differently by the two paths' roundings)."""
    began = time.time()
    torch.manual_seed(1)
    pattern = sparsedsl.load("nsa", pool="mean")
    q = torch.randn(B, HQ, L, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, HKV, L, D, device="cuda", dtype=dtype) for _ in range(2))
    gates = torch.rand(B, HQ, L, 3, device="cuda", dtype=dtype)
    starts = [L - steps - 1000 * b for b in range(B)]
    cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=L, dtype=dtype, device="cuda")
    prompt = [t[:, :, : max(starts)].clone() for t in (q, k, v, gates)]
    for b, s in enumerate(starts):  # each row's prompt, padded at the end
        for t, full in zip(prompt, (q, k, v, gates)):
            t[b, :, :s] = full[b, :, :s]
    pattern.prefill(*prompt[:3], cache, gates=prompt[3], lengths=starts)
    outs = []
    for step in range(steps):
        at = torch.tensor(starts, device="cuda") + step
        one = lambda t: t[torch.arange(B, device="cuda"), :, at][:, :, None]  # noqa: E731
        outs.append(pattern.decode(one(q), one(k), one(v), cache, gates=one(gates)))
    worst = 0.0
    for b, s in enumerate(starts):
        T = s + steps
        want = pattern(q[b : b + 1, :, s:T], k[b : b + 1, :, :T], v[b : b + 1, :, :T], gates=gates[b : b + 1, :, s:T])
        got = torch.cat([o[b : b + 1] for o in outs], 2)
        worst = max(worst, float((got.float() - want.float()).abs().max()))
    log.add(kind="check", what=f"nsa decode vs forward kernels, {dtype}", B=B, L=L, max_abs_err=worst, seconds=time.time() - began)


def sweep(log: Log, B: int, L: int) -> None:
    """The causal decode kernel at one size under other key blocks, pipeline depths and
    split counts than the defaults: what the defaults were chosen from."""
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    pattern = sparsedsl.load("causal")
    cache = pattern.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=L, dtype=torch.bfloat16, device="cuda")
    cache.lengths.fill_(L)
    new = torch.ones(B, dtype=torch.int32, device="cuda")
    kernels = BranchKernels(pattern.kernels, 0, pattern.source_key)
    for block_n in (32, 64, 128):
        for stages in (2, 3, 4):
            for splits in (16, 32, 64):
                run = lambda: merge_outputs(pattern.kernels, q, [run_decode(  # noqa: E731
                    kernels, q, CachedKeys(cache.k, cache.v, 0, cache.table), CacheRows(cache.lengths, new, cache.tickets), None, 0.1, L,
                    splits=splits, block_n=block_n, num_stages=stages)], None)  # fmt: skip
                try:
                    log.add(kind="sweep", B=B, L=L, block_n=block_n, stages=stages, splits=splits, us=graph_us(run))
                except Exception as exc:  # a configuration the compiler refuses
                    log.add(kind="sweep", B=B, L=L, block_n=block_n, stages=stages, splits=splits, error=str(exc)[:200])


def summarize(log: Log) -> None:
    print_environment(log.rows)
    for r in log.rows:
        if r["kind"] == "check":
            print(f"check: {r['what']}: max abs error {r['max_abs_err']:.2e}")
        if r["kind"] == "profile":
            print(f"NSA decode kernels, B={r['B']} L={r['L']} (us): " + ", ".join(f"{k[:40]} {v:.1f}" for k, v in r["kernels_us"].items()))
    for r in sorted((r for r in log.rows if r["kind"] == "sweep" and "us" in r), key=lambda r: r["us"])[:5]:
        print(f"sweep B={r['B']} L={r['L']}: BLOCK_N {r['block_n']}, {r['stages']} stages, {r['splits']} splits: {r['us']:.1f} us")
    layouts = [r for r in log.rows if r["kind"] == "layout"]
    for r in (r for r in layouts if r["method"].endswith("_paged")):
        base = next(x for x in layouts if (x["B"], x["L"], x["method"]) == (r["B"], r["L"], r["method"][:-6] + "_contiguous"))
        same = "" if "output_sum" not in r else f", outputs {'equal' if r['output_sum'] == base['output_sum'] else 'DIFFER'}"
        print(f"paged B={r['B']} L={r['L']} {r['method'][:-6]}: {r['us']:.1f} us against contiguous {base['us']:.1f} "
              f"({r['us'] / base['us']:.3f}x{same})")  # fmt: skip
    for r in (r for r in log.rows if r["kind"] == "layout_profile"):
        print(f"{r['layout']} step kernels, B={r['B']} L={r['L']} (us): " + ", ".join(f"{k[:24]} {v:.1f}" for k, v in r["kernels_us"].items()))
    rows = [r for r in log.rows if r["kind"] == "decode"]
    print(f"{'B':>3} {'L':>7} {'method':<26} {'us':>9} {'vs dense':>9} {'TB/s':>6}")  # vs dense: its speed-up
    for r in rows:
        dense = next((x for x in rows if x["B"] == r["B"] and x["L"] == r["L"] and x["method"] == "sdpa_dense"), None)
        ratio = f"{dense['us'] / r['us']:.2f}x" if dense else "-"
        print(f"{r['B']:>3} {r['L']:>7} {r['method']:<26} {r['us']:>9.1f} {ratio:>9} {r['tbps']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention's decoding on the same masks")
    parser.add_argument("--sweep", action="store_true", help="first time the causal kernel's options at batch 1, 64k")
    parser.add_argument("--paged", action="store_true", help="only NSA's steps, contiguous against paged (pages of 64)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 256  # FlexAttention compiles once per shape
    log = Log(args.out)
    ceiling = ceilings()
    log.add(kind="env", **environment(), **ceiling)
    check_nsa(log)
    if args.sweep:
        sweep(log, 1, 65536)
    for B in map(int, args.batches.split(",")):
        for L in map(int, args.contexts.split(",")):
            try:
                if args.paged:
                    bench_nsa(log, B, L, ceiling, paged=True)
                else:
                    bench_context(log, B, L, ceiling, args.flex)
            except torch.OutOfMemoryError:
                log.add(kind="skipped", B=B, L=L, why="out of memory")
                torch.cuda.empty_cache()
    summarize(log)


if __name__ == "__main__":
    main()
