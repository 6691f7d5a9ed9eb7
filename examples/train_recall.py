"""Train a small transformer from scratch on long-context associative recall, with dense
causal attention or with NSA, and record loss and retrieval accuracy.

The task (:func:`sparsedsl.training.tasks.recall_batch`): `pairs` key-value pairs (a key
token followed by its value token) are scattered through `seq` tokens of noise; the last
2 * `queries` tokens present keys again, each followed by its value. The loss is taken on
those values only: predicting one needs the pair seen far back (an induction head: a
plateau at "copy some value seen", then a sharp rise). Both models see the same data.
`--curriculum SEQ:PAIRS:STEPS ...` trains phases of shorter sequences and/or fewer pairs
first (rotary positions make what is learned there carry over); the final phase, `--seq`
and `--pairs`, takes the rest of `--steps`. Accuracy is the share of query values
predicted exactly (argmax) on held-out sequences of the current phase's setting: in the
final phase, the full task. `--eval-seqs` also evaluates the trained model at other
lengths. `--time-limit S --save FILE` stops after S seconds of training and saves
everything needed to go on (model, optimizer, schedule, data generators, log);
`--resume FILE` goes on from there, same data and schedule as one run.

Model, data and loop are :mod:`sparsedsl.training`'s; this script is their command line
for one run (`sparsedsl explore --train recall` sweeps variants over seeds).

    python examples/train_recall.py --attention dense --out dense.json
    python examples/train_recall.py --attention nsa --out nsa.json
    python examples/train_recall.py --plot dense.json nsa.json --png docs/images/train_recall.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from sparsedsl.training.loop import TrainConfig, train
from sparsedsl.training.models import DENSE, ModelSpec
from sparsedsl.training.objectives import HELD_OUT_SEED, Recall
from sparsedsl.training.tasks import RecallVocab

RUN_ONLY = {"device", "out", "plot", "png", "eval_seqs", "time_limit", "save", "resume"}  # may change on --resume


def setup(args) -> tuple[ModelSpec, Recall, TrainConfig]:
    """The model, the final phase's task and the training settings the arguments ask for."""
    vocab = RecallVocab(keys=args.keys, values=args.values, noise=args.noise)
    objective = Recall(vocab=vocab, seq=args.seq, pairs=args.pairs, queries=args.queries)
    params = {} if args.attention == DENSE else dict(sel_topk=args.topk, window=args.window, per=args.per)
    attention = DENSE if args.attention == DENSE else "nsa"
    spec = ModelSpec(vocab=vocab.size, attention=attention, params=params, hidden=args.hidden, layers=args.layers,
                     heads=args.heads, kv_heads=args.kv_heads)  # fmt: skip
    curriculum = []
    for phase in args.curriculum:
        seq, pairs, steps = (int(n) for n in phase.split(":"))
        curriculum.append((steps, {"seq": seq, "pairs": pairs}))
    config = TrainConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        seed=args.seed, eval_every=args.eval_every, eval_batches=args.eval_batches, curriculum=tuple(curriculum),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )  # fmt: skip
    return spec, objective, config


