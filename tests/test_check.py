"""Stage 2: checking. Every class of error, with its exact place, message and hint."""

import pytest

from sparsedsl import PatternError, compile_source
from sparsedsl.frontend import model as M


def error_of(text: str, **overrides) -> PatternError:
    with pytest.raises(PatternError) as info:
        compile_source(text, filename="p.attn", **overrides)
    return info.value


SELECT = "pattern p() {{\n    c = compress(block=32, stride=16)\n    return {}\n}}"
BOUND = "the kernels index positions with 32-bit integers: sizes (and sequence lengths) are at most 2^30 = 1,073,741,824"

CASES = [
    # (source, line, column, message, hint)
    ("pattern p() { return casual & sliding(4) }", 1, 22, "undefined name `casual`", "did you mean `causal`?"),
    ("pattern p() { return slidng(4) }", 1, 22, "unknown primitive `slidng`", "did you mean `sliding`?"),
    ("pattern p() { return sliding(1.5) }", 1, 30, "argument `window` of `sliding` must be an int, got a float (1.5)", None),
    ("pattern p() { return sliding(causal) }", 1, 30, "argument `window` of `sliding` must be an int, got a mask", None),
    (
        "pattern p() { return compress(32, 16, pool=median) }",
        1,
        44,
        "argument `pool` of `compress` must be one of mean, max, mlp, got `median`",
        "did you mean `mean`?",
    ),
    ("pattern p() { return sliding(1, 2) }", 1, 33, "`sliding` takes 1 argument but 2 were given", "its signature is sliding(window)"),
    ("pattern p() { return dilated(3) }", 1, 22, "`dilated` needs argument `dilation`", "its signature is dilated(window, dilation)"),
    ("pattern p() { return sliding(4, window=5) }", 1, 33, "argument `window` of `sliding` is given twice", None),
    ("pattern p() { return sliding(windw=4) }", 1, 30, "`sliding` has no argument `windw`", "did you mean `window`?"),
    (
        "pattern p() { return sliding(0) }",
        1,
        30,
        "argument `window` of `sliding` must be at least 1, got 0",
        "sizes count tokens or blocks and cannot be zero or negative",
    ),
    (
        "pattern p(w: int = 512) {\n    return causal & chunked(w - 600)\n}",
        2,
        29,
        "argument `size` of `chunked` must be at least 1, got -88",
        "sizes count tokens or blocks and cannot be zero or negative",
    ),
    (
        SELECT.format("select(block=64, topk=2, score=c, keep_first=1, keep_local=2)"),
        3,
        12,
        "select topk (2) is smaller than the blocks it must always keep (3)",
        "topk must be at least keep_first + keep_local",
    ),
    (
        "pattern p() {\n    w = causal\n    return select(block=64, topk=4, score=w)\n}",
        3,
        43,
        "the score of select(...) must be a compress branch, got a mask",
        "define `cmp = compress(block=..., stride=...)` and pass score=cmp",
    ),
    (
        SELECT.format("select(block=48, topk=4, score=c)"),
        3,
        12,
        "select block 48 cannot be served by the kernels",
        "selected blocks are walked in whole tiles: use a power of two from 16 to 4096",
    ),
    (
        "pattern p() { return compress(block=16, stride=32) }",
        1,
        22,
        "compress stride (32) is larger than its block (16)",
        "keys between pooled blocks would be summarised by none: use stride <= block",
    ),
    (
        "pattern p() {\n    x = causal\n    return full\n}",
        2,
        5,
        "variable `x` is assigned but never used",
        "use it in the returned expression, or remove it",
    ),
    ("pattern p() {\n    return causal & y\n}", 2, 21, "undefined name `y`", None),
    (
        "pattern p() {\n    a = b & causal\n    b = full\n    return a\n}",
        2,
        9,
        "variable `b` is used before it is assigned",
        "move its assignment up",
    ),
    (
        "pattern p() {\n    x = causal\n}",
        1,
        9,
        "pattern `p` has no `return`",
        "end the body with `return <branch>` or `return gate(a, b, ...)`",
    ),
    (
        "pattern p() {\n    return causal\n    x = full\n}",
        2,
        5,
        "`return` must be the last statement of a pattern",
        "a pattern has exactly one `return`, at the end",
    ),
    (
        "pattern p() {\n    x = causal\n    x = full\n    return x\n}",
        3,
        5,
        "variable `x` is assigned twice",
        "give the second one another name",
    ),
    ("pattern p(w: int = 4) {\n    w = causal\n    return w\n}", 2, 5, "variable `w` hides the parameter of that name", "rename the variable"),
    ("pattern p() { return causal + 1 }", 1, 22, "`+` needs numbers, not a mask", "combine masks with `&`, `|` and `~`"),
    ("pattern p() { return sliding(8 / 2) }", 1, 30, "`/` is not allowed: sizes are integers", "use `//` for integer division"),
    ("pattern p() { return sliding(8 // 0) }", 1, 35, "division by zero", None),
    ("pattern p(w: integer = 3) { return sliding(w) }", 1, 11, "unknown type `integer` for parameter `w`", "did you mean `int`?"),
    ("pattern p(w: int = 1.5) { return sliding(w) }", 1, 20, "the default of `w` must be an int, got a float (1.5)", None),
    (
        "pattern p(w: int) { return sliding(w) }",
        1,
        11,
        "parameter `w` has no default and no value was given",
        "give it a default (`w: int = ...`) or pass w=... when loading",
    ),
    ("pattern p(w: int = 1, w: int = 2) { return sliding(w) }", 1, 23, "parameter `w` is declared twice", "rename one of them"),
    (
        "pattern p() { return 3 }",
        1,
        22,
        "a pattern must return a branch or a gate, not an int",
        "return a mask such as `causal & sliding(512)`, a compress/select branch, or gate(...)",
    ),
    (
        "pattern p() {\n    c = compress(32, 16)\n    return c & causal\n}",
        3,
        12,
        "`&` cannot combine a compress branch: it attends with its own softmax",
        "mix separately normalised branches with gate(...)",
    ),
    (
        "pattern p() {\n    g = gate(causal)\n    return g\n}",
        2,
        9,
        "gate(...) must be the returned expression",
        "write `return gate(...)`",
    ),
    ("pattern p() {\n    w = causal\n    return gate(w, w)\n}", 3, 20, "branch `w` appears twice in gate(...)", None),
    ("pattern p() { return gate(causal, gate(full)) }", 1, 35, "gates cannot be nested", "list every branch in one gate(...)"),
    ("pattern p() { return gate(causal, 3) }", 1, 35, "an argument of gate(...) must be a branch, got an int (3)", None),
    ("pattern p() { return sliding }", 1, 22, "`sliding` needs arguments", "write sliding(window)"),
    ("pattern p() { return compress(32, 16, pool=mlp) & mlp }", 1, 22, "`&` cannot combine a compress branch: it attends with its own softmax", "mix separately normalised branches with gate(...)"),
    ("pattern p() { return sliding(mlp) }", 1, 30, "`mlp` is a value of `pool` and can only be passed as pool=mlp", None),
    (
        "pattern p() { return causal }\npattern p() { return full }",
        2,
        9,
        "pattern `p` is defined twice (first on line 1)",
        "rename one of them",
    ),
    # Sizes are bounded by what the kernels index with 32-bit integers.
    ("pattern p() { return causal & sliding(2147483648) }", 1, 39, "argument `window` of `sliding` must be at most 1,073,741,824, got 2,147,483,648", BOUND),
    ("pattern p() { return compress(2147483648, 16) }", 1, 31, "argument `block` of `compress` must be at most 1,073,741,824, got 2,147,483,648", BOUND),
    ("pattern p() { return causal & dilated(40000, 40000) }", 1, 31, "dilated window spans window * dilation = 1,600,000,000 positions, more than 1,073,741,824", BOUND),
    (
        SELECT.format("select(block=64, topk=257, score=c)"),
        3,
        29,
        "argument `topk` of `select` must be at most 256, got 257",
        "the top-k kernel unrolls one step per chosen block at compile time: at most 256 blocks",
    ),
    ("pattern p() { return sliding(99999999999 * 99999999999) }", 1, 30, "integer overflow: the value does not fit in 64 bits (22 digits)", "sizes are at most 1,073,741,824"),
    ("pattern p() { return sliding(" + "9" * 41 + ") }", 1, 30, "integer literal of 41 digits is too large", "sizes are at most 1,073,741,824"),
    (
        "pattern p() { return gate(" + ", ".join(["causal"] * 17) + ") }",
        1,
        27 + 8 * 16,
        "gate(...) mixes at most 16 branches, got 17",
        "the gate kernels take one argument per branch and unroll over them",
    ),
    # `true` and `false` would be names where they are assigned and booleans where read.
    ("pattern p() { true = causal; return true }", 1, 15, "`true` is a reserved word and cannot name a variable", "choose another name"),
    ("pattern p(false: int = 3) { return sliding(false) }", 1, 11, "`false` is a reserved word and cannot name a parameter", "choose another name"),
]


