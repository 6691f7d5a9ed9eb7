"""The trainability study of docs/training.md: associative recall at 128 tokens (8 pairs,
8 queries, batch 64, 2 layers, hidden 256, 4 heads = 4 KV heads, AdamW lr 1e-3, warmup
200, cosine over 8,000 steps, bf16 autocast on a GPU), every variant over several seeds
trained together as one stacked model (sparsedsl.training.train_seeds).

Every evaluation also records, per seed, the held-out accuracy per query index and per
position of the queried pair in the context, and the mean gates of each layer over all
positions and over the query positions; at the end, the loss gradients of the first
seed's trained model on the kernels (bf16 autocast and fp32) are compared with the
float64 reference path (no kernels).

    python bench/diagnose_recall.py run --variant nsa --seeds 0-7 --out DIR [--time-limit S --state FILE]
    python bench/diagnose_recall.py sweep --variants dense,causal,nsa --seeds 0-7 --out DIR --time-limit S --state-dir D
    python bench/diagnose_recall.py gradients --seeds 0-7 --out DIR [--time-limit S]
    python bench/diagnose_recall.py summary DIR [DIR ...] [--json FILE]

`sweep` runs one process per variant at once (one GPU), then prints `summary`: per variant
(its seeds pooled over the folders given) the share of seeds that solve the task (held-out
accuracy >= 0.99), mean and sample std of the final accuracy, Fisher's exact test of the
solved shares and the permutation test of the mean against dense SDPA. A run
stopped by --time-limit saves its state to --state (sweep: --state-dir/VARIANT.pt) and goes
on from there when started again with the same arguments. `gradients` trains dense SDPA
and compares, at every evaluation, SDPA's and the causal kernels' bf16 loss gradients on
its weights with float64 (the control of docs/training.md). Several processes share one
GPU best under CUDA MPS (`nvidia-cuda-mps-control -d` before the sweep).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from common import parse_seeds, training_step_ms

import sparsedsl
from sparsedsl.frontend.resources import shipped_pattern_path
from sparsedsl.training.loop import TrainConfig, train_seeds
from sparsedsl.training.models import DENSE, Decoder, ModelSpec
from sparsedsl.training.objectives import HELD_OUT_SEED, Recall
from sparsedsl.training.stats import fisher_exact, permutation_test, summarize

TASK = Recall(seq=128, pairs=8, queries=8)
CONFIG = TrainConfig(steps=8000, batch=64, lr=1e-3, warmup=200, eval_every=500)
BUCKETS = 8  # positions of the queried pair in the context, in this many equal parts
COMMON = dict(vocab=TASK.vocab_size, hidden=256, layers=2, heads=4, kv_heads=4)


def nsa_scores_only() -> sparsedsl.Pattern:
    """NSA whose compressed branch only scores the selection (InfLLM-v2's design): its
    output mixes the selected and window branches alone."""
    source = shipped_pattern_path("nsa").read_text().replace("return gate(cmp, sel, win)", "return gate(sel, win)")
    return sparsedsl.compile_source(source)


def zero_gates(bias: list[float]) -> Callable[[Decoder], None]:
    """Gate projections with zero weights and these biases per branch (every head alike):
    gates that start as sigmoid(bias) at every token."""

    def prepare(model: Decoder) -> None:
        for block in model.blocks:
            projection = block.attention.gate_proj
            torch.nn.init.zeros_(projection.weight)
            with torch.no_grad():
                projection.bias.copy_(torch.tensor(bias * block.attention.num_heads))

    return prepare


class DropBranch(torch.nn.Module):
    """Gate logits in, the same logits out, except that while training the gate of one
    branch is set to zero (logit -inf) at a random share of tokens, in every head. The
    model then has to answer those tokens without that branch, while evaluation (and
    inference) still mixes every branch: the paper's output, trained with branch dropout."""

    def __init__(self, branches: int, branch: int, share: float) -> None:
        super().__init__()
        self.branches, self.branch, self.share = branches, branch, share

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return logits
        view = logits.unflatten(-1, (-1, self.branches))  # (..., heads, branches)
        dropped = torch.rand(*view.shape[:-2], 1, 1, device=logits.device) < self.share  # (..., 1, 1): per token
        column = torch.zeros(self.branches, dtype=torch.bool, device=logits.device)
        column[self.branch] = True
        return view.masked_fill(dropped & column, float("-inf")).flatten(-2)


def drop_compressed(share: float) -> Callable[[Decoder], None]:
    """The compressed branch (the first of `gate(cmp, sel, win)`) left out of the output at
    ``share`` of the training tokens (DropBranch after each layer's gate projection)."""

    def prepare(model: Decoder) -> None:
        for block in model.blocks:
            attention = block.attention
            if attention.pattern.ir.output_branches[0].name != "cmp":
                raise ValueError(f"drop_compressed: the first gated branch is {attention.pattern.ir.output_branches[0].name}, not cmp")
            attention.gate_proj = torch.nn.Sequential(attention.gate_proj, DropBranch(attention.n_gates, 0, share))

    return prepare


def freeze_gates(model: Decoder) -> None:
    """Every gate sigmoid(0) = 0.5, for good."""
    zero_gates([0.0, 0.0, 0.0])(model)
    for block in model.blocks:
        block.attention.gate_proj.requires_grad_(False)


@dataclass(frozen=True)
class Variant:
    spec: Callable[[], ModelSpec]
    prepare: Callable[[Decoder], None] | None = None
    steps: int = CONFIG.steps
    about: str = ""


VARIANTS = {
    "dense": Variant(lambda: ModelSpec(attention=DENSE, **COMMON), about="dense SDPA"),
    "dense_long": Variant(lambda: ModelSpec(attention=DENSE, **COMMON), steps=16000, about="dense SDPA, 16,000 steps"),
    "causal": Variant(lambda: ModelSpec(attention="causal", **COMMON), about='SparseAttention("causal")'),
    "nsa": Variant(lambda: ModelSpec(attention="nsa", **COMMON), about="NativeSparseAttention (the paper's)"),
    "nsa_long": Variant(lambda: ModelSpec(attention="nsa", **COMMON), steps=16000, about="the paper's NSA, 16,000 steps"),
    "nsa_fixed": Variant(lambda: ModelSpec(attention="nsa", **COMMON), freeze_gates, about="NSA, gates frozen at 0.5"),
    "nsa_kv": Variant(lambda: ModelSpec(attention="nsa", kv_per_branch=True, **COMMON), about="NSA, keys and values per branch"),
    "nsa_wininit": Variant(lambda: ModelSpec(attention="nsa", **COMMON), zero_gates([-2.0, -2.0, 2.0]),
                           about="NSA, gates start at (0.12, 0.12, 0.88): window first"),
    "nsa_scoreonly": Variant(lambda: ModelSpec(attention=nsa_scores_only(), **COMMON),
                             about="NSA, compressed branch scores the selection only: gate(sel, win)"),
    "nsa_scoreonly_long": Variant(lambda: ModelSpec(attention=nsa_scores_only(), **COMMON), steps=16000,
                                  about="gate(sel, win), 16,000 steps"),
    "nsa_norm": Variant(lambda: ModelSpec(attention="nsa", normalize_gates=True, **COMMON),
                        about="NSA, gates divided by their sum: a weighted mean of the branches"),
    "nsa_norm_long": Variant(lambda: ModelSpec(attention="nsa", normalize_gates=True, **COMMON), steps=16000,
                             about="NSA, normalized gates, 16,000 steps"),
    "nsa_cdrop50": Variant(lambda: ModelSpec(attention="nsa", **COMMON), drop_compressed(0.5),
                           about="NSA, the compressed branch dropped from the output at half of the training tokens"),
    "nsa_cdrop25": Variant(lambda: ModelSpec(attention="nsa", **COMMON), drop_compressed(0.25),
                           about="NSA, the compressed branch dropped from the output at a quarter of the training tokens"),
    "nsa_mean": Variant(lambda: ModelSpec(attention="nsa", params={"pool": "mean"}, **COMMON), about="NSA, mean pooling"),
    # bench/coarse_route_ceiling.py predicts where the coarse route stops for these windows.
    "nsa_c16": Variant(lambda: ModelSpec(attention="nsa", params={"cmp_block": 16, "cmp_stride": 8}, **COMMON),
                       about="NSA, compression windows of 16 every 8 (coarse-route ceiling 0.891)"),
    "nsa_c64": Variant(lambda: ModelSpec(attention="nsa", params={"cmp_block": 64, "cmp_stride": 32}, **COMMON),
                       about="NSA, compression windows of 64 every 32 (coarse-route ceiling 0.497)"),
}


class Diagnostics:
    """Accuracy per query index and per pair position, and gate means, on fixed held-out data."""

    def __init__(self, device: torch.device, batches: int = 8) -> None:
        generator = torch.Generator().manual_seed(HELD_OUT_SEED + 1000)
        self.batches = [TASK.batch(64, generator) for _ in range(batches)]
        self.device = device
        self.gates: dict[int, torch.Tensor] = {}
        self.hooked: set[int] = set()

    def _hook(self, model: Decoder) -> None:
        if id(model) in self.hooked:
            return
        self.hooked.add(id(model))
        for index, block in enumerate(model.blocks):
            if getattr(block.attention, "gate_proj", None) is not None:
                block.attention.gate_proj.register_forward_hook(self._keep(index))

    def _keep(self, index: int):
        def hook(module, inputs, output):
            self.gates[index] = torch.sigmoid(output.float()).detach()

        return hook

    def __call__(self, record: dict, model: Decoder) -> None:
        self._hook(model)
        context = TASK.seq - 2 * TASK.queries
        per_query, by_position, seen = torch.zeros(TASK.queries), torch.zeros(BUCKETS), torch.zeros(BUCKETS)
        gates: dict[int, list] = {}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.no_grad(), autocast:
            for batch in self.batches:
                batch = batch.to(self.device)
                right = (model(batch.tokens, None, batch.scored).argmax(-1) == batch.targets[batch.scored]).float().cpu()
                right = right.view(-1, TASK.queries)  # (B, queries)
                per_query += right.sum(0)
                tokens = batch.tokens.cpu()
                keys = tokens[:, context::2]  # the queried keys, in order
                where = (tokens[:, None, :context] == keys[:, :, None]).int().argmax(-1)  # the key's position
                bucket = (where * BUCKETS // context).flatten()
                by_position.index_add_(0, bucket, right.flatten())
                seen.index_add_(0, bucket, torch.ones_like(right.flatten()))
                for layer, g in self.gates.items():
                    g = g.view(*tokens.shape, model.spec.heads, -1)  # (B, L, heads, branches)
                    gates[layer] = [g.mean((0, 1, 2)).tolist(), g[:, context::2].mean((0, 1, 2)).tolist()]
        record.update(
            per_query=(per_query / (len(self.batches) * 64)).tolist(),
            by_key_position=(by_position / seen.clamp(min=1)).tolist(),
            gates=gates,  # per layer: [mean over all positions, mean over the query positions]
        )


GRADIENT_BATCH_SEED = HELD_OUT_SEED + 2000


def loss_gradients(model: Decoder, batch, dtype: torch.dtype, autocast: bool) -> dict[str, torch.Tensor]:
    """The loss gradient of every parameter of a copy of ``model`` in ``dtype`` (float64
    runs the reference path, no kernels), with or without bf16 autocast."""
    copied = copy.deepcopy(model).to(dtype)
    with torch.autocast(batch.tokens.device.type, dtype=torch.bfloat16, enabled=autocast and batch.tokens.is_cuda):
        logits = copied(batch.tokens, None, batch.scored)
    F.cross_entropy(logits.float(), batch.targets[batch.scored]).backward()
    return {n: p.grad.double() for n, p in copied.named_parameters() if p.grad is not None}


def relative_errors(got: dict, exact: dict) -> dict:
    """||got - exact|| / ||exact|| over all parameters together, over the attention
    projections together, and the worst single parameter."""

    # Parameters whose gradient is negligible beside the largest are left out: a solved
    # model's gradients are all tiny, so a fixed threshold would leave none.
    largest = max(exact[n].norm() for n in exact)
    measured = {n for n in exact if exact[n].norm() > 1e-6 * largest > 0}
    if not measured:
        return {"all": None, "attention": None, "worst": None, "worst_name": None}

    def error(names) -> float | None:
        names = [n for n in names if n in measured]
        if not names:
            return None
        return (sum((got[n] - exact[n]).norm() ** 2 for n in names) / sum(exact[n].norm() ** 2 for n in names)).sqrt().item()

    worst = max(measured, key=lambda n: error([n]))
    return {"all": error(list(exact)), "attention": error([n for n in exact if ".attention." in n]),
            "worst": error([worst]), "worst_name": worst}  # fmt: skip


def gradient_errors(model: Decoder, device: torch.device) -> dict:
    """Relative errors of the loss gradient (over all parameters, the attention's, and the
    worst parameter with its name), bf16 autocast and fp32 kernels against the float64
    reference path, on one held-out batch."""
    batch = TASK.batch(64, torch.Generator().manual_seed(GRADIENT_BATCH_SEED)).to(device)
    exact = loss_gradients(model, batch, torch.float64, False)
    return {name: relative_errors(loss_gradients(model, batch, torch.float32, autocast), exact)
            for name, autocast in (("bf16", True), ("fp32", False))}  # fmt: skip


def gradients(args) -> None:
    """Train dense SDPA; at every evaluation give its weights to SDPA and to
    SparseAttention("causal") (the same function) and compare each one's loss gradients
    in bf16 autocast (and the kernels' in fp32) with float64, along the trajectory where
    the two layers' training parts (docs/training.md: the control)."""
    seeds = parse_seeds(args.seeds)
    device = torch.device(args.device)
    config = replace(CONFIG, steps=args.steps or CONFIG.steps, device=args.device)
    causal = Decoder(ModelSpec(attention="causal", **COMMON)).to(device)
    batch = TASK.batch(64, torch.Generator().manual_seed(GRADIENT_BATCH_SEED)).to(device)

    def on_eval(record: dict, model: Decoder) -> None:
        causal.load_state_dict(model.state_dict())
        exact = loss_gradients(model, batch, torch.float64, False)
        record["gradient_errors"] = {
            "sdpa_bf16": relative_errors(loss_gradients(model, batch, torch.float32, True), exact),
            "causal_bf16": relative_errors(loss_gradients(causal, batch, torch.float32, True), exact),
            "causal_fp32": relative_errors(loss_gradients(causal, batch, torch.float32, False), exact),
            "causal_fp64": relative_errors(loss_gradients(causal, batch, torch.float64, False), exact),
        }
        errors = record["gradient_errors"]
        print(f"step {record['step']}: accuracy {record['accuracy']:.3f}  " + "  ".join(
            f"{k} {v['all']:.2e}/{v['attention']:.2e}" for k, v in errors.items()), flush=True)

    runs = train_seeds(ModelSpec(attention=DENSE, **COMMON), TASK, config, seeds, time_limit=args.time_limit,
                       on_eval=on_eval)  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    document = {"about": gradients.__doc__, "seeds": seeds, "complete": runs.complete,
                "logs": [_compact(log) for log in runs.logs]}  # fmt: skip
    Path(args.out, "gradients.json").write_text(json.dumps(document))
    print(f"{'step':>5} {'seeds':>5} {'accuracy':>8}  " + "  ".join(f"{k + ' all/attn':>22}" for k in document["logs"][0]["evals"][0]["gradient_errors"]))
    for position in range(min(len(log["evals"]) for log in document["logs"])):
        records = [log["evals"][position] for log in document["logs"]]
        cells = []
        for key in records[0]["gradient_errors"]:
            cells.append(f"{statistics.median(r['gradient_errors'][key]['all'] for r in records):.2e}/"
                         f"{statistics.median(r['gradient_errors'][key]['attention'] for r in records):.2e}")
        accuracy = statistics.median(r["accuracy"] for r in records)
        print(f"{records[0]['step']:>5} {len(records):>5} {accuracy:>8.3f}  " + "  ".join(f"{c:>22}" for c in cells))


def run(args) -> None:
    variant = VARIANTS[args.variant]
    seeds = parse_seeds(args.seeds)
    device = torch.device(args.device)
    config = replace(CONFIG, steps=args.steps or variant.steps, device=args.device)
    resume = torch.load(args.state, map_location=device, weights_only=False) if args.state and Path(args.state).exists() else None
    diagnostics = Diagnostics(device)

    def on_eval(record: dict, model: Decoder) -> None:
        diagnostics(record, model)
        print(f"{args.variant} step {record['step']}: accuracy {record['accuracy']:.3f} {record['seconds']:.0f} s", flush=True)

    runs = train_seeds(variant.spec(), TASK, config, seeds, time_limit=args.time_limit, resume=resume,
                       prepare=variant.prepare, on_eval=on_eval)  # fmt: skip
    if not runs.complete:
        torch.save(runs.state, args.state)
        print(f"{args.variant}: stopped at step {runs.state['step']}, state in {args.state}", flush=True)
    document = {"variant": args.variant, "about": variant.about, "seeds": seeds, "complete": runs.complete,
                "logs": [_compact(log) for log in runs.logs]}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"{args.variant}.json").write_text(json.dumps(document))
    if runs.complete and not args.variant.startswith(("dense", "causal")):  # kernels against float64
        document["gradient_errors"] = gradient_errors(runs.models[0], device)
        print(f"{args.variant} seed {seeds[0]}: gradient errors against float64 {document['gradient_errors']}", flush=True)
        Path(args.out, f"{args.variant}.json").write_text(json.dumps(document))


def _compact(log: dict) -> dict:
    """A log without its per-step lists: the loss as means of 50 steps."""
    loss = log["loss"]
    means = [sum(loss[i : i + 50]) / len(loss[i : i + 50]) for i in range(0, len(loss), 50)]
    step_ms = log.get("step_ms") or training_step_ms(log)
    return {**{k: v for k, v in log.items() if k not in ("step", "loss", "step_seconds")}, "loss_per_50": means,
            "steps_done": len(loss), "step_ms": step_ms}  # fmt: skip


def sweep(args) -> None:
    """One `run` process per variant, all at once; then the summary."""
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    processes = []
    for name in args.variants.split(","):
        command = [sys.executable, __file__, "run", "--variant", name, "--seeds", args.seeds, "--out", args.out,
                   "--state", str(Path(args.state_dir, f"{name}.pt")), "--device", args.device]  # fmt: skip
        if args.time_limit is not None:
            command += ["--time-limit", str(args.time_limit)]
        if args.steps is not None:
            command += ["--steps", str(args.steps)]
        log = open(Path(args.out, f"{name}.log"), "a")
        processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())))
    for name, process in processes:
        if process.wait() != 0:
            print(f"{name}: exit code {process.returncode}, see {Path(args.out, name + '.log')}", flush=True)
    summary(argparse.Namespace(folders=[args.out], json=None, base="dense"))


