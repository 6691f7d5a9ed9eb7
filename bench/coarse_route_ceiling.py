"""How far the compressed branch's coarse route alone gets on the recall task of
docs/training.md (128 tokens, 8 pairs, 8 queries), for pooling windows of several sizes.

The coarse route answers a query for key X from pooled keys and values only: it finds the
pooled windows that hold X (each window of `block` keys, one every `stride`, pools its
keys and values) and reads the superposed values of those windows. The best it can do is
to pick, among the value tokens lying in every window that holds X, one that no earlier
query has answered (the "copy an unanswered value" trick that gives the dense models'
plateau). This script computes that ceiling exactly on held-out batches, overall and per
query index, with no model and no GPU:

    python bench/coarse_route_ceiling.py [--batches 100]

With NSA's windows (32 every 16) the ceiling is 0.756, rising from 0.58 for the first
query to 0.96 for the last; the stalled NSA models measured 0.72-0.80, rising from
0.6-0.7 to 0.86-0.93 (docs/training.md). Other window sizes give other ceilings: a
prediction the next GPU sweep tests (`nsa_c16`, `nsa_c64` in bench/diagnose_recall.py).
"""

from __future__ import annotations

import argparse

import torch

from sparsedsl.training.objectives import HELD_OUT_SEED, Recall

TASK = Recall(seq=128, pairs=8, queries=8)


def coarse_route_accuracy(block: int, stride: int, batches: int, exclusion: bool = True) -> torch.Tensor:
    """The expected accuracy per query index of the best coarse-route answer."""
    vocab, context = TASK.vocab, TASK.seq - 2 * TASK.queries
    windows = [(start, start + block) for start in range(0, context - block + 1, stride)]
    generator = torch.Generator().manual_seed(HELD_OUT_SEED)
    expected, rows = torch.zeros(TASK.queries), 0
    for _ in range(batches):
        for row in TASK.batch(64, generator).tokens.tolist():
            answered: set[int] = set()
            for query in range(TASK.queries):
                key, value = row[context + 2 * query], row[context + 2 * query + 1]
                where = row[:context].index(key)
                holding = [w for w in windows if w[0] <= where < w[1]]
                # No window holds the key (the context's tail): the route sees every value.
                lo, hi = (max(w[0] for w in holding), min(w[1] for w in holding)) if holding else (0, context)
                candidates = {t for t in row[lo:hi] if vocab.value_base <= t < vocab.value_base + vocab.values}
                if exclusion and candidates - answered:
                    candidates -= answered
                expected[query] += (value in candidates) / len(candidates)
                answered.add(value)
            rows += 1
    return expected / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=100, help="held-out batches of 64 rows")
    args = parser.parse_args()
    print(f"{'block':>5} {'stride':>6} {'ceiling':>7}  per query index")
    for block, stride in ((32, 16), (16, 8), (64, 32), (32, 32)):
        per_query = coarse_route_accuracy(block, stride, args.batches)
        print(f"{block:>5} {stride:>6} {per_query.mean().item():>7.3f}  {' '.join(f'{x:.2f}' for x in per_query.tolist())}")
    alone = coarse_route_accuracy(32, 16, args.batches, exclusion=False).mean().item()
    print(f"32/16 without the exclusion of answered values: {alone:.3f}")


if __name__ == "__main__":
    main()
