"""What every launcher of the generated kernels shares: where kernels run, the kernels
of one branch, output buffers and layouts, tile choices and head-dimension constants."""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

import torch

from ...codegen.kernel_specs import DOCUMENT_TABLES, KernelSpec
from ..generated import GeneratedBranch
from ..tuning import (
    TileConfig,
    candidates,
    compiling_only,
    interpreter_config,
    tuner,
    tuning_key,
)

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dependent_launches(t: torch.Tensor) -> bool:
    """Whether a decode step's kernels on ``t``'s device launch as programmatic dependents
    (CUDA's PDL, Hopper and later; their ``PDL`` constant): each kernel's launch and
    opening then overlap the previous kernel's tail, and it waits for that kernel's writes
    inside (``gdc_wait``), not between launches. Off by default (on an H100 it gained
    nothing in CUDA graphs, docs/performance.md): ``SPARSEDSL_PDL=1`` turns it on (read
    once per device)."""
    return t.is_cuda and not interpreting() and _dependent_launches_on(t.device.index)


@functools.cache
def _dependent_launches_on(index: int | None) -> bool:
    if os.environ.get("SPARSEDSL_PDL") != "1" or torch.version.hip is not None:  # (AMD's 9.x is not Hopper)
        return False
    try:  # Triton learnt launch_pdl in 3.4
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and torch.cuda.get_device_capability(index)[0] >= 9


def uses_kernels(t: torch.Tensor, module) -> bool:
    """Whether tensors like ``t`` run the generated kernels (``module``): on a GPU, or on the
    CPU under Triton's interpreter; float64 always runs the dense reference."""
    return module is not None and t.dtype != torch.float64 and (t.is_cuda or interpreting())


@dataclass(frozen=True)
class BranchKernels:
    """The generated kernels of one branch and where they came from."""

    module: ModuleType
    index: int
    source_key: str

    @property
    def functions(self) -> GeneratedBranch:
        return self.module.KERNELS[self.index]


def launch(kernel, spec: KernelSpec, grid, *, num_warps: int | None = None, num_stages: int | None = None, **arguments) -> None:
    """Launch ``kernel`` on ``grid`` by keyword, its arguments checked against ``spec``:
    each tensor's strides come from the tensor itself, and document tables are passed as
    ``**documents(tables)``."""
    strided, expected = _launch_plan(spec, DOCUMENT_TABLES[0] in arguments)
    for name, stride_names in strided:
        arguments.update(zip(stride_names, arguments[name].stride()))
    if arguments.keys() != expected:  # the launcher and the spec disagree: our bug
        missing, unexpected = sorted(expected - arguments.keys()), sorted(arguments.keys() - expected)
        raise TypeError(f"launch of {spec.name}: missing {missing}, unexpected {unexpected}")
    if num_warps is not None:
        arguments["num_warps"] = num_warps
    if num_stages is not None:
        arguments["num_stages"] = num_stages
    if arguments.get("PDL"):  # compiled to launch as a programmatic dependent (dependent_launches)
        arguments["launch_pdl"] = True
    if compiling_only():  # compiled ahead, at once with the others (tuning.compiling_ahead)
        kernel.warmup(**arguments, grid=grid)
        return
    compiled = kernel[grid](**arguments)  # the compiled kernel (None under the interpreter)
    records = getattr(_recording, "records", None)
    if records is not None:
        records.append((compiled, grid, None if compiled is None else [arguments[name] for name in kernel.arg_names]))


_recording = threading.local()


@contextmanager
def recording_launches():
    """Inside the block, every launch on this thread is also recorded, as (compiled kernel,
    grid, arguments in the kernel's order), into the list the block gets (serving/replay.py)."""
    records, outer = [], getattr(_recording, "records", None)
    _recording.records = records
    try:
        yield records
    finally:
        _recording.records = outer


@functools.cache
def _launch_plan(spec: KernelSpec, uses_documents: bool) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], frozenset[str]]:
    """Once per spec, not per launch (a launch's host time counts on short calls): the
    tensors whose strides are passed, with their stride parameters, and every parameter."""
    strided = tuple((t.name, t.stride_names()) for t in spec.tensors if t.strides is not None)
    return strided, frozenset(spec.parameters(uses_documents))


