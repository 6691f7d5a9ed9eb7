"""Compress, select and gated kernels (NSA and its variants) against the dense reference.

Run under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1). A selection is
checked twice: the kernels' choice must be a valid top-k under the reference's scores
(differences only where scores genuinely tie, within the dtype's tolerance), and every
branch output and gradient must match the reference computed over that same choice.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl
from sparsedsl import reference
from sparsedsl.frontend.resources import shipped_pattern_path
from sparsedsl.runtime.dispatch import attend
from sparsedsl.runtime.documents import DocumentLayout
from sparsedsl.runtime.inputs import validate_call
from sparsedsl.runtime.launch.common import BranchKernels
from sparsedsl.runtime.launch.pooling import BlockPooling
from sparsedsl.runtime.launch.selection import Selection, choose_blocks, selection_mask
from sparsedsl.runtime.tuning import TileConfig, tuner
from sparsedsl.serving.decoding import CachedKeys, CacheRows, decode_selection

NSA = sparsedsl.load(shipped_pattern_path("nsa"))

TWO_BRANCHES = sparsedsl.compile_source(
    """
    pattern sel_win(sel_block: int = 16, topk: int = 3, pool: pool = mean, per: per = token) {
        scores = compress(block=16, stride=8, pool=pool)
        sel = select(block=sel_block, topk=topk, score=scores, keep_first=0, keep_local=1, per=per)
        win = causal & sliding(24)
        return gate(sel, win)
    }
    """
)

TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # outputs are stored in the dtype


def table_mask(pattern, branch: str, table: torch.Tensor, Lq: int, Lk: int) -> torch.Tensor:
    ir_branch = pattern.ir.branch(branch)
    selection = Selection.of(ir_branch, pattern.ir.branch(ir_branch.blocks.score))
    return selection_mask(selection, table, Lq, Lk)


def check_selection(chosen, scores, topk, tolerance):
    """``chosen`` is a valid top-k under ``scores``: the right count, every forced block
    (score +inf), and no unchosen eligible block scoring clearly above a chosen one."""
    eligible = scores > float("-inf")
    assert (chosen <= eligible).all(), "a block after the query was selected"
    assert (chosen.sum(-1) == eligible.sum(-1).clamp(max=topk)).all()
    assert (chosen >= (scores == float("inf"))).all(), "a forced block is missing"
    finite = scores.clamp(max=1e30)
    weakest_chosen = torch.where(chosen, finite, float("inf")).amin(-1)
    strongest_left = torch.where(eligible & ~chosen, finite, float("-inf")).amax(-1)
    assert (strongest_left <= weakest_chosen + tolerance).all(), "top-k disagrees beyond a near-tie"


def compare(pattern, B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, learned=False, doc_ids=None):
    """Run ``pattern`` through the kernels and the fp64 reference; compare everything.
    With ``doc_ids`` (a packed batch) selections are compared in the aligned layout."""
    torch.manual_seed(seed)
    layout = DocumentLayout.of(doc_ids, pattern.ir.document_alignment) if pattern.ir.packed else None
    pooled_over = Lk if layout is None else layout.length
    n_out = len(pattern.ir.output_branches)
    leaves = {
        "q": torch.randn(B, Hq, Lq, D, dtype=torch.float64),
        "k": torch.randn(B, Hkv, Lk, D, dtype=torch.float64),
        "v": torch.randn(B, Hkv, Lk, D, dtype=torch.float64),
        "gates": torch.rand(B, Hq, Lq, n_out, dtype=torch.float64),
    }
    if learned:
        n = reference.pooled_length(pooled_over, pattern.params["cmp_block"], pattern.params["cmp_stride"])
        leaves["k_cmp"] = torch.randn(B, Hkv, n, D, dtype=torch.float64)
        leaves["v_cmp"] = torch.randn(B, Hkv, n, D, dtype=torch.float64)
    low = {name: t.to(dtype).requires_grad_() for name, t in leaves.items()}
    high = {name: t.to(dtype).double().requires_grad_() for name, t in leaves.items()}
    documents = {} if doc_ids is None else {"doc_ids": doc_ids}

    record = {}
    inputs = validate_call(pattern.ir, **low, **documents)
    out = attend(pattern.ir, pattern.checked, inputs, pattern.kernels, pattern.source_key, record)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(low.values()), dout)

    imposed = {
        b.name: table_mask(pattern, b.name, record[b.name, "blocks"], Lq, Lk)
        if layout is None
        else layout.unpad(table_mask(pattern, b.name, record[b.name, "blocks"], layout.length, layout.length))
        for b in pattern.ir.branches
        if (b.name, "blocks") in record
    }
    expected_inputs = validate_call(pattern.ir, **high, **documents)
    ref = reference.attention(pattern.checked, expected_inputs, selections=imposed)
    expected_grads = torch.autograd.grad(ref.out, list(high.values()), dout.double())

    tol = TOLERANCE[dtype]
    for name, chosen in imposed.items():
        check_selection(chosen, ref.scores[name], pattern.ir.branch(name).blocks.topk, 20 * tol * Hq)
    for b in pattern.ir.output_branches:
        got = record[b.name, "out"] if layout is None else layout.unpad(record[b.name, "out"])
        err = (got.double() - ref.branches[b.name]).abs().max().item()
        assert err < tol * 10, f"branch {b.name}: {err}"
    assert (out.double() - ref.out).abs().max().item() < tol * 10
    for name, got, want in zip(low, grads, expected_grads):
        err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err < tol * 20, f"d{name}: {err}"
    return record


VARIANTS = {
    # name: (pattern, params, (B, Hq, Hkv, Lq, Lk, D), dtype, learned)
    "paper-shape": (NSA, dict(pool="mean"), (1, 4, 1, 160, 160, 64), torch.float32, False),
    "small-blocks-mha-max": (
        NSA, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=32, pool="max"),
        (1, 2, 2, 80, 80, 16), torch.float32, False,
    ),
    "per-block-gqa-shorter-q": (
        NSA, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=32, pool="mean", per="block"),
        (2, 4, 1, 70, 90, 32), torch.float32, False,
    ),
    "learned-pooling-fp16": (
        NSA, dict(cmp_block=16, cmp_stride=16, sel_block=32, sel_topk=3, window=16, pool="mlp"),
        (1, 4, 2, 96, 96, 16), torch.float16, True,
    ),
    "two-branches-group16": (TWO_BRANCHES, dict(), (1, 16, 1, 64, 64, 16), torch.float32, False),
    "two-branches-per-block-bf16": (TWO_BRANCHES, dict(per="block"), (1, 4, 2, 75, 75, 16), torch.bfloat16, False),
    "head-dim-128": (
        NSA, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16, pool="mean"),
        (1, 2, 1, 48, 48, 128), torch.float32, False,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_reference(variant):
    pattern, params, shape, dtype, learned = VARIANTS[variant]
    compare(pattern.with_params(**params), *shape, dtype=dtype, learned=learned)


# Few examples per run (each is seconds in the interpreter); hypothesis draws new ones every CI run.
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cmp=st.sampled_from([(16, 8), (16, 16), (32, 16), (24, 8)]),
    sel_block=st.sampled_from([16, 32]),
    topk=st.integers(3, 5),
    per=st.sampled_from(["token", "block"]),
    heads=st.sampled_from([(2, 2), (4, 2), (8, 1), (6, 3)]),
    lengths=st.tuples(st.integers(1, 40), st.integers(40, 110)),
    seed=st.integers(0, 100),
)
def test_random_variants_match_reference(cmp, sel_block, topk, per, heads, lengths, seed):
    pattern = NSA.with_params(
        cmp_block=cmp[0], cmp_stride=cmp[1], sel_block=sel_block, sel_topk=topk, window=20, pool="mean", per=per
    )
    extra, Lk = lengths
    compare(pattern, 1, heads[0], heads[1], max(1, Lk - extra), Lk, 16, torch.float32, seed=seed)


def test_blocks_chosen_by_many_queries_are_summed_atomically():
    # The interpreter's work items hold 4 tiles: the forced first block, chosen by every
    # query, is split over many items whose dK/dV meet atomically.
    pattern = NSA.with_params(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16, pool="mean")
    record = compare(pattern, 1, 2, 1, 128, 128, 16, torch.float32)
    assert (record["sel", "blocks"] == 0).any(-1).all()  # block 0 is in every row


def test_a_tile_of_positions_with_different_choices_walks_their_union():
    # MHA per token: a tile holds 16 positions (one head each) whose table rows differ, so
    # some blocks are walked for the rows that chose them only. Lq < Lk puts the first tile
    # partly before the first query.
    pattern = NSA.with_params(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=16, pool="mean")
    with tuner.force(TileConfig(block_m=16, block_n=16, heads=1, num_warps=4, num_stages=1)):
        record = compare(pattern, 1, 2, 2, 90, 120, 16, torch.float32, seed=3)
    table = record["sel", "blocks"]  # (B, Hkv, Lq, topk); position Lk - Lq + row
    tile = table[:, :, 66:82].sort(-1).values  # positions 96..111 (rows 66..81): one aligned tile
    assert (tile != tile[:, :, :1]).any(), "the tile's positions chose alike: the union walk is not exercised"


def test_rows_before_the_first_pooled_key_output_zero():
    pattern = NSA.with_params(cmp_block=32, cmp_stride=16, sel_block=16, sel_topk=3, window=8, pool="mean")
    record = compare(pattern, 1, 2, 1, 40, 40, 16, torch.float32)
    assert (record["cmp", "out"][:, :, :31] == 0).all()
    assert (record["cmp", "lse"][:, :, :31] == float("-inf")).all()


def test_sequence_shorter_than_a_pooled_block():
    pattern = NSA.with_params(cmp_block=32, cmp_stride=16, sel_block=16, sel_topk=3, window=8, pool="mean")
    compare(pattern, 1, 2, 1, 20, 20, 16, torch.float32)


INF = float("inf")
# Rows of 7 block scores that arg-max passes rank by their tie rule: equal scores smaller
# block first (-0.0 equal to 0.0), -inf never chosen.
CRAFTED_SCORES = [
    [0.5] * 7,  # all equal: the blocks in order
    [0.25, 0.5, 0.5, -INF, 0.5, 0.25, 0.5],
    [-INF, 0.3, -INF, -INF, -INF, -INF, 2.0],  # two eligible
    [-INF] * 7,  # none
    [-1.5, 2.0, -0.25, 0.0, -0.0, -3e38, 1e-40],  # both signs, a subnormal
    [-0.0, 0.0, -0.0, 0.0, -1e-40, 1e-40, 0.0],
    [INF, 1.0, INF, -INF, INF, 3e38, -INF],  # forced blocks tie
    [-2.0, -2.0, -1.0, -INF, -2.0, -1.0, -3.0],
]


def ranked_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-k table by a stable descending sort: equal scores in block order, n_blocks
    past the eligible blocks (and past the last block where topk > n_blocks)."""
    n_blocks = scores.shape[-1]
    values, blocks = torch.sort(scores, dim=-1, descending=True, stable=True)
    blocks = torch.where(values > -INF, blocks, n_blocks)
    padding = blocks.new_full((*scores.shape[:-1], max(0, topk - n_blocks)), n_blocks)
    return torch.cat([blocks, padding], -1)[..., :topk].int()


