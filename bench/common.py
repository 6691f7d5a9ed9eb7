"""Shared pieces of the GPU benchmarks: timing, ceilings, environment, tables, and the
seed lists and step times of the training studies."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from sparsedsl.tools.timing import (  # noqa: F401 - the benches import them from here
    back_to_back_us,
    graph_us,
    host_ms,
    median_ms,
    timed_fwd_bwd,
)


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def ceilings() -> dict:
    """The measured matmul rate (bf16, 8192^3, random data) and copy bandwidth."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: a @ b)
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x))
    return {"matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_tbps": 2 * x.numel() * 2 / copy_ms / 1e9}


def kernel_times(fn, calls: int = 3) -> dict:
    """Device time of each kernel ``fn`` launches, in microseconds per call (profiler),
    slowest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total > 0 and not event.key.startswith(("aten::", "cuda")):
            times[event.key] = total / calls
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def dense_causal_baselines(q, k, v):
    """Dense causal SDPA with its cuDNN and FlashAttention-2 backends, by method name; K/V
    heads are expanded to q's inside (what a GQA model without native support pays)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]

    def dense(backend):
        def run():
            with sdpa_kernel(backend):
                expanded = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
                return torch.nn.functional.scaled_dot_product_attention(q, *expanded, is_causal=True)

        return run

    return {"sdpa_cudnn": dense(SDPBackend.CUDNN_ATTENTION), "sdpa_flash2": dense(SDPBackend.FLASH_ATTENTION)}


def print_environment(log_rows: list[dict]) -> None:
    env = next(r for r in log_rows if r["kind"] == "env")
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}; matmul ceiling "
          f"{env['matmul_tflops']:.0f} TFLOP/s, copy {env['copy_tbps']:.2f} TB/s")  # fmt: skip


class Log:
    """Prints as it goes (a run may be cut off) and keeps every row for the JSON file."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[dict] = []
        self.out = out
        self.start = time.time()

    def add(self, **row) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self, **extra) -> None:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "rows.json").write_text(json.dumps({"rows": self.rows, **extra}, indent=1))

    def elapsed(self) -> float:
        return time.time() - self.start


def parse_seeds(text: str) -> list[int]:
    """A training study's ``--seeds``: ``0-7`` or ``0,3,5``."""
    if "-" in text:
        first, last = (int(n) for n in text.split("-"))
        return list(range(first, last + 1))
    return [int(n) for n in text.split(",")]


def training_step_ms(log: dict) -> float | None:
    """The median step time (ms) of a training log, after the first steps, which compile and tune."""
    timed = log["step_seconds"][10:]
    return 1000 * statistics.median(timed) if timed else None
