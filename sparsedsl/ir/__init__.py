"""Stage 3 of the pipeline: ``lower_pattern`` turns a checked pattern into the block-level
IR of ``nodes.py`` (frozen dataclasses), with sympy index algebra (``expressions.py``,
``inverse.py``) and interval pieces of masks (``segments.py``); ``text.py`` prints it and
``evaluate.py`` evaluates its predicates on concrete indices (for tests and tools)."""

from .lower import lower_pattern
from .nodes import PatternIR

__all__ = ["PatternIR", "lower_pattern"]