def summary(args) -> None:
    """The table of one or more folders of logs; a variant's seeds in several folders (runs
    of other seeds) are pooled into one row."""
    documents: dict[str, dict] = {}
    for folder in args.folders:
        for path in sorted(Path(folder).glob("*.json")):
            document = json.loads(path.read_text())
            if "variant" not in document:  # summary.json, gradients.json
                continue
            known = documents.setdefault(document["variant"], {**document, "seeds": [], "logs": [], "complete": True,
                                                               "gradient_errors": {}})  # fmt: skip
            known["seeds"] += document["seeds"]
            known["logs"] += document["logs"]
            known["complete"] &= document["complete"]
            if document.get("gradient_errors"):  # measured on the first seed of each run
                known["gradient_errors"][str(document["seeds"][0])] = document["gradient_errors"]
    rows = {}
    for name, document in documents.items():
        finals = [log["evals"][-1]["accuracy"] for log in document["logs"] if log["evals"]]
        steps = min((log["evals"][-1]["step"] for log in document["logs"] if log["evals"]), default=0)
        solved = [value >= 0.99 for value in finals]
        rows[name] = {"about": document.get("about", ""), "step": steps, "complete": document["complete"],
                      "seeds_trained": document["seeds"], "finals": finals, "solved": sum(solved), "seeds": len(finals),
                      **(summarize(finals, solved) if finals else {}),
                      "gradient_errors": document["gradient_errors"] or None,  # seed -> the errors on its model
                      "step_ms": document["logs"][0].get("step_ms"),
                      "steps_done": document["logs"][0].get("steps_done")}  # fmt: skip
    base = rows.get(args.base)
    print(f"{'variant':<15} {'step':>6} {'solved':>7} {'mean':>6} {'std':>6} {'Fisher p':>8} {'perm. p':>7} {'ms/step':>8}  finals")
    for name, row in rows.items():
        if not row["seeds"]:
            print(f"{name:<15} no evaluation yet: {row['steps_done']} steps at {row['step_ms'] or 0:.1f} ms")
            continue
        fisher = permutation = float("nan")
        if base and base["seeds"]:
            fisher = fisher_exact(row["solved"], row["seeds"], base["solved"], base["seeds"])
            permutation = permutation_test(row["finals"], base["finals"])
        row["fisher_p_vs_dense"], row["permutation_p_vs_dense"] = (None if p != p else p for p in (fisher, permutation))
        ms = f"{row['step_ms']:.1f}" if row.get("step_ms") else "-"
        print(f"{name:<15} {row['step']:>6} {row['solved']:>3}/{row['seeds']:<3} {row['mean']:>6.3f} {row['std']:>6.3f} "
              f"{fisher:>8.3f} {permutation:>7.3f} {ms:>8}  {' '.join(f'{v:.3f}' for v in row['finals'])}")  # fmt: skip
    target = args.json or (Path(args.folders[0], "summary.json") if len(args.folders) == 1 else None)
    if target:
        Path(target).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="one variant over several seeds")
    one.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    one.add_argument("--state", default=None, help="where a run stopped by --time-limit saves itself, and resumes from")
    many = commands.add_parser("sweep", help="several variants at once, then the summary")
    many.add_argument("--variants", required=True, help=f"comma-separated, of {', '.join(VARIANTS)}")
    many.add_argument("--state-dir", required=True)
    along = commands.add_parser("gradients", help="SDPA's and the causal kernels' gradients against float64 along dense training")
    for command in (one, many, along):
        command.add_argument("--seeds", default="0-7", help="0-7 or 0,3,5")
        command.add_argument("--steps", type=int, default=None, help="instead of the variant's steps")
        command.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of training")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        command.add_argument("--out", default=".", help="folder of the JSON logs VARIANT.json")
    table = commands.add_parser("summary", help="the table of folders of logs, a variant's seeds pooled")
    table.add_argument("folders", nargs="+")
    table.add_argument("--json", default=None, help="where to write the rows (default: FOLDER/summary.json for one folder)")
    table.add_argument("--base", default="dense", help="the variant the tests compare every row with")
    args = parser.parse_args()
    {"run": run, "sweep": sweep, "gradients": gradients, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
