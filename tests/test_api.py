"""The public API: compiling, loading, importing .attn files, masks."""

import sys
import textwrap

import pytest
import torch

import sparsedsl
from sparsedsl import Pattern, PatternError, compile_source, load


def test_public_names():
    assert {"compile_source", "load", "Pattern", "PatternError", "InputError"} <= set(sparsedsl.__all__)


def test_load_shipped_pattern_by_name_and_by_path(tmp_path):
    nsa = load("nsa")
    assert isinstance(nsa, Pattern) and nsa.name == "nsa"
    assert nsa.params == {"cmp_block": 32, "cmp_stride": 16, "sel_block": 64, "sel_topk": 16, "window": 512, "pool": "mlp", "per": "token"}
    path = tmp_path / "mine.attn"
    path.write_text("pattern mine(w: int = 8) { return causal & sliding(w) }\npattern other() { return full }\n")
    assert load(path).name == "mine"  # the pattern named like the file
    assert load(path, name="other").name == "other"
    assert load(str(path), w=3).params == {"w": 3}


def test_load_errors_are_pattern_errors():
    with pytest.raises(PatternError) as info:
        load("nsaa")
    assert info.value.message == "no file `nsaa` and no shipped pattern of that name"
    assert info.value.hint == "did you mean `nsa`?"
    with pytest.raises(PatternError, match="defines several patterns"):
        compile_source("pattern a() { return full }\npattern b() { return causal }")
    with pytest.raises(PatternError, match="has no pattern `c`") as info:
        compile_source("pattern a() { return full }", name="c")
    with pytest.raises(PatternError, match="no pattern in this file"):
        compile_source("# nothing here\n")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: compile_source(None), "compile_source: `text` must be the .attn source as a str (or UTF-8 bytes), got NoneType; to load a file, use sparsedsl.load(path)"),
        (lambda: compile_source(3), "compile_source: `text` must be the .attn source as a str (or UTF-8 bytes), got int; to load a file, use sparsedsl.load(path)"),
        (lambda: compile_source("pattern p() { return causal }", name=3), "compile_source: `name` must be a pattern's name (a str), got int"),
        (lambda: load(None), "load: `path_or_name` must be a .attn file's path or a shipped pattern's name, got None (shipped patterns: "),
        (lambda: load(""), "load: `path_or_name` must be a .attn file's path or a shipped pattern's name, got '' (shipped patterns: "),
    ],
)
def test_wrong_kinds_of_argument_are_named(call, message):
    with pytest.raises(sparsedsl.InputError) as info:  # TypeErrors from deep inside before
        call()
    assert str(info.value).startswith(message)


def test_compile_source_takes_the_bytes_of_a_file():
    text = "pattern p() { return causal & sliding(4) }"
    assert compile_source(text.encode()).ir == compile_source(text).ir
    assert compile_source(("\ufeff" + text).encode()).ir == compile_source(text).ir


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.attn"
    with pytest.raises(PatternError) as info:
        load(missing)
    assert str(info.value).startswith(f"{missing}: error: no file `{missing}` and no shipped pattern of that name")
    with pytest.raises(PatternError) as info:  # a folder: was "<pattern>: error: ..."
        load(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: error: no file `{tmp_path}` (a folder of that name exists)")
    binary = tmp_path / "binary.attn"
    binary.write_bytes(b"pattern p() { return \x80 }")
    with pytest.raises(PatternError) as info:
        load(binary)
    assert str(info.value).startswith(f"{binary}:1:22: error: the file is not UTF-8 text")


def test_with_params_rechecks_and_keeps_the_original():
    base = load("sliding_window")
    small = base.with_params(window=64)
    assert base.params["window"] == 4096 and small.params["window"] == 64
    assert "511" not in small.ir_text and "63" in small.ir_text
    with pytest.raises(PatternError, match="must be at least 1, got 0"):
        base.with_params(window=0)


def test_import_shipped_patterns_as_modules():
    from sparsedsl.patterns import streaming
    from sparsedsl.patterns.nsa import nsa

    assert nsa.name == "nsa" and streaming.streaming.params["sinks"] == 4
    assert streaming.__all__ == ["streaming"]


def test_import_user_attn_files_from_sys_path(tmp_path, monkeypatch):
    package = tmp_path / "mypatterns"
    package.mkdir()
    (package / "variants.attn").write_text(
        textwrap.dedent(
            """
            pattern narrow() { return causal & sliding(16) }
            pattern wide(w: int = 256) { return causal & sliding(w) }
            """
        )
    )
    (tmp_path / "broken.attn").write_text("pattern b() { return causl }\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mypatterns", "mypatterns.variants", "broken"):
        sys.modules.pop(name, None)
    import mypatterns.variants as variants

    assert variants.narrow.params == {} and variants.wide.params == {"w": 256}
    assert variants.__file__.endswith("variants.attn")
    with pytest.raises(PatternError) as info:
        import broken  # noqa: F401
    assert info.value.line == 1 and info.value.hint == "did you mean `causal`?"


def test_dense_mask_per_branch():
    masks = load("nsa", window=4).dense_mask(40)
    assert set(masks) == {"cmp", "win"}  # the selection depends on the data
    assert masks["win"].shape == (40, 40) and masks["cmp"].shape == (40, 1)
    assert masks["win"][10].nonzero().flatten().tolist() == [7, 8, 9, 10]
    assert masks["cmp"][:, 0].nonzero().flatten().tolist() == list(range(31, 40))
    doc = load("document").dense_mask(6, doc_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]))["document"]
    assert doc.shape == (1, 6, 6) and doc[0, 4].tolist() == [False, False, False, True, True, False]
    end_aligned = load("causal").dense_mask(2, 5)["causal"]
    assert end_aligned.tolist() == [[True, True, True, True, False], [True] * 5]
    with pytest.raises(ValueError, match="uses `document`: pass doc_ids="):
        load("document").dense_mask(6)


def test_repr_names_the_source():
    assert repr(load("streaming")).startswith("<Pattern streaming(sinks=4, window=1024) from ")


def test_reference_takes_the_arguments_of_a_call():
    """pattern.reference is the float64 oracle of the same call; its arguments are checked
    as a call's are."""
    pattern = load("streaming", sinks=2, window=8)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    result = pattern.reference(q, k, v)
    assert result.out.dtype == torch.float64 and result.out.shape == (1, 4, 12, 8)
    assert torch.equal(result.out, pattern(q.double(), k.double(), v.double()))
    mask = pattern.dense_mask(12, 20)["streaming"]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(result.out, want)
    with pytest.raises(sparsedsl.InputError, match="gates"):
        pattern.reference(q, k, v, gates=torch.ones(1, 4, 12, 1))
