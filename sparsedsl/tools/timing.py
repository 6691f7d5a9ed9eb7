"""Timing on the GPU: medians of device-event timings, and of CUDA-graph replays.

Shared by ``sparsedsl explore`` and the benchmarks in ``bench/``. Triton is imported
when a function is called, so importing this module costs nothing on machines without it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], budget_ms: float = 200.0) -> float:
    """Median time of ``fn`` in milliseconds (device events, after warm-up)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(10, budget_ms / 8), rep=budget_ms, return_mode="median")


def host_ms(fn: Callable[[], object], calls: int = 25) -> float:
    """Median host time in milliseconds to issue one call of ``fn`` on an idle GPU (Python,
    argument checks and launches; the kernels run asynchronously). Where it reaches the
    device time of :func:`median_ms`, the call is bound by the host, not by its kernels."""
    import time

    fn()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


def back_to_back_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Mean time of ``fn`` in microseconds over ``calls`` calls issued back to back, one
    synchronisation at the end: what an eager loop (a generation loop without a CUDA
    graph) gets, host-bound or device-bound, whichever is slower. (``median_ms`` times
    each call between device events after flushing the L2 cache, which is not how an
    eager loop runs a host-bound call.)"""
    import time

    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def graph_us(fn: Callable[[], object], rep_ms: float = 100.0) -> float:
    """Median time of ``fn`` in microseconds, replayed from a CUDA graph (what a serving
    loop runs: no Python or launch overhead). ``fn`` must not synchronise with the host."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def timed_fwd_bwd(
    fwd: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dout: torch.Tensor, budget_ms: float
) -> tuple[float, float]:
    """Median forward and forward+backward times of ``fwd()`` in milliseconds (its first
    call compiles and tunes, outside the timing). Leaves the output does not depend on
    get no gradient (``allow_unused``)."""

    def both():
        return torch.autograd.grad(fwd(), leaves, dout, allow_unused=True)

    both()
    fwd_ms = median_ms(fwd, budget_ms)
    both_ms = median_ms(both, budget_ms)
    return fwd_ms, both_ms
