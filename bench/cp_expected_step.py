"""Expected time and memory of one attention layer per rank under context parallelism,
from measured single-GPU kernel times and the link's bandwidth (no multi-GPU machine
needed; the multi-GPU run measures what this predicts).

The model, for the paper's NSA per token (compression 32/16, selection blocks of 64, top
16, window 512; B=1, 64 query heads, 4 KV heads, head dim 128, bf16):

- Each stage's time is proportional to the work that drives it: (query, key) pairs for the
  compressed, selected and window attentions and the block scores (QK over pooled keys),
  block scores read for the top-k (every query's row is as long as its scoring launch's
  last block), queries for the gate mix, the softmax delta and the casts, keys for pooling.
  Its milliseconds per unit are fitted on the largest single-GPU profile of ``--rows``
  (``bench/bench_nsa.py``, 64k: a call of 65,536 queries, the size of a rank's chunk at
  1M over 8 ranks). The same fit predicting the profile's smaller lengths says how far
  the proportionality holds (small grids run below the 64k rates: the predictions are
  low there).
- A rank runs its chunks' calls (zigzag: chunks r and 2W-1-r, each over the keys up to its
  end), whichever plan brings the keys.
- Communication is the plan's bytes (:func:`sparsedsl.distributed.sequence_traffic`, the
  most a rank receives) over ``--link-gbps``; the selected blocks beyond the halo depend on
  the data, so the pooled plan's rows give none (``sel: 0``) and the bound (``sel: at most``).
  "serial" adds communication to compute, "overlapped" takes the larger: the plan posts
  every exchange ahead (docs/distributed.md says which waits remain).
- Dense causal ring attention: cuDNN's measured time per pair of the same run, the keys
  and values of the other ranks received once forward and twice backward (keys and values
  again, and their gradients' accumulators), overlapped by design.
- Memory per rank and layer: the keys and values a rank holds between forward and backward
  (``bench/cp_traffic.py``; the pooled plan lays a chunk's keys out from position 0 only
  while a call that reads them runs), and the largest float32
  block scores one scoring launch writes (queries x KV heads x blocks, before the top-k;
  at most ``SCORES_BYTES``: longer calls score in slices, and each slice's rows are as
  long as its last block, which the top-k's work follows).

    python bench/cp_expected_step.py --rows bench/results/nsa_2026-11-23_pool_kernels.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from cp_traffic import held_bytes

import sparsedsl
from sparsedsl.distributed import sequence_chunks, sequence_traffic
from sparsedsl.runtime.launch.selection import Selection
from sparsedsl.runtime.launch.selection import score_slices as slices_of

HEADS, KV_HEADS, HEAD_DIM = 64, 4, 128
CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, TOPK, WINDOW = 32, 16, 64, 16, 512
SELECTION = Selection(SEL_BLOCK, TOPK, per_block=False, pool_block=CMP_BLOCK, pool_stride=CMP_STRIDE)
PER_POSITION = KV_HEADS * HEAD_DIM * 2 * 2  # bytes of a key and a value, bf16
UNIT = {  # stage -> what its time is proportional to
    "cmp": "cmp", "scores": "cmp", "sel": "sel", "win": "win", "top-k / reverse index": "block scores",
    "gate mix": "queries", "softmax delta": "queries", "torch (casts, copies)": "queries", "pooling": "keys",
}  # fmt: skip


def units(start: int, stop: int) -> dict[str, float]:
    """The work of one call whose queries are positions start .. stop - 1 over keys 0 .. stop - 1."""
    t = np.arange(start, stop, dtype=np.float64)
    cmp = np.maximum(0, np.floor((t - CMP_BLOCK + 1) / CMP_STRIDE) + 1)
    own = t % SEL_BLOCK + 1  # the query's own block, causally
    sel = np.minimum(TOPK, t // SEL_BLOCK + 1) * SEL_BLOCK - SEL_BLOCK + own
    return {
        "cmp": HEADS * cmp.sum(), "sel": HEADS * sel.sum(), "win": HEADS * np.minimum(t + 1, WINDOW).sum(),
        "block scores": sum(KV_HEADS * (b - a) * -(-b // SEL_BLOCK) for a, b in score_slices(start, stop)),
        "queries": HEADS * (stop - start), "keys": KV_HEADS * stop, "dense": HEADS * (t + 1).sum(),
    }  # fmt: skip


def score_slices(start: int, stop: int) -> list[tuple[int, int]]:
    """The query positions each scoring launch of a call takes (at most SCORES_BYTES of float32
    scores: :func:`sparsedsl.runtime.launch.selection.score_slices`)."""
    return slices_of(SELECTION, stop - start, stop, KV_HEADS * -(-stop // SEL_BLOCK) * 4)


def fit(rows: list[dict], method: str) -> tuple[dict, dict, list[dict]]:
    """ms per unit of each stage, forward and backward, from the largest profile of ``method``;
    and the dense per-pair times of cuDNN at that length."""
    profiles = sorted((r for r in rows if r["kind"] == "profile" and r["method"] == method), key=lambda r: r["L"])
    top = profiles[-1]
    work = units(0, top["L"])
    per_unit = {
        direction: {stage: ms / work[UNIT[stage]] for stage, ms in stages.items() if stage in UNIT}
        for direction, stages in (("fwd", top["forward"]["stages"]), ("bwd", top["backward_stages"]))
    }
    cudnn = next(r for r in rows if r["kind"] == "time" and r["method"] == "sdpa_cudnn" and r["L"] == top["L"])
    dense = {"fwd": cudnn["fwd_ms"] / work["dense"], "bwd": (cudnn["fwd_bwd_ms"] - cudnn["fwd_ms"]) / work["dense"]}
    return per_unit, dense, profiles


def call_ms(per_unit: dict, work: dict, direction: str) -> float:
    return sum(ms * work[UNIT[stage]] for stage, ms in per_unit[direction].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="bench/results/nsa_2026-11-23_pool_kernels.json")
    parser.add_argument("--method", default="nsa_token")
    parser.add_argument("--lengths", default="131072,524288,1048576")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--link-gbps", type=float, default=360.0, help="bytes a rank receives per second, GB/s")
    args = parser.parse_args()
    rows = json.load(open(args.rows))["rows"]
    env = next(r for r in rows if r["kind"] == "env")
    per_unit, dense, profiles = fit(rows, args.method)
    print(f"single-GPU rows: {env['device']}, torch {env['torch']}, Triton {env['triton']}, {env['date']}; "
          f"fitted at L = {profiles[-1]['L']}; link {args.link_gbps:g} GB/s per rank\n")  # fmt: skip
    print("| L (one GPU) | measured fwd / bwd ms (stages) | predicted from the fit | predicted / measured |")
    print("|---|---|---|---|")
    for p in profiles:
        work = units(0, p["L"])
        measured = [sum(v for s, v in stages.items() if s in UNIT) for stages in (p["forward"]["stages"], p["backward_stages"])]
        predicted = [call_ms(per_unit, work, d) for d in ("fwd", "bwd")]
        print(f"| {p['L'] // 1024}k | {measured[0]:.1f} / {measured[1]:.1f} | {predicted[0]:.1f} / {predicted[1]:.1f} | "
              f"{predicted[0] / measured[0]:.2f} / {predicted[1] / measured[1]:.2f} |")  # fmt: skip
    gib, link = 2**30, args.link_gbps * 1e9 / 1e3  # bytes per ms
    nsa = sparsedsl.load("nsa")
    print("\n| L | W | plan | compute fwd / bwd ms | comm fwd / bwd ms | fwd+bwd serial | fwd+bwd overlapped | K/V held | block scores |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        W = args.world
        traffic = sequence_traffic(nsa, length, W, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
        worst = {"fwd": 0.0, "bwd": 0.0, "dense_fwd": 0.0, "dense_bwd": 0.0, "scores": 0}
        for r in range(W):  # the slowest rank sets the step
            calls = [units(a, b) for a, b in sequence_chunks(length, W, r, "zigzag")]
            for key, value in (("fwd", sum(call_ms(per_unit, c, "fwd") for c in calls)),
                               ("bwd", sum(call_ms(per_unit, c, "bwd") for c in calls)),
                               ("dense_fwd", sum(c["dense"] for c in calls) * dense["fwd"]),
                               ("dense_bwd", sum(c["dense"] for c in calls) * dense["bwd"]),
                               ("scores", max(max((b - a) * KV_HEADS * -(-b // SEL_BLOCK) * 4 for a, b in score_slices(*chunk))
                                              for chunk in sequence_chunks(length, W, r, "zigzag")))):  # fmt: skip
                worst[key] = max(worst[key], value)
        halo_pooled = max(traffic.received) / link, max(traffic.gradient_received) / link
        selected = max(traffic.selected_at_most[0]) / link, max(traffic.selected_at_most[1]) / link
        gathered = sequence_traffic(nsa, length, W, kv_heads=KV_HEADS, head_dim=HEAD_DIM, plan="all-gather")
        everything = max(gathered.received) / link  # the all-gather's, and the ring's per pass
        rows_out = [
            ("NSA, pooled plan, sel: 0", worst["fwd"], worst["bwd"], *halo_pooled, held_bytes(nsa, traffic, length, W, PER_POSITION)),
            ("NSA, pooled plan, sel: at most", worst["fwd"], worst["bwd"], halo_pooled[0] + selected[0],
             halo_pooled[1] + selected[1], held_bytes(nsa, traffic, length, W, PER_POSITION, selected=True)),
            ("NSA, all-gather of K/V (`cp_plan=\"all-gather\"`)", worst["fwd"], worst["bwd"], everything,
             max(gathered.gradient_received) / link, held_bytes(nsa, gathered, length, W, PER_POSITION)),
        ]  # fmt: skip
        for name, f, b, cf, cb, kv in rows_out:
            print(f"| {length // 1024}k | {W} | {name} | {f:,.1f} / {b:,.1f} | {cf:.1f} / {cb:.1f} | {f + b + cf + cb:,.1f} | "
                  f"{max(f, cf) + max(b, cb):,.1f} | {kv / gib:.2f} GiB | {worst['scores'] / gib:.2f} GiB |")  # fmt: skip
        f, b = worst["dense_fwd"], worst["dense_bwd"]
        print(f"| {length // 1024}k | {W} | dense causal, ring (cuDNN) | {f:,.1f} / {b:,.1f} | {everything:.1f} / {2 * everything:.1f} | "
              f"{f + b + 3 * everything:,.1f} | {max(f, everything) + max(b, 2 * everything):,.1f} | "
              f"{2 * length // W * PER_POSITION / gib:.2f} GiB | - |")  # fmt: skip


if __name__ == "__main__":
    main()
