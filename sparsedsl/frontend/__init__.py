"""Stages 1 and 2 of the pipeline: ``parse_source`` (``.attn`` text to the syntax tree of
``syntax.py``, with the lark grammar in the top-level ``grammar/``) and ``check_pattern``
(names, types, parameters and primitives' rules, to the ``CheckedPattern`` of ``model.py``).
``primitives.py`` lists the primitives and their bounds (``kinds.py``: the closed sets of
names, such as pools, as ``str`` enums), ``printer.py`` prints a syntax
tree back as source, ``resources.py`` finds the shipped grammar, templates and patterns."""

from .check import check_pattern
from .parse import parse_source

__all__ = ["check_pattern", "parse_source"]
