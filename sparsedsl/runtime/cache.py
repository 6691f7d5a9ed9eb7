"""Stage 5 of the pipeline: generated source on disk, loaded as a module, kept once.

Each pattern's kernels are rendered once, written to ``$SPARSEDSL_CACHE_DIR`` (default
``~/.cache/sparsedsl``) under a name made of the source key (a hash of the IR, of the
templates and renderer that turn it into source, and of Triton's version), and imported
from there; later loads and other processes reuse the file. Writes go to a temporary file
that is renamed into place, so two processes generating the same kernels at once both
succeed. The last line of every file is a checksum of the rest: a truncated or edited
file is regenerated.

Nothing happens here before a kernel is launched: a pattern holds :class:`LazyKernels`,
which renders and imports its module on first use, so checking, printing, masks and the
CPU reference never touch the cache. A cache that cannot be written (read-only, a file
in the folder's place, ``/proc``...) never stops work: the kernels are written to a
temporary folder of this process instead, with one warning saying why.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType

import triton

from ..codegen.render import render_module, source_key
from ..ir.nodes import PatternIR
from .generated import generated_branches

_CHECKSUM = "# sparsedsl-checksum "


class CacheWarning(UserWarning):
    """The kernel cache could not be used as configured; sparsedsl worked around it."""


def cache_dir() -> Path:
    """Where generated kernels live: ``$SPARSEDSL_CACHE_DIR``, else the user cache folder."""
    configured = os.environ.get("SPARSEDSL_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsedsl"


def with_checksum(text: str) -> str:
    return f"{text}{_CHECKSUM}{hashlib.sha256(text.encode()).hexdigest()}\n"


def read_cached(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` for a cache file whose checksum line matches the rest;
    ``(None, problem)`` otherwise, ``problem`` saying what is wrong (None: no file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except NotADirectoryError:  # a file where the cache folder should be: no such file
        return None, None
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "is damaged (not UTF-8 text)"
    body, marker, digest = text.rpartition(_CHECKSUM)
    if not marker or digest.strip() != hashlib.sha256(body.encode()).hexdigest():
        return None, "is damaged (truncated or edited: its checksum does not match)"
    return text, None


def verified_source(path: Path) -> str | None:
    """The file's text if its checksum line matches the rest, else None."""
    return read_cached(path)[0]


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


class _Fallback:
    """The temporary folder that stands in for an unwritable cache, made on first need and
    removed at exit; one warning per configured folder that failed."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def folder(self, wanted: Path, reason: str) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="sparsedsl-kernels-"))
                atexit.register(shutil.rmtree, self._folder, ignore_errors=True)
            if str(wanted) not in self._warned:
                self._warned.add(str(wanted))
                warnings.warn(
                    f"sparsedsl: cannot write the kernel cache in {wanted} ({reason}); generated kernels go to "
                    f"{self._folder} for this process and are not kept. Set SPARSEDSL_CACHE_DIR to a writable folder "
                    "to keep them",
                    CacheWarning,
                    stacklevel=5,
                )
            return self._folder


_fallback = _Fallback()


class KernelCache:
    """Generated kernel modules by source key: rendered, written and imported once."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, bool], ModuleType] = {}
        self._lock = threading.Lock()

    def kernels(self, ir: PatternIR, key: str | None = None) -> ModuleType:
        """The kernel module of ``ir`` (``key``: its source key, if already computed)."""
        key = source_key(ir, triton.__version__) if key is None else key
        # Triton decides at import whether kernels compile or interpret (TRITON_INTERPRET).
        mode = os.environ.get("TRITON_INTERPRET") == "1"
        module = self._modules.get((key, mode))
        if module is None:
            with self._lock:
                module = self._modules.get((key, mode))
                if module is None:
                    module = self._modules[(key, mode)] = self._load(key, ir, mode)
        return module

    def _load(self, key: str, ir: PatternIR, interpreted: bool) -> ModuleType:
        path = self._source_file(cache_dir(), key, ir)
        name = f"sparsedsl_generated_{key}{'_interpreted' if interpreted else ''}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton reads the kernels' source through the module
        try:
            spec.loader.exec_module(module)
            # Read once, here: a misnamed kernel fails at load, and launches find typed records.
            module.KERNELS = generated_branches(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module

    def _source_file(self, folder: Path, key: str, ir: PatternIR) -> Path:
        """A verified file of the kernels' source: found in ``folder``, or written there,
        or, where ``folder`` cannot take it, in the temporary fallback folder."""
        path = folder / f"kernels_{key}.py"
        text, problem = read_cached(path)
        if text is not None:
            return path
        source = with_checksum(render_module(ir, key))
        if path.is_dir():  # no file can be renamed over a folder
            return self._fall_back(folder, path, source, f"{path} is a folder, not a file")
        if problem is not None:
            warnings.warn(f"sparsedsl: the kernel cache file {path} {problem}; regenerating it", CacheWarning, stacklevel=5)
        try:
            write_atomically(path, source)
            return path
        except OSError as exc:
            return self._fall_back(folder, path, source, _unwritable(folder, exc))

    def _fall_back(self, folder: Path, path: Path, source: str, reason: str) -> Path:
        fallback = _fallback.folder(folder, reason) / path.name
        if verified_source(fallback) is None:
            write_atomically(fallback, source)
        return fallback


def _unwritable(folder: Path, exc: OSError) -> str:
    """Why the cache ``folder`` cannot take a file, in words."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return exc.strerror or str(exc)


# The one kernel cache of the process.
kernel_cache = KernelCache()


class LazyKernels:
    """A pattern's kernel module, rendered and imported (through :data:`kernel_cache`) the
    first time one of its attributes is read: when a kernel is about to launch."""

    def __init__(self, ir: PatternIR, key: str) -> None:
        self._ir = ir
        self._key = key

    def load(self) -> ModuleType:
        """The module itself (each TRITON_INTERPRET mode has its own)."""
        return kernel_cache.kernels(self._ir, self._key)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends must not generate kernels
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        return f"<LazyKernels {self._ir.name} {self._key}>"
