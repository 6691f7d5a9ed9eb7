"""Pictures of a pattern's masks: one panel per branch, visible pairs over the IR's blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from .mask_stats import BranchMask

# Block classes as the IR gives them: empty, partial, full.
_BLOCK_COLOURS = ((1.0, 1.0, 1.0), (1.0, 0.80, 0.45), (0.60, 0.85, 0.60))
_VISIBLE = (0.12, 0.20, 0.45)


def draw_masks(masks: list[BranchMask], path: str | Path, title: str, block: int) -> Path:
    """Write a PNG with one panel per branch and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("drawing masks needs matplotlib: pip install 'sparsedsl[plot]'") from exc

    fig, axes = plt.subplots(1, len(masks), figsize=(4.2 * len(masks), 4.6), squeeze=False)
    for ax, m in zip(axes[0], masks):
        ax.imshow(_image(m, block).numpy(), interpolation="nearest", origin="upper", aspect="auto")
        ax.set_title(f"{m.name} ({m.kind})\n{m.keys_per_query:.0f} keys/query" + (f"; {m.note}" if m.note else ""), fontsize=9)
        ax.set_xlabel("pooled key" if m.kind == "compress" else "key position")
        ax.set_ylabel("query position")
    handles = [
        Patch(color=tuple(0.45 * c for c in _BLOCK_COLOURS[2]), label="visible, full block"),
        Patch(color=tuple(0.45 * c for c in _BLOCK_COLOURS[1]), label="visible, partial block"),
        Patch(color=_BLOCK_COLOURS[1], label="masked, partial block"),
    ]
    if any(m.classes is None for m in masks):
        handles.append(Patch(color=_VISIBLE, label="visible (selected at run time)"))
    # One row of entries where the panels are wide enough, else two (a single panel).
    columns = len(handles) if len(masks) > 1 else 2
    rows = -(-len(handles) // columns)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * rows, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _image(m: BranchMask, block: int) -> torch.Tensor:
    rows, cols = m.mask.shape
    if m.classes is None:
        image = torch.ones(rows, cols, 3)
        image[m.mask] = torch.tensor(_VISIBLE)
        return image
    # Each element takes its block's colour, darkened where the pair is visible.
    colours = torch.tensor(_BLOCK_COLOURS)
    per_element = m.classes.long().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    image = colours[per_element]
    image[m.mask] *= 0.45
    return image
