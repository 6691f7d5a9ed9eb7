"""Train a small transformer from scratch on long-context associative recall, with dense
causal attention or with NSA, and record loss and retrieval accuracy.

The task: `pairs` key-value pairs (a key token followed by its value token) are scattered
through `seq` tokens of noise; the last 2 * `queries` tokens present keys again, each
followed by its value. The loss is taken on those values only: predicting one needs the
pair seen far back (an induction head: a plateau at "copy some value seen", then a sharp
rise). Both models see the same data. `--curriculum SEQ:PAIRS:STEPS ...` trains phases
of shorter sequences and/or fewer pairs first (rotary positions make what is learned
there carry over); the final phase, `--seq` and `--pairs`, takes the rest of `--steps`.
Accuracy is the share of query values predicted exactly (argmax) on held-out sequences
of the current phase's setting: in the final phase, the full task. `--eval-seqs` also
evaluates the trained model at other lengths. `--time-limit S --save FILE` stops after S
seconds of training and saves everything needed to go on (model, optimizer, schedule, data
generators, log); `--resume FILE` goes on from there, same data and schedule as one run.

    python examples/train_recall.py --attention dense --out dense.json
    python examples/train_recall.py --attention nsa --out nsa.json
    python examples/train_recall.py --plot dense.json nsa.json --png docs/images/train_recall.png
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparsedsl.nn import NativeSparseAttention, rotary


# ---------------------------------------------------------------- data
def recall_batch(batch: int, seq: int, pairs: int, queries: int, vocab: tuple[int, int, int], generator, device):
    """Token ids (batch, seq) and the positions whose next token is a value to predict."""
    n_keys, n_values, n_noise = vocab
    noise_base, key_base, value_base = 0, n_noise, n_noise + n_keys
    context = seq - 2 * queries
    tokens = torch.randint(noise_base, noise_base + n_noise, (batch, seq), generator=generator)
    keys = torch.stack([torch.randperm(n_keys, generator=generator)[:pairs] for _ in range(batch)])
    values = torch.randint(0, n_values, (batch, pairs), generator=generator)
    # Pair slots: distinct even offsets in the context, so pairs never overlap.
    slots = torch.stack([torch.randperm(context // 2, generator=generator)[:pairs] for _ in range(batch)]) * 2
    rows = torch.arange(batch)[:, None]
    tokens[rows, slots] = key_base + keys
    tokens[rows, slots + 1] = value_base + values
    asked = torch.stack([torch.randperm(pairs, generator=generator)[:queries] for _ in range(batch)])
    query_at = context + 2 * torch.arange(queries)
    tokens[:, query_at] = key_base + keys.gather(1, asked)
    tokens[:, query_at + 1] = value_base + values.gather(1, asked)
    return tokens.to(device), query_at.to(device)  # predict tokens[:, query_at + 1] at query_at


# ---------------------------------------------------------------- model
class DenseAttention(nn.Module):
    """Causal grouped-query attention with PyTorch's fastest SDPA backend: the baseline."""

    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, -1).transpose(1, 2)
        positions = torch.arange(L, device=x.device)
        q, k = rotary(q, positions, 10000.0), rotary(k, positions, 10000.0)
        group = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, hidden: int, attention: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RecallModel(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, make_attention) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([Block(hidden, make_attention()) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens, positions):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, positions]))  # logits only where a value is predicted


# ---------------------------------------------------------------- training
RUN_ONLY = {"device", "out", "plot", "png", "eval_seqs", "time_limit", "save", "resume"}  # may change on --resume


