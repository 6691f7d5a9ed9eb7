"""torch.compile over pattern calls and SparseAttention models: one graph, forward and backward.

Every kernel launch is a custom operator with a fake implementation (sparsedsl.runtime.ops),
so dynamo traces a call without a graph break: ``fullgraph=True`` raises on any break, and
the graph-break counter is checked besides. Compiled outputs and gradients must equal the
eager ones. Kernels run under Triton's CPU interpreter (conftest); float64 runs the dense
reference. Shapes are small: the interpreter is slow. One test compiles with the default
backend (inductor: the operators become its fallback kernels); the models take
``aot_eager`` (dynamo, fake tensors and AOT autograd, as inductor sees them, without its
code generation), which keeps this file fast.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparsedsl
from sparsedsl import InputError
from sparsedsl.nn import NativeSparseAttention, SparseAttention
from sparsedsl.runtime import checks, ops
from sparsedsl.runtime.launch.common import document_tables

SMALL_NSA = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_one_graph(graphs: int = 1) -> None:
    """Nothing fell back to eager: no graph break, and ``graphs`` graphs compiled."""
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs


def forward_backward(fn, *args, **kwargs):
    """fn's output and the gradients of a loss over it, for every argument that takes one."""
    leaves = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args, **kwargs)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return out.detach(), grads


def assert_same(got, expected, atol: float = 0.0) -> None:
    (out, grads), (out_e, grads_e) = got, expected
    torch.testing.assert_close(out, out_e, rtol=0, atol=atol)
    for g, g_e in zip(grads, grads_e, strict=True):
        torch.testing.assert_close(g, g_e, rtol=0, atol=atol)


def leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype).requires_grad_() for s in shapes]


# ---------------------------------------------------------------- a bare pattern call
def test_pattern_call_compiles_to_one_graph_forward_and_backward():
    """NSA (mean pooling, a selection per block, gates): every kind of operator, through
    the default backend (inductor); compiled equals eager exactly."""
    torch.manual_seed(0)
    pattern = sparsedsl.load("nsa", pool="mean", per="block", **SMALL_NSA)
    q, k, v = leaves((1, 2, 40, 16), (1, 1, 40, 16), (1, 1, 40, 16))
    gates = torch.rand(1, 2, 40, 3, requires_grad=True)

    def call(q, k, v, gates):
        return pattern(q, k, v, gates=gates)

    expected = forward_backward(call, q, k, v, gates)
    assert_same(forward_backward(torch.compile(call, fullgraph=True), q, k, v, gates), expected)
    assert_one_graph()


def test_documents_are_checked_inside_the_compiled_graph():
    """Document ids are checked by an operator: compiled calls take them without a graph
    break and still refuse bad ones."""
    torch.manual_seed(0)
    pattern = sparsedsl.load("document")
    q, k, v = leaves((1, 2, 24, 16), (1, 2, 24, 16), (1, 2, 24, 16))

    def call(q, k, v, doc_ids):
        return pattern(q, k, v, doc_ids=doc_ids)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    doc_ids = torch.tensor([[0] * 10 + [1] * 14])
    assert_same(forward_backward(compiled, q, k, v, doc_ids), forward_backward(call, q, k, v, doc_ids))
    with pytest.raises(InputError, match="returns to a document"):
        compiled(q, k, v, torch.tensor([[0] * 8 + [1] * 8 + [0] * 8]))
    assert_one_graph()


def test_graph_break_count_is_zero():
    """Compiled without fullgraph (so that a break would fall back to eager silently),
    calls on the kernels and on the dense reference count no graph break: one graph each."""
    pattern = sparsedsl.load("streaming", sinks=2, window=8)
    compiled = torch.compile(lambda q, k, v: pattern(q, k, v), backend="eager")
    for dtype in (torch.float32, torch.float64):  # the kernels, the dense reference
        q, k, v = leaves((1, 2, 16, 16), (1, 1, 16, 16), (1, 1, 16, 16), dtype=dtype)
        forward_backward(compiled, q, k, v)
    assert_one_graph(graphs=2)


