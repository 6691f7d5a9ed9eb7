"""Hostile text: random bytes and random soups of the language's tokens, into
``compile_source`` and ``sparsedsl check``. Either the text compiles or it is refused
with a located :class:`PatternError`; nothing else (no other exception, no traceback,
no hang)."""

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl import PatternError, compile_source
from sparsedsl.cli import main

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

TOKENS = (
    "pattern", "p", "q", "(", ")", "{", "}", "return", "=", ",", ":", ";", "\n", "# note\n",
    "causal", "full", "document", "sliding", "sink", "global", "chunked", "dilated",
    "compress", "select", "gate", "block", "stride", "topk", "score", "keep_first", "keep_local",
    "pool", "mean", "max", "mlp", "per", "token", "within", "int", "float", "bool", "true", "false",
    "&", "|", "~", "-", "+", "*", "//", "/", "%", "0", "1", "3", "16", "64", "1.5", "2147483648",
    "99999999999999999999", "w", "x", "c", "\ufeff", "\t", "é", "$", "\x00",
)  # fmt: skip

# Soups inside a pattern's frame get past the parser more often, so the checker and the
# lowering see them too.
soups = st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join)
# Well-formed expressions of any types, so that many texts parse and reach the checker
# and the lowering.
ATOMS = ("causal", "full", "document", "sliding(3)", "sink(2)", "global(1)", "chunked(4)", "dilated(2, 3)", "w", "3", "-1", "true", "compress(8, 4)")  # fmt: skip
expressions = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["&", "|", "+", "*", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda x: f"~{x}"),
        inner.map(lambda x: f"sliding({x})"),
    ),
    max_leaves=10,
)
texts = st.one_of(
    st.binary(max_size=120),
    soups.map(str.encode),
    soups.map(lambda body: f"pattern p(w: int = 8) {{\n    return {body}\n}}".encode()),
    soups.map(lambda body: f"pattern p() {{\n    x = {body}\n    return causal & x\n}}".encode()),
    expressions.map(lambda body: f"pattern p(w: int = 8) {{\n    return {body}\n}}".encode()),
)
ERROR_LINE = re.compile(r"^fuzz\.attn(:\d+:\d+)?: error: \S")


@FUZZ
@given(texts)
def test_compile_source_compiles_or_refuses_with_a_located_error(data):
    for text in (data, data.decode("utf-8", errors="replace")):
        try:
            compile_source(text, filename="fuzz.attn")
        except PatternError as exc:
            assert exc.file == "fuzz.attn" and str(exc).startswith("fuzz.attn")


@FUZZ
@given(texts)
def test_check_prints_ok_or_one_located_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.attn"
        path.write_bytes(data)
        stderr = _check(path)
    assert stderr is None or ERROR_LINE.match(stderr.replace(str(path), "fuzz.attn")), stderr


def _check(path: Path) -> str | None:
    """``sparsedsl check`` of one file: None when it passes, else what it printed."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["check", str(path)])
    assert code in (0, 1)
    return None if code == 0 else err.getvalue()