def parse_phases(args) -> list[tuple[int, int, int]]:
    """(steps, seq, pairs) of each phase: the --curriculum phases, then the final phase at
    --seq and --pairs for the rest of --steps."""
    phases = []
    for phase in args.curriculum:
        seq, pairs, steps = (int(n) for n in phase.split(":"))
        phases.append((steps, seq, pairs))
    rest = args.steps - sum(steps for steps, _, _ in phases)
    if rest <= 0:
        raise SystemExit(f"--steps {args.steps} leaves no step for the final phase after --curriculum")
    return phases + [(rest, args.seq, args.pairs)]


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = (args.keys, args.values, args.noise)
    n_vocab = sum(vocab)
    if args.attention == "dense":
        make = lambda: DenseAttention(args.hidden, args.heads, args.kv_heads)  # noqa: E731
    else:
        params = dict(sel_topk=args.topk, window=args.window, per=args.per)
        make = lambda: NativeSparseAttention(args.hidden, args.heads, args.kv_heads, **params)  # noqa: E731
    model = RecallModel(n_vocab, args.hidden, args.layers, make).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, args.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    phases = parse_phases(args)
    # (seq, pairs) of every step; a phase asks min(--queries, pairs) queries.
    setting = [(seq, pairs) for steps, seq, pairs in phases for _ in range(steps)]
    data = torch.Generator().manual_seed(args.seed)
    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    log = {"args": vars(args), "phases": [], "step": [], "loss": [], "eval_step": [], "eval_seq": [], "accuracy": []}
    start = 0
    for steps, seq, pairs in phases:
        log["phases"].append({"start": start, "steps": steps, "seq": seq, "pairs": pairs})
        start += steps
    first_step, spent = 0, 0.0  # seconds of training in earlier segments of this run
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=False)
        saved, now = ({k: v for k, v in a.items() if k not in RUN_ONLY} for a in (state["log"]["args"], vars(args)))
        if saved != now:
            raise SystemExit(f"--resume {args.resume} was trained with other arguments: {state['log']['args']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        data.set_state(state["data"].cpu())
        held_out.set_state(state["held_out"].cpu())
        log, first_step, spent = state["log"], state["step"], state["log"]["seconds"]
        print(f"{args.attention}: resumed at step {first_step} after {spent:.0f} s", flush=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()

    def evaluate(seq: int, pairs: int) -> float:
        model.eval()
        correct = total = 0
        with torch.no_grad(), autocast:
            for _ in range(args.eval_batches):
                tokens, at = recall_batch(args.batch, seq, pairs, min(args.queries, pairs), vocab, held_out, device)
                predicted = model(tokens, at).argmax(-1)
                correct += (predicted == tokens[:, at + 1]).sum().item()
                total += predicted.numel()
        model.train()
        return correct / total

    for step in range(first_step, args.steps):
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            log["seconds"] = spent + time.perf_counter() - started
            log.setdefault("segments", []).append(time.perf_counter() - started)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "data": data.get_state(), "held_out": held_out.get_state(), "log": log, "step": step}
            torch.save(state, args.save)
            print(f"{args.attention}: stopped at step {step} after {log['seconds']:.0f} s, saved {args.save}", flush=True)
            return None
        seq, pairs = setting[step]
        tokens, at = recall_batch(args.batch, seq, pairs, min(args.queries, pairs), vocab, data, device)
        with autocast:
            logits = model(tokens, at)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, at + 1].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log["step"].append(step)
        log["loss"].append(loss.item())
        # Held-out accuracy at the current phase's setting: the final phase's is the full task.
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            accuracy = evaluate(seq, pairs)
            log["eval_step"].append(step + 1)
            log["eval_seq"].append(seq)
            log["accuracy"].append(accuracy)
            print(f"{args.attention} step {step + 1} ({seq} tokens, {pairs} pairs): loss {loss.item():.4f}, "
                  f"held-out accuracy {accuracy:.3f}, {spent + time.perf_counter() - started:.0f} s", flush=True)
    log["seconds"] = spent + time.perf_counter() - started
    if args.resume:
        log["segments"].append(time.perf_counter() - started)
    log["final_accuracy"] = log["accuracy"][-1]
    log["chance"] = 1 / args.values
    # Length generalization: the trained model on longer (or shorter) sequences, same pairs.
    log["length_accuracy"] = {seq: evaluate(seq, args.pairs) for seq in args.eval_seqs}
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
        smooth = torch.tensor(log["loss"]).unfold(0, 20, 1).mean(-1) if len(log["loss"]) >= 20 else torch.tensor(log["loss"])
        left.plot(range(len(smooth)), smooth, label=f"{name} ({log['seconds']:.0f} s)")
        right.plot(log["eval_step"], log["accuracy"], marker="o", label=f"{name}: {log['final_accuracy']:.3f}")
    for phase in log.get("phases", [])[1:]:  # curriculum phase boundaries
        for axis in (left, right):
            axis.axvline(phase["start"], color="gray", lw=0.5, ls=":")
    a = log["args"]
    left.set(xlabel="step", ylabel="loss (mean of 20 steps)", title=f"associative recall, {a['seq']} tokens, {a['pairs']} pairs")
    right.set(xlabel="step", ylabel="held-out retrieval accuracy", title=f"{a['layers']} layers, hidden {a['hidden']}")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=["dense", "nsa"], default="nsa")
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
    log = train(args)
    if log is None:  # stopped at --time-limit, saved to --save
        return
    print(json.dumps({k: log[k] for k in ("final_accuracy", "chance", "seconds")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(log, f)


if __name__ == "__main__":
    main()