def selection_kernels(pattern) -> BranchKernels:
    index = next(n for n, b in enumerate(pattern.ir.branches) if b.name == "sel")
    return BranchKernels(pattern.kernels, index, pattern.source_key)


@pytest.mark.parametrize("topk", [1, 3, 4, 6])
def test_top_k_kernel_ranks_equal_scores_by_block_and_pads_with_n_blocks(topk):
    kernels = selection_kernels(TWO_BRANCHES.with_params(topk=topk))
    crafted = torch.tensor(CRAFTED_SCORES)
    torch.manual_seed(topk)
    drawn = torch.randint(-3, 4, (1, 3, 45, 37)).float() / 2  # many ties; 135 rows: several programs
    drawn[torch.rand(drawn.shape) < 0.3] = -INF
    drawn[torch.rand(drawn.shape) < 0.1] = INF
    drawn[drawn == 0] = -0.0
    for scores in (crafted.view(2, 1, 4, 7), drawn, crafted[:, :2].contiguous().view(1, 2, 4, 2)):  # the last: 2 blocks
        assert torch.equal(choose_blocks(kernels, scores, topk), ranked_blocks(scores, topk))


@pytest.mark.parametrize("topk", [1, 3, 6])
def test_decode_top_k_ranks_equal_scores_by_block(topk):
    # The pooled pass's last program takes the top-k (serving/decoding.py). With every
    # pooled key 0 a position's visible pooled keys share its probability equally, so blocks
    # overlapping as many of them tie and go in block order. Row 0's three new positions
    # lie in block 6, row 1's two in block 2 (one padding position, which selects nothing);
    # a position's own block is forced (keep_local=1).
    pattern = TWO_BRANCHES.with_params(topk=topk)
    kernels = selection_kernels(pattern)
    branch = pattern.ir.branch("sel")
    selection = Selection.of(branch, pattern.ir.branch(branch.blocks.score))
    checked = {b.name: b for b in pattern.checked.branches}
    lengths, new, capacity = [112, 40], [3, 2], 112
    kc = torch.zeros(2, 1, reference.pooled_length(capacity, 16, 8) + 1, 16)
    rows = CacheRows(torch.tensor(lengths, dtype=torch.int32), torch.tensor(new, dtype=torch.int32), torch.zeros(2, dtype=torch.int32))
    pooled = CachedKeys(kc, torch.randn_like(kc), 0, torch.zeros(2, 1, dtype=torch.int32))
    table, _ = decode_selection(kernels, selection, torch.randn(2, 1, 3, 16), pooled, rows, 0.25, capacity)

    for b, (Lk, n) in enumerate(zip(lengths, new)):
        visible = reference.compressed_mask(checked["sel"].score, n, Lk).double()
        _, ranked = reference.select_blocks(checked["sel"], (visible / visible.sum(-1, keepdim=True))[None, None], n, Lk, 1)
        ranked = torch.nn.functional.pad(ranked, (0, 7 - ranked.shape[-1]), value=-INF)  # the capacity's 7 blocks
        assert torch.equal(table[b, :, :n], ranked_blocks(ranked[0], topk)), b
    assert table[1, :, 2].eq(7).all()  # the padding position


