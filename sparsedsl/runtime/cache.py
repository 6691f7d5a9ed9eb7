"""Stage 5 of the pipeline: generated source on disk, loaded as a module, kept once.

Each pattern's kernels are rendered once, written to ``$SPARSEDSL_CACHE_DIR`` (default
``~/.cache/sparsedsl``) under a name made of the source key (a hash of the IR, the
templates' version and Triton's), and imported from there; later loads and other
processes reuse the file. Writes go to a temporary file that is renamed into place, so
two processes generating the same kernels at once both succeed. The last line of every
file is a checksum of the rest: a truncated or edited file is regenerated.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import triton

from ..codegen.render import render_module, source_key
from ..ir.nodes import PatternIR

_CHECKSUM = "# sparsedsl-checksum "


def cache_dir() -> Path:
    """Where generated kernels live: ``$SPARSEDSL_CACHE_DIR``, else the user cache folder."""
    configured = os.environ.get("SPARSEDSL_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsedsl"


def with_checksum(text: str) -> str:
    return f"{text}{_CHECKSUM}{hashlib.sha256(text.encode()).hexdigest()}\n"


def verified_source(path: Path) -> str | None:
    """The file's text if its checksum line matches the rest, else None."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, marker, digest = text.rpartition(_CHECKSUM)
    if not marker or digest.strip() != hashlib.sha256(body.encode()).hexdigest():
        return None
    return text


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class KernelCache:
    """Generated kernel modules by source key: rendered, written and imported once."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, bool], ModuleType] = {}

    def kernels(self, ir: PatternIR) -> ModuleType:
        key = source_key(ir, triton.__version__)
        # Triton decides at import whether kernels compile or interpret (TRITON_INTERPRET).
        mode = os.environ.get("TRITON_INTERPRET") == "1"
        module = self._modules.get((key, mode))
        if module is None:
            module = self._modules[(key, mode)] = self._load(key, ir, mode)
        return module

    def _load(self, key: str, ir: PatternIR, interpreted: bool) -> ModuleType:
        path = cache_dir() / f"kernels_{key}.py"
        if path.exists() and verified_source(path) is None:
            warnings.warn(f"sparsedsl: regenerating the damaged kernel cache file {path}", stacklevel=3)
        if verified_source(path) is None:
            write_atomically(path, with_checksum(render_module(ir, key)))
        name = f"sparsedsl_generated_{key}{'_interpreted' if interpreted else ''}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton reads the kernels' source through the module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module


# The one kernel cache of the process.
kernel_cache = KernelCache()
