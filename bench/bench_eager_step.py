"""Eager decode steps, replayed (serving/replay.py) against launched: exactness and host time.

For `nsa` (mean pooling), `sliding_window`, `streaming` and `causal`, bf16, 64 query heads,
4 KV heads, head dim 128: two caches prefilled alike with 8,192 tokens in 2 rows, then 40
decode steps on each, one replaying its recorded launches and one launching every kernel
through Triton (its plans cleared before each step); the outputs and the caches must be
equal bit for bit. Then the time of one eager `pattern.decode` step at 64k context, batch 1,
as the host sees it (median of 300, not waiting for the GPU): launched, replayed through
Triton's runner (`compiled[grid](...)`, as replays did before they called the launcher
itself) and replayed, and replayed with a synchronisation after each step.

    python bench/bench_eager_step.py
"""

import statistics
import time

import torch

import sparsedsl
from sparsedsl.serving import replay

torch.manual_seed(0)
for name, params in (("nsa", {"pool": "mean"}), ("sliding_window", {}), ("streaming", {}), ("causal", {})):
    p = sparsedsl.load(name, **params)
    B, HQ, HKV, D, L = 2, 64, 4, 128, 8192
    caches = [p.cache(batch=B, kv_heads=HKV, head_dim=D, capacity=L + 256, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    n_out = len(p.ir.output_branches)
    q0 = torch.randn(B, HQ, L, D, device="cuda", dtype=torch.bfloat16); k0 = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16)
    g0 = torch.rand(B, HQ, L, n_out, device="cuda", dtype=torch.bfloat16) if p.ir.combine == "gate" else None
    for c in caches:
        p.prefill(q0, k0, k0 * 0.5, c, **({"gates": g0} if g0 is not None else {}))
    worst, replayed = 0.0, 0
    for s in range(40):
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kw = {"gates": torch.rand(B, HQ, 1, n_out, device="cuda", dtype=torch.bfloat16)} if g0 is not None else {}
        caches[1].step_plans.clear()  # the second cache never replays
        replayed += bool(caches[0].step_plans)  # a plan before the step: it replays (the first records)
        a = p.decode(q, k, v, caches[0], **kw); b = p.decode(q, k, v, caches[1], **kw)
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    assert caches[0].seqlens == caches[1].seqlens
    same_cache = all(torch.equal(x, y) for x, y in zip((caches[0].k, caches[0].v, *[t for pr in caches[0].pooled.values() for t in pr]),
                                                      (caches[1].k, caches[1].v, *[t for pr in caches[1].pooled.values() for t in pr])))
    # eager step times, B=1 at 64k (host time, not waiting for the GPU)
    c = p.cache(batch=1, kv_heads=HKV, head_dim=D, capacity=65536 + 64, dtype=torch.bfloat16, device="cuda")
    c.lengths.fill_(65536); c.seqlens = [65536]
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16); k = torch.randn(1, HKV, 1, D, device="cuda", dtype=torch.bfloat16); v = k.clone()
    kw = {"gates": torch.rand(1, HQ, 1, n_out, device="cuda", dtype=torch.bfloat16)} if g0 is not None else {}
    def one(clear):
        if clear: c.step_plans.clear()
        c.seqlens = [65536]; c.lengths.fill_(65536)
        return p.decode(q, k, v, c, **kw)
    res, direct = {}, replay._direct
    for mode in ("launched", "runner", "replayed"):
        replay._direct = (lambda compiled: None) if mode == "runner" else direct  # no launcher: Triton's runner
        try:
            c.step_plans.clear()  # each mode records its own plan
            for _ in range(30): one(mode == "launched")
            torch.cuda.synchronize(); ts = []
            for _ in range(300):
                t = time.perf_counter(); one(mode == "launched"); ts.append(time.perf_counter() - t)
            torch.cuda.synchronize(); res[mode] = statistics.median(ts) * 1e6
        finally:
            replay._direct = direct
    # device time of the replayed step: with synchronisation
    torch.cuda.synchronize(); ts = []
    for _ in range(200):
        t = time.perf_counter(); one(False); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    print(f"{name}: replayed {replayed}/40 steps, max |replayed - launched| {worst:.3g}, caches equal {same_cache}; "
          f"eager step at 64k, B=1: {res['launched']:.1f} us launched, {res['runner']:.1f} us replayed through Triton's runner, "
          f"{res['replayed']:.1f} us replayed; replayed + sync {statistics.median(ts)*1e6:.1f} us")