def documents(tables) -> dict:
    """A launch's document-table keywords: none, or both of (first, last) position tables."""
    return dict(zip(DOCUMENT_TABLES, tables)) if tables else {}


def document_tables(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lk) int32 tables: the first and the last position of each position's document."""
    B, L = doc_ids.shape
    positions = torch.arange(L, device=doc_ids.device).expand(B, L)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, positions, 0).cummax(1).values
    last = torch.where(ends, positions, L).flip(1).cummin(1).values.flip(1)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


def output_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An output buffer the kernels fill completely. With SPARSEDSL_POISON_OUTPUTS=1 it
    starts as NaN, so that an element a kernel forgot to write shows up in tests; while
    kernels only compile (:func:`compiling_only`) it starts zeroed, for the host code that
    reads it (block tables index tensors)."""
    shape = t.shape if shape is None else shape
    dtype = t.dtype if dtype is None else dtype
    if compiling_only():
        return torch.zeros(shape, device=t.device, dtype=dtype)
    if os.environ.get("SPARSEDSL_POISON_OUTPUTS") == "1" and dtype.is_floating_point:
        return torch.full(shape, float("nan"), device=t.device, dtype=dtype)
    return torch.empty(shape, device=t.device, dtype=dtype)


def rows_last(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dimension with stride 1; any other layout is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def precision_of(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def choose_config(kind: str, kernels: BranchKernels, q, k, run, selection: tuple[int, bool] | None = None) -> TileConfig:
    """The tile configuration for one launch: forced, the interpreter's, or the fastest
    candidate (timed once per tuning key). ``selection`` is (block, per_block) for the
    kernels of a select branch."""
    group = q.shape[1] // k.shape[1]
    if tuner.forced is not None:
        return tuner.forced
    if interpreting() or not q.is_cuda:
        return interpreter_config(kind, group, selection)
    known = tuner.chosen(tuning_key(kind, kernels.source_key, kernels.index, q, k))
    return known if known is not None else tuner.choose(*_tuning_request(kind, kernels, q, k, run, selection))


def compile_together(kernels: BranchKernels, q, k, launches: dict, selection: tuple[int, bool] | None = None) -> None:
    """Before :func:`choose_config` of each ``{kind: run}`` in ``launches`` (kernels that
    run one after another on inputs that exist already, such as a branch's dK/dV and dQ),
    compile all their untuned candidates at once."""
    if tuner.forced is None and not interpreting() and q.is_cuda:
        tuner.prepare([_tuning_request(kind, kernels, q, k, run, selection) for kind, run in launches.items()])


def _tuning_request(kind: str, kernels: BranchKernels, q, k, run, selection):
    group = q.shape[1] // k.shape[1]
    key = tuning_key(kind, kernels.source_key, kernels.index, q, k)
    return key, candidates(kind, q.shape[-1], group, selection, q.dtype), run


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1): ``triton.next_power_of_2`` without the
    constexpr wrapper that newer Triton puts around it, which costs microseconds a call
    (a decode step makes dozens of them)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` without its constexpr wrapper: a / b rounded up, for b > 0."""
    return -(-a // b)


@functools.cache
def _head_dims(D: int) -> tuple[tuple[str, int], ...]:
    return (("HEAD_DIM", D), ("D_PAD", max(16, next_power_of_2(D))))


def head_dims(D: int) -> dict:
    """A launch's head-dimension constants: HEAD_DIM and its padding to a power of two."""
    return dict(_head_dims(D))


def interpretable(t: torch.Tensor) -> torch.Tensor:
    """Triton's CPU interpreter (3.9) multiplies bfloat16 tiles wrongly (a 16x16 tl.dot is
    off by 1e10), so interpreted runs compute bfloat16 inputs in float32. On GPUs the
    kernels take bfloat16 directly."""
    return t.float() if t.dtype == torch.bfloat16 and not t.is_cuda and interpreting() else t
