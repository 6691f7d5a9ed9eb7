"""What a generated kernel module holds for the runtime: per branch, its kernels by name
(the ``BRANCHES`` table that ``codegen/templates/attention.py.j2`` writes), read into a
typed record once, when the module is loaded, so that a misnamed kernel fails there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class GeneratedBranch:
    """One branch's kernels, as an entry of a generated module's ``BRANCHES`` names them
    (``codegen/templates/attention.py.j2``): every branch has the first four, a select
    branch its scores, top-k and decode-scoring kernels, a pooled branch its pooling ones."""

    title: str
    uses_documents: bool
    forward: Callable
    backward_dq: Callable
    backward_dkdv: Callable
    decode: Callable
    scores: Callable | None = None
    top: Callable | None = None
    decode_pooled: Callable | None = None
    pool: Callable | None = None
    pool_backward: Callable | None = None
    pool_latest: Callable | None = None


def generated_branches(module) -> tuple[GeneratedBranch, ...]:
    """Every branch's kernels in a freshly loaded generated module, in the IR's order (the
    kernel cache keeps them as the module's ``KERNELS``)."""
    return tuple(GeneratedBranch(**entry) for entry in module.BRANCHES)