SLICED = {  # name: (pattern, params, (B, Hq, Hkv, Lq, Lk, D), document lengths per row or None)
    # queries from position 37 (inside a block): the first slice starts there, the others on blocks
    "per-token-shorter-q": (NSA, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16, pool="mean"),
                            (1, 4, 2, 83, 120, 16), None),
    "per-block": (NSA, dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16, pool="mean", per="block"),
                  (2, 2, 1, 70, 90, 16), None),
    "packed": ("nsa_packed", dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=24, pool="mean"),
               (1, 4, 2, 0, 0, 16), [[30, 40, 9, 17]]),
}


@pytest.mark.parametrize("case", list(SLICED))
def test_scoring_in_slices_chooses_and_attends_as_one_launch(case, monkeypatch):
    """A call whose block scores exceed SCORES_BYTES scores its queries in slices of whole
    blocks: the same table, outputs and gradients as scoring them at once, bit for bit,
    and, sliced, what the dense reference gives (float64)."""
    from sparsedsl.runtime.launch import selection

    pattern, params, (B, Hq, Hkv, Lq, Lk, D), lengths = SLICED[case]
    pattern = (NSA_PACKED if pattern == "nsa_packed" else pattern).with_params(**params)
    documents_ = {} if lengths is None else {"doc_ids": documents(lengths)}
    if lengths is not None:
        B, Lq = documents_["doc_ids"].shape
        Lk = Lq
    torch.manual_seed(0)
    leaves = [torch.randn(B, Hq, Lq, D), torch.randn(B, Hkv, Lk, D), torch.randn(B, Hkv, Lk, D), torch.rand(B, Hq, Lq, 3)]
    scored = []
    block_scores = selection.block_scores
    monkeypatch.setattr(selection, "block_scores", lambda *args: scored.append(args[5]) or block_scores(*args))

    def run():
        record, tensors = {}, [t.clone().requires_grad_() for t in leaves]
        inputs = validate_call(pattern.ir, *tensors[:3], gates=tensors[3], **documents_)
        out = attend(pattern.ir, pattern.checked, inputs, pattern.kernels, pattern.source_key, record)
        return record["sel", "blocks"], out, torch.autograd.grad(out, tensors, torch.ones_like(out))

    whole = run()
    assert len(scored) == 1
    scored.clear()
    monkeypatch.setattr(selection, "SCORES_BYTES", B * Hkv * -(-whole[0].shape[2] // 4) * 4 * 8)  # about 4 slices
    sliced = run()
    assert len(scored) >= 3, scored  # the calls that end at each slice's last key
    assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])
    for got, want in zip(sliced[2], whole[2]):
        assert torch.equal(got, want)
    scored.clear()
    compare(pattern, B, Hq, Hkv, Lq, Lk, D, torch.float32, doc_ids=documents_.get("doc_ids"))
    assert len(scored) >= 3, scored  # (compare's call was sliced too)


