"""Causality of a training model on the GPU: the logits at positions <= t must not change
when the bytes after t change (bf16 autocast, the generated kernels). A layer that trains
better than dense must not do so by seeing the future; docs/training.md records the run.

    python bench/check_causality.py --study lm8k --layers "dense;nsa_packed;nsa_packed:per=block" --out causality.json
"""

from __future__ import annotations

import argparse
import json

import torch
from train_quality import STUDIES, layer_spec

from sparsedsl.training.models import Decoder

POSITIONS = (0, 31, 100, 1000, 4095, 4096, 5000, 8000, 8190)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="lm8k", choices=sorted(STUDIES))
    parser.add_argument("--layers", default="dense;nsa_packed;nsa_packed:per=block", help="';'-separated")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    data = study.objective.batch(args.rows, torch.Generator().manual_seed(0))
    tokens, docs = data.tokens.cuda(), data.doc_ids.cuda()
    positions = [t for t in POSITIONS if t < tokens.shape[1] - 1]
    rows = []
    for layer in args.layers.split(";"):
        torch.manual_seed(0)
        model = Decoder(layer_spec(study, layer)).cuda()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            base = model(tokens, docs).float()
            repeat = (model(tokens, docs).float() - base).abs().max().item()  # the same input twice
            for t in positions:
                changed = tokens.clone()
                changed[:, t + 1 :] = torch.randint(0, 256, changed[:, t + 1 :].shape, device="cuda")
                out = model(changed, docs).float()
                past = (out[:, : t + 1] - base[:, : t + 1]).abs().max().item()
                future = (out[:, t + 1 :] - base[:, t + 1 :]).abs().max().item()
                rows.append(dict(layer=layer, t=t, past=past, future=future, repeat=repeat))
                print(f"{layer:<24} t={t:<5} logits up to t moved {past:.3e}, after t {future:.3e} "
                      f"(same input twice: {repeat:.1e})", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    leaking = sorted({row["layer"] for row in rows if row["past"] > 0})
    print("causal: every layer" if not leaking else f"NOT causal: {', '.join(leaking)}")


if __name__ == "__main__":
    main()
