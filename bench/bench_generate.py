"""Tokens per second of transformers' ``generate()`` on a small Llama-shaped model with a
long prompt: SDPA against sparsedsl patterns, through transformers' own cache (the
pattern's forward kernel at each step) and through ``generation_cache`` (``KVCache`` and
the decode kernels).

Random weights (a config, nothing downloaded), bf16, greedy. The time of a new token is
(generate of 1 + N tokens - generate of 1 token) / N, medians over ``--repeats``, so the
prompt's prefill cancels. Eager steps, no CUDA graph (as ``generate()`` runs them).

    python bench/bench_generate.py --context 32768 --batches 1,8 --new 32 --out DIR
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import Log, environment

import sparsedsl
from sparsedsl.integrations.transformers import generation_cache, register

PATTERNS = {"sliding_window": dict(window=4096), "streaming": dict(sinks=4, window=4096), "causal": {}}


def model_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=1 << 17, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip


def generate_seconds(model, ids, new: int, cache_capacity: int | None) -> tuple[float, torch.Tensor]:
    # transformers renamed generate()'s past_key_values= to cache= (5.2x)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {keyword: generation_cache(model, cache_capacity)} if cache_capacity else {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, **cache)  # fmt: skip
    torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, ids.shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    log = Log(Path(args.out) if args.out else None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(), attn_implementation="sdpa")
    model = model.to("cuda", torch.bfloat16).eval()
    names = {name: register(sparsedsl.load(name, **params), f"sparsedsl_{name}") for name, params in PATTERNS.items()}
    runs = [("sdpa", "sdpa", False)] + [(f"{n} (transformers' cache)", names[n], False) for n in ("sliding_window",)]
    runs += [(f"{n} (generation_cache)", names[n], True) for n in PATTERNS]
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(1, 32000, (batch, args.context), device="cuda")
        reference = None
        for label, implementation, ours in runs:
            model.set_attn_implementation(implementation)
            capacity = args.context + args.new + 1 if ours else None
            generate_seconds(model, ids[:, :1024], 2, capacity and 1024 + 3)  # compile the kernels on a short prompt
            ones, tokens = [], None
            for _ in range(args.repeats):
                one, _ = generate_seconds(model, ids, 1, capacity)
                full, tokens = generate_seconds(model, ids, 1 + args.new, capacity)
                ones.append((full - one) / args.new)
            per_token = statistics.median(ones)
            if implementation == "sdpa":
                reference = tokens
            same = float((tokens == reference).float().mean()) if "causal" in label else None
            row = {"batch": batch, "context": args.context, "layer": label, "ms_per_token": per_token * 1e3,
                   "tokens_per_s": batch / per_token, "same_tokens_as_sdpa": same}  # fmt: skip
            log.add(**row)
            print(f"batch {batch:2d}  {label:40s} {per_token * 1e3:8.2f} ms/token  {batch / per_token:9.1f} tok/s"
                  + (f"  same tokens as SDPA: {same:.3f}" if same is not None else ""), flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    log.save(environment=environment())


if __name__ == "__main__":
    main()
