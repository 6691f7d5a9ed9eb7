"""The last step of rendering: the generated module laid out within 120 columns.

Templates write calls and index expressions as one line each, since their length depends
on the pattern (how many segments, which predicate). This pass breaks every longer line
inside parentheses, after a comma or before a ``&`` or ``|``, continuing under the first
argument of the innermost open parenthesis (as a person would format it), and re-wraps
long comment lines. Only whitespace changes: the module's syntax tree stays the same,
which the tests check.
"""

from __future__ import annotations

import io
import textwrap
import tokenize

WIDTH = 120
DEEPEST_ALIGNMENT = 72  # continuing further right than this leaves too little room: indent instead


def within_columns(source: str, width: int = WIDTH) -> str:
    """``source`` (valid Python) with lines longer than ``width`` broken, where they can be."""
    lines = source.split("\n")
    breaks, frozen = _break_points(source)
    out = []
    for number, line in enumerate(lines, start=1):
        if len(line) <= width or number in frozen:
            out.append(line)
        elif line.lstrip().startswith("#"):
            out.extend(_wrap_comment(line, width))
        else:
            out.extend(_wrap_code(line, breaks.get(number, []), width))
    return "\n".join(out)


def _break_points(source: str) -> tuple[dict[int, list[tuple[int, int, int]]], set[int]]:
    """Per line, where it may break inside parentheses (not subscripts): (column where the
    piece ends, column of the innermost open parenthesis or -1 if it opened on an earlier
    line, depth); and the lines inside a multi-line string, which must not change."""
    breaks: dict[int, list[tuple[int, int, int]]] = {}
    frozen: set[int] = set()
    brackets: list[tuple[str, int, int]] = []  # (bracket, line, column) of each open one
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), (end_row, _) = token.start, token.end
        if token.type == tokenize.STRING and end_row > row:
            frozen.update(range(row, end_row + 1))
        elif token.type == tokenize.OP and token.string in "([{":
            brackets.append((token.string, row, col))
        elif token.type == tokenize.OP and token.string in ")]}":
            brackets.pop()
        elif token.type == tokenize.OP and token.string in (",", "&", "|") and brackets and brackets[-1][0] == "(":
            _, opened_row, opened_col = brackets[-1]
            cut = col + 1 if token.string == "," else col  # after a comma, before an operator
            breaks.setdefault(row, []).append((cut, opened_col if opened_row == row else -1, len(brackets)))
    return breaks, frozen


def _wrap_code(line: str, breaks: list[tuple[int, int, int]], width: int) -> list[str]:
    """``line`` broken at ``breaks``, each piece as long as fits: at the shallowest break
    that fits and lets the next piece continue under its parenthesis's first argument
    (within DEEPEST_ALIGNMENT columns), else at the last that fits, indented."""
    indent = len(line) - len(line.lstrip())
    pieces: list[str] = []
    start, lead = 0, ""
    shifts = [(0, 0)]  # (original column where a piece starts, where its text moved by)

    def column(original: int) -> int:
        return original + next(shift for begin, shift in reversed(shifts) if begin <= original)

    def aligned(point: tuple[int, int, int]) -> int:
        return column(point[1]) + 1 if point[1] >= 0 else -1

    while len(lead) + len(line) - start > width:
        ahead = [c for c in breaks if start < c[0] and line[c[0] :].strip()]  # something must follow
        if not ahead:
            break
        fitting = [c for c in ahead if column(c[0]) <= width]
        neat = [c for c in fitting if 0 <= aligned(c) <= DEEPEST_ALIGNMENT]
        if neat:
            shallowest = min(c[2] for c in neat)
            point = [c for c in neat if c[2] == shallowest][-1]
        else:
            point = fitting[-1] if fitting else ahead[0]
        pieces.append(lead + line[start : point[0]].rstrip())
        start = point[0]
        while start < len(line) and line[start] == " ":
            start += 1
        continuation = aligned(point) if 0 <= aligned(point) <= DEEPEST_ALIGNMENT else indent + 8
        lead = " " * continuation
        shifts.append((start, continuation - start))
    pieces.append(lead + line[start:])
    return pieces


def _wrap_comment(line: str, width: int) -> list[str]:
    """A comment line re-wrapped at spaces; continuation lines indented four more."""
    indent = line[: len(line) - len(line.lstrip())]
    text = line.lstrip()[1:]
    inner = text[: len(text) - len(text.lstrip())]
    first = f"{indent}#{inner}"
    words = text.strip().replace("# ", "#\0")  # a comment's "# location" stays on one line
    wrapped = textwrap.wrap(words, width, initial_indent=first, subsequent_indent=first + "    ",
                            break_long_words=False, break_on_hyphens=False)  # fmt: skip
    return [piece.replace("\0", " ") for piece in wrapped] or [line]
