"""Stage 3: lowering. The block IR against the element mask it must describe."""

import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparsedsl import PatternError, compile_source, load
from sparsedsl.frontend import model as M
from sparsedsl.ir import evaluate as E
from sparsedsl.ir.expressions import (
    BK,
    Q0,
    Q1,
    ExpressionPrinter,
    FloorDiv,
    provably_le,
)
from sparsedsl.ir.nodes import StaticBlocks
from sparsedsl.tools.mask_stats import example_documents

RELAXED = dict(deadline=None, suppress_health_check=list(HealthCheck))


def true_classes(mask: torch.Tensor, BQ: int, BK: int) -> torch.Tensor:
    """Block classes straight from an element mask. A key block that runs past the last
    key is never full: the kernels mask its missing keys."""
    Lq, n = mask.shape
    classes = torch.zeros(-(-Lq // BQ), -(-n // BK), dtype=torch.int8)
    for a in range(classes.shape[0]):
        for b in range(classes.shape[1]):
            block = mask[a * BQ : (a + 1) * BQ, b * BK : (b + 1) * BK]
            if block.all() and block.shape[1] == BK:
                classes[a, b] = E.FULL
            elif block.any():
                classes[a, b] = E.PARTIAL
    return classes


def check_branch(pattern, Lq, Lk, BQ, BK, doc_ids=None, exact=True):
    masks = pattern.dense_mask(Lq, Lk, doc_ids=doc_ids)
    for name, mask in masks.items():
        branch = pattern.ir.branch(name)
        row_docs = doc_ids[0] if doc_ids is not None and mask.dim() == 3 else None
        mask = mask[0] if mask.dim() == 3 else mask
        assert torch.equal(E.predicate_mask(branch, Lq, Lk, row_docs), mask), "IR predicate differs from the mask"
        truth = true_classes(mask, BQ, BK)
        by_query_block = E.block_classes(branch, Lq, Lk, BQ, BK, row_docs)
        by_key_block = E.block_classes_by_key_block(branch, Lq, Lk, BQ, BK, row_docs)  # the backward's walk
        for ir in (by_query_block, by_key_block):
            # Sound: every visible pair lies in a listed block, and a full block is full.
            assert bool(((truth > 0) <= (ir > 0)).all()), "a visible block is missing from the IR's ranges"
            assert bool(((ir == E.FULL) <= (truth == E.FULL)).all()), "the IR calls a block full that is not"
        if exact:
            ir = by_query_block
            assert torch.equal(ir, truth), f"classification differs:\nIR\n{ir}\ntruth\n{truth}"


lengths = st.integers(1, 160).flatmap(lambda Lk: st.tuples(st.integers(1, Lk), st.just(Lk)))
tiles = st.sampled_from([8, 16, 32, 64])

SINGLE_SEGMENT = [
    ("causal", {}),
    ("causal & sliding(w)", {"w": st.integers(1, 200)}),
    ("sliding(w)", {"w": st.integers(1, 200)}),
    ("sink(s)", {"s": st.integers(1, 40)}),
    ("causal & chunked(n)", {"n": st.integers(1, 100)}),
    ("chunked(n)", {"n": st.integers(1, 100)}),
    ("~causal", {}),
    ("causal & ~sliding(w)", {"w": st.integers(1, 100)}),
    ("~sink(s) & causal", {"s": st.integers(1, 40)}),
    ("full", {}),
    ("causal & dilated(w, 1)", {"w": st.integers(1, 60)}),
]


@st.composite
def single_segment_patterns(draw):
    body, params = draw(st.sampled_from(SINGLE_SEGMENT))
    values = {k: draw(v) for k, v in params.items()}
    header = ", ".join(f"{k}: int = {v}" for k, v in values.items())
    return compile_source(f"pattern p({header}) {{ return {body} }}")


@settings(max_examples=80, **RELAXED)
@given(single_segment_patterns(), lengths, tiles, tiles)
def test_single_segment_patterns_are_classified_exactly(pattern, Lqk, BQ, BK):
    assert len(pattern.ir.branches[0].blocks.segments) == 1
    check_branch(pattern, *Lqk, BQ, BK)


@settings(max_examples=60, **RELAXED)
@given(lengths, tiles, tiles, st.integers(1, 8), st.booleans())
def test_document_masks_are_classified_exactly(Lqk, BQ, BK, docs, causal):
    Lq, Lk = Lqk
    pattern = compile_source(f"pattern p() {{ return {'causal & ' if causal else ''}document }}")
    doc_ids = example_documents(Lk, min(docs, Lk), seed=Lk)
    check_branch(pattern, Lq, Lk, BQ, BK, doc_ids)


@settings(max_examples=60, **RELAXED)
@given(lengths, tiles, tiles, st.integers(1, 64), st.integers(1, 64))
def test_compressed_branch_is_classified_exactly(Lqk, BQ, BK, block, stride):
    block, stride = max(block, stride), min(block, stride)
    pattern = compile_source(f"pattern p() {{ return compress(block={block}, stride={stride}) }}")
    check_branch(pattern, *Lqk, BQ, BK)


atoms = st.one_of(
    st.sampled_from(["causal", "full"]),
    st.integers(1, 40).map("sliding({})".format),
    st.integers(1, 40).map("sink({})".format),
    st.integers(1, 20).map("global({})".format),
    st.integers(1, 40).map("chunked({})".format),
    st.tuples(st.integers(1, 6), st.integers(1, 12)).map(lambda t: "dilated({}, {})".format(*t)),
)
masks = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: f"({t[0]} & {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]} | {t[1]})"),
        inner.map("~{}".format),
    ),
    max_leaves=4,
)


