"""From text or files to :class:`Pattern` objects: ``compile_source`` and ``load``."""

from __future__ import annotations

from pathlib import Path

from .errors import PatternError, SourceFile, did_you_mean
from .frontend.parse import parse_source
from .pattern import Pattern, patterns_of
from .resources import shipped_pattern_names, shipped_pattern_path


def compile_file(text: str, filename: str = "<string>") -> dict[str, Pattern]:
    """Every pattern of a file, with default parameters, by name."""
    module = parse_source(text, filename)
    return {d.name: Pattern(d, module.source) for d in patterns_of(module)}


def compile_source(text: str, name: str | None = None, *, filename: str = "<string>", **overrides) -> Pattern:
    """Compile one pattern from ``.attn`` text.

    ``name`` picks a pattern when the text defines several; ``overrides`` set parameters.
    """
    module = parse_source(text, filename)
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
    return Pattern(definition, source, overrides)


def load(path_or_name: str | Path, name: str | None = None, **overrides) -> Pattern:
    """Load a pattern from a ``.attn`` file, or a shipped one by name (``load("nsa")``)."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_pattern_path(str(path_or_name))
        if shipped is None:
            available = shipped_pattern_names()
            raise PatternError(
                f"no file `{path_or_name}` and no shipped pattern of that name",
                hint=did_you_mean(str(path_or_name), available) or f"shipped patterns: {', '.join(available)}",
            )
        path = shipped
    return compile_source(_read(path), name, filename=str(path), **overrides)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PatternError(f"cannot read {path}: {exc}", source=SourceFile(str(path), "")) from None
