"""Replayed decode steps (serving/replay.py): a step's recorded launches run again with the
next step's inputs and output in place of the recorded ones, and no plan is kept where
that would not be exact. Kernels here are stand-ins with Triton's calling convention
(``kernel[grid](**arguments)`` returns the compiled kernel, ``compiled[grid](*arguments)``
runs it): the interpreter compiles nothing, so the real ones replay on GPUs only."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from sparsedsl.codegen.kernel_specs import KernelSpec, Tensor
from sparsedsl.runtime.launch.common import launch
from sparsedsl.serving.replay import MAX_PLANS, planned_step

knobs = pytest.importorskip("triton.knobs")

SPEC = KernelSpec("axpy", tensors=(Tensor("X"), Tensor("Y"), Tensor("OUT")), scalars=("a",), constexprs=())


def apply(X, Y, OUT, a):
    OUT.copy_(X + a * Y)


class Compiled:
    """OUT = X + a * Y."""

    runs = 0  # launches through compiled[grid](...)

    def __getitem__(self, grid):
        def run(*arguments):
            self.runs += 1
            apply(*arguments)

        return run


class CompiledWithLauncher(Compiled):
    """As Triton's compiled kernels: ``compiled[grid]`` calls the launcher ``run`` with the
    grid, a stream, the function, its metadata, the launch metadata and hooks, then the
    arguments; a replay may call ``run`` itself."""

    function, packed_metadata = object(), object()
    direct_runs = 0

    def run(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *arguments):
        assert (gx, gy, gz, stream, function, packed_metadata) == (1, 1, 1, 0, self.function, self.packed_metadata)
        assert launch_metadata is enter_hook is exit_hook is None
        self.direct_runs += 1
        apply(*arguments)


class Kernel:
    arg_names = ["X", "Y", "OUT", "a"]

    def __init__(self, compiled=Compiled):
        self.dispatches = 0  # launches through kernel[grid](...), which a replay skips
        self.compiled = []
        self.make = compiled

    def __getitem__(self, grid):
        def run(**arguments):
            self.dispatches += 1
            compiled = self.make()
            self.compiled.append(compiled)
            compiled[grid](*(arguments[name] for name in self.arg_names))
            return compiled

        return run


def step(cache, kernel, q, k, copy_q=False, halves=False, key=("key",)):
    """Append k into the cache's store, advance, then out = q + 2 * store (``halves``: in
    two launches, the second over views of q and out at another offset)."""
    store = cache.store

    def run_append():
        launch(kernel, SPEC, (1,), X=k, Y=k, OUT=store, a=0.0)

    def run_attend():
        out = torch.empty_like(q)
        if halves:
            launch(kernel, SPEC, (1,), X=q[:4], Y=store[:4], OUT=out[:4], a=2.0)
            launch(kernel, SPEC, (1,), X=q[4:], Y=store[4:], OUT=out[4:], a=2.0)
        else:
            launch(kernel, SPEC, (1,), X=q.clone() if copy_q else q, Y=store, OUT=out, a=2.0)
        return out

    def advance():
        cache.steps += 1

    return planned_step(cache, key, (q, k, None), run_append, run_attend, advance)


def new_cache():
    return SimpleNamespace(step_plans=OrderedDict(), store=torch.zeros(8), steps=0)


def test_a_replay_launches_the_recorded_kernels_with_the_new_inputs():
    cache, kernel = new_cache(), Kernel()
    for i in range(3):
        q, k = torch.randn(8), torch.randn(8)
        assert torch.equal(step(cache, kernel, q, k), q + 2 * k)
    assert kernel.dispatches == 2 and cache.steps == 3  # only the first step dispatched; every step advanced
    assert list(cache.step_plans) == [("key",)]


def _hook(metadata) -> None:  # a profiler's launch hook
    pass


def _chain(*hooks):
    chain = knobs.HookChain()
    for hook in hooks:
        chain.add(hook)
    return chain


@pytest.mark.parametrize(
    "hook, hooked",
    [(None, False), (_chain(), False), (_chain(_hook), True), (_hook, True)],
    ids=["none", "empty chain", "chain with a hook", "a hook"],  # older Triton: None or a hook; newer: a chain
)
def test_a_replay_calls_the_launcher_itself_unless_triton_has_launch_hooks(monkeypatch, hook, hooked):
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    cache, kernel = new_cache(), Kernel(CompiledWithLauncher)
    for _ in range(3):
        q, k = torch.randn(8), torch.randn(8)
        assert torch.equal(step(cache, kernel, q, k), q + 2 * k)
    # Both launches recorded by the first step, then replayed by two: through Triton's
    # runner where a hook must be called, else by the launcher itself.
    replays = (2, 0) if hooked else (0, 2)
    assert [(c.runs - 1, c.direct_runs) for c in kernel.compiled] == [replays, replays]


def test_no_plan_where_a_replay_would_not_be_exact():
    for case in ("copied", "shared", "misaligned", "offset views"):
        cache, kernel = new_cache(), Kernel()
        launches = 3 if case == "offset views" else 2
        for _ in range(2):
            q, k = torch.randn(8), torch.randn(8)
            if case == "shared":
                k = q  # k is q: a later step's two inputs could not be told apart
            if case == "misaligned":
                q = torch.randn(9)[1:]  # 4 bytes past an aligned start: not what Triton specialised for
            out = step(cache, kernel, q, k, copy_q=case == "copied", halves=case == "offset views")
            assert torch.equal(out, q + 2 * k)
        assert kernel.dispatches == 2 * launches, case  # both steps dispatched: nothing replayed
        assert not cache.step_plans, case


def test_a_cache_keeps_its_latest_plans():
    cache, kernel = new_cache(), Kernel()
    for key in range(MAX_PLANS + 3):
        step(cache, kernel, torch.randn(8), torch.randn(8), key=(key,))
    assert list(cache.step_plans) == [(key,) for key in range(3, MAX_PLANS + 3)]
