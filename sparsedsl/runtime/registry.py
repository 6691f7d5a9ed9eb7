"""Where the kernel operators find a pattern: its IR and generated kernels, by source key.

A custom operator takes tensors and plain values, never a :class:`~sparsedsl.Pattern`, so
every pattern whose kernels are loaded is registered here under its source key (a hash of
its IR, the templates and Triton: one key, one set of kernels), and the operators of
:mod:`.ops` carry that key as a string. A key is stable across processes, so a graph that
names one finds its kernels wherever the pattern is loaded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from ..ir.nodes import PatternIR, PooledKeys
from .launch.common import BranchKernels
from .launch.selection import Selection


@dataclass(frozen=True)
class Registered:
    """A pattern's IR and its generated kernel module, under its source key."""

    key: str
    ir: PatternIR
    module: ModuleType

    def kernels(self, index: int) -> BranchKernels:
        """The kernels of branch ``index``."""
        return BranchKernels(self.module, index, self.key)

    def pooled_keys(self, index: int) -> PooledKeys:
        """How compress branch ``index`` pools."""
        keys = self.ir.branches[index].keys
        assert isinstance(keys, PooledKeys), f"branch {index} of {self.ir.name} is not a compress branch"
        return keys

    def selection(self, index: int) -> Selection:
        """The numbers of select branch ``index`` and of the compress branch scoring it."""
        branch = self.ir.branches[index]
        return Selection.of(branch, self.ir.branch(branch.blocks.score))


_patterns: dict[str, Registered] = {}


def register(key: str, ir: PatternIR, module: ModuleType) -> None:
    """Make ``key`` name ``ir`` and its kernels ``module`` (the latest loaded, as Triton's
    interpreter mode decides at import which kind of kernels a module holds)."""
    _patterns[key] = Registered(key, ir, module)


def registered(key: str) -> Registered:
    """The pattern registered under ``key``."""
    try:
        return _patterns[key]
    except KeyError:
        raise KeyError(
            f"sparsedsl: no pattern is registered under source key {key!r}; load the pattern "
            "(sparsedsl.load / compile_source) in this process before running a graph that calls it"
        ) from None
