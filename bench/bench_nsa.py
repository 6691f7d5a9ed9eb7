"""NSA (patterns/nsa.attn) against dense causal SDPA (cuDNN, FlashAttention-2) and FlexAttention.

B=1, bf16, 64 query heads, 4 KV heads (GQA group 16), head dim 128, the paper's
hyperparameters (compression blocks of 32 every 16, selection blocks of 64, top 16,
window 512), mean pooling so that everything runs in generated kernels. Forward and
forward+backward medians, per-token and per-block selection, then a profile of one call
that splits the time by stage and gives each kernel's TFLOP/s against the measured
ceiling. A correctness check against the float64 reference runs first.

    python bench/bench_nsa.py --lengths 8192,16384,32768,65536 --out DIR
    python bench/bench_nsa.py --checks none --shapes "4,4,64,128" --lengths 1024 --out DIR   # other shapes
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Log,
    ceilings,
    dense_causal_baselines,
    environment,
    kernel_times,
    print_environment,
    timed_fwd_bwd,
)

import sparsedsl  # noqa: E402
from sparsedsl import reference  # noqa: E402
from sparsedsl.runtime.dispatch import attend  # noqa: E402
from sparsedsl.runtime.inputs import validate_call  # noqa: E402
from sparsedsl.runtime.launch.selection import Selection, selection_mask  # noqa: E402
from sparsedsl.runtime.tuning import TileConfig, tuner  # noqa: E402
from sparsedsl.tools import costs  # noqa: E402


def parse_shape(text: str) -> costs.Shape:
    """``HQ,HKV,D,B`` as in ``--shapes 64,4,128,1``."""
    heads, kv_heads, head_dim, batch = (int(n) for n in text.split(","))
    return costs.Shape(batch, heads, kv_heads, head_dim)


def shape_label(shape: costs.Shape) -> str:
    return f"B{shape.batch} H{shape.heads}/{shape.kv_heads} D{shape.head_dim}"


def nsa(name="nsa", **params):
    return sparsedsl.load(name, **{"pool": "mean", **params})


def ragged_documents(L: int, n: int, seed: int) -> torch.Tensor:
    """(1, L) ids of ``n`` documents of random lengths (at least L / 2n each)."""
    generator = torch.Generator().manual_seed(seed)
    base = L // (2 * n)
    extra = L - base * n
    cuts = torch.randint(0, extra + 1, (n - 1,), generator=generator).sort().values
    lengths = base + torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([extra])]))
    return torch.repeat_interleave(torch.arange(n), lengths)[None].to("cuda" if torch.cuda.is_available() else "cpu")


def kernel_call(pattern, q, k, v, gates, record=None, **kw):
    inputs = validate_call(pattern.ir, q, k, v, gates=gates, **kw)
    return attend(pattern.ir, pattern.checked, inputs, pattern.kernels, pattern.source_key, record)


# ---------------------------------------------------------------- correctness
def check_correctness(log: Log) -> None:
    """Kernels against the float64 reference on the GPU, with one forced tile shape or (the
    "tuned" cases, at the shapes of examples/train_recall.py) the tuner's choice. The
    reference attends over the kernels' own selection; the selection itself must be a
    valid top-k of the reference's scores (violation: how far an unchosen block scores
    above a chosen one, relative to the largest finite score)."""
    checks = [
        ("paper (learned pooling), bf16, group 16", sparsedsl.load("nsa"), torch.bfloat16, 16, 1, 128, 1024, 1024, True),
        ("per block, bf16, group 16, Lq < Lk", nsa(per="block"), torch.bfloat16, 16, 1, 128, 1000, 1200, False),
        ("small blocks, max pool, fp16, group 4, D64", nsa(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=8, window=64, pool="max"), torch.float16, 8, 2, 64, 900, 900, False),
        ("packed, 5 documents, bf16, group 16", nsa("nsa_packed"), torch.bfloat16, 16, 1, 128, 1500, 1500, False),
        ("tuned, learned, bf16, MHA, D64, L 128", sparsedsl.load("nsa"), torch.bfloat16, 4, 4, 64, 128, 128, True),
        ("tuned, learned, bf16, MHA, D64, L 4096", sparsedsl.load("nsa"), torch.bfloat16, 4, 4, 64, 4096, 4096, True),
    ]  # fmt: skip
    for name, pattern, dtype, hq, hkv, head_dim, Lq, Lk, learned in checks:
        torch.manual_seed(0)
        docs = {"doc_ids": ragged_documents(Lk, 5, 0).expand(2, Lk)} if pattern.ir.packed else {}
        leaves = {
            "q": torch.randn(2, hq, Lq, head_dim, device="cuda", dtype=torch.float64),
            "k": torch.randn(2, hkv, Lk, head_dim, device="cuda", dtype=torch.float64),
            "v": torch.randn(2, hkv, Lk, head_dim, device="cuda", dtype=torch.float64),
            "gates": torch.rand(2, hq, Lq, 3, device="cuda", dtype=torch.float64),
        }
        if learned:
            n = reference.pooled_length(Lk, 32, 16)
            leaves["k_cmp"], leaves["v_cmp"] = (torch.randn(2, hkv, n, head_dim, device="cuda", dtype=torch.float64) for _ in range(2))
        low = {key: t.to(dtype).requires_grad_() for key, t in leaves.items()}
        high = {key: t.to(dtype).double().requires_grad_() for key, t in leaves.items()}
        record = {}
        tiles = contextlib.nullcontext() if name.startswith("tuned") else tuner.force(TileConfig(64, 64, 1, 4, 2, max_tiles=16))
        with tiles:
            out = kernel_call(pattern, record=record, **low, **docs)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, list(low.values()), dout)
        sel = pattern.ir.branch("sel")
        selection = Selection.of(sel, pattern.ir.branch("cmp"))
        inputs64 = validate_call(pattern.ir, **high, **docs)
        if inputs64.layout is None:
            chosen = selection_mask(selection, record["sel", "blocks"], Lq, Lk)
        else:  # the table numbers blocks and positions in the aligned layout
            aligned = inputs64.layout.length
            chosen = inputs64.layout.unpad(selection_mask(selection, record["sel", "blocks"], aligned, aligned))
        ref = reference.attention(pattern.checked, inputs64, selections={"sel": chosen})
        want = torch.autograd.grad(ref.out, list(high.values()), dout.double())
        scores = ref.scores["sel"]
        finite = scores.clamp(-1e30, 1e30)
        weakest = torch.where(chosen, finite, float("inf")).amin(-1)
        strongest_left = torch.where((scores > float("-inf")) & ~chosen, finite, float("-inf")).amax(-1)
        largest = finite[scores.isfinite()].abs().max() if scores.isfinite().any() else 1.0  # all forced: no choice
        violation = float((strongest_left - weakest).clamp(min=0).max() / largest)
        free = reference.attention(pattern.checked, validate_call(pattern.ir, **{key: t.detach() for key, t in high.items()}, **docs))
        differ = float((free.selections["sel"] != chosen).any(-1).float().mean())
        errors = {
            f"rel_err_{key}": float((g.double() - w).norm() / w.norm())
            for key, g, w in zip(["out", *(f"d{k}" for k in low)], (out.detach(), *grads), (ref.out.detach(), *want))
        }
        log.add(kind="check", case=name, dtype=str(dtype), **errors, topk_violation=violation, rows_with_other_choice=differ)


# ---------------------------------------------------------------- timing
def visible_counts(pattern, table, L: int, shape: costs.Shape) -> dict:
    """(query, key) pairs each branch computes, summed over query heads and the batch."""
    p = pattern.params
    i = torch.arange(L, device="cuda")
    pooled = ((i - p["cmp_block"] + 1).div(p["cmp_stride"], rounding_mode="floor") + 1).clamp(min=0)
    window = torch.minimum(i + 1, torch.tensor(p["window"], device="cuda"))
    selection = Selection.of(pattern.ir.branch("sel"), pattern.ir.branch("cmp"))
    chosen = selection_mask(selection, table, L, L)  # (1, Hkv, L, n_blocks)
    block = torch.arange(chosen.shape[-1], device="cuda")
    keys = torch.where(block[None, :] < (i // p["sel_block"])[:, None], p["sel_block"], (i % p["sel_block"] + 1)[:, None])
    selected = (chosen * keys).sum() * (shape.heads // shape.kv_heads)
    heads = shape.heads * shape.batch
    return {"cmp": int(pooled.sum()) * heads, "sel": int(selected), "win": int(window.sum()) * heads}


def stage_of(kernel: str, indices: dict) -> str:
    if kernel.startswith("gate_"):
        return "gate mix"
    for branch, n in indices.items():
        if kernel.startswith(f"b{n}_scores"):
            return "scores"
        if kernel.startswith(f"b{n}_top"):
            return "top-k / reverse index"
        if kernel.startswith(f"b{n}_pool"):
            return "pooling"
        if kernel.startswith(f"b{n}_"):
            return branch
    if "backward_preprocess" in kernel:
        return "softmax delta"
    if "topk" in kernel.lower() or "radix" in kernel.lower() or "sort" in kernel.lower():
        return "top-k / reverse index"
    return "torch (casts, copies)"


def profile(fn, indices: dict) -> dict:
    """Device time per stage and per kernel over 3 calls of ``fn``, in ms per call."""
    stages, kernels = defaultdict(float), {}
    for kernel, us in kernel_times(fn).items():
        stages[stage_of(kernel, indices)] += us / 1e3
        kernels[kernel] = us / 1e3
    return {"stages": dict(stages), "kernels": dict(list(kernels.items())[:12])}


def bench_length(log: Log, L: int, ceiling: dict, flex_too: bool, shape: costs.Shape) -> None:
    generator = torch.Generator().manual_seed(L)
    B, HQ, HKV, D = shape.batch, shape.heads, shape.kv_heads, shape.head_dim
    q = torch.randn(B, HQ, L, D, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(B, HKV, L, D, generator=generator).to("cuda", torch.bfloat16).requires_grad_() for _ in range(2))
    gates = torch.rand(B, HQ, L, 3, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    dout = torch.randn_like(q)
    budget = 400.0 if L * B >= 32768 else 150.0
    dense_pairs = L * (L + 1) // 2 * HQ * B

    def record(method: str, fwd, leaves, extra=None):
        try:
            fwd_ms, both_ms = timed_fwd_bwd(fwd, leaves, dout, budget)
            log.add(kind="time", L=L, shape=shape_label(shape), method=method, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, **(extra or {}))
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            log.add(kind="time", L=L, shape=shape_label(shape), method=method, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()

    for per in ("token", "block"):
        pattern = nsa(per=per)
        indices = {b.name: n for n, b in enumerate(pattern.ir.branches)}
        record(f"nsa_{per}", lambda: kernel_call(pattern, q, k, v, gates), (q, k, v, gates))
        rec = {}
        kernel_call(pattern, q, k, v, gates, rec)
        pairs = visible_counts(pattern, rec["sel", "blocks"], L, shape)
        forward = profile(lambda: kernel_call(pattern, q, k, v, gates), indices)
        both = profile(lambda: torch.autograd.grad(kernel_call(pattern, q, k, v, gates), (q, k, v, gates), dout), indices)
        backward = {s: both["stages"].get(s, 0.0) - forward["stages"].get(s, 0.0) for s in both["stages"]}
        rates = {}
        for branch in ("cmp", "sel", "win"):
            f_ms = forward["stages"].get(branch, 0.0)
            b_ms = backward.get(branch, 0.0)
            rates[branch] = {
                "fwd_tflops": 4 * pairs[branch] * D / f_ms / 1e9 if f_ms else None,
                "bwd_tflops": 10 * pairs[branch] * D / b_ms / 1e9 if b_ms else None,
            }
        s_ms = forward["stages"].get("scores", 0.0)
        rates["scores"] = {"fwd_tflops": 2 * pairs["cmp"] * D / s_ms / 1e9 if s_ms else None}
        log.add(kind="profile", L=L, shape=shape_label(shape), method=f"nsa_{per}", forward=forward, backward_stages=backward, pairs=pairs,
                dense_pairs=dense_pairs, rates=rates, matmul_ceiling_tflops=ceiling["matmul_tflops"])  # fmt: skip

    packed, doc_ids = nsa("nsa_packed"), ragged_documents(L, 16, L).expand(B, L)
    record("nsa_packed_16docs", lambda: kernel_call(packed, q, k, v, gates, doc_ids=doc_ids), (q, k, v, gates),
           {"note": "16 documents of random lengths, each its own sequence"})  # fmt: skip
    for method, dense in dense_causal_baselines(q, k, v).items():
        record(method, dense, (q, k, v), {"note": "dense causal (K/V expansion inside)"})
    if flex_too:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device="cuda", _compile=True)
        record("flex_causal", lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True), (q, k, v), {"note": "dense causal"})


def summarize(log: Log) -> None:
    print_environment(log.rows)
    for r in log.rows:
        if r["kind"] == "check":
            errs = " ".join(f"{k[8:]} {v:.1e}" for k, v in r.items() if k.startswith("rel_err_"))
            print(f"check {r['case']:<36} {errs}  top-k violation {r['topk_violation']:.1e}, other choice {r['rows_with_other_choice']:.3f}")
    times = [r for r in log.rows if r["kind"] == "time"]
    print(f"{'shape':<16} {'L':>6} {'method':<17} {'fwd ms':>9} {'f+b ms':>9} {'fwd vs cuDNN':>12} {'f+b vs cuDNN':>12} {'fwd vs FA2':>10} {'f+b vs FA2':>10}")
    for r in times:
        where = f"{r['shape']:<16} {r['L']:>6} {r['method']:<17}"
        if "error" in r:
            print(f"{where} {r['error'][:90]}")
            continue
        same = [x for x in times if (x["L"], x["shape"]) == (r["L"], r["shape"]) and "error" not in x]
        base = {m: next((x for x in same if x["method"] == m), None) for m in ("sdpa_cudnn", "sdpa_flash2")}
        ratio = lambda m, key: f"{base[m][key] / r[key]:.2f}x" if base[m] else "-"  # noqa: E731
        print(f"{where} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>9.2f} {ratio('sdpa_cudnn', 'fwd_ms'):>12} "
              f"{ratio('sdpa_cudnn', 'fwd_bwd_ms'):>12} {ratio('sdpa_flash2', 'fwd_ms'):>10} {ratio('sdpa_flash2', 'fwd_bwd_ms'):>10}")  # fmt: skip
    for r in log.rows:
        if r["kind"] == "profile":
            f = " ".join(f"{k} {v:.2f}" for k, v in sorted(r["forward"]["stages"].items(), key=lambda kv: -kv[1]))
            b = " ".join(f"{k} {v:.2f}" for k, v in sorted(r["backward_stages"].items(), key=lambda kv: -kv[1]))
            rates = " ".join(f"{k} {v['fwd_tflops'] or 0:.0f}/{v.get('bwd_tflops') or 0:.0f}" for k, v in r["rates"].items())
            print(f"{r['shape']:<16} {r['L']:>6} {r['method']:<10} fwd ms: {f}\n{'':>34} bwd ms: {b}\n{'':>34} TFLOP/s fwd/bwd: {rates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768,65536")
    parser.add_argument("--shapes", default="64,4,128,1",
                        help="HQ,HKV,D,B of the timed calls; several separated by ';' (64,4,128,1;16,16,64,2)")
    parser.add_argument("--checks", choices=("all", "none"), default="all")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention on the dense causal mask")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 256
    log = Log(args.out)
    ceiling = ceilings()
    log.add(kind="env", **environment(), **ceiling)
    if args.checks == "all":
        check_correctness(log)
    for shape in (parse_shape(text) for text in args.shapes.split(";")):
        for L in (int(x) for x in args.lengths.split(",")):
            bench_length(log, L, ceiling, args.flex, shape)
    summarize(log)


if __name__ == "__main__":
    main()
