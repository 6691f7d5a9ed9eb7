"""The pictures of ``sparsedsl explore``: one line per variant against the sequence length.

- ``speedup.png`` (measured rows only): speed-up over dense SDPA of the forward, the
  backward and a decode step;
- ``deviation.png``: relative distance from dense causal attention;
- ``density.png``: density and the K/V bytes of a decode step.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("explore's pictures need matplotlib: pip install 'sparsedsl[plot]'") from exc
    return plt


def _series(rows: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """For each variant, in order of first appearance: lengths and values of ``key``,
    sorted by length, rows without a value left out."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["seq"]):
        xs, ys = lines.setdefault(row["variant"], ([], []))
        if row.get(key) is not None:
            xs.append(row["seq"])
            ys.append(row[key])
    return {name: line for name, line in lines.items() if line[0]}


def _panel(ax, rows: list[dict], key: str, title: str, ylabel: str, scale: float = 1.0) -> None:
    for name, (xs, ys) in _series(rows, key).items():
        ax.plot(xs, [y * scale for y in ys], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["seq"] for r in rows}))
    ax.get_xaxis().set_major_formatter(_length_formatter())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _length_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{int(x) // 1024}k" if x >= 1024 and x % 1024 == 0 else f"{x:,.0f}")


def draw_plots(document: dict, folder: str | Path) -> list[Path]:
    """Write the PNGs for ``document``'s rows into ``folder``; return their paths."""
    plt = _pyplot()
    rows = document["rows"]
    folder = Path(folder)
    written = []
    title = f"{document['pattern']} on {document['device']}"

    if any(r.get(k) is not None for r in rows for k in ("speedup_fwd", "speedup_bwd", "speedup_decode")):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, (key, what) in zip(axes, (("speedup_fwd", "forward"), ("speedup_bwd", "backward"), ("speedup_decode", "decode step"))):
            _panel(ax, rows, key, f"{what}: speed-up over dense SDPA", "dense time / pattern time")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        written.append(_save(plt, fig, [axes[0]], folder / "speedup.png", title))

    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    lengths = sorted({(r["seq"], r["deviation_seq"]) for r in rows if r.get("deviation_seq")})
    capped = [f"{L:,} at {d:,}" for L, d in lengths if d < L]
    _panel(ax, rows, "deviation", "deviation from dense causal attention", "||out - dense|| / ||dense||")
    if capped:  # hollow markers: computed at fewer positions than the row's length
        short = [r for r in rows if r.get("deviation") is not None and r["deviation_seq"] < r["seq"]]
        ax.plot([r["seq"] for r in short], [r["deviation"] for r in short], "o", color="white", markersize=4, zorder=3)
        ax.set_title(f"deviation from dense causal attention\n(hollow: computed at fewer positions: {'; '.join(capped)})", fontsize=9)
    written.append(_save(plt, fig, [ax], folder / "deviation.png", title))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    _panel(axes[0], rows, "density", "density: keys read / dense causal pairs", "density")
    axes[0].axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="dense causal")
    axes[0].set_yscale("log")
    _panel(axes[1], rows, "decode_kv_bytes", "K/V read by one decode step", "MiB", 1 / 2**20)
    dense = sorted({(r["seq"], r["dense_decode_kv_bytes"]) for r in rows})
    axes[1].plot([x for x, _ in dense], [y / 2**20 for _, y in dense], color="black", linewidth=0.8, linestyle="--", label="dense")
    axes[1].set_yscale("log")
    written.append(_save(plt, fig, list(axes), folder / "density.png", title))
    return written


def _save(plt, fig, legend_axes, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    for ax in legend_axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
