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
from sparsedsl.distributed import sequence_traffic
from sparsedsl.distributed.pooled import window_slots

COMPRESS_AND_WINDOW = """pattern nsa_cmp_win() {
    cmp = compress(block=32, stride=16, pool=mean)
    win = causal & sliding(512)
    return gate(cmp, win)
}"""
PATTERNS = {"nsa": {}, "causal": {}, "sliding_window": {"window": 4096}, "streaming": {"sinks": 4, "window": 4096},
            "gate(cmp, win)": COMPRESS_AND_WINDOW}  # fmt: skip


def held_bytes(pattern, traffic, length: int, world: int, per_position: int, selected: bool = False) -> int:
    """Keys and values a rank holds between a layer's forward and its backward (the most
    over the ranks): its own and what it received (``selected``: with the selected blocks'
    bound, ``Traffic.selected_at_most``); the pooled plan's gathers hold its own pooled keys
    too. (The pooled plan lays a chunk's keys out from position 0 only while a call that
    reads them runs: ``distributed.pooled.KeptAsPieces``.)"""
    own = length // world * per_position
    if traffic.plan.startswith("pooled"):  # (zigzag: two chunks a rank)
        own += sum(2 * window_slots(length, world, "zigzag", b.stride) for b in pattern.checked.compress_branches()) * per_position
    extra = traffic.selected_at_most[0] if selected else (0,) * world
    return own + max(received + more for received, more in zip(traffic.received, extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="131072,524288,1048576")
    parser.add_argument("--world", type=int, default=8)
    args = parser.parse_args()
    mib = 2**20
    print("| length | pattern | plan | forward: most received by a rank | of which halo / pooled | selected blocks: at most "
          "| backward: most gradient received | K/V held by a rank |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for length in map(int, args.lengths.split(",")):
        for name, params in PATTERNS.items():
            pattern = sparsedsl.compile_source(params) if isinstance(params, str) else sparsedsl.load(name, **params)
            traffic = sequence_traffic(pattern, length, args.world, kv_heads=4, head_dim=128)
            held = held_bytes(pattern, traffic, length, args.world, 4 * 128 * 2 * 2)
            parts = dict(traffic.parts)
            split = " / ".join(f"{max(parts[p]) / mib:,.1f}" if p in parts else "-" for p in ("halo", "pooled"))
            selected = f"{max(traffic.selected_at_most[0]) / mib:,.1f} MiB" if traffic.selected_at_most else "-"
            print(f"| {length // 1024}k | `{name}` | {traffic.plan} | {max(traffic.received) / mib:,.1f} MiB | {split} | "
                  f"{selected} | {max(traffic.gradient_received) / mib:,.1f} MiB | {held / mib:,.1f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
