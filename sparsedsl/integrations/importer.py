"""Importing ``.attn`` files as Python modules.

``from sparsedsl.patterns.nsa import nsa`` loads a shipped pattern; ``import
mypatterns.variants`` loads ``mypatterns/variants.attn`` from ``sys.path``. Each pattern of
the file becomes a module attribute of its name. The finder is registered once, when
:mod:`sparsedsl` is imported, after Python's own finders, so ``.py`` modules win.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

from ..frontend.resources import data_dir

SHIPPED_PACKAGE = "sparsedsl.patterns"


class AttnLoader(importlib.abc.Loader):
    """Compiles every pattern of one ``.attn`` file into the module's namespace."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        from ..compiler import compile_file, read_source

        module.__file__ = str(self.path)
        patterns = compile_file(read_source(self.path), str(self.path))
        module.__dict__.update(patterns)
        module.__all__ = list(patterns)


class _ShippedPackageLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__doc__ = "The patterns shipped with sparsedsl, importable as submodules."


class AttnFinder(importlib.abc.MetaPathFinder):
    """Finds ``<name>.attn`` where Python would look for ``<name>.py``."""

    def find_spec(self, fullname, path, target=None):
        if fullname == SHIPPED_PACKAGE:
            spec = importlib.machinery.ModuleSpec(fullname, _ShippedPackageLoader(), is_package=True)
            spec.submodule_search_locations = [str(data_dir("patterns"))]
            return spec
        leaf = fullname.rpartition(".")[2]
        for entry in path if path is not None else sys.path:
            candidate = Path(entry or ".") / f"{leaf}.attn"
            if candidate.is_file():
                return importlib.machinery.ModuleSpec(fullname, AttnLoader(candidate), origin=str(candidate))
        return None


def install() -> None:
    """Register the ``.attn`` finder (once)."""
    if not any(isinstance(f, AttnFinder) for f in sys.meta_path):
        sys.meta_path.append(AttnFinder())
