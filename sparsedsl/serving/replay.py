"""An eager decode step without Triton's per-launch dispatch: record once, replay after.

``kernel[grid](**arguments)`` binds and specialises every argument before it launches,
tens of microseconds a launch on the host, and an eager NSA decode step makes seven of
them, which is most of its host time. A step's launches are the same from step to step
of one cache: the same compiled kernels, grids and arguments, but for the step's own
inputs (q, k, v, gates) and output. So the first step of a shape runs as usual and
records each launch (the compiled kernel Triton returns, its grid, its arguments in
order); later steps launch the recorded compiled kernels directly, with their own
inputs and a fresh output put where the recorded ones were. Scratch buffers (partial
outputs, block tables) are the recorded ones again: steps of one cache run one after
another on the stream, so reusing them is safe. A step captured into a CUDA graph launches
as usual (a graph must own its buffers, which a plan may drop).

A plan is kept only where replaying is exact: every input a launch reads is found among
its arguments, 16-byte aligned (what Triton specialised the kernel for) and laid out as
recorded; otherwise, and under Triton's interpreter (which compiles nothing), steps run
as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from triton.runtime.driver import driver as _triton_driver

try:  # Triton's launch hooks (a profiler's), read where a replay decides how to launch
    from triton import knobs as _triton_knobs
except ImportError:  # a Triton before its knobs: every replayed launch goes through its runner
    _triton_knobs = None

from ..runtime.launch.common import recording_launches

MAX_PLANS = 8  # per cache: shapes a server alternates between (batch, tokens per step)


class Recorded(NamedTuple):
    """One launch: the compiled kernel, its grid, its arguments in order, which of them
    are the step's inputs (argument index, input index; -1 for the output), and the
    compiled kernel's launcher, function and packed metadata where it has them."""

    compiled: object
    grid: tuple
    arguments: list
    inputs: tuple[tuple[int, int], ...]
    direct: tuple | None


def _direct(compiled) -> tuple | None:
    """What ``compiled[grid](*arguments)`` passes to the launcher besides the grid, the
    stream and the arguments: found once, so that a replay calls the launcher itself
    (``compiled[grid]`` looks up the device, the stream, the hooks and the launch metadata
    at every launch, several microseconds each time). None where the kernel lacks them."""
    try:
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None


def _current_stream() -> int:
    return _triton_driver.active.get_current_stream(_triton_driver.active.get_current_device())


def _hooked() -> bool:
    """Whether Triton has launch hooks set (a profiler's), which only its runner calls: a
    hook that is not None, or a chain of hooks (newer Triton) that holds some."""
    runtime = getattr(_triton_knobs, "runtime", None)
    if runtime is None:
        return True
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return any(hook is not None and bool(getattr(hook, "calls", True)) for hook in hooks)


def _layout(t: torch.Tensor | None):
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


def plan_key(q, k, v, gates, scale: float, storage: tuple[torch.Tensor, ...]) -> tuple:
    """What a plan depends on: the inputs' layouts, the scale and the cache's storage."""
    return (_layout(q), _layout(k), _layout(v), _layout(gates), scale, tuple(t.data_ptr() for t in storage))


def _aligned(tensors) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


class StepPlan:
    """The recorded launches of one decode step: ``append`` before the cache's lengths
    advance, ``attend`` after."""

    def __init__(self, append: list[Recorded], attend: list[Recorded]) -> None:
        self.append, self.attend = append, attend

    @staticmethod
    def of(append_records, attend_records, inputs: tuple, out: torch.Tensor) -> StepPlan | None:
        """A plan from the recorded launches, or None where a replay would not be exact."""
        if not _aligned((*inputs, out)):
            return None
        pointers = {t.data_ptr(): j for j, t in enumerate(inputs) if t is not None}
        if len(pointers) < sum(t is not None for t in inputs):
            return None  # two inputs share memory (k is v): a later step's could not be told apart
        pointers[out.data_ptr()] = -1
        storages = {t.untyped_storage().data_ptr() for t in (*inputs, out) if t is not None}
        plans = []
        for records in (append_records, attend_records):
            plan = []
            for compiled, grid, arguments in records:
                if compiled is None:  # the interpreter: nothing compiled to replay
                    return None
                tensors = [(i, a) for i, a in enumerate(arguments) if isinstance(a, torch.Tensor)]
                if any(a.data_ptr() not in pointers and a.untyped_storage().data_ptr() in storages for _, a in tensors):
                    return None  # a view of an input at another offset: a replay could not follow it
                slots = tuple((i, pointers[a.data_ptr()]) for i, a in tensors if a.data_ptr() in pointers)
                grid = (*grid, 1, 1)[:3]  # a compiled kernel's runner takes all three axes
                plan.append(Recorded(compiled, grid, list(arguments), slots, _direct(compiled)))
            plans.append(plan)
        found = {j for plan in plans for record in plan for _, j in record.inputs}
        if not {j for j, t in enumerate(inputs) if t is not None} | {-1} <= found:
            return None  # an input was copied before a kernel read it: the copy would be stale
        return StepPlan(*plans)

    @staticmethod
    def launch(records: list[Recorded], inputs: tuple, out: torch.Tensor) -> None:
        hooked, stream = _hooked(), None
        for compiled, grid, arguments, slots, direct in records:
            for i, j in slots:
                arguments[i] = out if j < 0 else inputs[j]
            if direct is None or hooked:
                compiled[grid](*arguments)
                continue
            if stream is None:  # the stream of this step, found as Triton's runner finds it
                stream = _current_stream() if out.is_cuda else 0
            run, function, packed_metadata = direct
            run(*grid, stream, function, packed_metadata, None, None, None, *arguments)  # no hooks: no launch metadata


def planned_step(cache, key: tuple, inputs: tuple, run_append, run_attend, advance) -> torch.Tensor:
    """One decode step: replayed from the cache's plan for ``key`` where there is one,
    else run (``run_append()``, ``advance()``, then ``run_attend()``, which returns the
    output) and recorded for the next step."""
    if inputs[0].is_cuda and torch.cuda.is_current_stream_capturing():
        # A graph captured from a plan would hold its scratch buffers, which the plan alone
        # keeps alive (an evicted or cleared plan frees them): capture the plain launches.
        run_append()
        advance()
        return run_attend()
    plans: OrderedDict = cache.step_plans
    plan = plans.get(key)
    if plan is not None and _aligned(inputs):
        plans.move_to_end(key)
        q = inputs[0]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        StepPlan.launch(plan.append, inputs, out)
        advance()
        StepPlan.launch(plan.attend, inputs, out)
        return out
    with recording_launches() as appended:
        run_append()
    advance()
    with recording_launches() as attended:
        out = run_attend()
    plan = StepPlan.of(appended, attended, inputs, out)
    if plan is not None:
        plans[key] = plan
        if len(plans) > MAX_PLANS:
            plans.popitem(last=False)
    return out
