"""Results over seeds: summaries and the two comparison tests the docs report.

A training result is a distribution: each claim compares several seeds of one model with
several of another. Accuracy tasks with a sudden transition compare the share of seeds
that solve the task (Fisher's exact test on the 2x2 table); continuous results (final
accuracy, validation loss) compare their means (a two-sided permutation test, every split of
the pooled values enumerated, or 100,000 random ones for many seeds, so no distribution
is assumed).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics


def summarize(values: list[float], solved: list[bool | None] | None = None) -> dict:
    """Mean, sample standard deviation (0 for one value), count and, when ``solved`` holds
    booleans, the share of seeds that solved the task."""
    if not values:
        raise ValueError("summarize needs at least one value")
    known = [s for s in (solved or []) if s is not None]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "solved_share": sum(known) / len(known) if known else None,
    }


def fisher_exact(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """Two-sided p-value of Fisher's exact test: are the success shares of a and b equal?
    Sums the hypergeometric probabilities of every table with the same margins that is no
    more likely than the observed one."""
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b) or n_a + n_b == 0:
        raise ValueError(f"fisher_exact: bad counts {successes_a}/{n_a}, {successes_b}/{n_b}")
    total = successes_a + successes_b

    def probability(x: int) -> float:  # x successes in a, given the margins
        return math.comb(n_a, x) * math.comb(n_b, total - x) / math.comb(n_a + n_b, total)

    observed = probability(successes_a)
    low, high = max(0, total - n_b), min(n_a, total)
    return min(1.0, sum(p for x in range(low, high + 1) if (p := probability(x)) <= observed * (1 + 1e-9)))


def permutation_test(a: list[float], b: list[float], limit: int = 200_000, draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value that a and b have equal means: the share of the ways to split the
    pooled values into groups of their sizes whose mean difference is at least the one
    observed. Exact while there are at most ``limit`` splits (C(16, 8) = 12,870 for 8 seeds
    each); beyond, ``draws`` random splits from a fixed ``seed`` estimate it, counting the
    observed split among them ((extreme + 1) / (draws + 1)) so the estimate is never 0."""
    if not a or not b:
        raise ValueError("permutation_test needs values on both sides")
    pooled, n = [*a, *b], len(a)
    total = sum(pooled)
    observed = abs(sum(a) / n - (total - sum(a)) / len(b))

    def extreme(chosen) -> bool:
        s = sum(pooled[i] for i in chosen)
        return abs(s / n - (total - s) / len(b)) >= observed - 1e-12

    splits = math.comb(len(pooled), n)
    if splits <= limit:
        return sum(map(extreme, itertools.combinations(range(len(pooled)), n))) / splits
    rng = random.Random(seed)
    hits = sum(extreme(rng.sample(range(len(pooled)), n)) for _ in range(draws))
    return (hits + 1) / (draws + 1)
