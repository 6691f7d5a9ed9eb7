"""Bytes per rank and layer of context parallelism, from the plans the calls run
(``sparsedsl.distributed.sequence_traffic``; no GPU, no process group): the paper's NSA
shape (4 KV heads of dimension 128, bf16: 2 KiB of keys and values per position) on W
ranks, zigzag layout, for NSA, `causal`, `sliding_window(4096)` and `streaming(4, 4096)`.
Ring attention for dense causal moves what the all-gather moves ((W-1)/W of the keys and
values reach every rank, in W-1 steps), so its row is the all-gather's.

    python bench/cp_traffic.py --lengths 131072,524288,1048576 --world 8
"""

from __future__ import annotations

import argparse

import sparsedsl
from sparsedsl.distributed import sequence_traffic

PATTERNS = {"nsa": {}, "causal": {}, "sliding_window": {"window": 4096}, "streaming": {"sinks": 4, "window": 4096}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,524288,1048576")
    parser.add_argument("--world", type=int, default=8)
    args = parser.parse_args()
    mib = 2**20
    print("| length | pattern | plan | forward: most received by a rank | backward: most gradient received | K/V held by a rank |")
    print("|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        for name, params in PATTERNS.items():
            traffic = sequence_traffic(sparsedsl.load(name, **params), length, args.world, kv_heads=4, head_dim=128)
            local = length // args.world * 4 * 128 * 2 * 2
            held = local + max(traffic.received)
            print(f"| {length // 1024}k | `{name}` | {traffic.plan} | {max(traffic.received) / mib:,.1f} MiB | "
                  f"{max(traffic.gradient_received) / mib:,.1f} MiB | {held / mib:,.1f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
