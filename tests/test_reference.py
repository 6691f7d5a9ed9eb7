"""The dense reference against a naive per-query loop written from the definitions."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl import InputError, compile_source, load, reference
from sparsedsl.frontend import model as M
from sparsedsl.runtime.inputs import validate_call
from sparsedsl.tools.mask_stats import example_documents

RELAXED = dict(deadline=None, suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------- the naive oracle
def visible(mask: M.Mask, i: int, j: int, doc) -> bool:
    if isinstance(mask, M.Full):
        return True
    if isinstance(mask, M.Causal):
        return j <= i
    if isinstance(mask, M.Sliding):
        return abs(i - j) < mask.window
    if isinstance(mask, M.Sink):
        return j < mask.size
    if isinstance(mask, M.Global):
        return j < mask.size or i < mask.size
    if isinstance(mask, M.Chunked):
        return i // mask.size == j // mask.size
    if isinstance(mask, M.Dilated):
        return (i - j) % mask.dilation == 0 and abs(i - j) < mask.window * mask.dilation
    if isinstance(mask, M.Document):
        return doc[i] == doc[j]
    if isinstance(mask, M.And):
        return visible(mask.left, i, j, doc) and visible(mask.right, i, j, doc)
    if isinstance(mask, M.Or):
        return visible(mask.left, i, j, doc) or visible(mask.right, i, j, doc)
    return not visible(mask.operand, i, j, doc)


def softmax_row(q, keys, values, scale):
    """One query over a list of key and value vectors; nothing visible gives 0."""
    if not keys:
        return torch.zeros_like(q), [], -math.inf
    logits = torch.stack([q @ key for key in keys]) * scale
    p = torch.softmax(logits, 0)
    return sum(w * val for w, val in zip(p, values)), p.tolist(), float(torch.logsumexp(logits, 0))


def naive(pattern, q, k, v, gates=None, doc_ids=None, pooled=None):
    checked = pattern.checked
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        doc = doc_ids[b].tolist() if doc_ids is not None else None
        for r in range(Lq):
            i = r + Lk - Lq
            branch_out = {}
            probs = {}  # compress branch -> head -> list of (c, p)
            for c_branch in checked.compress_branches():
                if pooled is not None and c_branch.name in pooled:
                    kc, vc = pooled[c_branch.name]  # (Hkv, n, D), learned pooling
                else:
                    n = max(0, (Lk - c_branch.block) // c_branch.stride + 1)
                    windows = [slice(c * c_branch.stride, c * c_branch.stride + c_branch.block) for c in range(n)]
                    kc = torch.stack([k[b, :, w].mean(1) for w in windows], 1) if n else k[b, :, :0]
                    vc = torch.stack([v[b, :, w].mean(1) for w in windows], 1) if n else v[b, :, :0]
                cs = [c for c in range(kc.shape[1]) if c * c_branch.stride + c_branch.block - 1 <= i]
                outs, probs[c_branch.name] = [], []
                for h in range(Hq):
                    o, p, _ = softmax_row(q[b, h, r], [kc[h // G, c] for c in cs], [vc[h // G, c] for c in cs], scale)
                    outs.append(o)
                    probs[c_branch.name].append(dict(zip(cs, p)))
                branch_out[c_branch.name] = outs
            for branch in checked.branches:
                if isinstance(branch, M.MaskBranch):
                    js = [j for j in range(Lk) if visible(branch.mask, i, j, doc)]
                elif isinstance(branch, M.SelectBranch):
                    c_branch, sb = branch.score, branch.block
                    n_blocks = -(-Lk // sb)
                    selections = []
                    for g in range(Hkv):
                        score = {}
                        for s in range(n_blocks):
                            if s * sb > i:
                                continue
                            total = 0.0
                            for h in range(g * G, (g + 1) * G):
                                for c, p in probs[c_branch.name][h].items():
                                    lo, hi = c * c_branch.stride, c * c_branch.stride + c_branch.block - 1
                                    if lo <= s * sb + sb - 1 and hi >= s * sb:
                                        total += p
                            forced = s < branch.keep_first or i // sb - branch.keep_local < s <= i // sb
                            score[s] = math.inf if forced else total
                        ranked = sorted(score, key=lambda s: (-score[s], s))[: branch.topk]
                        selections.append(set(ranked))
                    branch_out[branch.name] = []
                    for h in range(Hq):
                        js = [j for j in range(i + 1) if j // sb in selections[h // G]]
                        branch_out[branch.name].append(softmax_row(q[b, h, r], [k[b, h // G, j] for j in js], [v[b, h // G, j] for j in js], scale)[0])
                    continue
                else:
                    continue
                branch_out[branch.name] = [
                    softmax_row(q[b, h, r], [k[b, h // G, j] for j in js], [v[b, h // G, j] for j in js], scale)[0]
                    for h in range(Hq)
                ]
            for h in range(Hq):
                if checked.gated:
                    out[b, h, r] = sum(gates[b, h, r, n] * branch_out[br.name][h] for n, br in enumerate(checked.branches))
                else:
                    out[b, h, r] = branch_out[checked.branches[0].name][h]
    return out


def run_reference(pattern, q, k, v, **kw):
    return reference.attention(pattern.checked, validate_call(pattern.ir, q, k, v, **kw)).out


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MASKS = ["causal", "causal & sliding(5)", "sink(2) | (causal & sliding(3))", "sliding(4) | global(2)", "causal & chunked(6)", "~causal", "dilated(3, 2)", "causal & document"]


@settings(max_examples=40, **RELAXED)
@given(st.sampled_from(MASKS), st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 20), st.integers(0, 6), st.integers(0, 2**16))
def test_reference_matches_naive_loop_for_masks(mask, B, heads, Lq, extra, seed):
    Hq, Hkv = heads
    Lk = Lq + extra
    pattern = compile_source(f"pattern p() {{ return {mask} }}")
    q, k, v = rand(B, Hq, Lq, 8, seed=seed), rand(B, Hkv, Lk, 8, seed=seed + 1), rand(B, Hkv, Lk, 8, seed=seed + 2)
    docs = torch.cat([example_documents(Lk, min(3, Lk), seed + b) for b in range(B)]) if "document" in mask else None
    got = run_reference(pattern, q, k, v, doc_ids=docs)
    torch.testing.assert_close(got, naive(pattern, q, k, v, doc_ids=docs), rtol=1e-10, atol=1e-10)


NSA_LIKE = """
pattern p(pool: pool = mean) {
    cmp = compress(block=4, stride=2, pool=pool)
    sel = select(block=16, topk=2, score=cmp, keep_first=1, keep_local=1)
    win = causal & sliding(3)
    return gate(cmp, sel, win)
}
"""


@settings(max_examples=15, **RELAXED)
@given(st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(1, 40), st.integers(0, 12), st.integers(0, 2**16))
def test_reference_matches_naive_loop_for_nsa(heads, Lq, extra, seed):
    Hq, Hkv = heads
    Lk = Lq + extra
    pattern = compile_source(NSA_LIKE)
    q, k, v = rand(1, Hq, Lq, 8, seed=seed), rand(1, Hkv, Lk, 8, seed=seed + 1), rand(1, Hkv, Lk, 8, seed=seed + 2)
    gates = torch.rand(1, Hq, Lq, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = run_reference(pattern, q, k, v, gates=gates)
    torch.testing.assert_close(got, naive(pattern, q, k, v, gates=gates), rtol=1e-10, atol=1e-10)


def test_learned_pooling_takes_the_given_pooled_keys():
    pattern = compile_source(NSA_LIKE, pool="mlp")
    Lk = 24
    q, k, v = rand(1, 2, Lk, 8, seed=1), rand(1, 1, Lk, 8, seed=2), rand(1, 1, Lk, 8, seed=3)
    n = (Lk - 4) // 2 + 1
    kc, vc = rand(1, 1, n, 8, seed=4), rand(1, 1, n, 8, seed=5)
    gates = torch.ones(1, 2, Lk, 3, dtype=torch.float64)
    got = run_reference(pattern, q, k, v, gates=gates, k_cmp=kc, v_cmp=vc)
    want = naive(pattern, q, k, v, gates=gates, pooled={"cmp": (kc[0], vc[0])})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_rows_that_see_nothing_give_zero_and_finite_gradients():
    pattern = compile_source("pattern p() { return compress(block=8, stride=8) }")
    q, k, v = (rand(1, 1, 12, 4, seed=s).requires_grad_() for s in range(3))
    out = run_reference(pattern, q, k, v)
    assert torch.equal(out[0, 0, :7], torch.zeros(7, 4, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    ref = reference.attention(pattern.checked, validate_call(pattern.ir, q, k, v))
    assert torch.isinf(ref.lse["p"][0, 0, :7]).all() and torch.isfinite(ref.lse["p"][0, 0, 7:]).all()


def test_selection_forces_first_and_local_blocks_and_breaks_ties_low():
    text = """
    pattern p() {
        c = compress(block=16, stride=16)
        return select(block=16, topk=3, score=c, keep_first=1, keep_local=1)
    }"""
    pattern = compile_source(text)
    Lk = 16 * 8
    q = torch.zeros(1, 1, Lk, 4, dtype=torch.float64)  # every pooled block scores the same
    k, v = rand(1, 1, Lk, 4, seed=1), rand(1, 1, Lk, 4, seed=2)
    ref = reference.attention(pattern.checked, validate_call(pattern.ir, q, k, v))
    chosen = ref.selections["p"][0, 0]
    last = chosen[-1].nonzero().flatten().tolist()
    assert last == [0, 1, 7]  # the first block, the lowest-index tie, and the query's own block
    assert chosen[5].nonzero().flatten().tolist() == [0]  # query 5 lives in block 0: nothing else is eligible
    assert chosen[16 * 2].nonzero().flatten().tolist() == [0, 1, 2]


def test_cu_seqlens_equals_doc_ids():
    pattern = load("document")
    q, k, v = rand(1, 2, 20, 8, seed=1), rand(1, 2, 20, 8, seed=2), rand(1, 2, 20, 8, seed=3)
    ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 6])
    a = pattern(q, k, v, doc_ids=ids)
    b = pattern(q, k, v, cu_seqlens=torch.tensor([0, 5, 14, 20]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_call_runs_the_reference_in_the_input_dtype():
    pattern = load("sliding_window", window=4)
    q, k, v = (rand(2, 4, 10, 8, seed=s).to(torch.bfloat16) for s in range(3))
    out = pattern(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 10, 8)
    want = run_reference(pattern, q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=torch.zeros(1, 4, 8)), "pattern `p`: `q` must have 4 dimensions (batch, heads, length, head_dim), got shape (1, 4, 8)"),
        (dict(q=torch.zeros(1, 3, 8, 16)), "pattern `p`: q has 3 heads, not a multiple of the 2 heads of k and v (grouped-query attention needs Hq % Hkv == 0)"),
        (dict(q=torch.zeros(1, 4, 8, 16, dtype=torch.int32)), "pattern `p`: `q` must be float16, bfloat16, float32 or float64, got torch.int32"),
        (dict(v=torch.zeros(1, 2, 9, 16)), "pattern `p`: `k` and `v` must have the same shape, got (1, 2, 8, 16) and (1, 2, 9, 16)"),
        (dict(q=torch.zeros(1, 4, 9, 16)), "pattern `p`: q is longer (9) than k and v (8); queries are the last Lq of the Lk positions, so Lq <= Lk"),
        (dict(q=torch.zeros(1, 4, 8, 8)), "pattern `p`: q has head_dim 8 but k and v have head_dim 16"),
        (dict(k=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), "pattern `p`: q, k and v must share a dtype, got torch.float32, torch.float64, torch.float32"),
        (dict(doc_ids=torch.zeros(1, 8, dtype=torch.long)), "pattern `p` does not use `document`; drop `doc_ids`/`cu_seqlens`"),
        (dict(gates=torch.zeros(1, 4, 8, 1)), "pattern `p` has a single branch and takes no `gates`"),
        (dict(scale="big"), "pattern `p`: `scale` must be a number, got 'big'"),
        # Non-positive scales gave NaN on the kernel path (a finite output on the reference).
        *((dict(scale=s), f"pattern `p`: `scale` must be positive and finite, got {s!r}; leave it out for the default 1/sqrt(head_dim) = 0.25")
          for s in (0.0, -1.0, -1e-30, float("inf"), float("nan"))),
        (dict(k=torch.zeros(1, 0, 8, 16), v=torch.zeros(1, 0, 8, 16)), "pattern `p`: empty input: q has 4 heads and k and v have 0; both need at least one"),
        (dict(q=torch.zeros(1, 0, 8, 16)), "pattern `p`: empty input: q has 0 heads and k and v have 2; both need at least one"),
        (dict(q=torch.zeros(1, 4, 8, 16, device="meta"), k=torch.zeros(1, 2, 8, 16, device="meta"), v=torch.zeros(1, 2, 8, 16, device="meta")),
         "pattern `p`: `q` is on meta; sparsedsl runs on CUDA GPUs and on the CPU"),
        # 2^30 + 1 positions (expanded: no memory), more than the kernels' 32-bit indices allow
        (dict(q=torch.zeros(1, 4, 1, 16), k=torch.zeros(1, 2, 1, 16).expand(1, 2, 2**30 + 1, 16), v=torch.zeros(1, 2, 1, 16).expand(1, 2, 2**30 + 1, 16)),
         "pattern `p`: k and v have 1,073,741,825 positions; the kernels index positions with 32-bit integers, so at most 1,073,741,824"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    pattern = compile_source("pattern p() { return causal }")
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises(InputError) as info:
        pattern(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert str(info.value) == message


def test_the_reference_refuses_what_a_call_refuses():
    pattern = compile_source("pattern p() { return causal & sliding(8) }")
    x = torch.zeros(1, 2, 8, 16)
    with pytest.raises(InputError, match=r"`scale` must be positive and finite, got -1.0"):
        pattern.reference(x, x, x, scale=-1.0)


def test_gated_and_document_and_learned_inputs_are_demanded():
    q, kv = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(InputError, match=r"mixes 3 branches \(cmp, sel, win\): pass gates= of shape \(1, 4, 8, 3\)"):
        load("nsa")(q, kv, kv)
    with pytest.raises(InputError, match=r"compress branch `cmp` pools with a learned MLP: pass its pooled keys"):
        load("nsa")(q, kv, kv, gates=torch.zeros(1, 4, 8, 3))
    with pytest.raises(InputError, match=r"uses `document`: pass doc_ids= \(a \(1, 8\) integer tensor\) or cu_seqlens="):
        load("document")(q, kv, kv)
    with pytest.raises(InputError, match="returns to a document after another one"):
        load("document")(q, kv, kv, doc_ids=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]]))
    with pytest.raises(InputError, match=r"`cu_seqlens` must start at 0, never decrease and end at the key length 8"):
        load("document")(q, kv, kv, cu_seqlens=torch.tensor([0, 5, 7]))