@settings(max_examples=50, **RELAXED)
@given(masks, lengths, tiles, tiles)
def test_any_mask_is_classified_soundly(mask, Lqk, BQ, BK):
    """Unions, complements and hulls: no visible pair is ever skipped and no block is
    wrongly called full (a block that only a union covers may be called partial)."""
    try:
        pattern = compile_source(f"pattern p() {{ return {mask} }}")
    except PatternError as exc:  # nested complements can multiply past the segment limit
        assume("interval pieces" not in exc.message)
        raise
    check_branch(pattern, *Lqk, BQ, BK, exact=False)


@settings(max_examples=15, **RELAXED)
@given(lengths, tiles, tiles)
def test_shipped_static_patterns_are_sound_and_touch_exactly(Lqk, BQ, BK):
    Lq, Lk = Lqk
    for name, overrides in [("streaming", {"sinks": 3, "window": 37}), ("longformer", {"window": 19, "globals": 5}), ("chunked", {"chunk": 24})]:
        pattern = load(name, **overrides)
        check_branch(pattern, Lq, Lk, BQ, BK, exact=False)
        mask = pattern.dense_mask(Lq, Lk)[name]
        ir = E.block_classes(pattern.ir.branches[0], Lq, Lk, BQ, BK)
        assert torch.equal(ir > 0, true_classes(mask, BQ, BK) > 0)


def test_causal_window_ranges_are_the_textbook_closed_form():
    (segment,) = compile_source("pattern p() { return causal & sliding(512) }").ir.branches[0].blocks.segments
    show = ExpressionPrinter("python")
    assert show(segment.start) == "(max(0, (q0 - 511)) // BK)"
    assert show(segment.stop) == "((q1 // BK) + 1)"
    assert show(segment.full_start) == "((BK + max(0, (q1 - 511)) - 1) // BK)"
    assert show(segment.full_stop) == "((q0 + 1) // BK)"


def test_triton_printing_floors_what_may_be_negative():
    triton = ExpressionPrinter("triton")
    assert triton(FloorDiv(Q0 + 1, BK)) == "((q0 + 1) // BK)"
    assert triton(FloorDiv(Q1 - 31, 16)) == "floordiv((q1 - 31), 16)"
    assert triton(sympy.Max(Q0, 3)) == "tl.maximum(3, q0)"


def test_prover_uses_facts_and_floor_remainders():
    i = sympy.Symbol("i", integer=True)
    assert provably_le(i, 128 * FloorDiv(i, 128) + 127)
    assert not provably_le(i, 128 * FloorDiv(i, 128) + 126)
    assert provably_le(Q0, Q1, {Q1: Q0 + sympy.Symbol("r", nonnegative=True, integer=True)})
    assert not provably_le(Q1, Q0)


def test_union_lists_each_segment_and_selection_names_its_table():
    ir = load("nsa").ir
    assert [b.name for b in ir.branches] == ["cmp", "sel", "win"]
    assert ir.branch("sel").blocks.index == "sel_blocks" and ir.branch("sel").blocks.score == "cmp"
    assert ir.branch("cmp").runtime == ("k_cmp", "v_cmp")
    streaming = load("streaming").ir.branches[0].blocks
    assert isinstance(streaming, StaticBlocks) and len(streaming.segments) == 2
    moba = load("moba").ir
    assert [(b.name, b.output) for b in moba.branches] == [("moba", True), ("gate_keys", False)]


def test_unions_of_nested_ranges_merge_before_pieces_are_counted():
    """`causal & (sliding(1) | ... | sliding(17))` is `causal & sliding(17)`: it was refused
    as 17 pieces, with a hint about complements it does not have."""
    union = " | ".join(f"sliding({w})" for w in range(1, 18))
    merged = compile_source(f"pattern p() {{ return causal & ({union}) }}")
    assert merged.ir.branches[0].blocks == compile_source("pattern p() { return causal & sliding(17) }").ir.branches[0].blocks
    hulls = " | ".join(f"(causal & dilated(2, {d}))" for d in range(1, 18))  # hulls have holes: none merges
    with pytest.raises(PatternError) as info:
        compile_source(f"pattern p() {{ return {hulls} }}", filename="p.attn")
    assert info.value.message == "the mask of branch `p` splits into 17 interval pieces (at most 16 are supported)"
    assert info.value.hint.startswith("every piece of a union is its own range of keys")


def test_a_union_past_the_intermediate_bound_is_refused_early():
    from functools import reduce

    from sparsedsl.ir.lower import lower_pattern
    from sparsedsl.ir.segments import (
        MAX_INTERMEDIATE_SEGMENTS,
        TooManySegments,
        mask_segments,
    )

    mask = reduce(M.Or, [M.Dilated(2, d) for d in range(1, MAX_INTERMEDIATE_SEGMENTS + 5)])
    with pytest.raises(TooManySegments):
        mask_segments(mask)
    checked = M.CheckedPattern("p", (), (M.MaskBranch("p", mask),), False, "p.attn", 1)
    with pytest.raises(PatternError, match=f"splits into more than {MAX_INTERMEDIATE_SEGMENTS} interval pieces"):
        lower_pattern(checked)
