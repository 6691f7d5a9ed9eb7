"""A whole model's decode step under torch.compile: eager, compiled, and compiled with
CUDA graphs (``mode="reduce-overhead"``), milliseconds per step (one new token per row), outputs against eager.

A small decoder of random weights (embedding, pre-norm blocks of ``SparseAttention`` and
an MLP, output head; the shape of bench_generate.py's Llama: hidden 1024, 16 heads, 4 KV
heads of 64), bf16; ``dense`` is the same model with SDPA over a plain cache, the baseline.
Each step feeds fixed token ids, so that every mode runs the same steps. A prompt of ``--context`` tokens is prefilled eagerly into each mode's own
caches; then ``--steps`` steps of one token are timed back to back (one synchronisation
at the end), after ``--warmup`` steps that compile and capture. With ``--static-caches`` the
caches' tensors are marked as static addresses (``torch._dynamo.mark_static_address``), which
lets CUDA graphs keep tensors that every step mutates; the rows say whether Inductor
skipped its graphs, and why.

    python bench/bench_compiled_decode.py --patterns dense,nsa,sliding_window,causal --context 32768 --batches 1,8 --out DIR
    TRITON_INTERPRET=1 python bench/bench_compiled_decode.py --device cpu --tiny --modes eager,default   # CPU check
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import Log, environment
from torch import nn

from sparsedsl.nn import SparseAttention
from sparsedsl.serving.compiled import cache_tensors

PATTERNS = {"nsa": {}, "sliding_window": dict(window=4096), "causal": {}}


class DenseCache:
    """Keys and values of every position so far, in preallocated (B, Hkv, capacity, D) tensors."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int, like: torch.Tensor) -> None:
        self.k = like.new_zeros(batch, kv_heads, capacity, head_dim)
        self.v = torch.zeros_like(self.k)
        self.length = torch.zeros((), dtype=torch.int64, device=like.device)  # on the device: no host sync a step

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.length]


class DenseAttention(nn.Module):
    """The baseline: dense SDPA over a :class:`DenseCache`. A step's queries attend to the
    whole capacity, masked past each query's position (fixed shapes, so that a compiled step
    is one graph; the capacity exceeds the context by a few steps only); a prefill into an
    empty cache is plain causal SDPA."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.kv_proj = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def make_cache(self, batch: int, capacity: int) -> DenseCache:
        return DenseCache(batch, self.kv_heads, capacity, self.head_dim, self.q_proj.weight)

    def forward(self, x: torch.Tensor, cache: DenseCache) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        positions = cache.length + torch.arange(L, device=x.device)
        cache.k.index_copy_(2, positions, k)
        cache.v.index_copy_(2, positions, v)
        if L > 16:  # a prefill, into an empty cache
            out = F.scaled_dot_product_attention(q, cache.k[:, :, :L], cache.v[:, :, :L], is_causal=True, enable_gqa=True)
        else:  # each KV head's group of query heads as rows of one query tile: no GQA expansion, so that
            # SDPA's memory-efficient kernel takes the mask (with enable_gqa it falls back to the math one)
            group = self.heads // self.kv_heads
            visible = torch.arange(cache.k.shape[2], device=x.device)[None, :] <= positions[:, None]  # (L, capacity)
            rows = q.reshape(B, self.kv_heads, group * L, self.head_dim)
            out = F.scaled_dot_product_attention(rows, cache.k, cache.v, attn_mask=visible.repeat(group, 1))
            out = out.view(B, self.heads, L, self.head_dim)
        cache.length += L
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, pattern: str, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        if pattern == "dense":
            self.attention = DenseAttention(hidden, heads, kv_heads)
        else:
            self.attention = SparseAttention(pattern, hidden, num_heads=heads, num_kv_heads=kv_heads,
                                             head_dim=hidden // heads, **PATTERNS[pattern])  # fmt: skip
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden, bias=False), nn.GELU(), nn.Linear(4 * hidden, hidden, bias=False))

    def forward(self, x: torch.Tensor, cache) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, pattern: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(pattern, hidden, heads, kv_heads) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(hidden), nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, caches: list) -> torch.Tensor:
        x = self.embed(tokens)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.norm(x))

    def make_caches(self, batch: int, capacity: int) -> list:
        return [block.attention.make_cache(batch, capacity) for block in self.blocks]


def skips() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["inductor"]["cudagraph_skips"].values()) if "cudagraph_skips" in counters["inductor"] else 0


def bench(log: Log, args, pattern: str, B: int) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Decoder(pattern, args.vocab, args.hidden, args.layers, args.heads, args.kv_heads).to(device, args.dtype).eval()
    prompt = torch.randint(args.vocab, (B, args.context), device=device)
    tokens = torch.randint(args.vocab, (args.warmup + args.steps, B, 1), device=device)
    capacity = args.context + args.warmup + args.steps + 16
    outputs = {}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        caches = model.make_caches(B, capacity)
        with torch.no_grad():
            model(prompt, caches)  # the prefill, eagerly (longer than a decode step)
            if args.static_caches:
                for cache in caches:
                    for t in cache.tensors() if isinstance(cache, DenseCache) else cache_tensors(cache):
                        torch._dynamo.mark_static_address(t)
            step = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode, fullgraph=True)
            before = skips()
            began = time.perf_counter()
            got = [step(tokens[i], caches).float() for i in range(args.warmup)]
            sync(device)
            compile_s = time.perf_counter() - began
            began = time.perf_counter()
            for i in range(args.warmup, args.warmup + args.steps):
                out = step(tokens[i], caches)
            sync(device)
            ms = (time.perf_counter() - began) * 1e3 / args.steps
        outputs[mode] = got + [out.float()]
        err = max(float((a - b).abs().max()) for a, b in zip(outputs[mode], outputs["eager"])) if "eager" in outputs else None
        log.add(kind="step", pattern=pattern, B=B, L=args.context, mode=mode, ms_per_step=ms, first_steps_s=compile_s,
                      max_abs_vs_eager=err, cudagraph_skips=skips() - before, static_caches=args.static_caches)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", default="dense,nsa,sliding_window,causal", help="dense: SDPA over a plain cache")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--modes", default="eager,default,reduce-overhead")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--static-caches", action="store_true", help="mark every cache tensor as a static address")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, float32, a short context (a CPU check)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.dtype = 32000, 1024, 4, 16, 4, torch.bfloat16
    if args.tiny:
        args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.dtype = 64, 32, 2, 2, 1, torch.float32
        args.context, args.steps, args.warmup = min(args.context, 40), min(args.steps, 2), min(args.warmup, 2)
    torch.set_default_dtype(torch.float32)
    log = Log(args.out)
    log.add(kind="env", **(environment() if args.device == "cuda" else {"device": "cpu", "torch": torch.__version__}))
    for pattern in args.patterns.split(","):
        for B in map(int, args.batches.split(",")):
            bench(log, args, pattern, B)
    env = log.rows[0]
    print(f"\n{env['device']}, torch {env['torch']}, triton {env.get('triton', '-')}")
    print(f"{'pattern':<16} {'B':>3} {'mode':<16} {'ms/step':>9} {'first steps s':>13} {'vs eager':>9} {'graph skips':>11}")
    for r in (r for r in log.rows if r["kind"] == "step"):
        err = "-" if r["max_abs_vs_eager"] is None else f"{r['max_abs_vs_eager']:.1e}"
        print(f"{r['pattern']:<16} {r['B']:>3} {r['mode']:<16} {r['ms_per_step']:>9.3f} {r['first_steps_s']:>13.1f} {err:>9} "
              f"{r['cudagraph_skips']:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
