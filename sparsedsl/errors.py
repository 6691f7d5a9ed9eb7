"""Diagnostics: the one exception of the front end, and the one for bad call arguments.

Every malformed or impossible ``.attn`` input raises :class:`PatternError`, printed in
the usual compiler form::

    nsa.attn:3:12: error: unknown primitive `casual`
        win = casual & sliding(window)
              ^~~~~~
    hint: did you mean `causal`?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Span:
    """A stretch of source text; lines and columns are 1-based, ``end_column`` exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True)
class SourceFile:
    """The text of a ``.attn`` file and the name diagnostics use for it."""

    name: str
    text: str = field(repr=False)

    def line_text(self, line: int) -> str:
        # Lines as the parser counts them: only "\n" ends one (str.splitlines would also
        # split at form feeds and other separators, and the numbers would disagree).
        lines = self.text.split("\n")
        return lines[line - 1].removesuffix("\r") if 1 <= line <= len(lines) else ""


class PatternError(Exception):
    """A malformed or impossible pattern: names the file, line and column, and how to fix it."""

    def __init__(
        self,
        message: str,
        *,
        source: SourceFile | None = None,
        span: Span | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.hint = hint
        self.file = source.name if source is not None else None
        self.line = span.line if span is not None else None
        self.column = span.column if span is not None else None
        self.span = span
        self._source_line = (
            _printable(source.line_text(span.line)) if source is not None and span is not None else None
        )
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or "<pattern>"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        text = f"{where}: error: {self.message}"
        if self._source_line and not self._source_line.isspace() and self.span is not None:
            width = 1
            if self.span.end_line == self.span.line:
                width = max(1, self.span.end_column - self.span.column)
            text += f"\n    {self._source_line}\n    {' ' * (self.span.column - 1)}^{'~' * (width - 1)}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class InputError(ValueError):
    """A bad argument to a call of the API or an option of the command line (shape, dtype,
    device, a missing tensor, a size); names it and says how to fix it."""


def _printable(line: str) -> str:
    """A source line safe to echo on a terminal, one character per column: a tab as a
    space, any other control character as `?`."""
    return "".join(c if c.isprintable() else " " if c == "\t" else "?" for c in line)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, if one is close enough to be a likely typo."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None
