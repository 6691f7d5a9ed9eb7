"""Stage 1: text to syntax tree, printing back, and syntax errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsedsl import PatternError
from sparsedsl.frontend import syntax as S
from sparsedsl.frontend.parse import parse_source
from sparsedsl.frontend.printer import format_module
from sparsedsl.frontend.resources import data_dir

NSA = """
# comments start with '#'
pattern longformer(window: int = 512, globals: int = 16) {
    return sliding(window) | global(globals)
}

pattern nsa(cmp_block: int = 32, cmp_stride: int = 16, sel_block: int = 64,
            sel_topk: int = 16, window: int = 512) {
    cmp = compress(block=cmp_block, stride=cmp_stride, pool=mlp)
    sel = select(block=sel_block, topk=sel_topk, score=cmp, keep_first=1, keep_local=2)
    win = causal & sliding(window)
    return gate(cmp, sel, win)
}
"""


def test_parses_the_issue_example():
    module = parse_source(NSA, "nsa.attn")
    assert [p.name for p in module.patterns] == ["longformer", "nsa"]
    nsa = module.patterns[1]
    assert [p.name for p in nsa.params] == ["cmp_block", "cmp_stride", "sel_block", "sel_topk", "window"]
    assert nsa.params[0] == S.Param("cmp_block", "int", S.Number(32))
    cmp, sel, win, ret = nsa.body
    assert cmp == S.Assign(
        "cmp",
        S.Call(
            "compress",
            (),
            (
                S.Keyword("block", S.Name("cmp_block")),
                S.Keyword("stride", S.Name("cmp_stride")),
                S.Keyword("pool", S.Name("mlp")),
            ),
        ),
    )
    assert win.value == S.BinaryOp("&", S.Name("causal"), S.Call("sliding", (S.Name("window"),), ()))
    assert ret == S.Return(S.Call("gate", (S.Name("cmp"), S.Name("sel"), S.Name("win")), ()))
    assert nsa.span.line == 7 and nsa.name_span.column == 9


def test_precedence_follows_python():
    (p,) = parse_source("pattern p() { return a | b & ~c + 2 * -d // 3 }").patterns
    expr = p.body[0].value
    assert expr == S.BinaryOp(
        "|",
        S.Name("a"),
        S.BinaryOp(
            "&",
            S.Name("b"),
            S.BinaryOp(
                "+",
                S.UnaryOp("~", S.Name("c")),
                S.BinaryOp("//", S.BinaryOp("*", S.Number(2), S.UnaryOp("-", S.Name("d"))), S.Number(3)),
            ),
        ),
    )


def test_semicolons_newlines_and_trailing_commas_are_optional():
    a = parse_source("pattern p(w: int = 3,) { x = sliding(w,); return causal & x; }")
    b = parse_source("pattern p(w: int = 3) {\n  x = sliding(w)\n  return causal & x\n}")
    assert a == b


def test_spans_are_one_based_and_ignored_by_equality():
    (p,) = parse_source("pattern p() {\n    return   causal\n}").patterns
    assert p.body[0].span.line == 2 and p.body[0].span.column == 5
    assert p.body[0].value.span.column == 14
    assert p == S.PatternDef("p", (), (S.Return(S.Name("causal")),))


# ---------------------------------------------------------------- printing round trip
_KEYWORDS = {"pattern", "return", "true", "false"}
names = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(lambda n: n not in _KEYWORDS)
numbers = st.one_of(
    st.integers(0, 10**6).map(S.Number),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False).map(S.Number),
)
leaves = st.one_of(numbers, names.map(S.Name), st.booleans().map(S.Boolean))


def _exprs():
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(S.BinaryOp, st.sampled_from(["|", "&", "+", "-", "*", "//", "/", "%"]), inner, inner),
            st.builds(S.UnaryOp, st.sampled_from(["-", "~"]), inner),
            st.builds(
                S.Call,
                names,
                st.lists(inner, max_size=3).map(tuple),
                st.lists(st.builds(S.Keyword, names, inner), max_size=2).map(tuple),
            ),
        ),
        max_leaves=12,
    )


patterns = st.builds(
    S.PatternDef,
    names,
    st.lists(st.builds(S.Param, names, names, st.one_of(st.none(), _exprs())), max_size=3).map(tuple),
    st.tuples(st.lists(st.builds(S.Assign, names, _exprs()), max_size=3), st.builds(S.Return, _exprs())).map(
        lambda t: (*t[0], t[1])
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(patterns, min_size=1, max_size=3).map(lambda ps: S.Module(tuple(ps))))
def test_printing_then_parsing_gives_the_same_tree(module):
    assert parse_source(format_module(module)) == module


def test_shipped_patterns_round_trip():
    for path in sorted(data_dir("patterns").glob("*.attn")):
        module = parse_source(path.read_text(), str(path))
        assert parse_source(format_module(module)) == module, path.name


# ---------------------------------------------------------------- syntax errors
@pytest.mark.parametrize(
    "text, line, column, message, hint",
    [
        (
            "pattern p() {\n  return causal\n",
            2,
            16,
            "unexpected end of file; expected `(`, `;`, `return`, `}`, a name or an operator",
            "a pattern body must end with `}`",
        ),
        ("pattern p( { }", 1, 12, "unexpected `{`; expected `)` or a name", None),
        ("pattern p() {\n  x = 3 $ 4\n}", 2, 9, "unexpected character `$`", "names are letters, digits and `_`; comments start with `#`"),
        (
            "pattern p() { return sliding(1 2) }",
            1,
            32,
            "unexpected number `2`; expected `)`, `,` or an operator",
            "separate arguments with `,`",
        ),
        ("causal", 1, 1, "unexpected name `causal`; expected `pattern` or end of file", "a file holds patterns: `pattern name(params) { ... }`"),
        (
            "pattern p() { return sliding(w=1, 2) }",
            1,
            35,
            "positional argument after keyword argument in call to `sliding`",
            "put positional arguments first, or name this one too",
        ),
        (
            "pattern p() { return causal == x }",
            1,
            29,
            "unexpected `=`; expected `(`, `;`, `return`, `}`, a name or an operator",
            "keyword arguments are written `name=value` inside a call; `==` does not exist",
        ),
    ],
)
def test_syntax_errors_name_the_place_and_what_was_expected(text, line, column, message, hint):
    with pytest.raises(PatternError) as info:
        parse_source(text, "bad.attn")
    err = info.value
    assert (err.file, err.line, err.column) == ("bad.attn", line, column)
    assert err.message == message
    assert err.hint == hint
    rendered = str(err)
    assert rendered.startswith(f"bad.attn:{line}:{column}: error: {message}")
    source_line = text.splitlines()[line - 1] if line <= len(text.splitlines()) else ""
    assert f"\n    {source_line}\n    {' ' * (column - 1)}^" in rendered


# ---------------------------------------------------------------- hostile text
@pytest.mark.parametrize(
    "expression",
    [
        "~" * 1000 + "causal",
        "sliding(" + "-" * 1000 + "3)",
        " & ".join(["causal"] * 1000),
        "sliding(" + " + ".join(["1"] * 1000) + ")",
        " | ".join(["causal"] * 500),
    ],
)
def test_deep_nesting_is_refused_at_the_expression_not_by_recursion(expression):
    from sparsedsl.frontend.parse import MAX_NESTING

    with pytest.raises(PatternError) as info:
        parse_source(f"pattern p() {{\n    return {expression}\n}}", "deep.attn")
    err = info.value
    assert (err.file, err.line, err.column) == ("deep.attn", 2, 12)
    assert err.message == f"this expression nests more than {MAX_NESTING} levels deep"
    assert "a chain `a & b & ...` of n terms is n - 1 levels" in err.hint


def test_nesting_up_to_the_limit_parses():
    from sparsedsl.frontend.parse import MAX_NESTING

    chain = " & ".join(["causal"] * (MAX_NESTING + 1))  # MAX_NESTING operators
    assert len(parse_source(f"pattern p() {{ return {chain} }}").patterns) == 1


def test_a_byte_order_mark_is_not_part_of_the_text():
    text = "\ufeffpattern p() { return causal }"
    assert parse_source(text) == parse_source(text[1:])
    assert parse_source(text.encode("utf-8")) == parse_source(text[1:])
    with pytest.raises(PatternError) as info:
        parse_source("\ufeffpattern p() { return casual & }", "bom.attn")
    assert (info.value.line, info.value.column) == (1, 31)  # columns do not count the mark


def test_bytes_are_utf8_and_other_bytes_are_located():
    assert parse_source("pattern é() { return causal }".replace("é", "e").encode()).patterns[0].name == "e"
    with pytest.raises(PatternError) as info:
        parse_source(b"pattern p() {\n  return caus\xe9al\n}", "latin1.attn")
    err = info.value
    assert (err.file, err.line, err.column) == ("latin1.attn", 2, 14)
    assert err.message == "the file is not UTF-8 text: byte 0xe9 here is not valid UTF-8"
    with pytest.raises(PatternError, match=r"^bin.attn:1:1: error: the file is not UTF-8 text: byte 0xff"):
        parse_source(b"\xff\xfe\x00\x01binary", "bin.attn")


def test_control_characters_are_named_not_printed():
    with pytest.raises(PatternError) as info:
        parse_source("pattern p() { return causal \x1b[31m }", "esc.attn")
    assert info.value.message == "unexpected character U+001B"
    assert "\x1b" not in str(info.value) and "    pattern p() { return causal ?[31m }" in str(info.value)


def test_lines_are_counted_at_newlines_only():
    # A form feed ends a line for str.splitlines but not for the parser: the echoed line
    # must be the one the position is on.
    with pytest.raises(PatternError) as info:
        parse_source("pattern p() {\x0c\n  return $ }", "ff.attn")
    assert (info.value.line, info.value.column) == (2, 10)
    assert "\n      return $ }\n" in str(info.value)
