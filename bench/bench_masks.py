"""Static-mask kernels against SDPA (cuDNN and FlashAttention-2 backends) and FlexAttention.

B=1, bf16, 64 query heads, 4 KV heads, head dim 128. For every case the same run times
sparsedsl's generated kernels, FlexAttention compiled on the same mask, and dense causal
SDPA; forward and forward+backward, medians of device-event timings. TFLOP/s count only
the visible (query, key) pairs: 4 D flops per pair forward, 14 D forward+backward.

    python bench/bench_masks.py --lengths 8192,32768 --cases causal,window --out DIR

``--backward split,fused`` times sparsedsl with both backward strategies side by side
(and checks both): dQ in a kernel of its own (split, the default; method "sparsedsl") or
added atomically inside the dK/dV kernel (fused, ``SPARSEDSL_FUSED_DQ=1``; method
"sparsedsl-fused").
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Log,
    ceilings,
    dense_causal_baselines,
    environment,
    host_ms,
    print_environment,
    timed_fwd_bwd,
)

import sparsedsl  # noqa: E402
from sparsedsl import reference  # noqa: E402
from sparsedsl.runtime.inputs import validate_call  # noqa: E402
from sparsedsl.runtime.launch.static import FUSED_DQ_VARIABLE  # noqa: E402
from sparsedsl.runtime.tuning import TileConfig, tuner  # noqa: E402

HQ, HKV, D = 64, 4, 128
WINDOW, SINKS = 512, 4

CASES = {
    # name: the mask, in the language
    "causal": "causal",
    "window": f"causal & sliding({WINDOW})",
    "sink_window": f"causal & (sink({SINKS}) | sliding({WINDOW}))",
    "document": "causal & document",
}


BACKWARDS = {"split": "sparsedsl", "fused": "sparsedsl-fused"}  # strategy: method name in the results


@contextmanager
def backward_strategy(strategy: str):
    """Inside the block, static branches' backward uses ``strategy`` ('split' or 'fused'):
    the launcher reads SPARSEDSL_FUSED_DQ at every backward."""
    previous = os.environ.get(FUSED_DQ_VARIABLE)
    os.environ[FUSED_DQ_VARIABLE] = "1" if strategy == "fused" else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FUSED_DQ_VARIABLE]
        else:
            os.environ[FUSED_DQ_VARIABLE] = previous


def visible_pairs(case: str, L: int, doc_lengths: list[int] | None) -> int:
    if case == "causal":
        return L * (L + 1) // 2
    if case == "window":
        return sum(min(i + 1, WINDOW) for i in range(L))
    if case == "sink_window":
        return sum(min(i + 1, WINDOW) + max(0, min(SINKS, i + 1 - WINDOW)) for i in range(L))
    return sum(n * (n + 1) // 2 for n in doc_lengths)


def flex_mask(case: str, doc_ids: torch.Tensor | None):
    if case == "causal":
        return lambda b, h, q, k: q >= k
    if case == "window":
        return lambda b, h, q, k: (q >= k) & (q - k < WINDOW)
    if case == "sink_window":
        return lambda b, h, q, k: (q >= k) & ((q - k < WINDOW) | (k < SINKS))
    docs = doc_ids[0]
    return lambda b, h, q, k: (q >= k) & (docs[q] == docs[k])


def random_documents(L: int, generator: torch.Generator) -> list[int]:
    """Packed sequences of random lengths (512 to 8192 tokens) filling L."""
    lengths = []
    while sum(lengths) < L:
        lengths.append(int(torch.randint(512, 8193, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - L
    return [n for n in lengths if n > 0]


def check_correctness(log: Log, quick: bool, backward: str = "split") -> None:
    """Small shapes on the GPU against the float64 reference, forward and gradients, with
    one tile configuration per head dim (tuning would compile every candidate), under
    backward strategy ``backward`` (the caller sets it: :func:`backward_strategy`)."""
    torch.manual_seed(0)
    checks = [(p, torch.bfloat16, 128) for p in ("causal", "sliding_window", "streaming", "document", "longformer", "chunked")]
    checks += [("dilated", torch.bfloat16, 128), ("streaming", torch.float16, 64), ("streaming", torch.float32, 128), ("causal", torch.bfloat16, 256)]
    packed = None
    if quick:  # the union and document paths, with packed heads and split dK/dV walks
        checks, packed = [checks[2], checks[3]], TileConfig(64, 64, 4, 4, 2, max_tiles=4)
    for name, dtype, head_dim in checks:
        if name == "dilated":
            pattern = sparsedsl.compile_source("pattern dilated() { return causal & dilated(32, 4) }")
        else:
            pattern = sparsedsl.load(name, **{"sliding_window": {"window": 100}, "streaming": {"window": 100}, "chunked": {"chunk": 300}}.get(name, {}))
        B, Lq, Lk = 2, 1000, 1200
        q = torch.randn(B, 8, Lq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, 2, Lk, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        kw = {"doc_ids": torch.repeat_interleave(torch.arange(4, device="cuda"), Lk // 4)[None].expand(B, Lk).contiguous()} if name == "document" else {}
        config = packed or (TileConfig(64, 64, 1, 4, 2) if head_dim <= 128 else TileConfig(32, 32, 1, 4, 2))
        with tuner.force(config):
            out = pattern(q, k, v, **kw)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        want = reference.attention(pattern.checked, validate_call(pattern.ir, q64, k64, v64, **kw)).out
        want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
        errors = [float((a.double() - b).norm() / b.norm()) for a, b in zip((out.detach(), *grads), (want.detach(), *want_grads))]
        log.add(kind="check", pattern=name, backward=backward, dtype=str(dtype), head_dim=head_dim, rel_err_out=errors[0], rel_err_dq=errors[1], rel_err_dk=errors[2], rel_err_dv=errors[3])


def bench_case(log: Log, case: str, L: int, backends: list[str], backwards: list[str]) -> None:
    generator = torch.Generator().manual_seed(L)
    q = torch.randn(1, HQ, L, D, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, HKV, L, D, generator=generator).to("cuda", torch.bfloat16).requires_grad_() for _ in range(2))
    dout = torch.randn_like(q)
    doc_lengths = random_documents(L, generator) if case == "document" else None
    doc_ids = (
        torch.repeat_interleave(torch.arange(len(doc_lengths)), torch.tensor(doc_lengths))[None].to("cuda")
        if doc_lengths
        else None
    )
    pairs = visible_pairs(case, L, doc_lengths)
    flops_fwd = 4 * pairs * D * HQ
    budget = 400.0 if L >= 32768 else 150.0

    def record(method: str, fwd, extra: dict | None = None):
        try:
            fwd_ms, both_ms = timed_fwd_bwd(fwd, (q, k, v), dout, budget)
            host = {"host_fwd_ms": host_ms(fwd), "host_fwd_bwd_ms": host_ms(lambda: torch.autograd.grad(fwd(), (q, k, v), dout))}
            log.add(kind="time", case=case, L=L, method=method, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms,
                    fwd_tflops=flops_fwd / fwd_ms / 1e9, fwd_bwd_tflops=3.5 * flops_fwd / both_ms / 1e9, **host, **(extra or {}))  # fmt: skip
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            log.add(kind="time", case=case, L=L, method=method, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()

    if "sparsedsl" in backends:
        pattern = sparsedsl.compile_source(f"pattern {case}() {{ return {CASES[case]} }}")
        kw = {"doc_ids": doc_ids} if doc_ids is not None else {}
        for strategy in backwards:
            with backward_strategy(strategy):
                record(BACKWARDS[strategy], lambda: pattern(q, k, v, **kw), {"backward": strategy})
    if "flex" in backends:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(flex_mask(case, doc_ids), None, None, L, L, device="cuda", _compile=True)
        record("flex", lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
        del block_mask
    if case == "causal" or "dense" in backends:
        for method, dense in dense_causal_baselines(q, k, v).items():
            record(method, dense, {"note": "dense causal (K/V expansion inside)"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--backends", default="sparsedsl,flex")
    parser.add_argument("--checks", choices=("all", "quick", "none"), default="all")
    parser.add_argument("--backward", default="split", help="sparsedsl's backward strategies, comma-separated: split, fused")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    backwards = args.backward.split(",")
    if not backwards or not set(backwards) <= set(BACKWARDS):
        parser.error(f"--backward: comma-separated strategies among {', '.join(BACKWARDS)}, got {args.backward!r}")

    # Every (length, mask) compiles FlexAttention anew; without room for that, dynamo falls
    # back to eager FlexAttention, which materialises the whole score matrix.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    log = Log(args.out)
    log.add(kind="env", **environment(), **ceilings())
    if args.checks != "none":
        for strategy in backwards:
            with backward_strategy(strategy):
                check_correctness(log, args.checks == "quick", strategy)
    for L in (int(x) for x in args.lengths.split(",")):
        for case in args.cases.split(","):
            bench_case(log, case, L, args.backends.split(","), backwards)
    summarize(log)


def summarize(log: Log) -> None:
    print_environment(log.rows)
    for r in log.rows:
        if r["kind"] == "check":
            print(f"check {r['pattern']:>14} {r.get('backward', 'split'):>5} {r['dtype']:>15} D={r['head_dim']:<3} out {r['rel_err_out']:.1e}  "
                  f"dq {r['rel_err_dq']:.1e} dk {r['rel_err_dk']:.1e} dv {r['rel_err_dv']:.1e}")  # fmt: skip
    times = [r for r in log.rows if r["kind"] == "time"]
    print(f"{'case':<12} {'L':>6} {'method':<15} {'fwd ms':>9} {'TF/s':>5} {'f+b ms':>9} {'TF/s':>5} {'fwd vs flex':>11} {'f+b vs flex':>11}"
          f" {'f+b vs split':>12} {'host fwd':>9} {'host f+b':>9}")  # fmt: skip

    def same_case(r: dict, method: str) -> dict | None:
        return next((x for x in times if x["case"] == r["case"] and x["L"] == r["L"] and x["method"] == method and "error" not in x), None)

    for r in times:
        if "error" in r:
            print(f"{r['case']:<12} {r['L']:>6} {r['method']:<15} {r['error'][:80]}")
            continue
        flex, split = same_case(r, "flex"), same_case(r, BACKWARDS["split"])
        ratio = lambda key: f"{flex[key] / r[key]:.2f}x" if flex else "-"  # noqa: E731
        against_split = f"{split['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if split and r["method"] == BACKWARDS["fused"] else "-"
        print(f"{r['case']:<12} {r['L']:>6} {r['method']:<15} {r['fwd_ms']:>9.3f} {r['fwd_tflops']:>5.0f} "
              f"{r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tflops']:>5.0f} {ratio('fwd_ms'):>11} {ratio('fwd_bwd_ms'):>11}"
              f" {against_split:>12} {r.get('host_fwd_ms', float('nan')):>9.3f} {r.get('host_fwd_bwd_ms', float('nan')):>9.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
