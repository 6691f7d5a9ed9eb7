"""Training quality of attention layers beyond recall at 128 tokens (that is
bench/diagnose_recall.py; docs/training.md): language modelling on packed standard-library
files (`lm`, validation bits per byte), every layer over several seeds trained together as
one stacked model (sparsedsl.training.train_seeds), bf16 autocast on a GPU.

A study fixes the task, its length, the model and the schedule, so that runs of other
seeds or other layers compare; a layer is `dense` (SDPA) or a pattern name with
parameters (`nsa_packed`, `nsa_packed:window=256`). The studies of issue 13's targets:

    lm2k   lm at 2,048 bytes: the control, dense against `document` (causal within files)
    lm8k   lm at 8,192: NSA (nsa_packed) against dense, validation bpb within 1%
    lm16k  lm at 16,384: NSA reaching dense's final loss in less GPU time
    recall16k  recall through a curriculum (128, 1k, 4k, 16k tokens; 8,000 steps at 128
           as in diagnose_recall.py, then 1,000, 600 and 300 steps, fewer rows per step
           as the rows grow), then the trained model's needle accuracy by depth at 4k, 8k
           and 16k (RULER-style: one key among 8 distractor pairs, every length within
           the trained one)

    python bench/train_quality.py run --study lm2k --layer dense --seeds 0-2 --out DIR [--time-limit S --state F]
    python bench/train_quality.py summary DIR [DIR ...] [--json FILE]
    python bench/train_quality.py run --study smoke --layer document --seeds 0-1 --out /tmp/tq   # CPU check

A run stopped by --time-limit saves its state to --state and goes on from there when
started again with the same arguments. `summary` pools each (study, layer)'s seeds over
the folders given and prints, per layer: the final metric's mean and sample std, its
relative difference from dense and the permutation test of the means against dense
(exact for small seed counts), the median step time, the training seconds to the end,
and the first evaluation at which the layer's mean reached dense's final mean (the
time-to-loss comparison: lower is better for bpb, higher for accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import parse_seeds, training_step_ms

from sparsedsl.training.loop import TrainConfig, train_seeds
from sparsedsl.training.models import DENSE, ModelSpec
from sparsedsl.training.objectives import (
    HELD_OUT_SEED,
    SOLVED,
    LanguageModel,
    Needle,
    Recall,
)
from sparsedsl.training.stats import permutation_test, summarize


@dataclass(frozen=True)
class Study:
    objective: object
    config: TrainConfig
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    about: str = ""
    # after the final evaluation: the trained model's needle accuracy at these lengths
    needle_lengths: tuple[int, ...] = ()


NEEDLE_SEED = HELD_OUT_SEED - 1  # the needle evaluation's data: apart from every run's own
_LM = dict(lr=1e-3, warmup=200, weight_decay=0.1, eval_every=250, eval_batches=8)
STUDIES = {
    "lm2k": Study(LanguageModel(seq=2048), TrainConfig(steps=2000, batch=16, **_LM), about="lm at 2k: the control"),
    "lm8k": Study(LanguageModel(seq=8192), TrainConfig(steps=2000, batch=4, **_LM), about="lm at 8k: NSA within 1%"),
    "lm16k": Study(LanguageModel(seq=16384), TrainConfig(steps=2000, batch=2, **_LM), about="lm at 16k: time to loss"),
    "recall16k": Study(Recall(seq=16384, pairs=16, queries=16), TrainConfig(
        steps=9900, batch=4, lr=1e-3, warmup=200, eval_every=200, eval_batches=4, curriculum=(
            (8000, {"seq": 128, "pairs": 8, "queries": 8, "batch": 64}),
            (1000, {"seq": 1024, "batch": 32}), (600, {"seq": 4096, "batch": 16}))),
        layers=2, needle_lengths=(4096, 8192, 16384), about="recall to 16k, then needle at 4k-16k"),
    # CPU smoke tests of the script itself: a few steps of a tiny model
    "smoke_recall": Study(Recall(seq=64, pairs=4, queries=4), TrainConfig(
        steps=6, batch=2, warmup=1, eval_every=2, eval_batches=1, curriculum=((4, {"seq": 32, "batch": 3}),)),
        hidden=32, layers=1, heads=2, kv_heads=1, needle_lengths=(32, 64), about="CPU smoke test"),  # fmt: skip
    "smoke": Study(LanguageModel(seq=64, max_bytes=200_000), TrainConfig(steps=4, batch=2, warmup=1, eval_every=2,
                   eval_batches=1), hidden=32, layers=1, heads=2, kv_heads=1, about="CPU smoke test"),  # fmt: skip
}


LAYER_OPTIONS = ("normalize_gates", "kv_per_branch")  # SparseAttention's own keywords, not the pattern's


def parse_layer(layer: str) -> dict:
    """``dense`` or ``PATTERN[:name=value,...]`` as the ModelSpec fields ``attention``,
    ``params`` and, for the names in LAYER_OPTIONS (``nsa_packed:normalize_gates=1``), the
    layer's options."""
    name, _, given = layer.partition(":")
    params, options = {}, {}
    for item in filter(None, given.split(",")):
        key, _, value = item.partition("=")
        if key in LAYER_OPTIONS:
            if value.lower() not in ("0", "1", "false", "true"):
                raise SystemExit(f"--layer {layer}: {key}={value}: expected 1 or 0 (true or false)")
            options[key] = value.lower() in ("1", "true")
        else:
            params[key] = int(value) if value.lstrip("-").isdigit() else value
    return {"attention": DENSE if name == DENSE else name, "params": params, **options}