# ---------------------------------------------------------------- models
class TinyModel(nn.Module):
    """A pre-norm residual block around an attention layer."""

    def __init__(self, attention: nn.Module, hidden: int = 32) -> None:
        super().__init__()
        self.norm, self.attention, self.head = nn.LayerNorm(hidden), attention, nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.head(x + self.attention(self.norm(x), **kwargs))


def model_step(model: nn.Module, x: torch.Tensor, **kwargs):
    """The model's output and the gradients of its parameters and input."""
    model.zero_grad(set_to_none=True)
    out = model(x, **kwargs)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters()] + [x.grad]
    x.grad = None
    return out.detach(), grads


def test_native_sparse_attention_model_compiles_to_one_graph():
    """A model around NativeSparseAttention (learned compression MLPs, a selection per
    token, gates) on the kernels: one graph forward and backward, equal to eager."""
    torch.manual_seed(0)
    model = TinyModel(NativeSparseAttention(32, num_heads=2, num_kv_heads=1, head_dim=16, **SMALL_NSA))
    for mlp in model.attention.compress_k.values():
        nn.init.normal_(mlp.mlp[2].weight, std=0.1)  # the learned pooling matters
    x = torch.randn(1, 40, 32, requires_grad=True)
    expected = model_step(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # inductor: the bare call's test
    assert_same(model_step(compiled, x), expected, atol=1e-5)
    assert_one_graph()


def test_reference_path_compiles_to_one_graph():
    """float64 runs the dense reference: a model around SparseAttention (a selection per
    block) compiles to one graph too, equal to eager."""
    torch.manual_seed(0)
    layer = SparseAttention("nsa", 32, num_heads=2, num_kv_heads=1, head_dim=16, per="block", **SMALL_NSA)
    model = TinyModel(layer).double()
    x = torch.randn(1, 40, 32, dtype=torch.float64, requires_grad=True)
    expected = model_step(model, x)
    assert_same(model_step(torch.compile(model, fullgraph=True, backend="aot_eager"), x), expected, atol=1e-12)
    assert_one_graph()


def test_sparse_attention_with_documents_compiles_to_one_graph():
    """SparseAttention over a document pattern, documents as cu_seqlens: rotary positions
    per document and the document tables are traced, the checks are operators."""
    torch.manual_seed(0)
    model = TinyModel(SparseAttention("document", 32, num_heads=2, head_dim=16))
    x = torch.randn(1, 24, 32, requires_grad=True)
    bounds = torch.tensor([0, 10, 24])
    expected = model_step(model, x, cu_seqlens=bounds)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same(model_step(compiled, x, cu_seqlens=bounds), expected, atol=1e-6)
    assert_one_graph()


# ---------------------------------------------------------------- the operators themselves
def test_operators_fake_implementations_match_real_ones():
    """torch.library.opcheck on every operator (those of a gated NSA call with max pooling,
    attention within documents, the documents' checks): schemas, fake outputs' shapes,
    dtypes and strides against the real ones, autograd registration."""
    torch.manual_seed(0)
    pattern = sparsedsl.load("nsa", pool="max", **SMALL_NSA)
    key = pattern.source_key
    cmp, sel, win = (pattern.ir.branches.index(pattern.ir.branch(n)) for n in ("cmp", "sel", "win"))
    q, k, v = leaves((1, 2, 32, 16), (1, 1, 32, 16), (1, 1, 32, 16))
    q_t = q.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # strides of another layout
    kc, share = ops.pool(key, cmp, k)
    out_c, lse_c = ops.attention(key, cmp, q, kc, kc, 0.25, [], 32)
    table = ops.select_blocks(key, sel, q.detach(), kc.detach(), lse_c, 0.25, [], 32)
    out_s, lse_s = ops.selected_attention(key, sel, q, k, v, table, 0.25)
    gates = torch.rand(1, 2, 32, 3, requires_grad=True)
    dout = torch.randn(1, 2, 32, 16)
    cases = [
        (ops.pool, (key, cmp, k)),
        (ops.pool_backward, (key, cmp, k.detach(), kc.detach(), share, torch.randn_like(kc))),
        (ops.attention, (key, win, q_t, k, v, 0.25, [], 32)),
        (ops.attention, (key, cmp, q, kc.detach()[:, :, :0], kc.detach()[:, :, :0], 0.25, [], 32)),  # no pooled key yet
        (ops.attention_backward, (key, win, q_t.detach(), k.detach(), v.detach(), out_s.detach(), lse_s, dout, 0.25, [], 32)),
        (ops.select_blocks, (key, sel, q.detach(), kc.detach(), lse_c, 0.25, [], 32)),
        (ops.selected_attention, (key, sel, q, k, v, table, 0.25)),
        (ops.selected_attention_backward, (key, sel, q.detach(), k.detach(), v.detach(), out_s.detach(), lse_s, dout, table, 0.25)),
        (ops.gated_sum, (key, gates, [out_c.detach().requires_grad_(), out_s.detach().requires_grad_(), dout.requires_grad_()])),
        (ops.gated_sum_backward, (key, dout, gates.detach(), [out_c.detach(), out_s.detach(), dout])),
    ]  # fmt: skip
    documents = sparsedsl.load("document")
    doc_ids = torch.tensor([[0] * 12 + [1] * 20])
    cases += [
        (ops.attention, (documents.source_key, 0, q, k, v, 0.25, list(document_tables(doc_ids)), 32)),
        (checks.document_ids, ("call", doc_ids.int())),
        (checks.documents_from_bounds, ("call", torch.tensor([0, 12, 32]), 2, 32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------- where graphs still break
def break_reasons() -> list[str]:
    return list(counters["graph_break"])


def test_packed_documents_break_the_graph_only_at_their_layout():
    """A pattern that works within documents lays a packed batch out at a length the data
    decides: that one function runs eagerly (a graph break); the rest compiles, and
    compiled equals eager."""
    torch.manual_seed(0)
    pattern = sparsedsl.compile_source(
        """
        pattern packed() {
            cmp = compress(block=8, stride=8, pool=mlp, within=document)
            win = causal & sliding(8) & document
            return gate(cmp, win)
        }
        """
    )
    model = TinyModel(SparseAttention(pattern, 32, num_heads=2, num_kv_heads=1, head_dim=16))
    x = torch.randn(1, 24, 32, requires_grad=True)
    bounds = torch.tensor([0, 9, 24])
    expected = model_step(model, x, cu_seqlens=bounds)
    assert_same(model_step(torch.compile(model, backend="aot_eager"), x, cu_seqlens=bounds), expected, atol=1e-5)
    assert break_reasons() and all("DocumentLayout.of" in reason for reason in break_reasons())


def test_a_kv_cache_prefill_runs_eagerly_inside_a_compiled_model():
    """A prefill longer than a decode step (or with ragged rows) keeps host-side state in
    the cache: a compiled layer runs it eagerly (a graph break) around its compiled
    projections, equal to eager."""
    torch.manual_seed(0)
    layer = SparseAttention("streaming", 32, num_heads=2, num_kv_heads=1, head_dim=16, sinks=2, window=8)
    compiled = torch.compile(layer, backend="aot_eager")
    caches = layer.make_cache(2, 40), layer.make_cache(2, 40)
    with torch.no_grad():
        for n, lengths in ((20, None), (2, [2, 1])):  # a prefill, then a ragged step
            x = torch.randn(2, n, 32)
            got, want = compiled(x, cache=caches[0], lengths=lengths), layer(x, cache=caches[1], lengths=lengths)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert caches[0].seqlens == caches[1].seqlens == [22, 21]
    assert break_reasons() and all("Pattern.prefill" in reason for reason in break_reasons())


@pytest.mark.parametrize("name, params", [("streaming", dict(sinks=2, window=8)), ("nsa", SMALL_NSA | {"pool": "mean"}),
                                          ("nsa", SMALL_NSA | {"pool": "mlp"})], ids=["streaming", "nsa", "nsa, learned pooling"])  # fmt: skip
def test_a_compiled_layer_decodes_without_a_graph_break(name, params):
    """A layer's decode steps (every row the same few tokens, no documents; learned
    pooling by the poolers its cache was made with) are one operator under torch.compile:
    fullgraph=True compiles them, once for three steps, and they equal the eager layer's
    exactly."""
    torch.manual_seed(0)
    layer = SparseAttention(name, 32, num_heads=4, num_kv_heads=2, head_dim=16, **params)
    caches = layer.make_cache(2, 40), layer.make_cache(2, 40)
    with torch.no_grad():
        prompt = torch.randn(2, 20, 32)
        for cache in caches:
            layer(prompt, cache=cache)  # a prefill of more than 16 tokens: eager
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for _ in range(3):
            x = torch.randn(2, 1, 32)
            torch.testing.assert_close(compiled(x, cache=caches[0]), layer(x, cache=caches[1]), rtol=0, atol=0)
    assert caches[0].seqlens == caches[1].seqlens == [23, 23]
    assert torch.equal(caches[0].k, caches[1].k)
    assert all(torch.equal(a, b) for name in caches[0].pooled for a, b in zip(caches[0].pooled[name], caches[1].pooled[name]))
    assert_one_graph()


def test_a_layer_pools_with_its_own_learned_poolers_whatever_cache_it_gets():
    """A cache made by another layer (or by the layer this one was copied from) carries
    that layer's poolers: a step of this layer pools with its own (passed explicitly),
    never silently with the cache's."""
    torch.manual_seed(0)
    a = SparseAttention("nsa", 32, num_heads=4, num_kv_heads=2, head_dim=16, **SMALL_NSA)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)  # b's poolers now pool otherwise than a's
    foreign, own = a.make_cache(1, 40), b.make_cache(1, 40)
    with torch.no_grad():
        for n in (20, 1, 1):
            x = torch.randn(1, n, 32)
            torch.testing.assert_close(b(x, cache=foreign), b(x, cache=own), rtol=0, atol=0)


# ---------------------------------------------------------------- decode steps
@pytest.mark.parametrize("name", ["sliding_window", "nsa"])
def test_a_compiled_decode_loop_has_no_graph_break_and_compiles_once(name):
    """pattern.decode under torch.compile(fullgraph=True) is one operator that appends to
    the cache: steps equal the eager ones exactly, the host lengths advance, and three
    steps compile one graph (no recompilation as the cache grows)."""
    pattern = sparsedsl.load(name, **(SMALL_NSA | {"pool": "mean"} if name == "nsa" else {"window": 16}))
    torch.manual_seed(0)
    eager_cache, compiled_cache = (pattern.cache(batch=2, kv_heads=2, head_dim=16, capacity=48) for _ in range(2))
    gated = pattern.ir.combine == "gate"

    def gates(n):
        return {"gates": torch.rand(2, 4, n, 3)} if gated else {}

    prompt = [torch.randn(2, h, 20, 16) for h in (4, 2, 2)]
    first = gates(20)
    for cache in (eager_cache, compiled_cache):
        pattern.prefill(*prompt, cache, **first)
    compiled = torch.compile(lambda q, k, v, cache, **kw: pattern.decode(q, k, v, cache, **kw), fullgraph=True, backend="aot_eager")
    for _ in range(3):
        step, extra = [torch.randn(2, h, 1, 16) for h in (4, 2, 2)], gates(1)
        expected = pattern.decode(*step, eager_cache, **extra)
        torch.testing.assert_close(compiled(*step, compiled_cache, **extra), expected, rtol=0, atol=0)
    assert compiled_cache.seqlens == eager_cache.seqlens == [23, 23]
    assert torch.equal(compiled_cache.k, eager_cache.k) and torch.equal(compiled_cache.lengths, eager_cache.lengths)
    assert_one_graph()


def test_a_compiled_decode_step_with_ragged_rows_runs_eagerly():
    """A step with ragged rows is an eager step behind a graph break: fullgraph=True
    refuses it, and without fullgraph it runs (and appends) as eagerly."""
    pattern = sparsedsl.load("sliding_window", window=16)
    cache = pattern.cache(batch=2, kv_heads=2, head_dim=16, capacity=8)
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16)

    def ragged_step():
        return pattern.decode(q, k, k, cache, lengths=[1, 0])

    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        torch.compile(ragged_step, fullgraph=True, backend="aot_eager")()
    torch.compile(ragged_step, backend="aot_eager")()
    assert cache.seqlens == [1, 0]
