"""Shared pieces of the GPU benchmarks: timing, ceilings, environment, tables."""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench


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


def median_ms(fn, budget_ms: float = 200.0) -> float:
    """Median time of ``fn`` in milliseconds (device events, after warm-up)."""
    return do_bench(fn, warmup=max(10, budget_ms / 8), rep=budget_ms, return_mode="median")


def ceilings() -> dict:
    """The measured matmul rate (bf16, 8192^3, random data) and copy bandwidth."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = median_ms(lambda: a @ b)
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x))
    return {"matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_tbps": 2 * x.numel() * 2 / copy_ms / 1e9}


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