NSA_PACKED = sparsedsl.load(shipped_pattern_path("nsa_packed"))


def documents(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """(B, L) doc ids from each row's document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths_per_row])


PACKED_VARIANTS = {
    # name: (params, (Hq, Hkv, D), dtype, learned, document lengths per row)
    "mean-gqa-ragged": (
        dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=24, pool="mean"),
        (4, 2, 16), torch.float32, False, [[30, 40, 9, 17], [96]],
    ),
    "per-block-max-mha": (
        dict(cmp_block=16, cmp_stride=16, sel_block=32, sel_topk=3, window=16, pool="max", per="block"),
        (2, 2, 32), torch.float32, False, [[33, 64, 3, 20]],
    ),
    "learned-pooling-fp16": (
        dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=16, pool="mlp"),
        (4, 1, 16), torch.float16, True, [[50, 20, 46]],
    ),
}


@pytest.mark.parametrize("variant", list(PACKED_VARIANTS))
def test_packed_documents_match_reference(variant):
    params, (Hq, Hkv, D), dtype, learned, lengths = PACKED_VARIANTS[variant]
    doc_ids = documents(lengths)
    B, L = doc_ids.shape
    compare(NSA_PACKED.with_params(**params), B, Hq, Hkv, L, L, D, dtype, learned=learned, doc_ids=doc_ids)


def test_packed_batch_equals_its_documents_run_alone():
    """The kernels on a packed row give what nsa.attn's dense reference (float64) gives
    each document on its own."""
    params = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=24, pool="mean")
    lengths = [37, 64, 27]
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, h, sum(lengths), 16) for h in (4, 2, 2))
    gates = torch.rand(1, 4, sum(lengths), 3)
    packed = NSA_PACKED.with_params(**params)(q, k, v, gates=gates, cu_seqlens=torch.tensor([0, 37, 101, 128]))
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        q_, k_, v_, g_ = (t[:, :, part].double() for t in (q, k, v, gates))
        alone = NSA.with_params(**params)(q_, k_, v_, gates=g_)
        assert (packed[:, :, part] - alone).abs().max() < 1e-5
        start += n


def test_packed_pattern_needs_every_position_queried():
    q, k = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 40, 16)
    with pytest.raises(sparsedsl.InputError, match="needs every position queried: q has 30 positions but k and v have 40"):
        NSA_PACKED.with_params(pool="mean")(q, k, k, gates=torch.rand(1, 2, 30, 3), doc_ids=torch.zeros(1, 40, dtype=torch.long))


@pytest.mark.parametrize("how", ["mean", "max"])
@pytest.mark.parametrize("block, stride, L", [(32, 16, 100), (16, 16, 50), (24, 8, 45)])
def test_pooling_kernels_match_torch(how, block, stride, L):
    """Forward and gradient of the generated pooling against torch's. Small integers make
    many entries of a window equal, so max pooling must split gradients among ties."""
    pattern = NSA.with_params(cmp_block=block, cmp_stride=stride, sel_block=64, pool=how)
    index = next(n for n, b in enumerate(pattern.ir.branches) if b.name == "cmp")
    kernels = BranchKernels(pattern.kernels, index, pattern.source_key)
    keys = pattern.ir.branches[index].keys
    torch.manual_seed(0)
    x = torch.randint(-3, 4, (2, 3, L, 24)).to(torch.float16)[..., 2:22]  # strided rows, head dim 20
    got_x, want_x = (x.clone().requires_grad_() for _ in range(2))
    got = BlockPooling.apply(got_x, kernels, keys)
    want = reference.pool(want_x.double(), block, stride, how)
    assert got.shape == want.shape and (got.double() - want).abs().max() < 2e-3
    dout = torch.randn(want.shape, dtype=torch.float64)
    (got.double() * dout).sum().backward()
    (want * dout).sum().backward()
    assert (got_x.grad.double() - want_x.grad).abs().max() < 2e-3