def layer_spec(study: Study, layer: str) -> ModelSpec:
    """``dense`` or ``PATTERN[:name=value,...]`` as the model of ``study``."""
    return ModelSpec(vocab=study.objective.vocab_size, hidden=study.hidden, layers=study.layers, heads=study.heads,
                     kv_heads=study.kv_heads, **parse_layer(layer))  # fmt: skip


def run(args) -> None:
    study = STUDIES[args.study]
    seeds = parse_seeds(args.seeds)
    config = replace(study.config, steps=args.steps or study.config.steps, device=args.device)
    state = Path(args.state) if args.state else None
    resume = torch.load(state, map_location=args.device, weights_only=False) if state and state.exists() else None

    def on_eval(record: dict, model) -> None:
        if record["step"] == config.steps and study.needle_lengths:
            record["needle"] = needle_by_length(model, study, config.device)
        metric = {k: v for k, v in record.items() if k in ("val_bpb", "accuracy", "needle")}
        print(f"{args.layer} step {record['step']}: {metric} {record['seconds']:.0f} s", flush=True)

    runs = train_seeds(layer_spec(study, args.layer), study.objective, config, seeds, time_limit=args.time_limit,
                       resume=resume, on_eval=on_eval)  # fmt: skip
    if not runs.complete:
        torch.save(runs.state, state)
        print(f"{args.layer}: stopped at step {runs.state['step']}, state in {state}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = [{k: v for k, v in log.items() if k not in ("loss", "step_seconds")} | {"step_ms": training_step_ms(log)}
            for log in runs.logs]  # fmt: skip
    document = {"study": args.study, "layer": args.layer, "seeds": seeds, "steps": config.steps,
                "complete": runs.complete, "logs": logs}  # fmt: skip
    (out / f"{args.study}_{args.layer.replace(':', '_').replace(',', '_')}.json").write_text(json.dumps(document))


