"""Packed batches for patterns that work within documents (``compress(within=document)``).

Each document of a packed row is its own sequence: its pooled blocks and selection blocks
start at its first position. The kernels count blocks on the whole row's grid, so the
runtime pads every document to a multiple of the pattern's alignment (its compression
strides and selection blocks): then each document's blocks are grid blocks, and a
pooled block that would straddle two documents is hidden by the `doc_start` bound. The
padding is never seen by a real query (compression and selection are causal, and the
padding gets a document id of its own for masks with `document`); its outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocumentLayout:
    """Where each position of a packed (B, L) batch goes in the aligned layout.

    ``position`` (B, L): each position's place in the aligned rows of ``length``;
    ``source`` (B, length): the position each aligned place holds, ``L`` for padding;
    ``doc_ids`` (B, length): document ids of the aligned rows; padding has an id below all.
    """

    position: torch.Tensor
    source: torch.Tensor
    doc_ids: torch.Tensor
    length: int

    @staticmethod
    @torch.compiler.disable  # sizes from values: torch.compile runs it eagerly, one graph break
    def of(doc_ids: torch.Tensor, alignment: int) -> DocumentLayout:
        """The layout of (B, L) ``doc_ids`` (documents are runs of equal ids) with every
        document padded to a multiple of ``alignment``. One host synchronisation (the
        aligned length is the data's, so a compiled call breaks its graph here)."""
        B, L = doc_ids.shape
        device = doc_ids.device
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        run = torch.cumsum(starts.flatten(), 0) - 1  # (B*L,) run number of each position
        first = torch.nonzero(starts.flatten()).squeeze(1)  # each run's first flat position
        run_length = torch.bincount(run, minlength=first.numel())
        padded = (run_length + alignment - 1) // alignment * alignment
        before = torch.cumsum(padded, 0) - padded  # padded lengths of all earlier runs
        row_of_run = first // L
        row_first_run = run.view(B, L)[:, 0]
        run_start = before - before[row_first_run][row_of_run]  # aligned start within its row
        offset = torch.arange(B * L, device=device) - first[run]
        position = (run_start[run] + offset).view(B, L)
        rows_length = torch.zeros(B, dtype=padded.dtype, device=device).index_add_(0, row_of_run, padded)
        length = int(rows_length.max())  # the synchronisation
        source = torch.full((B, length), L, dtype=torch.int64, device=device)
        source.scatter_(1, position, torch.arange(L, device=device).expand(B, L))
        padded_ids = (doc_ids.min() - 1).expand(B, length).clone()  # below every document's id
        padded_ids.scatter_(1, position, doc_ids)
        return DocumentLayout(position, source, padded_ids, length)

    def pad(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """``x`` with positions along ``dim`` (batch first) moved to the aligned layout;
        padding places are 0. Differentiable."""
        zero = x.new_zeros(*x.shape[:dim], 1, *x.shape[dim + 1 :])
        extended = torch.cat([x, zero], dim)
        return extended.gather(dim, _spread(self.source, x, dim))

    def unpad(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The real positions of aligned ``x``, in their original order. Differentiable."""
        return x.gather(dim, _spread(self.position, x, dim))


def _spread(index: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, n) ``index`` broadcast to gather along ``dim`` of a tensor shaped like ``like``."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = index.shape
    sizes = list(like.shape)
    sizes[dim] = index.shape[1]
    return index.view(shape).expand(sizes)
