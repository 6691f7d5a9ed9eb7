"""Stage 4 of the pipeline: the block IR to Triton source, through the jinja2 templates."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Iterable

import jinja2

from .. import __version__
from ..frontend.resources import data_dir
from ..ir.nodes import PatternIR
from ..ir.text import format_ir
from .kernel_specs import SPEC_FAMILIES, SPECS
from .layout import within_columns
from .plan import plan_module

# What turns a pattern's IR into source: the templates, this renderer and the printing of
# the IR's formulas (sparsedsl/ir). Their contents are hashed into every cache key, so an
# edit to any of them generates new kernels; there is no version to bump by hand.
_CODE_DIRS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "ir")


def _nest(names, fn: str) -> str:
    """``fn(a, fn(b, c))`` for names a, b, c: a min or max of several values."""
    names = list(names)
    if not names:
        return "0"
    text = names[-1]
    for name in reversed(names[:-1]):
        text = f"{fn}({name}, {text})"
    return text


def _inside_any(segments, lo: str, hi: str) -> str:
    """Whether block `blk` lies in the [lo, hi) run of any segment (in parentheses, so that
    the layout can break a long one between segments)."""
    runs = [f"(({getattr(s, lo).name} <= blk) & (blk < {getattr(s, hi).name}))" for s in segments]
    return f"({' | '.join(runs)})" if len(runs) > 1 else (runs[0] if runs else "False")


def _overlaps_any(segments, lo: str, hi: str) -> str:
    """Whether [lo, hi) meets the [start, stop) run of any segment."""
    overlaps = [f"(tl.maximum({s.start.name}, {lo}) < tl.minimum({s.stop.name}, {hi}))" for s in segments]
    return f"({' | '.join(overlaps)})" if len(overlaps) > 1 else (overlaps[0] if overlaps else "False")  # a mask that provably sees nothing has no segment


def _first_start(segments, none: str) -> str:
    """The first start among segments with a non-empty run (``none`` if all are empty)."""
    return _nest([f"tl.where({s.start.name} < {s.stop.name}, {s.start.name}, {none})" for s in segments], "tl.minimum")


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=False,
        autoescape=False,
    )
    environment.filters.update(nest=_nest, inside_any=_inside_any, overlaps_any=_overlaps_any, first_start=_first_start)
    return environment


def generator_files() -> list[Path]:
    """The files whose contents decide what source an IR renders to."""
    templates = sorted(p for p in data_dir("templates").iterdir() if p.is_file())
    return templates + sorted(p for folder in _CODE_DIRS for p in folder.glob("*.py"))


def files_digest(files: Iterable[Path]) -> str:
    """A hash of the files' names (with their folder's) and contents."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


@cache
def generator_digest() -> str:
    """The hash of :func:`generator_files`, computed once per process."""
    return files_digest(generator_files())


def source_key(ir: PatternIR, triton_version: str, generator: str | None = None) -> str:
    """What identifies generated code: the IR (not where it was written), the generator
    (``generator_digest()`` unless given) and the versions of sparsedsl and Triton."""
    ir_lines = format_ir(ir).splitlines()
    body = "\n".join([ir_lines[0].split("  #")[0], *ir_lines[1:]])
    generator = generator_digest() if generator is None else generator
    text = f"{body}\ngenerator {generator}\nsparsedsl {__version__}\ntriton {triton_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def render_module(ir: PatternIR, key: str) -> str:
    """The Python source of the pattern's kernels: forward and backward for every branch,
    within 120 columns (:mod:`.layout`)."""
    return within_columns(render_template(ir, key))


def render_template(ir: PatternIR, key: str) -> str:
    """The templates' output for ``ir``, before :func:`render_module` lays it out."""
    template = _environment().get_template("attention.py.j2")
    specs = {**SPECS, **SPEC_FAMILIES}
    return template.render(plan=plan_module(ir), specs=specs, key=key, version=__version__, generator=generator_digest()[:24])
