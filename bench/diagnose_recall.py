"""The trainability diagnosis of docs/training.md: associative recall at 128 tokens (8
pairs, 8 queries, batch 64, 2 layers, hidden 256, 4 heads = 4 KV heads, AdamW lr 1e-3,
warmup 200, cosine over 8,000 steps, bf16 autocast on a GPU), one variant and seed per
process. Every evaluation also records the held-out accuracy per query index and per
position of the queried pair in the context, and the mean gates of each layer over all
positions and over the query positions; at the end, the loss gradients of the trained
model on the kernels (bf16 autocast and fp32) are compared with the float64 reference.

Variants: dense (SDPA), causal (`SparseAttention("causal")`), gg (`gate(causal, causal)`),
g1 (`gate(causal)`), nsa (`NativeSparseAttention`), nsa_fixed (its gates frozen at 0.5),
nsa_kv (independent keys and values per branch). One process per run, several at once
on one GPU (the logs of 2026-12-01 in bench/results/trainability_2026-12-01/ were made
so, by the first version of this script, which had its own copy of the loop):

    python bench/diagnose_recall.py --variant nsa --seed 0 --time-limit 330 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsedsl
from sparsedsl.training.loop import TrainConfig, train
from sparsedsl.training.models import DENSE, Decoder, ModelSpec
from sparsedsl.training.objectives import HELD_OUT_SEED, Recall

TASK = Recall(seq=128, pairs=8, queries=8)
BUCKETS = 8  # positions of the queried pair in the context, in this many equal parts
GATED_CAUSAL = {
    "gg": "pattern gg() {\n    a = causal\n    b = causal\n    return gate(a, b)\n}",
    "g1": "pattern g1() {\n    a = causal\n    return gate(a)\n}",
}


def model_spec(variant: str) -> ModelSpec:
    common = dict(vocab=TASK.vocab_size, hidden=256, layers=2, heads=4, kv_heads=4)
    if variant in GATED_CAUSAL:
        return ModelSpec(attention=sparsedsl.compile_source(GATED_CAUSAL[variant]), **common)
    attention = {"dense": DENSE, "causal": "causal"}.get(variant, "nsa")
    return ModelSpec(attention=attention, kv_per_branch=variant == "nsa_kv", **common)


def freeze_gates(model: Decoder) -> None:
    """nsa_fixed: every gate sigmoid(0) = 0.5, for good."""
    for block in model.blocks:
        torch.nn.init.zeros_(block.attention.gate_proj.weight)
        torch.nn.init.zeros_(block.attention.gate_proj.bias)
        block.attention.gate_proj.requires_grad_(False)


class Diagnostics:
    """Accuracy per query index and per pair position, and gate means, on held-out data."""

    def __init__(self, model: Decoder, seed: int, device, batches: int = 8) -> None:
        self.gates: dict[int, torch.Tensor] = {}
        self.batches = [TASK.batch(64, torch.Generator().manual_seed(HELD_OUT_SEED + 1000 + seed)) for _ in range(batches)]
        self.device = device
        for index, block in enumerate(model.blocks):
            if getattr(block.attention, "gate_proj", None) is not None:
                block.attention.gate_proj.register_forward_hook(self._keep_gates(index))

    def _keep_gates(self, index: int):
        def hook(module, inputs, output):
            self.gates[index] = torch.sigmoid(output.float()).detach()

        return hook

    def __call__(self, record: dict, model: Decoder) -> None:
        context = TASK.seq - 2 * TASK.queries
        per_query, by_position, seen = torch.zeros(TASK.queries), torch.zeros(BUCKETS), torch.zeros(BUCKETS)
        gates = {}
        model.eval()
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
        model.train()
        record.update(
            per_query=(per_query / (len(self.batches) * 64)).tolist(),
            by_key_position=(by_position / seen.clamp(min=1)).tolist(),
            gates=gates,  # per layer: [mean over all positions, mean over the query positions]
        )
        print(f"step {record['step']}: accuracy {record['accuracy']:.3f}, per query "
              f"{[round(x, 2) for x in record['per_query']]}, {record['seconds']:.0f} s", flush=True)  # fmt: skip


def gradient_errors(model: Decoder, device) -> dict:
    """Worst relative error over parameters of the loss gradient, bf16 autocast and fp32
    kernels against the float64 reference path, on one held-out batch."""
    batch = TASK.batch(64, torch.Generator().manual_seed(HELD_OUT_SEED + 2000)).to(device)

    def gradients(dtype, autocast: bool) -> dict:
        copied = copy.deepcopy(model).to(dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
            logits = copied(batch.tokens, None, batch.scored)
        F.cross_entropy(logits.float(), batch.targets[batch.scored]).backward()
        return {n: p.grad.double() for n, p in copied.named_parameters() if p.grad is not None}

    exact = gradients(torch.float64, False)  # float64 runs the reference path
    errors = {}
    for name, autocast in (("bf16", True), ("fp32", False)):
        got = gradients(torch.float32, autocast)
        errors[name] = max(((got[n] - exact[n]).norm() / exact[n].norm()).item() for n in exact if exact[n].norm() > 1e-6)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["dense", "causal", "gg", "g1", "nsa", "nsa_fixed", "nsa_kv"], default="nsa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds of training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=".", help="folder of the JSON log VARIANT_sSEED.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = TrainConfig(steps=args.steps, batch=64, lr=1e-3, warmup=200, seed=args.seed, eval_every=args.eval_every, device=args.device)
    diagnostics = {}

    def prepare(model: Decoder) -> None:
        if args.variant == "nsa_fixed":
            freeze_gates(model)
        diagnostics["hook"] = Diagnostics(model, args.seed, device)

    run = train(model_spec(args.variant), TASK, config, time_limit=args.time_limit, prepare=prepare,
                on_eval=lambda record, model: diagnostics["hook"](record, model))  # fmt: skip
    log = {"variant": args.variant, "seed": args.seed, **run.log}
    if args.variant not in ("dense", "causal"):  # the gated layers: kernels against float64
        log["gradient_errors"] = gradient_errors(run.model, device)
        print(f"gradient errors against float64: {log['gradient_errors']}")
    Path(args.out, f"{args.variant}_s{args.seed}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main()