def run(args) -> dict | None:
    """Train (or go on training); the finished run's log, or None when stopped at --time-limit."""
    spec, objective, config = setup(args)
    resume = None
    if args.resume:
        saved = torch.load(args.resume, map_location="cpu", weights_only=False)
        before, now = ({k: v for k, v in a.items() if k not in RUN_ONLY} for a in (saved["args"], vars(args)))
        if before != now:
            raise SystemExit(f"--resume {args.resume} was trained with other arguments: {saved['args']}")
        resume = saved["state"]
        print(f"{args.attention}: resumed at step {resume['step']} after {resume['logs'][0]['seconds']:.0f} s", flush=True)

    def show(record: dict, model) -> None:
        print(f"{args.attention} step {record['step']} ({record['seq']} tokens): held-out accuracy "
              f"{record['accuracy']:.3f}, {record['seconds']:.0f} s", flush=True)  # fmt: skip

    result = train(spec, objective, config, time_limit=args.time_limit, resume=resume, on_eval=show)
    if not result.complete:
        torch.save({"args": vars(args), "state": result.state}, args.save)
        print(f"{args.attention}: stopped at step {result.state['step']} after {result.log['seconds']:.0f} s, saved {args.save}")
        return None
    log = {**result.log, "args": vars(args), "chance": 1 / args.values}
    # Length generalization: the trained model on longer (or shorter) sequences, same pairs.
    held_out = torch.Generator().manual_seed(HELD_OUT_SEED + args.seed)
    autocast = torch.autocast(config.device, dtype=torch.bfloat16, enabled=config.device == "cuda")
    result.model.eval()
    with autocast:
        log["length_accuracy"] = {
            seq: replace(objective, seq=seq).evaluate(result.model, args.batch, args.eval_batches, held_out, config.device)["accuracy"]
            for seq in args.eval_seqs
        }
    for seq, accuracy in log["length_accuracy"].items():
        print(f"{args.attention} at {seq} tokens, {args.pairs} pairs: held-out accuracy {accuracy:.3f}", flush=True)
    return log


def plot(paths: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for path in paths:
        log = json.loads(open(path).read())
        name = log["args"]["attention"]
        steps, accuracy = _curve(log)
        smooth = torch.tensor(log["loss"]).unfold(0, 20, 1).mean(-1) if len(log["loss"]) >= 20 else torch.tensor(log["loss"])
        left.plot(range(len(smooth)), smooth, label=f"{name} ({log['seconds']:.0f} s)")
        right.plot(steps, accuracy, marker="o", label=f"{name}: {accuracy[-1]:.3f}")
    starts = [0]
    for phase in log.get("phases", []):  # curriculum phase boundaries
        starts.append(starts[-1] + phase["steps"])
    for start in starts[1:-1]:
        for axis in (left, right):
            axis.axvline(start, color="gray", lw=0.5, ls=":")
    a = log["args"]
    left.set(xlabel="step", ylabel="loss (mean of 20 steps)", title=f"associative recall, {a['seq']} tokens, {a['pairs']} pairs")
    right.set(xlabel="step", ylabel="held-out retrieval accuracy", title=f"{a['layers']} layers, hidden {a['hidden']}")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def _curve(log: dict) -> tuple[list[int], list[float]]:
    """Evaluation steps and accuracies, from this script's logs or the earlier format
    (bench/results/train_recall_*.json)."""
    if "evals" in log:
        return [e["step"] for e in log["evals"]], [e["accuracy"] for e in log["evals"]]
    return log["eval_step"], log["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=[DENSE, "nsa"], default="nsa")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--curriculum", nargs="*", default=[], metavar="SEQ:PAIRS:STEPS",
                        help="phases trained before the final one (--seq, --pairs), in order")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--values", type=int, default=64)
    parser.add_argument("--noise", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--per", choices=["token", "block"], default="token")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear warmup before the cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--eval-seqs", type=int, nargs="*", default=[], help="after training, also evaluate at these lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="write the log as JSON here")
    parser.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of training (needs --save)")
    parser.add_argument("--save", default=None, help="where --time-limit saves the run to go on with --resume")
    parser.add_argument("--resume", default=None, help="go on with a run saved by --time-limit --save")
    parser.add_argument("--plot", nargs="+", default=None, help="plot these JSON logs instead of training")
    parser.add_argument("--png", default="train_recall.png")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        return
    if args.time_limit is not None and not args.save:
        parser.error("--time-limit needs --save")
    log = run(args)
    if log is None:  # stopped at --time-limit, saved to --save
        return
    print(json.dumps({k: log[k] for k in ("final", "chance", "seconds")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(log, f)


if __name__ == "__main__":
    main()