def needle_by_length(model, study: Study, device: str) -> dict[str, dict]:
    """Needle accuracy of a trained model at each of the study's lengths, by depth; every
    model is asked the same needles (one generator seed for all), so layers compare pairwise."""
    device = torch.device(device)
    rows = max(1, min(64, 64 * 1024 // max(study.needle_lengths)))  # 4 rows a batch at 16k
    found = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for length in study.needle_lengths:
            needle = Needle(vocab=study.objective.vocab, seq=length)
            generator = torch.Generator().manual_seed(NEEDLE_SEED)
            found[str(length)] = needle.evaluate(model, rows, study.config.eval_batches * 2, generator, device)
    return found


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(args) -> dict:
    """The table of one or more folders: a (study, layer)'s seeds pooled over folders."""
    pooled: dict[tuple[str, str], dict] = {}
    for folder in args.folders:
        for path in sorted(Path(folder).glob("*.json")):
            document = json.loads(path.read_text())
            if "study" not in document:
                continue
            known = pooled.setdefault((document["study"], document["layer"]), {"logs": [], "complete": True})
            known["logs"] += document["logs"]
            known["complete"] &= document["complete"]
    rows = {}
    for (study, layer), document in sorted(pooled.items()):
        logs = [log for log in document["logs"] if log["evals"]]
        if not logs:
            continue
        metric = "val_bpb" if "val_bpb" in logs[0]["evals"][-1] else "accuracy"
        finals = [log["evals"][-1][metric] for log in logs]
        # the mean curve over seeds, at the evaluations every seed reached
        reached = min(len(log["evals"]) for log in logs)
        curve = [(statistics.fmean(log["evals"][i]["seconds"] for log in logs),
                  statistics.fmean(log["evals"][i][metric] for log in logs),
                  logs[0]["evals"][i]["step"]) for i in range(reached)]  # fmt: skip
        rows[f"{study} {layer}"] = {"study": study, "layer": layer, "metric": metric, "finals": finals,
                                    **summarize(finals), "step": curve[-1][2], "seconds": curve[-1][0],
                                    "step_ms": _median([log["step_ms"] for log in logs if log["step_ms"]]),
                                    "curve": curve, "complete": document["complete"],
                                    "phase_ends": _phase_ends(logs, metric), "needle": _needle_by_seed(logs)}  # fmt: skip
    print(f"{'study':<6} {'layer':<24} {'step':>6} {'seeds':>5} {'metric':>8} {'mean':>8} {'std':>7} "
          f"{'vs dense':>9} {'perm. p':>7} {'ms/step':>8} {'train s':>8} {'s to dense final':>16}")  # fmt: skip
    for row in rows.values():
        base = rows.get(f"{row['study']} {DENSE}")
        difference = p = to_dense = float("nan")
        if base is not None and row["layer"] != DENSE:
            difference = row["mean"] / base["mean"] - 1 if base["mean"] else float("nan")
            p = permutation_test(row["finals"], base["finals"])
            better = (lambda v: v <= base["mean"]) if row["metric"] == "val_bpb" else (lambda v: v >= base["mean"])
            to_dense = next((seconds for seconds, value, _ in row["curve"] if better(value)), float("nan"))
        row.update(relative_to_dense=difference, permutation_p_vs_dense=p, seconds_to_dense_final=to_dense)
        print(f"{row['study']:<6} {row['layer']:<24} {row['step']:>6} {row['n']:>5} {row['metric']:>8} {row['mean']:>8.4f} "
              f"{row['std']:>7.4f} {difference:>+9.2%} {p:>7.3f} {row['step_ms']:>8.1f} {row['seconds']:>8.0f} "
              f"{to_dense:>16.0f}")  # fmt: skip
    _print_lengths_and_needles(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def _phase_ends(logs: list[dict], metric: str) -> dict[str, list[float]]:
    """Each seed's metric at the last evaluation of every length it trained at."""
    ends: dict[str, list[float]] = {}
    for log in logs:
        last = {str(record["seq"]): record[metric] for record in log["evals"]}  # later evaluations overwrite
        for seq, value in last.items():
            ends.setdefault(seq, []).append(value)
    return ends


def _needle_by_seed(logs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Each seed's needle accuracy by length and depth (empty without a needle evaluation)."""
    found = [log["evals"][-1]["needle"] for log in logs if "needle" in log["evals"][-1]]
    if not found:
        return {}
    return {length: {depth: [f[length]["accuracy_by_depth"][depth] for f in found]
                     for depth in found[0][length]["accuracy_by_depth"]} for length in found[0]}  # fmt: skip


def _print_lengths_and_needles(rows: dict) -> None:
    """Accuracy studies: the share of seeds solving at the end of each length, and, where the
    study asked the needle, its mean accuracy by length and depth."""
    for row in rows.values():
        if row["metric"] != "accuracy":
            continue
        ends = "  ".join(f"{seq}: {sum(v >= SOLVED for v in values)}/{len(values)} solved, mean {statistics.fmean(values):.3f}"
                         for seq, values in row["phase_ends"].items())  # fmt: skip
        print(f"{row['study']} {row['layer']}: {ends}")
        base = rows.get(f"{row['study']} {DENSE}", {}).get("needle", {}) if row["layer"] != DENSE else {}
        for length, depths in row["needle"].items():
            cells = []
            for depth, values in depths.items():
                cell = f"{float(depth):.2f}: {statistics.fmean(values):.3f}"
                if length in base:  # the permutation test against dense's seeds at this depth
                    cell += f" (p {permutation_test(values, base[length][depth]):.2f})"
                cells.append(cell)
            print(f"  needle at {length}, mean by depth: " + "  ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one layer of one study over several seeds")
    one.add_argument("--study", choices=sorted(STUDIES), required=True)
    one.add_argument("--layer", required=True, help="dense, or a pattern: nsa_packed, document, nsa_packed:window=256, nsa_packed:normalize_gates=1")
    one.add_argument("--seeds", default="0-2", help="0-2 or 0,3,5")
    one.add_argument("--steps", type=int, default=None, help="instead of the study's steps")
    one.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of training")
    one.add_argument("--state", default=None, help="where a run stopped by --time-limit saves itself, and resumes from")
    one.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    one.add_argument("--out", default=".", help="folder of the JSON logs")
    table = commands.add_parser("summary", help="the table of folders of logs, a layer's seeds pooled")
    table.add_argument("folders", nargs="+")
    table.add_argument("--json", default=None, help="where to write the rows")
    args = parser.parse_args(argv)
    {"run": run, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
