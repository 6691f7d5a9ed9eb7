"""Bytes per rank and layer of context parallelism, from the plans the calls run
(``sparsedsl.distributed.sequence_traffic``; no GPU, no process group): the paper's NSA
shape (4 KV heads of dimension 128, bf16: 2 KiB of keys and values per position) on W
ranks, zigzag layout, for NSA, `causal`, `sliding_window(4096)`, `streaming(4, 4096)` and
NSA's compressed and window branches alone (`gate(cmp, win)`, the pooled plan).
Ring attention for dense causal moves what the all-gather moves ((W-1)/W of the keys and
values reach every rank, in W-1 steps), so its row is the all-gather's.

    python bench/cp_traffic.py --lengths 131072,524288,1048576 --world 8
"""

from __future__ import annotations

import argparse

import sparsedsl
from sparsedsl.distributed import sequence_chunks, sequence_traffic

COMPRESS_AND_WINDOW = """pattern nsa_cmp_win() {
    cmp = compress(block=32, stride=16, pool=mean)
    win = causal & sliding(512)
    return gate(cmp, win)
}"""
PATTERNS = {"nsa": {}, "causal": {}, "sliding_window": {"window": 4096}, "streaming": {"sinks": 4, "window": 4096},
            "gate(cmp, win)": COMPRESS_AND_WINDOW}  # fmt: skip


def held_bytes(pattern, traffic, length: int, world: int, per_position: int, selected: bool = False) -> tuple[int, int]:
    """Keys and values a rank holds in the call (the most over the ranks): between forward
    and backward, its own and what it received (``selected``: with the selected blocks'
    bound, ``Traffic.selected_at_most``); and at the peak of a chunk's call, where the
    pooled plan lays that chunk's keys out at their positions from 0 (the kernels index
    keys by position) with its prefix of the pooled keys, which live only while the call
    runs (the backward lays them out again: ``distributed.pooled.KeptAsPieces``)."""
    own = length // world * per_position
    held = [own + received + (traffic.selected_at_most[0][r] if selected else 0) for r, received in enumerate(traffic.received)]
    if not traffic.plan.startswith("pooled"):
        return max(held), max(held)
    strides = [b.stride for b in pattern.checked.compress_branches()]
    stops = [max(stop for _, stop in sequence_chunks(length, world, r, "zigzag")) for r in range(world)]
    return max(held), max(h + stop * per_position + sum(stop // s for s in strides) * per_position for h, stop in zip(held, stops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,524288,1048576")
    parser.add_argument("--world", type=int, default=8)
    args = parser.parse_args()
    mib = 2**20
    print("| length | pattern | plan | forward: most received by a rank | of which halo / pooled | selected blocks: at most "
          "| backward: most gradient received | K/V held by a rank (peak in a call) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        for name, params in PATTERNS.items():
            pattern = sparsedsl.compile_source(params) if isinstance(params, str) else sparsedsl.load(name, **params)
            traffic = sequence_traffic(pattern, length, args.world, kv_heads=4, head_dim=128)
            held, peak = held_bytes(pattern, traffic, length, args.world, 4 * 128 * 2 * 2)
            parts = dict(traffic.parts)
            split = " / ".join(f"{max(parts[p]) / mib:,.1f}" if p in parts else "-" for p in ("halo", "pooled"))
            selected = f"{max(traffic.selected_at_most[0]) / mib:,.1f} MiB" if traffic.selected_at_most else "-"
            print(f"| {length // 1024}k | `{name}` | {traffic.plan} | {max(traffic.received) / mib:,.1f} MiB | {split} | "
                  f"{selected} | {max(traffic.gradient_received) / mib:,.1f} MiB | {held / mib:,.1f} MiB ({peak / mib:,.1f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
