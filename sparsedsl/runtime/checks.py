"""Checks of documents' values, as operators that ``torch.compile`` keeps opaque.

Document ids must come in runs, and ``cu_seqlens`` must be bounds that never decrease:
facts about values, each checked with one host synchronisation, which would break a
compiled graph in traced code. So each check is a custom operator returning the checked
ids, (B, Lk) int64 and contiguous: a result the call goes on with, so that the check stays
in the graph, and eager and compiled calls check alike.

(This module takes no ``from __future__ import annotations``: ``custom_op`` reads the
operators' schemas from their annotations.)
"""

import torch
from torch import Tensor

from ..errors import InputError


@torch.library.custom_op("sparsedsl::document_ids", mutates_args=())
def document_ids(where: str, doc_ids: Tensor) -> Tensor:
    """(B, Lk) integer ``doc_ids`` as int64, checked: every document is one run of positions.
    ``where`` names the call in the error."""
    ids = torch.empty(doc_ids.shape, dtype=torch.int64, device=doc_ids.device).copy_(doc_ids)
    # Kernels walk documents as runs of positions: an id that comes back after another
    # document would be silently split, so say so instead. Ids that never decrease (the
    # usual packing) are runs already; only other orders need the full check.
    if not bool((ids[:, 1:] >= ids[:, :-1]).all()):
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        for row in range(ids.shape[0]):
            runs = ids[row][starts[row]]
            if runs.numel() != torch.unique(runs).numel():
                raise InputError(
                    f"{where}: `doc_ids` row {row} returns to a document after another one; each document "
                    "must be one contiguous run of positions (pack sequences one after another)"
                )
    return ids


@document_ids.register_fake
def _(where, doc_ids):
    return doc_ids.new_empty(doc_ids.shape, dtype=torch.int64)


@torch.library.custom_op("sparsedsl::documents_from_bounds", mutates_args=())
def documents_from_bounds(where: str, bounds: Tensor, batch: int, length: int) -> Tensor:
    """(batch, length) int64 document ids from int64 ``bounds`` [0, len1, len1+len2, ...,
    length] (``cu_seqlens``), checked: they start at 0, never decrease and end at ``length``."""
    valid = bounds.numel() >= 2 and bool(
        (bounds[0] == 0) & (bounds[-1] == length) & (bounds[1:] >= bounds[:-1]).all()
    )  # one synchronisation
    if not valid:
        shown = bounds.tolist()
        raise InputError(
            f"{where}: `cu_seqlens` must start at 0, never decrease and end at the key length {length}, "
            f"got {shown[:8]}{'...' if len(shown) > 8 else ''}"
        )
    positions = torch.arange(length, device=bounds.device)
    ids = torch.searchsorted(bounds[1:], positions, right=True)
    return torch.empty((batch, length), dtype=torch.int64, device=bounds.device).copy_(ids)


@documents_from_bounds.register_fake
def _(where, bounds, batch, length):
    return bounds.new_empty((batch, length), dtype=torch.int64)
