"""The compiler's driver: ``.attn`` text to a callable :class:`Pattern`, one stage per line.

=======  ===================================  ==========================================
stage    entry function                       from → to
=======  ===================================  ==========================================
parse    ``frontend.parse_source``            text → syntax tree (``frontend/syntax.py``)
check    ``frontend.check_pattern``           one definition + parameters → ``CheckedPattern``
lower    ``ir.lower_pattern``                 ``CheckedPattern`` → block-level ``PatternIR``
plan     ``codegen.plan_module``              ``PatternIR`` → the templates' inputs
render   ``codegen.render_module``            plan → Triton source (``codegen/templates/``)
load     ``runtime.cache.kernel_cache``       source → module on disk and imported, once
=======  ===================================  ==========================================

Plan, render and load run on a pattern's first kernel launch (``LazyKernels``), so
checking, printing, masks and the CPU reference never generate code. After the driver,
a call goes through ``runtime`` (validation, dispatch, launch, autograd) and generation
through ``serving`` (KV cache, prefill, decode).
"""

from __future__ import annotations

from pathlib import Path

from . import frontend, ir
from .errors import InputError, PatternError, SourceFile, did_you_mean
from .frontend import syntax as S
from .frontend.parse import decode_source
from .frontend.resources import shipped_pattern_names, shipped_pattern_path
from .pattern import Pattern, patterns_of


def compile_definition(definition: S.PatternDef, source: SourceFile, overrides: dict | None = None) -> Pattern:
    """One parsed definition through the stages after parsing."""
    overrides = dict(overrides or {})
    checked = frontend.check_pattern(definition, source, overrides)  # check
    lowered = ir.lower_pattern(checked)  # lower
    kernels, key = bind_kernels(lowered)  # plan, render, load: on the first launch
    return Pattern(definition, source, overrides, checked, lowered, kernels, key)


def bind_kernels(lowered: ir.PatternIR):
    """The pattern's generated kernel module, rendered and loaded on its first launch
    (``LazyKernels``), and its source key; (None, None) where Triton is missing. The
    kernels' operators find the module by that key (``runtime.registry``)."""
    try:
        import triton
    except ImportError:  # pragma: no cover - platforms without Triton run the reference
        return None, None
    from .codegen import source_key
    from .runtime.cache import LazyKernels
    from .runtime.registry import register

    key = source_key(lowered, triton.__version__)
    module = LazyKernels(lowered, key)
    register(key, lowered, module)
    return module, key


def compile_file(text: str, filename: str = "<string>") -> dict[str, Pattern]:
    """Every pattern of a file, with default parameters, by name."""
    module = frontend.parse_source(text, filename)  # parse
    return {d.name: compile_definition(d, module.source) for d in patterns_of(module)}


def compile_source(text: str | bytes, name: str | None = None, *, filename: str = "<string>", **overrides) -> Pattern:
    """Compile one pattern from ``.attn`` text (a ``str``, or the UTF-8 bytes of a file).

    ``name`` picks a pattern when the text defines several; ``overrides`` set parameters.
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise InputError(
            f"compile_source: `text` must be the .attn source as a str (or UTF-8 bytes), got {type(text).__name__}; "
            "to load a file, use sparsedsl.load(path)"
        )
    if name is not None and not isinstance(name, str):
        raise InputError(f"compile_source: `name` must be a pattern's name (a str), got {type(name).__name__}")
    module = frontend.parse_source(text, filename)  # parse
    definitions = patterns_of(module)
    source = module.source
    if not definitions:
        raise PatternError("no pattern in this file", source=source, hint="define one: `pattern name() { return causal }`")
    if name is None:
        stem = Path(filename).stem
        chosen = [d for d in definitions if d.name == stem] if len(definitions) > 1 else definitions
        if len(chosen) != 1:
            names = ", ".join(d.name for d in definitions)
            raise PatternError(f"{source.name} defines several patterns ({names}); pick one with name=", source=source)
        definition = chosen[0]
    else:
        matches = [d for d in definitions if d.name == name]
        if not matches:
            names = [d.name for d in definitions]
            raise PatternError(
                f"{source.name} has no pattern `{name}`",
                source=source,
                hint=did_you_mean(name, names) or f"it defines: {', '.join(names)}",
            )
        definition = matches[0]
    return compile_definition(definition, source, overrides)


def load(path_or_name: str | Path, name: str | None = None, **overrides) -> Pattern:
    """Load a pattern from a ``.attn`` file, or a shipped one by name (``load("nsa")``)."""
    if not isinstance(path_or_name, (str, Path)) or not str(path_or_name):
        raise InputError(
            f"load: `path_or_name` must be a .attn file's path or a shipped pattern's name, got {path_or_name!r} "
            f"(shipped patterns: {', '.join(shipped_pattern_names())})"
        )
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_pattern_path(str(path_or_name)) if _plain_name(str(path_or_name)) else None
        if shipped is None:
            available = shipped_pattern_names()
            folder = " (a folder of that name exists)" if path.is_dir() else ""
            raise PatternError(
                f"no file `{path_or_name}`{folder} and no shipped pattern of that name",
                source=SourceFile(str(path_or_name), ""),
                hint=did_you_mean(str(path_or_name), available) or f"shipped patterns: {', '.join(available)}",
            )
        path = shipped
    return compile_source(read_source(path), name, filename=str(path), **overrides)


def _plain_name(text: str) -> bool:
    """A name such as ``nsa``, not a path: shipped patterns are looked up by names only."""
    return text.isidentifier()


# No pattern file is this large; reading stops here, so that `/dev/zero` or a huge file
# given by mistake is refused instead of filling the memory.
MAX_SOURCE_BYTES = 1 << 20


def read_source(path: str | Path) -> str:
    """The text of a ``.attn`` file; a file that cannot be read, is larger than
    :data:`MAX_SOURCE_BYTES` or is not UTF-8 text raises a :class:`PatternError` naming it."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise PatternError(f"cannot read {path}: {exc.strerror or exc}", source=SourceFile(str(path), "")) from None
    if len(data) > MAX_SOURCE_BYTES:
        raise PatternError(
            f"{path} is larger than {MAX_SOURCE_BYTES // 1024} KiB: not a pattern file", source=SourceFile(str(path), "")
        )
    return decode_source(data, str(path))
