"""Training-step time of the harness's small models (sparsedsl.training), per attention
layer, with the kernels that take the step's time: where `explore --train` and the
training studies spend theirs.

Each layer's model (ModelSpec: dense SDPA or a pattern with parameters) is stacked over
--seeds seeds as the studies train it, on batches of the task at --seq, bf16 autocast;
the step (forward, backward, clipping, AdamW) is timed over --steps steps after --warmup,
then one step is profiled.

    python bench/bench_train_step.py --layers "dense;nsa;nsa:sel_topk=8,window=256" --task recall --seq 1024 \\
        --batch 64 --seeds 2 --out DIR
    python bench/bench_train_step.py --layers "dense;nsa_packed" --task lm --seq 8192 --batch 4 --seeds 3 --depth 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Log, environment, kernel_times  # noqa: E402
from train_quality import parse_layer  # noqa: E402

from sparsedsl.training.loop import seeds_batch, training_step  # noqa: E402
from sparsedsl.training.models import Decoder, ModelSpec  # noqa: E402
from sparsedsl.training.objectives import make_objective  # noqa: E402
from sparsedsl.training.stacking import stack  # noqa: E402


def step_function(spec: ModelSpec, objective, batch: int, seeds: int):
    """One training step of ``seeds`` stacked models of ``spec`` (a closure over its state)."""
    members = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        members.append(Decoder(spec))
    model = stack(members).cuda()
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    generators = [torch.Generator().manual_seed(seed) for seed in range(seeds)]
    batches = [seeds_batch([objective.batch(batch, g) for g in generators]).to("cuda") for _ in range(4)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    count = [0]

    def step() -> None:
        training_step(model, parameters, optimizer, batches[count[0] % len(batches)], seeds, autocast)
        count[0] += 1

    return step


def time_layer(log: Log, layer: str, args) -> None:
    objective = make_objective(args.task, args.seq)
    spec = ModelSpec(vocab=objective.vocab_size, hidden=args.hidden, layers=args.depth, heads=args.heads,
                     kv_heads=args.kv_heads, **parse_layer(layer))  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step = step_function(spec, objective, args.batch, args.seeds)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    kernels = kernel_times(step, calls=2)
    top = {name[:90]: round(us / 1e3, 3) for name, us in list(kernels.items())[: args.top]}
    log.add(kind="step", layer=layer, task=args.task, seq=args.seq, batch=args.batch, seeds=args.seeds,
            hidden=args.hidden, depth=args.depth, heads=args.heads, kv_heads=args.kv_heads,
            step_ms=statistics.median(times), warmup_s=first_s, kernels_ms=sum(kernels.values()) / 1e3,
            peak_mb=torch.cuda.max_memory_allocated() / 2**20, top_kernels_ms=top)  # fmt: skip


def summarize(log: Log) -> None:
    env = next(r for r in log.rows if r["kind"] == "env")
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    rows = [r for r in log.rows if r["kind"] == "step"]
    dense = next((r for r in rows if r["layer"] == "dense"), None)
    print(f"{'layer':<34} {'step ms':>8} {'x dense':>8} {'kernels ms':>10} {'warm-up s':>9} {'peak MiB':>9}")
    for r in rows:
        ratio = f"{r['step_ms'] / dense['step_ms']:.2f}" if dense else "-"
        print(f"{r['layer']:<34} {r['step_ms']:>8.2f} {ratio:>8} {r['kernels_ms']:>10.2f} {r['warmup_s']:>9.1f} {r['peak_mb']:>9.0f}")
    for r in rows:
        print(f"\n{r['layer']}: " + "; ".join(f"{name} {ms:.2f}" for name, ms in r["top_kernels_ms"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="dense,nsa", help="';'-separated: dense or PATTERN[:name=value,...]")
    parser.add_argument("--task", default="recall", choices=("recall", "needle", "lm"))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="per seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2, help="layers of the model")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per layer")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    log = Log(args.out)
    log.add(kind="env", **environment())
    for layer in args.layers.split(";"):
        time_layer(log, layer, args)
    summarize(log)


if __name__ == "__main__":
    main()
