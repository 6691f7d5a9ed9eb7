"""Context parallelism (sparsedsl.distributed) on CPUs with gloo: processes spawned by the
test, each holding its shard, against one single-process call of the full sequence."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsedsl
from sparsedsl.distributed import sequence_chunks
from sparsedsl.errors import InputError


def test_zigzag_and_contiguous_chunks():
    assert sequence_chunks(16, 2, 0) == [(0, 4), (12, 16)] and sequence_chunks(16, 2, 1) == [(4, 8), (8, 12)]
    assert sequence_chunks(16, 4, 1, "contiguous") == [(4, 8)]
    with pytest.raises(InputError, match=r"does not split into 4 equal chunks \(zigzag layout over 2 ranks\): pad it to a multiple of 4"):
        sequence_chunks(18, 2, 0)
    with pytest.raises(InputError, match=r"layout 'ring': expected one of 'zigzag', 'contiguous'"):
        sequence_chunks(16, 2, 0, "ring")


CASES = {  # name: (pattern, call keywords beyond q, k, v)
    "causal": ("causal", {}),
    "sliding_window": ("sliding_window", {}),
    "streaming": ("streaming", {}),
    "document": ("document", {"doc_ids": True}),
    "nsa": ("nsa", {"gates": True}),
    "nsa_per_block": ("nsa", {"gates": True, "per": "block"}),
}


_NSA = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=16, pool="mean")
SMALL = {"sliding_window": dict(window=8), "streaming": dict(sinks=2, window=8), "nsa": _NSA, "nsa_packed": _NSA}


def _pattern(name: str, options: dict):
    return sparsedsl.load(name, **SMALL.get(name, {}), **({"per": options["per"]} if "per" in options else {}))


def _inputs(L: int, options: dict, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, L, 16, generator=generator, dtype=dtype)
    k, v = (torch.randn(1, 2, L, 16, generator=generator, dtype=dtype) for _ in range(2))
    call = {}
    if options.get("gates"):
        call["gates"] = torch.rand(1, 4, L, 3, generator=generator, dtype=dtype)
    if options.get("doc_ids"):  # documents that cross the ranks' boundaries
        call["doc_ids"] = torch.repeat_interleave(torch.arange(3), torch.tensor([L // 3, L // 2, L - L // 3 - L // 2]))[None]
    return q, k, v, call


def _worker(rank: int, world: int, port: int, cases: list[str], layout: str, L: int, dtype, failures) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import gather_sequence, shard_sequence

    try:
        for name in cases:
            spec, options = CASES[name]
            pattern = _pattern(spec, options)
            q, k, v, call = _inputs(L, options, dtype)
            leaves = [q, k, v, *([call["gates"]] if "gates" in call else [])]
            for t in leaves:
                t.requires_grad_()
            expected = pattern(q, k, v, **call)
            weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
            expected_grads = torch.autograd.grad((expected * weights).sum(), leaves)

            shard = lambda t, dim=2: shard_sequence(t.detach(), dim=dim, layout=layout).requires_grad_(t.requires_grad)  # noqa: E731
            local = [shard(t) for t in leaves]
            local_call = {key: local[3] if key == "gates" else shard(t, 1) for key, t in call.items()}
            out_local = pattern(*local[:3], cp_group=dist.group.WORLD, cp_layout=layout, **local_call)
            # Each rank's loss is its own queries' part; key and value gradients come back
            # from the ranks whose queries used them.
            grads = torch.autograd.grad((out_local * shard(weights)).sum(), local)
            tolerance = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
            out = gather_sequence(out_local.detach(), layout=layout)
            torch.testing.assert_close(out, expected.detach(), **tolerance, msg=lambda m: f"{name}, output: {m}")
            for which, grad, want in zip("q k v gates".split(), grads, expected_grads):
                torch.testing.assert_close(grad, shard(want), **tolerance, msg=lambda m: f"{name}, d{which}: {m}")
    except Exception as exc:  # reported to the parent, which fails the test with it
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def _spawn(worker, world: int, *args) -> None:
    """``worker(rank, world, port, *args, failures)`` on ``world`` spawned processes; their
    failures (put on the queue) fail the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(world, port, *args, failures), nprocs=world, start_method="spawn")
    problems = []
    while not failures.empty():
        problems.append(failures.get())
    assert not problems, "\n".join(problems)


def _run(world: int, cases: list[str], layout: str, L: int, dtype=torch.float64) -> None:
    _spawn(_worker, world, cases, layout, L, dtype)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_two_ranks_equal_one_call_on_the_reference_path(layout):
    """Outputs and every gradient (q, k, v, gates) of the sharded call, gathered, equal the
    single call exactly in float64 (the reference path), for documents crossing the ranks'
    boundaries, NSA per token and per block, windows and sinks."""
    _run(2, list(CASES), layout, 128)


def test_four_ranks_on_the_reference_path():
    _run(4, ["document", "nsa"], "zigzag", 128)


def test_two_ranks_through_the_generated_kernels():
    """The generated kernels under Triton's interpreter (float32), a small shape."""
    _run(2, ["causal", "nsa"], "zigzag", 64, torch.float32)


def test_one_rank_falls_back_to_the_plain_call():
    _run(1, ["nsa"], "zigzag", 64)


def _errors_worker(rank: int, world: int, port: int, failures) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q, k, v, _ = _inputs(16, {})
        two_sided = sparsedsl.compile_source("pattern both() { return sliding(4) }")
        with pytest.raises(InputError, match=r"pattern `both`: branch `\w+` may let a query see later keys.*with `causal`"):
            two_sided(q, k, v, cp_group=dist.group.WORLD)
        per_block = sparsedsl.load("nsa", **_NSA, per="block")
        with pytest.raises(InputError, match=r"chooses blocks per block of 16 queries, but the zigzag chunks over 2 ranks hold 4 positions; make the sequence length a multiple of 64"):  # noqa: E501
            per_block(q[:, :, :8], k[:, :, :8], v[:, :, :8], gates=torch.rand(1, 4, 8, 3, dtype=q.dtype), cp_group=dist.group.WORLD)
        causal = sparsedsl.load("causal")
        mine = 4 if rank == 0 else 6  # mismatched shards
        with pytest.raises(InputError, match=r"the ranks' shards differ in shape \(rank 0: \(1, 2, 4, 16\), rank 1: \(1, 2, 6, 16\)\)"):
            causal(q[:, :, :mine], k[:, :, :mine], v[:, :, :mine], cp_group=dist.group.WORLD)
        packed = sparsedsl.load("nsa_packed", **_NSA)
        with pytest.raises(InputError, match=r"pattern `nsa_packed` pools within documents .*not supported yet"):
            packed(q, k, v, gates=torch.rand(1, 4, 16, 3, dtype=q.dtype), doc_ids=torch.zeros(1, 16, dtype=torch.long), cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"`cp_layout` 'ring': expected one of 'zigzag', 'contiguous'"):
            causal(q, k, v, cp_group=dist.group.WORLD, cp_layout="ring")
        with pytest.raises(InputError, match=r"q and k are this rank's shards of one sequence and hold the same positions"):
            causal(q[:, :, :8], k, v, cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"`cp_group` must be a ProcessGroup or a one-dimensional DeviceMesh, got str"):
            causal(q, k, v, cp_group="world")
    except BaseException as exc:  # noqa: BLE001 - a failed pytest.raises is not an Exception
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_bad_input_is_refused_on_every_rank():
    _spawn(_errors_worker, 2)
