"""Training curves of the JSON logs that `train_quality.py run` and `diagnose_recall.py run`
write: one panel per study (or recall variant set), one colour per layer, every seed as a
thin line and the mean over seeds as a thick one. The PNGs in docs/training.md come from it.

    python bench/plot_curves.py bench/results/lm8k_lm16k_2026-12-03/res --png docs/images/lm_8k_16k.png
    python bench/plot_curves.py bench/results/trainability_2026-12-02 --png recall.png --panel recall
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def read_runs(folders: list[str]) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    """panel -> layer -> one (step, metric) curve per seed, from every *.json under the folders."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.json")):
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or "logs" not in document:
                continue
            panel = document.get("study", "recall")
            layer = document.get("layer") or document.get("variant", path.stem)
            for log in document["logs"]:
                evals = log.get("evals") or []
                if not evals:
                    continue
                metric = "val_bpb" if "val_bpb" in evals[-1] else "accuracy"
                panels[f"{panel} ({metric})"][layer].append([(e["step"], e[metric]) for e in evals])
    return panels


def plot(panels: dict, png: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, layers) in zip(axes[0], sorted(panels.items(), key=lambda item: (len(item[0]), item[0]))):
        for colour, (layer, curves) in enumerate(sorted(layers.items())):
            for curve in curves:
                ax.plot(*zip(*curve), color=f"C{colour}", alpha=0.25, linewidth=0.8)
            reached = min(len(curve) for curve in curves)
            steps = [curves[0][i][0] for i in range(reached)]
            mean = [statistics.fmean(curve[i][1] for curve in curves) for i in range(reached)]
            ax.plot(steps, mean, color=f"C{colour}", linewidth=2, label=f"{layer} ({len(curves)} seeds)")
        ax.set_title(panel)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--png", required=True)
    parser.add_argument("--panel", default=None, help="only panels whose name starts with this")
    parser.add_argument("--layers", default=None, help="only these layers (comma-separated)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    panels = read_runs(args.folders)
    if args.panel:
        panels = {name: layers for name, layers in panels.items() if name.startswith(args.panel)}
    if args.layers:
        keep = args.layers.split(",")
        panels = {name: {k: v for k, v in layers.items() if k in keep} for name, layers in panels.items()}
    if not any(panels.values()):
        raise SystemExit(f"no training logs under {', '.join(args.folders)}")
    plot(panels, args.png, args.title)


if __name__ == "__main__":
    main()
