"""Stage 1 of the pipeline: ``.attn`` text to the syntax tree (:mod:`.syntax`), with lark.

Lark's own exceptions never escape: every syntax error becomes a :class:`PatternError`
naming the file, line and column, what was found, and what would have been accepted.
Text arrives as ``str`` or as the bytes of a file (UTF-8, a byte-order mark allowed);
expressions nest at most :data:`MAX_NESTING` levels, so that every later pass, all of
them recursive, stays far from Python's recursion limit.
"""

from __future__ import annotations

from functools import cache

import lark
from lark import Lark, Token, Transformer, v_args

from ..errors import PatternError, SourceFile, Span
from . import syntax as S
from .primitives import MAX_SIZE
from .resources import data_dir

# How deeply an expression may nest: every operator (`&`, `|`, `~`, `+`, `-`, ...) and
# every call is one level, so a chain `a & b & c` of n terms is n - 1 levels. The
# checker applies the same bound to masks built through variables. docs/language.md
# documents it.
MAX_NESTING = 32

_BOM = "\ufeff"
_RESERVED = frozenset({"true", "false"})
_MAX_DIGITS = 40
# Lark's tree nodes that make an expression one level deeper (parentheses make none).
_NESTING_NODES = frozenset(
    {"union", "intersection", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "complement", "call"}
)


@cache
def _parser() -> Lark:
    return Lark(
        (data_dir("grammar") / "attn.lark").read_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
    )


def decode_source(data: bytes, filename: str) -> str:
    """The text of a ``.attn`` file's bytes: UTF-8, or a :class:`PatternError` at the
    line and column of the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise PatternError(
            f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} here is not valid UTF-8",
            source=SourceFile(filename, before),
            span=Span(line, column, line, column + 1),
            hint="save .attn files as UTF-8; binary files are not patterns",
        ) from None


def parse_source(text: str | bytes, filename: str = "<string>") -> S.Module:
    """Parse the text of a ``.attn`` file (``str``, or its UTF-8 bytes) into a
    :class:`~.syntax.Module`."""
    if isinstance(text, (bytes, bytearray)):
        text = decode_source(bytes(text), filename)
    # An editor's byte-order mark is not part of the text (and columns do not count it).
    text = text[len(_BOM) :] if text.startswith(_BOM) else text
    source = SourceFile(filename, text)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    _check_nesting(tree, source)
    try:
        return S.Module(tuple(_ToSyntax(source).transform(tree).children), source)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, PatternError):
            raise exc.orig_exc from None
        raise


def _check_nesting(tree: lark.Tree, source: SourceFile) -> None:
    """Refuse an expression nested deeper than :data:`MAX_NESTING`, at the expression that
    does; the walk keeps its own stack (Python's would overflow on what it refuses)."""
    stack = [(tree, 0, None)]  # node, its nesting, the outermost expression it is part of
    while stack:
        node, depth, outermost = stack.pop()
        if node.data in _NESTING_NODES:
            depth += 1
            outermost = outermost if outermost is not None else node
            if depth > MAX_NESTING:
                raise PatternError(
                    f"this expression nests more than {MAX_NESTING} levels deep",
                    source=source,
                    span=_span_of(outermost.meta),
                    hint="each operator and call is one level: a chain `a & b & ...` of n terms is n - 1 levels; "
                    "write it with fewer terms",
                )
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth, outermost))


def _span_of(meta_or_token) -> Span:
    return Span(meta_or_token.line, meta_or_token.column, meta_or_token.end_line, meta_or_token.end_column)


