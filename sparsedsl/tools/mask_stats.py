"""What a pattern attends to at a given length: each branch's mask and its density.

Static branches come from their definitions; a selection depends on the data, so it is
shown for seeded random inputs (and said so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from ..frontend import model as M
from ..ir.evaluate import block_classes, document_runs
from ..pattern import Pattern
from ..runtime.documents import DocumentLayout
from ..runtime.inputs import CallInputs


@dataclass(frozen=True)
class BranchMask:
    """One branch's visible (query, key) pairs at one length."""

    name: str
    kind: str  # "mask", "compress", "select"
    mask: torch.Tensor  # (Lq, keys): keys are pooled keys for a compress branch
    classes: torch.Tensor | None  # (query blocks, key blocks) from the IR, static branches only
    note: str = ""

    @property
    def pairs(self) -> int:
        return int(self.mask.sum())

    @property
    def keys_per_query(self) -> float:
        return self.pairs / self.mask.shape[0]


def causal_pairs(seq: int) -> int:
    return seq * (seq + 1) // 2


def example_documents(seq: int, count: int, seed: int = 0, alignment: int = 1) -> torch.Tensor:
    """(1, seq) ids of ``count`` packed documents of random lengths, each starting at a
    multiple of ``alignment`` (fewer documents where ``seq`` has too few multiples)."""
    generator = torch.Generator().manual_seed(seed)
    places = (seq - 1) // alignment  # the multiples of alignment inside (0, seq)
    cuts = (torch.randperm(places, generator=generator)[: count - 1] + 1) * alignment
    ids = torch.zeros(seq, dtype=torch.long)
    for cut in cuts.tolist():
        ids[cut:] += 1
    return ids[None]


def branch_masks(pattern: Pattern, seq: int, block: int = 64, documents: int = 4, seed: int = 0) -> list[BranchMask]:
    """Every output branch's mask for a sequence of ``seq`` tokens (queries = keys).

    A pattern that works within documents (``compress(within=document)``) gets example
    documents that start on its block grid, where the packed layout is the row itself."""
    doc_ids = _documents(pattern, seq, documents, seed)
    count = int(doc_ids.max()) + 1 if doc_ids is not None else 0
    tables = doc_ids[0] if doc_ids is not None else None
    masks = []
    selections = _example_selections(pattern, seq, seed, doc_ids) if any(
        isinstance(b, M.SelectBranch) for b in pattern.checked.branches
    ) else {}
    for branch in pattern.checked.branches:
        ir_branch = pattern.ir.branch(branch.name)
        if isinstance(branch, M.MaskBranch):
            uses_docs = M.uses_documents(branch.mask)
            mask = reference.element_mask(branch.mask, seq, seq, doc_ids if uses_docs else None)
            mask = mask[0] if uses_docs else mask
            classes = block_classes(ir_branch, seq, seq, block, block, tables if uses_docs else None)
            note = f"{count} example documents" if uses_docs else ""
            masks.append(BranchMask(branch.name, "mask", mask, classes, note))
        elif isinstance(branch, M.CompressBranch):
            mask = reference.compressed_mask(branch, seq, seq)
            note = "over pooled keys"
            if branch.within == "document":  # pooled key c must start in the query's document
                starts = torch.tensor(document_runs(tables)[0])
                mask &= (torch.arange(mask.shape[1]) * branch.stride)[None, :] >= starts[:, None]
                note += f"; {count} example documents"
            classes = block_classes(ir_branch, seq, seq, block, block, tables)
            masks.append(BranchMask(branch.name, "compress", mask, classes, note))
        else:
            selected = selections[branch.name][0, 0]  # (seq, n_blocks)
            keys = torch.arange(seq)
            mask = selected[:, keys // branch.block] & (keys[None, :] <= keys[:, None])
            masks.append(BranchMask(branch.name, "select", mask, None, "example: seeded random q, k"))
    return masks


def _documents(pattern: Pattern, seq: int, documents: int, seed: int) -> torch.Tensor | None:
    """Example document ids for a pattern that reads them, else None."""
    if not pattern.checked.needs_documents:
        return None
    return example_documents(seq, documents, seed, pattern.ir.document_alignment)


def _example_selections(pattern: Pattern, seq: int, seed: int, doc_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, seq, 64, generator=generator) for _ in range(2))
    pooled = {}
    for compress in pattern.checked.compress_branches():
        if compress.pool == "mlp":  # learned pooling has no weights here: mean-pool instead
            kc = reference.pool(k, compress.block, compress.stride, "mean")
            pooled[compress.name] = (kc, kc)
    gates = torch.ones(1, 1, seq, len(pattern.checked.branches)) if pattern.checked.gated else None
    # Documents on the block grid: the aligned layout keeps every position where it is.
    layout = DocumentLayout.of(doc_ids, pattern.ir.document_alignment) if pattern.ir.packed else None
    inputs = CallInputs(q, k, k, 64**-0.5, gates, doc_ids, pooled, layout)
    return reference.attention(pattern.checked, inputs).selections


def density_rows(pattern: Pattern, seq: int, block: int = 64, documents: int = 4) -> list[dict]:
    """One row per branch and one for the whole pattern: pairs, density versus dense
    causal, keys per query, and the IR's share of full/partial key blocks."""
    masks = branch_masks(pattern, seq, block, documents)
    dense = causal_pairs(seq)
    rows = []
    for m in masks:
        row = {
            "branch": m.name,
            "kind": m.kind,
            "pairs": m.pairs,
            "density": m.pairs / dense,
            "keys_per_query": m.keys_per_query,
            "note": m.note,
        }
        if m.classes is not None:
            total = max(1, m.classes.numel())  # no blocks at all: a compress branch shorter than its block
            row["full_blocks"] = int((m.classes == 2).sum()) / total
            row["partial_blocks"] = int((m.classes == 1).sum()) / total
        rows.append(row)
    pairs = sum(m.pairs for m in masks)
    rows.append(
        {"branch": "(pattern)", "kind": "all", "pairs": pairs, "density": pairs / dense, "keys_per_query": pairs / seq, "note": ""}
    )
    return rows


def format_density_table(rows: list[dict], seq: int, block: int) -> str:
    lines = [
        f"sequence {seq}: density = attended pairs / dense causal pairs ({causal_pairs(seq)}); blocks {block}x{block}",
        f"{'branch':<12} {'kind':<9} {'pairs':>12} {'density':>8} {'keys/query':>11} {'full':>6} {'partial':>8}  note",
    ]
    for r in rows:
        full = f"{r['full_blocks']:.1%}" if "full_blocks" in r else "-"
        partial = f"{r['partial_blocks']:.1%}" if "partial_blocks" in r else "-"
        lines.append(
            f"{r['branch']:<12} {r['kind']:<9} {r['pairs']:>12,} {r['density']:>8.2%} {r['keys_per_query']:>11.1f} "
            f"{full:>6} {partial:>8}  {r['note']}"
        )
    return "\n".join(lines)
