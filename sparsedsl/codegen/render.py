"""Stage 4 of the pipeline: the block IR to Triton source, through the jinja2 templates."""

from __future__ import annotations

import hashlib
from functools import cache

import jinja2

from ..version import __version__
from ..ir.nodes import PatternIR
from ..ir.text import format_ir
from ..resources import data_dir
from .plan import plan_module

# Bump when the templates change what they generate: it is part of every cache key.
TEMPLATE_VERSION = 29


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
    """Whether block `blk` lies in the [lo, hi) run of any segment."""
    return " | ".join(f"(({getattr(s, lo).name} <= blk) & (blk < {getattr(s, hi).name}))" for s in segments) or "False"


def _overlaps_any(segments, lo: str, hi: str) -> str:
    """Whether [lo, hi) meets the [start, stop) run of any segment."""
    overlaps = [f"(tl.maximum({s.start.name}, {lo}) < tl.minimum({s.stop.name}, {hi}))" for s in segments]
    return " | ".join(overlaps) or "False"  # a mask that provably sees nothing has no segment


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


def source_key(ir: PatternIR, triton_version: str) -> str:
    """What identifies generated code: the IR (not where it was written), the templates'
    version and Triton's."""
    ir_lines = format_ir(ir).splitlines()
    body = "\n".join([ir_lines[0].split("  #")[0], *ir_lines[1:]])
    text = f"{body}\ntemplates {TEMPLATE_VERSION}\nsparsedsl {__version__}\ntriton {triton_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def render_module(ir: PatternIR, key: str) -> str:
    """The Python source of the pattern's kernels: forward and backward for every branch."""
    plan = plan_module(ir)
    template = _environment().get_template("attention.py.j2")
    return template.render(plan=plan, key=key, version=__version__, template_version=TEMPLATE_VERSION)