@v_args(meta=True)
class _ToSyntax(Transformer):
    """Builds syntax nodes bottom-up; every node remembers its span."""

    def __init__(self, source: SourceFile) -> None:
        super().__init__()
        self.source = source

    def _refuse_reserved(self, name: Token, what: str) -> None:
        # `true` and `false` lex as names where only a name can stand (a statement's start,
        # a parameter), but as booleans in expressions: such a variable could never be read.
        if str(name) in _RESERVED:
            raise PatternError(
                f"`{name}` is a reserved word and cannot name a {what}", source=self.source, span=_span_of(name),
                hint="choose another name",
            )

    def pattern(self, meta, children):
        name, *rest = children
        params = tuple(c for c in rest if isinstance(c, S.Param))
        body = tuple(c for c in rest if isinstance(c, (S.Assign, S.Return)))
        return S.PatternDef(str(name), params, body, _span_of(meta), _span_of(name))

    def param(self, meta, children):
        name, type_name, *default = children
        self._refuse_reserved(name, "parameter")
        return S.Param(str(name), str(type_name), default[0] if default else None, _span_of(meta))

    def assign(self, meta, children):
        target, value = children
        self._refuse_reserved(target, "variable")
        return S.Assign(str(target), value, _span_of(meta))

    def return_(self, meta, children):
        return S.Return(children[0], _span_of(meta))

    def call(self, meta, children):
        func, *arguments = children
        args, keywords = [], []
        for argument in arguments:
            if isinstance(argument, S.Keyword):
                keywords.append(argument)
            elif keywords:
                raise PatternError(
                    f"positional argument after keyword argument in call to `{func}`",
                    source=self.source,
                    span=argument.span,
                    hint="put positional arguments first, or name this one too",
                )
            else:
                args.append(argument)
        return S.Call(str(func), tuple(args), tuple(keywords), _span_of(meta), _span_of(func))

    def keyword(self, meta, children):
        name, value = children
        return S.Keyword(str(name), value, _span_of(meta))

    def int_(self, meta, children):
        digits = str(children[0])
        if len(digits) > _MAX_DIGITS:  # Python refuses longer decimal strings anyway
            raise PatternError(
                f"integer literal of {len(digits)} digits is too large", source=self.source, span=_span_of(meta),
                hint=f"sizes are at most {MAX_SIZE:,}",
            )
        return S.Number(int(digits), _span_of(meta))

    def float_(self, meta, children):
        return S.Number(float(children[0]), _span_of(meta))

    def true(self, meta, children):
        return S.Boolean(True, _span_of(meta))

    def false(self, meta, children):
        return S.Boolean(False, _span_of(meta))

    def name(self, meta, children):
        return S.Name(str(children[0]), _span_of(meta))

    def _binary(op):  # noqa: N805 - a factory for the methods below
        def build(self, meta, children):
            left, right = children
            return S.BinaryOp(op, left, right, _span_of(meta))

        return build

    union = _binary("|")
    intersection = _binary("&")
    add = _binary("+")
    sub = _binary("-")
    mul = _binary("*")
    floordiv = _binary("//")
    truediv = _binary("/")
    mod = _binary("%")

    def neg(self, meta, children):
        return S.UnaryOp("-", children[0], _span_of(meta))

    def complement(self, meta, children):
        return S.UnaryOp("~", children[0], _span_of(meta))


# Friendly spellings of the grammar's terminals, for "expected ..." messages.
_TERMINAL_WORDS = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "$END": "end of file"}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"`{pattern.value}`"
    return name.lower()


_OPERATORS = {"`%`", "`&`", "`*`", "`+`", "`-`", "`/`", "`//`", "`|`"}


def _expected_list(expected) -> str:
    words = {_describe_terminal(t) for t in expected}
    if len(words & _OPERATORS) > 2:  # where an expression could go on, any operator could
        words = (words - _OPERATORS) | {"an operator"}
    ordered = sorted(words, key=lambda w: (not w.startswith("`"), w))
    return ", ".join(ordered[:-1]) + (" or " if len(ordered) > 1 else "") + ordered[-1] if ordered else "nothing"


def _syntax_error(exc: lark.exceptions.UnexpectedInput, source: SourceFile) -> PatternError:
    line, column = max(exc.line, 1), max(exc.column, 1)
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        char = source.line_text(line)[column - 1 : column] or "?"
        shown = f"`{char}`" if char.isprintable() else f"U+{ord(char):04X}"  # never a control code on a terminal
        return PatternError(
            f"unexpected character {shown}",
            source=source,
            span=Span(line, column, line, column + 1),
            hint="names are letters, digits and `_`; comments start with `#`",
        )
    if isinstance(exc, lark.exceptions.UnexpectedEOF) or (
        isinstance(exc, lark.exceptions.UnexpectedToken) and exc.token.type == "$END"
    ):
        lines = source.text.splitlines() or [""]
        end_line = len(lines)
        end_col = len(lines[-1]) + 1
        expected = getattr(exc, "accepts", None) or exc.expected
        hint = "a pattern body must end with `}`" if "RBRACE" in expected else None
        return PatternError(
            f"unexpected end of file; expected {_expected_list(expected)}",
            source=source,
            span=Span(end_line, end_col, end_line, end_col + 1),
            hint=hint,
        )
    assert isinstance(exc, lark.exceptions.UnexpectedToken)
    token: Token = exc.token
    expected = exc.accepts or exc.expected
    span = Span(token.line, token.column, token.end_line or token.line, token.end_column or token.column + 1)
    return PatternError(
        f"unexpected {_describe_found(token)}; expected {_expected_list(expected)}",
        source=source,
        span=span,
        hint=_syntax_hint(token, expected),
    )


def _describe_found(token: Token) -> str:
    if token.type == "NAME":
        return f"name `{token}`"
    if token.type in ("INT", "FLOAT"):
        return f"number `{token}`"
    return f"`{token}`"


def _syntax_hint(token: Token, expected) -> str | None:
    if token.type == "EQUAL" and "EQUAL" not in expected:
        return "keyword arguments are written `name=value` inside a call; `==` does not exist"
    if "COMMA" in expected and "RPAR" in expected:
        return "separate arguments with `,`"
    if token.type == "RETURN":
        return "`return` is a statement of its own, at the end of a pattern body"
    if "PATTERN" in expected and token.type != "PATTERN":
        return "a file holds patterns: `pattern name(params) { ... }`"
    return None