@pytest.mark.parametrize("text, line, column, message, hint", CASES)
def test_errors(text, line, column, message, hint):
    err = error_of(text)
    assert (err.file, err.line, err.column, err.message, err.hint) == ("p.attn", line, column, message, hint)
    assert str(err).splitlines()[0] == f"p.attn:{line}:{column}: error: {message}"


def test_unknown_override_points_at_the_pattern_and_suggests():
    err = error_of("pattern p(window: int = 4) { return sliding(window) }", windw=3)
    assert (err.line, err.column) == (1, 9)
    assert err.message == "pattern `p` has no parameter `windw`"
    assert err.hint == "did you mean `window`?"


def test_override_of_the_wrong_type_points_at_the_parameter():
    err = error_of("pattern p(window: int = 4) { return sliding(window) }", window=1.5)
    assert (err.line, err.column) == (1, 11)
    assert err.message == "bad value for parameter: parameter `window` is an int, got 1.5"


def test_override_that_makes_the_pattern_impossible_is_caught():
    text = "pattern p(k: int = 4) {\n  c = compress(32, 16)\n  return select(block=64, topk=k, score=c, keep_local=3)\n}"
    err = error_of(text, k=2)
    assert (err.line, err.message) == (3, "select topk (2) is smaller than the blocks it must always keep (3)")


