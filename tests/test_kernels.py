"""The generated kernels (forward and backward) against the dense reference.

They run under Triton's CPU interpreter (conftest.py), from outputs poisoned with NaN,
so every element a kernel should write and every gradient is checked.
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl import compile_source, reference
from sparsedsl.runtime.dispatch import SlowPathWarning
from sparsedsl.runtime.inputs import validate_call
from sparsedsl.runtime.launch import static
from sparsedsl.runtime.launch.common import launch
from sparsedsl.runtime.tuning import TileConfig, candidates, tuner
from sparsedsl.tools.mask_stats import example_documents

RELAXED = dict(deadline=None, suppress_health_check=list(HealthCheck))
# Norm-wise relative error allowed for the output and each gradient, per input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

MASKS = [
    "full",
    "causal",
    "causal & sliding(7)",
    "sliding(5)",
    "causal & (sink(3) | sliding(6))",
    "sliding(4) | global(3)",
    "causal & chunked(9)",
    "dilated(3, 4)",
    "causal & document",
    "document & ~chunked(8)",
    "~causal",
    "causal & ~sliding(5)",
    "causal & ~causal",  # sees nothing: every output row is 0
]


def run_and_compare(mask, B, Hq, Hkv, Lq, Lk, D, dtype, seed, config=None):
    pattern = compile_source(f"pattern p() {{ return {mask} }}")
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=generator).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, Lk, D, generator=generator).to(dtype).requires_grad_() for _ in range(2))
    kw = {}
    if "document" in mask:
        kw["doc_ids"] = torch.cat([example_documents(Lk, min(3, Lk), seed + b) for b in range(B)])
    with tuner.force(config) if config is not None else contextlib.nullcontext():
        out = pattern(q, k, v, **kw)
        dout = torch.randn(out.shape, generator=generator).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference.attention(pattern.checked, validate_call(pattern.ir, q64, k64, v64, **kw))
    want_grads = torch.autograd.grad(want.out, (q64, k64, v64), dout.double())
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (want.out, *want_grads)):
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.isfinite(got).all(), f"{name} has NaN or inf (an unwritten or poisoned element)"
        # Relative to the reference's size, with a floor for gradients that are ~0 (a
        # softmax over one key has none), where only rounding remains.
        got, expected = got.detach().double(), expected.detach()
        error = float((got - expected).norm() / (expected.norm() + 1e-2 * expected.numel() ** 0.5))
        assert error < TOLERANCE[dtype], f"{name}: relative error {error:.2e} for {mask}"
    empty = torch.isinf(want.lse["p"])  # rows that see no key at all
    assert torch.equal(out.detach()[empty], torch.zeros_like(out.detach()[empty]))
    return out, grads


@pytest.mark.parametrize("mask", MASKS)
def test_every_primitive_forward_and_backward(mask):
    run_and_compare(mask, B=2, Hq=4, Hkv=2, Lq=37, Lk=45, D=16, dtype=torch.float32, seed=1)


@settings(max_examples=12, **RELAXED)
@given(
    st.sampled_from(MASKS),
    st.integers(1, 2),
    st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 1), (6, 3)]),
    st.integers(1, 60),
    st.integers(0, 30),
    st.sampled_from([16, 24, 32, 64]),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.integers(0, 2**16),
)
def test_random_shapes_dtypes_and_patterns(mask, B, heads, Lq, extra, D, dtype, seed):
    Hq, Hkv = heads
    run_and_compare(mask, B, Hq, Hkv, Lq, Lq + extra, D, dtype, seed)


@pytest.mark.parametrize(
    "config",
    [
        TileConfig(32, 16, 2, 4, 1),  # two heads of the group per tile
        TileConfig(64, 32, 4, 4, 1),  # four heads, 16 rows each
        TileConfig(32, 16, 2, 4, 1, max_tiles=2),  # dK/dV walks shared among programs
        TileConfig(16, 16, 1, 4, 1, max_tiles=1),
    ],
)
@pytest.mark.parametrize("mask", ["causal & (sink(3) | sliding(10))", "causal & document", "causal"])
def test_packed_heads_and_split_key_walks(config, mask):
    run_and_compare(mask, B=1, Hq=8, Hkv=2, Lq=29, Lk=50, D=24, dtype=torch.float16, seed=3, config=config)


FUSED_DQ_CASES = {
    # name: (mask, B, Hq, Hkv, Lq, Lk, D, dtype, forced tile); lengths not multiples of 16
    "causal": ("causal", 1, 2, 1, 37, 37, 16, torch.float32, None),
    "window-gqa-shorter-q": ("causal & sliding(7)", 1, 4, 2, 29, 45, 16, torch.float32, None),
    "documents": ("causal & document", 1, 2, 1, 40, 40, 16, torch.float16, None),
    "sinks-packed-heads-split-walks": (
        "causal & (sink(3) | sliding(10))", 1, 8, 2, 29, 50, 24, torch.float16, TileConfig(32, 16, 2, 4, 1, max_tiles=2)
    ),
    "compress": ("compress(block=16, stride=8, pool=mean)", 1, 4, 2, 50, 70, 16, torch.float32, None),
}


@pytest.mark.parametrize("case", list(FUSED_DQ_CASES))
def test_fused_dq_backward_matches_the_reference_and_the_two_kernel_path(case, monkeypatch):
    """SPARSEDSL_FUSED_DQ=1: the dK/dV kernel adds dQ too and no dQ kernel is launched;
    both strategies' gradients match the reference and each other."""
    mask, B, Hq, Hkv, Lq, Lk, D, dtype, config = FUSED_DQ_CASES[case]
    launched = []

    def spy(kernel, spec, grid, **arguments):
        launched.append((spec.name, arguments.get("FUSED_DQ")))
        return launch(kernel, spec, grid, **arguments)

    monkeypatch.setattr(static, "launch", spy)
    results = {}
    for fused in (False, True):
        monkeypatch.setenv("SPARSEDSL_FUSED_DQ", "1" if fused else "0")
        launched.clear()
        results[fused] = run_and_compare(mask, B, Hq, Hkv, Lq, Lk, D, dtype, seed=7, config=config)
        assert ("static_backward_dkdv", fused) in launched
        assert (("static_backward_dq", None) in launched) == (not fused)
    for split, fused in zip(results[False], results[True]):
        torch.testing.assert_close(fused, split, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_non_contiguous_inputs():
    pattern = compile_source("pattern p() { return causal & sliding(9) }")
    base = torch.randn(2, 33, 4, 16)  # (B, L, H, D) viewed as (B, H, L, D)
    q = base.transpose(1, 2)
    k = torch.randn(2, 33, 2, 32)[..., ::2].transpose(1, 2)  # head dim strided too
    v = torch.randn(2, 33, 2, 16).transpose(1, 2)
    out = pattern(q, k, v)
    want = reference.attention(pattern.checked, validate_call(pattern.ir, q.double(), k.double(), v.double())).out
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_length_one_and_fully_masked_rows():
    run_and_compare("~causal", B=1, Hq=2, Hkv=1, Lq=1, Lk=1, D=16, dtype=torch.float32, seed=5)
    run_and_compare("causal & ~sliding(4)", B=1, Hq=2, Hkv=1, Lq=9, Lk=9, D=16, dtype=torch.float32, seed=6)


def test_gated_static_branches_run_on_kernels():
    text = "pattern g() {\n a = causal & sliding(5)\n b = causal & sink(2)\n return gate(a, b)\n}"
    pattern = compile_source(text)
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    gates = torch.rand(1, 2, 20, 2)
    out = pattern(q, k, v, gates=gates)
    want = reference.attention(pattern.checked, validate_call(pattern.ir, q.double(), k.double(), v.double(), gates=gates.double())).out
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_cpu_without_the_interpreter_runs_the_reference_with_a_notice(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pattern = compile_source("pattern p() { return causal }")
    q = torch.randn(1, 2, 8, 16)
    with pytest.warns(SlowPathWarning, match="dense PyTorch reference"):
        out = pattern(q, q[:, :1], q[:, :1])
    want = reference.attention(pattern.checked, validate_call(pattern.ir, q.double(), q[:, :1].double(), q[:, :1].double())).out
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_documents_with_global_tokens():
    # Lowering raised sympy's "The argument 'DocEnd(0)' is not comparable" (found by tests/test_fuzz.py).
    run_and_compare("document & global(2)", B=2, Hq=2, Hkv=1, Lq=20, Lk=23, D=16, dtype=torch.float32, seed=1)


FLOAT32_TILES = sorted(
    {c for kind in ("forward", "dq", "dkdv") for c in candidates(kind, 128, 4, dtype=torch.float32)},
    key=lambda c: (c.block_m, c.block_n, c.heads, c.max_tiles),
)


def test_float32_tries_few_and_smaller_tiles():
    for kind in ("forward", "dq", "dkdv"):
        wide, narrow = candidates(kind, 128, 4), candidates(kind, 128, 4, dtype=torch.float32)
        assert 1 <= len(narrow) <= 2
        assert max(c.block_m * c.block_n for c in narrow) <= max(c.block_m * c.block_n for c in wide) // 4
        assert all(c.num_stages <= 2 for c in narrow)


@pytest.mark.parametrize("config", FLOAT32_TILES, ids=lambda c: f"{c.block_m}x{c.block_n}h{c.heads}")
def test_float32_tiles_compute_the_reference(config):
    run_and_compare("causal & (sink(3) | sliding(40))", B=1, Hq=8, Hkv=2, Lq=70, Lk=90, D=32, dtype=torch.float32, seed=4, config=config)


def test_nearby_lengths_share_a_tuning_choice():
    from sparsedsl.runtime.tuning import tuning_key

    def key(L):
        q = torch.zeros(1, 4, 1, 16).expand(1, 4, L, 16)
        return tuning_key("forward", "k", 0, q, q[:, :2])

    assert key(4097) == key(9000) == key(16384) != key(16385)
    assert key(1000) != key(1025)


def test_candidates_compile_at_once_and_only_compile():
    """The tuner compiles every candidate before timing any: each candidate's launches
    run in compile-only mode (``launch`` calls Triton's ``warmup``, which queues the
    compilation, not the kernel), a candidate that fails is left to the timed pass, and
    launches afterwards run as usual."""
    from sparsedsl.codegen.kernel_specs import SELECT_TOP
    from sparsedsl.runtime.launch.common import launch
    from sparsedsl.runtime.tuning import Tuner, compiling_only, precompile

    class Kernel:
        def __init__(self):
            self.calls = []

        def warmup(self, grid, **arguments):
            self.calls.append(("warmup", arguments["UNITS"], compiling_only()))

        def __getitem__(self, grid):
            return lambda **arguments: self.calls.append(("run", arguments["UNITS"], compiling_only()))

    kernel = Kernel()
    arguments = dict(SCORES=torch.zeros(4), TABLE=torch.zeros(4), units=1, n_blocks=4, BLOCKS=4)

    def run(config: TileConfig):
        if config.block_m == 3:
            raise RuntimeError("this tile does not fit")
        launch(kernel, SELECT_TOP, (1,), UNITS=config.block_m, **arguments)

    configs = [TileConfig(m, 16, 1, 4, 1) for m in (1, 2, 3)]
    precompile([("key", config, run) for config in configs])
    assert kernel.calls == [("warmup", 1, True), ("warmup", 2, True)]
    assert not compiling_only()
    run(configs[0])
    assert kernel.calls[-1] == ("run", 1, False)

    # Several kernels' candidates compile together; a key tuned already compiles nothing.
    tuner = Tuner()
    tuner._loaded, tuner._chosen = True, {"tuned": configs[0]}
    kernel.calls.clear()
    tuner.prepare([("tuned", configs[:2], run), ("new", configs[1:2], run), ("other", [TileConfig(4, 16, 1, 4, 1)], run)])
    assert sorted(call[:2] for call in kernel.calls) == [("warmup", 2), ("warmup", 4)]
    assert tuner._compiled == {"new", "other"}  # choose() times these without compiling them again

    # Inside a rehearsal choose() times nothing: it queues the candidates after the first
    # and returns the first, whose compilation the caller's own launch queues.
    from sparsedsl.runtime.tuning import compiling_ahead

    kernel.calls.clear()
    with compiling_ahead():
        chosen = tuner.choose("rehearsed", configs[:2], run)
        run(chosen)
        assert tuner.choose("tuned", configs[1:], run) == configs[0]  # known: as before
    assert chosen == configs[0] and kernel.calls == [("warmup", 2, True), ("warmup", 1, True)]
    assert "rehearsed" in tuner._compiled and "rehearsed" not in tuner._chosen


def test_a_rehearsal_compiles_every_kernel_of_the_call_and_runs_none(monkeypatch):
    """The first call of a kind on a GPU rehearses (dispatch.rehearse): every kernel the
    call launches, forward and backward, must be queued for compilation then, and none
    may run (the rehearsal's buffers are zeros, which keeps the selection's host code in
    bounds). Checked in the interpreter, where a warmup is a no-op that can be counted;
    NSA with mean pooling launches every kind of kernel (pooling, scores, top-k, selected
    and static attention, gates)."""
    from triton.runtime.interpreter import InterpretedFunction

    import sparsedsl
    from sparsedsl.runtime import dispatch
    from sparsedsl.runtime.tuning import Tuner

    pattern = sparsedsl.load("nsa", cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=16, pool="mean")
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 1, 2, 1, 64, 16
    leaves = dict(q=torch.randn(B, Hq, L, D), k=torch.randn(B, Hkv, L, D), v=torch.randn(B, Hkv, L, D), gates=torch.rand(B, Hq, L, 3))
    leaves = {key: t.requires_grad_() for key, t in leaves.items()}
    expected = reference.attention(pattern.checked, validate_call(pattern.ir, **leaves)).out

    calls = []
    original = InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        calls.append((bool(warmup), self.fn.__name__))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    monkeypatch.setattr(dispatch, "_rehearses", lambda q: True)
    monkeypatch.setattr(dispatch, "tuner", Tuner())
    out = pattern(**leaves)
    out.sum().backward()
    rehearsed = [kernel for warmup, kernel in calls if warmup]
    ran = [kernel for warmup, kernel in calls if not warmup]
    assert calls[: len(rehearsed)] == [(True, kernel) for kernel in rehearsed]  # all before any run
    assert sorted(rehearsed) == sorted(ran) and any(k.endswith("backward_dkdv") for k in ran)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)  # the call's own result

    calls.clear()  # the same kind of call again: no second rehearsal
    pattern(**leaves)
    assert calls and not any(warmup for warmup, _ in calls)