def test_parameters_defaults_arithmetic_and_enums():
    text = """
    pattern p(b: int = 64, w: int = 4 * b, pool: pool = max, t: float = 2, flag: bool = true) {
        c = compress(block=b // 2, stride=(b - 32) // 2, pool=pool)
        s = select(block=b, topk=8, score=c, keep_local=1)
        return gate(s, causal() & sliding(w + 1))
    }
    """
    p = compile_source(text)
    assert p.params == {"b": 64, "w": 256, "pool": "max", "t": 2.0, "flag": True}
    sel, win = p.checked.branches
    assert sel == M.SelectBranch("s", 64, 8, M.CompressBranch("c", 32, 16, "max"), 0, 1)
    assert win == M.MaskBranch("branch1", M.And(M.Causal(), M.Sliding(257)))
    assert p.checked.gated
    q = p.with_params(b=128, pool="mean")
    assert q.params["w"] == 512 and q.checked.branches[0].score == M.CompressBranch("c", 64, 48, "mean")


def test_single_branch_is_named_after_its_variable_or_the_pattern():
    assert compile_source("pattern p() { w = causal\n return w }").branch_names == ("w",)
    assert compile_source("pattern p() { return causal | sink(4) }").branch_names == ("p",)


def test_select_per_token_or_block():
    # `per=block` names the enumeration's member even where a parameter is called `block`.
    text = """
    pattern moba(block: int = 64, per: per = token) {
        c = compress(block=block, stride=block, pool=mean)
        shared = select(block=block, topk=3, score=c, keep_local=1, per=block)
        own = select(block=block, topk=3, score=c, keep_local=1, per=per)
        return gate(shared, own)
    }
    """
    p = compile_source(text)
    shared, own = p.checked.branches
    assert (shared.per, own.per) == ("block", "token")
    assert p.with_params(per="block").checked.branches[1].per == "block"
    with pytest.raises(PatternError) as info:
        compile_source("pattern p() { c = compress(block=16, stride=16); return select(block=16, topk=1, score=c, per=query) }")
    assert info.value.message == "argument `per` of `select` must be one of token, block, got `query`"


def test_compress_within_documents():
    packed = compile_source(
        """
        pattern p(where: within = document) {
            c = compress(block=32, stride=16, within=where)
            s = select(block=64, topk=2, score=c)
            w = causal & document
            return gate(c, s, w)
        }
        """
    )
    compress, select, _ = packed.checked.branches
    assert compress.within == select.within == "document" and packed.checked.needs_documents
    assert packed.ir.document_alignment == 64
    assert not packed.with_params(where="sequence").ir.packed
    error = error_of(
        "pattern p() {\n    c = compress(block=32, stride=16, within=document)\n    return gate(c, causal)\n}"
    )
    assert (error.message, error.span.line, error.span.column) == (
        "branch `branch1` attends across documents, but a compress branch works within them",
        3,
        20,
    )
    assert error.hint == "add `& document` to the mask, so that every branch treats each document as its own sequence"


def test_an_override_past_the_kernels_bound_is_refused_where_it_is_used():
    text = "pattern p(w: int = 4) {\n    return causal & sliding(w)\n}"
    err = error_of(text, w=2**31)
    assert (err.line, err.column) == (2, 29)
    assert err.message == "argument `window` of `sliding` must be at most 1,073,741,824, got 2,147,483,648"
    for value, digits in ((10**26, 27), (10**5000, 5001)):  # past 64 bits: refused at the parameter
        err = error_of(text, w=value)
        assert (err.line, err.column) == (1, 11)
        assert err.message == f"bad value for parameter: `w` does not fit in 64 bits ({digits} digits)"


def test_masks_stacked_through_variables_are_bounded_in_depth():
    from sparsedsl.frontend.parse import MAX_NESTING

    def chain(n):
        lines = "".join(f"    a{i} = a{i - 1} & sliding({i + 1})\n" for i in range(1, n))
        return f"pattern p() {{\n    a0 = causal\n{lines}    return a{n - 1}\n}}"

    compile_source(chain(MAX_NESTING + 1))  # MAX_NESTING operators: fine
    err = error_of(chain(1000))  # it was a RecursionError in ir/segments.py
    assert (err.line, err.column) == (MAX_NESTING + 3, 11)  # "    a33 = a32 & ..."
    assert err.message == f"this mask nests more than {MAX_NESTING} operators deep (counting those of the variables it uses)"
