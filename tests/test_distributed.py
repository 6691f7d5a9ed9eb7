"""Context parallelism (sparsedsl.distributed) on CPUs with gloo: processes spawned by the
test, each holding its shard, against one single-process call of the full sequence."""

import gc
import os
import socket
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsedsl
from sparsedsl.distributed import sequence_chunks
from sparsedsl.errors import InputError
from sparsedsl.nn import SparseAttention


def test_zigzag_and_contiguous_chunks():
    assert sequence_chunks(16, 2, 0) == [(0, 4), (12, 16)] and sequence_chunks(16, 2, 1) == [(4, 8), (8, 12)]
    assert sequence_chunks(16, 4, 1, "contiguous") == [(4, 8)]
    with pytest.raises(InputError, match=r"does not split into 4 equal chunks \(zigzag layout over 2 ranks\): pad it to a multiple of 4"):
        sequence_chunks(18, 2, 0)
    with pytest.raises(InputError, match=r"layout 'ring': expected one of 'zigzag', 'contiguous'"):
        sequence_chunks(16, 2, 0, "ring")


def test_the_pooled_plan_owns_every_window_once_and_fetches_what_the_halo_lacks():
    from sparsedsl.distributed.halo import Piece, Reach, split_by_owner, without
    from sparsedsl.distributed.pooled import owned_windows, pooled_reach
    from sparsedsl.reference import pooled_length

    # NSA: the window reaches 511 back, its score-only compress branch 31; a compress branch
    # that only scores counts too (c2 below), and an unbounded mask leaves the plan
    assert pooled_reach(sparsedsl.load("nsa").checked) == Reach(511, 1, 0)
    assert pooled_reach(sparsedsl.compile_source(CASES["score_only_compress"][0]).checked) == Reach(31, 1, 0)
    assert pooled_reach(sparsedsl.load("causal").checked) is None
    assert pooled_reach(sparsedsl.compile_source("pattern c() {\n c = compress(block=8, stride=4, pool=mean)\n w = causal\n"
                                                 " return gate(c, w)\n}").checked) is None  # fmt: skip
    for length, world, layout, block, stride in ((128, 2, "zigzag", 16, 8), (120, 4, "zigzag", 12, 4), (32, 4, "contiguous", 16, 8)):
        owned = sorted(owned_windows(a, b, length, block, stride) for r in range(world) for a, b in sequence_chunks(length, world, r, layout))
        windows = [w for lo, hi in owned for w in range(lo, hi)]
        assert windows == list(range(pooled_length(length, block, stride))), (length, world, layout)
    assert without([(0, 16), (32, 48)], [(8, 40)]) == [(0, 8), (40, 48)]
    assert without([(16, 32)], [(0, 16), (32, 64)]) == [(16, 32)]
    # merged, then split where the owners change: zigzag over 2 ranks of 64 positions holds 0-15, 48-63 on rank 0
    assert split_by_owner([(40, 50), (10, 20), (45, 52)], 64, 2, "zigzag") == [
        Piece(0, 10, 16), Piece(1, 16, 20), Piece(1, 40, 48), Piece(0, 48, 52)]  # fmt: skip


def test_the_halo_plan_reaches_as_far_back_as_the_masks():
    from sparsedsl.distributed.halo import Piece, Reach, chunk_keys, pattern_reach

    reach = lambda name, **params: pattern_reach(sparsedsl.load(name, **params).checked)  # noqa: E731
    assert reach("sliding_window", window=8) == Reach(7, 1)
    assert reach("chunked", chunk=16) == Reach(15, 16)
    assert reach("causal") is None  # unbounded: all-gather
    assert reach("streaming", sinks=2, window=8) == Reach(7, 1, 2)
    # with sinks the halo starts at least as far back as the farthest window of the pattern
    wide = sparsedsl.compile_source("pattern w() { return causal & (sink(2) | (sliding(4) & sliding(40))) }")
    assert pattern_reach(wide.checked) == Reach(39, 1, 2)
    assert reach("longformer") is None  # global tokens count queries from position 0: a shift changes them
    assert reach("nsa") is None  # compress and select branches: the pooled plan
    both = sparsedsl.compile_source("pattern w() { return causal & (sliding(4) | chunked(8)) }")
    assert pattern_reach(both.checked) == Reach(7, 8)
    # 64 positions, 2 ranks, zigzag: rank 0 holds 0-15 and 48-63, rank 1 16-47 (pieces split by chunk)
    assert chunk_keys(64, 2, 0, "zigzag", Reach(7)) == [[Piece(0, 0, 16)], [Piece(1, 41, 48), Piece(0, 48, 64)]]
    assert chunk_keys(64, 2, 1, "zigzag", Reach(7)) == [[Piece(0, 9, 16), Piece(1, 16, 32)], [Piece(1, 25, 32), Piece(1, 32, 48)]]
    assert chunk_keys(64, 2, 1, "zigzag", Reach(15, 16)) == [[Piece(0, 0, 16), Piece(1, 16, 32)], [Piece(1, 16, 32), Piece(1, 32, 48)]]
    # sinks: the first keys (rounded up to the grid), then the halo; the whole prefix where the halo starts among them
    assert chunk_keys(64, 2, 1, "zigzag", Reach(7, 1, 2)) == [[Piece(0, 0, 2), Piece(0, 9, 16), Piece(1, 16, 32)],
                                                              [Piece(0, 0, 2), Piece(1, 25, 32), Piece(1, 32, 48)]]  # fmt: skip
    assert chunk_keys(64, 2, 1, "zigzag", Reach(7, 8, 3))[1] == [Piece(0, 0, 8), Piece(1, 24, 32), Piece(1, 32, 48)]
    assert chunk_keys(64, 2, 1, "zigzag", Reach(15, 1, 2))[0] == [Piece(0, 0, 16), Piece(1, 16, 32)]


_COMPRESS_AND_WINDOW = "pattern cw() {\n cmp = compress(block=16, stride=8, pool=mean)\n win = causal & sliding(12)\n return gate(cmp, win)\n}"
CASES = {  # name: (pattern, call keywords beyond q, k, v)
    "causal": ("causal", {}),
    "sliding_window": ("sliding_window", {}),
    "streaming": ("streaming", {}),
    "document": ("document", {"doc_ids": True}),
    "nsa": ("nsa", {"gates": True}),
    "nsa_per_block": ("nsa", {"gates": True, "per": "block"}),
    # the halo plan: a window reaching across several chunks, chunks on their own grid
    "wide_window": ("sliding_window", {"params": dict(window=40)}),
    "chunked": ("chunked", {"params": dict(chunk=24)}),
    # sinks beside chunks: the first keys rounded up to the chunks' grid travel with each halo
    "sinks_and_chunks": ("pattern sc() { return causal & (sink(3) | chunked(8)) }", {}),
    # the pooled plan: a halo of raw keys, pooled keys gathered (windows crossing the ranks' boundaries)
    "compress_and_window": (_COMPRESS_AND_WINDOW, {"gates": 2}),
    "compress_alone": ("pattern c() { return compress(block=12, stride=4, pool=mean) }", {}),
    # a compress branch that only scores a selection pools from the halo too (topk above the forced blocks)
    "score_only_compress": ("pattern so() {\n c1 = compress(block=8, stride=8, pool=mean)\n c2 = compress(block=32, stride=16, pool=mean)\n"
                            " s = select(block=16, topk=4, score=c2, keep_first=1, keep_local=1)\n w = causal & sliding(4)\n"
                            " return gate(c1, s, w)\n}", {"gates": True}),
    "compress_and_documents": ("pattern cd() {\n c = compress(block=8, stride=4, pool=mean)\n"
                               " w = causal & document & (sink(2) | sliding(6))\n return gate(c, w)\n}", {"gates": 2, "doc_ids": True}),
    "compress_and_sinks": ("pattern cs() {\n c = compress(block=8, stride=8, pool=max)\n w = causal & (sink(2) | sliding(6))\n"
                           " return gate(c, w)\n}", {"gates": 2}),
    # the packed plan: every document its own sequence, documents crossing the ranks' boundaries
    "nsa_packed": ("nsa_packed", {"gates": True, "doc_ids": True}),
    "nsa_packed_per_block": ("nsa_packed", {"gates": True, "doc_ids": True, "per": "block"}),
    # cp_plan="all-gather" where another plan would serve
    "nsa_all_gather": ("nsa", {"gates": True, "plan": "all-gather"}),
}


_NSA = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=4, window=16, pool="mean")
SMALL = {"sliding_window": dict(window=8), "streaming": dict(sinks=2, window=8), "nsa": _NSA, "nsa_packed": _NSA}


def _pattern(name: str, options: dict):
    params = SMALL.get(name, {}) | options.get("params", {}) | ({"per": options["per"]} if "per" in options else {})
    return sparsedsl.compile_source(name) if name.startswith("pattern ") else sparsedsl.load(name, **params)


def _inputs(L: int, options: dict, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, L, 16, generator=generator, dtype=dtype)
    k, v = (torch.randn(1, 2, L, 16, generator=generator, dtype=dtype) for _ in range(2))
    call = {}
    if options.get("gates"):  # True: NSA's three branches
        call["gates"] = torch.rand(1, 4, L, 3 if options["gates"] is True else options["gates"], generator=generator, dtype=dtype)
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
            out_local = pattern(*local[:3], cp_group=dist.group.WORLD, cp_layout=layout, cp_plan=options.get("plan", "auto"),
                                **local_call)  # fmt: skip
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


def _ended(rank: int, worker, *args) -> None:
    """``worker(rank, *args)``, then the process ends at once (``os._exit``), its result
    already on the queue: at interpreter teardown a gloo process group that something
    still references may be destroyed after Python's finalisation has begun, and abort the
    process ("terminate called without an active exception") after a test that passed."""
    worker(rank, *args)
    gc.collect()
    os._exit(0)


def _spawn(worker, world: int, *args) -> None:
    """``worker(rank, world, port, *args, failures)`` on ``world`` spawned processes; their
    failures (put on the queue) fail the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ended, args=(worker, world, port, *args, failures), nprocs=world, start_method="spawn")
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
    _run(4, ["document", "nsa", "sliding_window", "wide_window", "nsa_packed"], "zigzag", 128)


def test_a_rank_that_pools_no_window_still_returns_the_others_gradients():
    """Contiguous chunks of 8 under pooling windows of 16: rank 0 holds no window's last key,
    yet its backward must post the pooled keys' collective (it hung before)."""
    _run(4, ["nsa"], "contiguous", 32)


def test_two_ranks_through_the_generated_kernels():
    """The generated kernels under Triton's interpreter (float32), a small shape."""
    _run(2, ["causal", "nsa", "nsa_packed"], "zigzag", 64, torch.float32)


def _attention_calls_worker(rank: int, world: int, port: int, failures) -> None:
    """The pooled plan on the kernels runs each branch once per chunk: the compress branch's
    attention, whose log-sum-exp scores the selection, is not run again by the call. And
    between forward and backward it holds what it fetched, not the keys each chunk's call
    reads laid out from position 0 (nor each chunk's prefix of the pooled keys), with mean
    and with max pooling (which saves its input): the backward lays them out again. Under
    activation checkpointing its hooks step aside; double backward and a saved tensor
    changed in place are refused."""
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from torch.utils.checkpoint import checkpoint

    from sparsedsl.distributed import pooled, shard_sequence
    from sparsedsl.runtime import ops

    attention, lay_out, pooled_prefix = ops.attention, pooled._lay_out, pooled._pooled_prefix
    calls, made, outputs = [], [], []  # branches attended to; layouts made; the attention's outputs

    def recorded(function):
        def call(*args):
            x = function(*args)
            made.append(weakref.ref(x))
            return x
        return call

    def counted(key, index, *args):
        calls.append(pattern.ir.branches[index].name)
        out_and_lse = attention(key, index, *args)
        outputs.extend(weakref.ref(t) for t in out_and_lse)
        return out_and_lse

    try:
        ops.attention = counted
        pooled._lay_out, pooled._pooled_prefix = recorded(lay_out), recorded(pooled_prefix)
        for name in ("nsa", "compress_and_sinks"):
            calls.clear()
            made.clear()
            pattern = _pattern(*CASES[name])
            q, k, v, call = _inputs(64, CASES[name][1], torch.float32)
            local = [shard_sequence(t).requires_grad_() for t in (q, k, v, call["gates"])]
            sharded = lambda q, k, v, g: pattern(q, k, v, gates=g, cp_group=dist.group.WORLD)  # noqa: E731
            out = sharded(*local)
            if name == "nsa":
                assert sorted(calls) == ["cmp", "cmp", "win", "win"], calls  # (the selection has kernels of its own)
            gc.collect()
            forward = len(made)
            held = sum(r() is not None for r in made)
            assert forward >= 8 and not held, f"{name}: {held} of {forward} held"
            grads = torch.autograd.grad(out.square().sum(), local)
            assert len(made) > forward and all(g.abs().sum() > 0 for g in grads)  # laid out again; every input has its gradient
        outputs.clear()  # a graph dropped without its backward frees what it saved, the attention's outputs too
        del out, grads
        out = sharded(*local)
        del out
        gc.collect()
        assert outputs and not [r for r in outputs if r() is not None]
        grads = torch.autograd.grad(sharded(*local).square().sum(), local)
        again = checkpoint(sharded, *local, use_reentrant=False)
        for grad, want in zip(torch.autograd.grad(again.square().sum(), local), grads):
            torch.testing.assert_close(grad, want, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match=r"^the pooled plan of context parallelism \(`cp_group=`\) has no double backward: "
                                               r"call backward without create_graph=True$"):  # fmt: skip
            torch.autograd.grad(sharded(*local).sum(), local, create_graph=True)
        scaled = local[0] * 1  # changed in place after the forward: refused, as autograd refuses it without the hooks
        out = sharded(scaled, *local[1:])
        scaled.mul_(2)
        with pytest.raises(RuntimeError, match=r"saved for its backward was modified by an inplace operation \(version 1, saved at 0\)"):
            torch.autograd.grad(out.sum(), local)
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc!r}")
    finally:
        ops.attention, pooled._lay_out, pooled._pooled_prefix = attention, lay_out, pooled_prefix
        dist.destroy_process_group()


def test_the_pooled_plan_runs_the_compressed_attention_once_per_chunk_and_holds_what_it_fetched():
    _spawn(_attention_calls_worker, 2)


def test_one_rank_falls_back_to_the_plain_call():
    _run(1, ["nsa"], "zigzag", 64)


def _overlap_worker(rank: int, world: int, port: int, failures) -> None:
    """The all-gather plan in the zigzag layout posts both gathers before waiting for the
    first, and waits for the second only once the first chunk's prefix is out. Its backward
    posts the second gathers' sums before the first chunk's backward and waits after it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import attention, gather_sequence, shard_sequence
    from sparsedsl.distributed.sequence import (
        BackwardOrder,
        PendingGather,
        _PostGather,
        _ReturnParts,
    )

    events, gathers = [], []
    sums, awaits = _ReturnParts.backward, _PostGather.backward

    class Logged(PendingGather):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            events.append("post")
            gathers.append(self)

        def parts(self):
            if "work" in self._posted:  # the first read waits
                events.append("wait")
            return super().parts()

    def logged(name, function):
        def call(*args):
            events.append(name)
            return function(*args)

        return call

    try:
        attention.PendingGather = Logged
        _ReturnParts.backward, _PostGather.backward = staticmethod(logged("post sum", sums)), staticmethod(logged("wait sum", awaits))
        k, v = (torch.randn(1, 2, 32, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in (0, 1))
        local = {"": tuple(shard_sequence(t).requires_grad_() for t in (k, v))}
        order = BackwardOrder(k)
        chunks = attention._prefix_chunks(local, None, dist.group.WORLD, "zigzag", order)
        first, _ = next(chunks)
        events.append("chunk 0")
        losses = [(first[""][0] * first[""][1]).sum()]  # as the plan attends: before the next chunk's read
        losses[0].register_hook(lambda grad: events.append("chunk 0's backward"))  # about to start
        second, _ = next(chunks)
        losses.append((second[""][0] * second[""][1]).sum())
        # chunk 0 (positions 0-7 on rank 0, 8-15 on rank 1) reads first chunks only
        assert events == ["post"] * 4 + ["wait", "wait", "chunk 0", "wait", "wait"], events
        stops = [stop for _, stop in sequence_chunks(32, world, rank)]
        for (keys, values), stop in zip((first[""], second[""]), stops):
            whole = [gather_sequence(t.detach()) for t in local[""]]
            assert torch.equal(keys, whole[0][:, :, :stop]) and torch.equal(values, whole[1][:, :, :stop])
        events.clear()
        order.tie(sum(losses)).backward()
        assert events == ["post sum", "post sum", "chunk 0's backward", "post sum", "post sum"] + ["wait sum"] * 4, events
        whole = [t.clone().requires_grad_() for t in (k, v)]
        ends = [stop for r in range(world) for _, stop in sequence_chunks(32, world, r)]
        expected = torch.autograd.grad(sum((whole[0][:, :, :b] * whole[1][:, :, :b]).sum() for b in ends), whole)
        for shard, want in zip(local[""], expected):
            torch.testing.assert_close(shard.grad, shard_sequence(want))
        # Frozen keys: their gathers' sums are still posted (the ranks' posts must agree) and
        # waited for where posted, since no gather backward runs for them.
        gathers.clear()
        frozen = {"": (local[""][0].detach(), local[""][1].detach().requires_grad_())}
        order = BackwardOrder(k)
        chunks = attention._prefix_chunks(frozen, None, dist.group.WORLD, "zigzag", order)
        loss = sum((chunk[""][0] * chunk[""][1]).sum() for chunk, _ in chunks)
        events.clear()
        order.tie(loss).backward()
        assert events == ["post sum"] * 4 + ["wait sum"] * 2, events
        assert all("sum" not in gather._posted for gather in gathers), "a posted sum that nothing waited for"
        torch.testing.assert_close(frozen[""][1].grad, local[""][1].grad, atol=0, rtol=0)
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc!r}")
    finally:
        attention.PendingGather = PendingGather
        _ReturnParts.backward, _PostGather.backward = staticmethod(sums), staticmethod(awaits)
        dist.destroy_process_group()


def test_the_all_gather_plan_overlaps_its_chunks_forward_and_backward():
    _spawn(_overlap_worker, 2)


def _halo_overlap_worker(rank: int, world: int, port: int, deferred: bool, failures) -> None:
    """The halo plan posts every piece of both chunks before reading the first, and waits
    for a chunk's batch only when it reads that chunk; what it reads is the sequence's
    keys from the halo's start to the chunk's end. Its backward posts the second chunk's
    gradients before the first chunk's backward runs and waits for them after it.
    ``deferred``: each batch gives one request whose messages move only once it is waited
    for (NCCL's convention, one work per batch, with the worst timing), so a chunk read, or
    a gradient added, without its batch's wait would hold garbage."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import attention, halo, shard_sequence
    from sparsedsl.distributed.sequence import BackwardOrder

    events, PendingPieces, batch = [], halo.PendingPieces, dist.batch_isend_irecv
    returns, waits = halo._ReturnChunk.backward, halo._PostPieces.backward

    class Logged(PendingPieces):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            events.append("post")

        def chunk(self, index):
            if self._exchange.batches.get(index):  # requests still open: this read waits
                events.append(f"wait {index}")
            return super().chunk(index)

    def logged_return(ctx, *grads):  # posts chunk index's gradients
        events.append(f"return {ctx.index}")
        return returns(ctx, *grads)

    def logged_wait(ctx, *grads):  # waits for every chunk's
        events.append("wait for the gradients")
        return waits(ctx, *grads)

    class Deferred:
        def __init__(self, ops) -> None:
            self.ops = ops

        def wait(self) -> bool:
            for work in batch(self.ops):
                work.wait()
            return True

    try:
        halo.PendingPieces = Logged
        halo._ReturnChunk.backward, halo._PostPieces.backward = staticmethod(logged_return), staticmethod(logged_wait)
        if deferred:
            dist.batch_isend_irecv = lambda ops: [Deferred(ops)]
        k, v = (torch.randn(1, 2, 32, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in (0, 1))
        local = {"": tuple(shard_sequence(t).requires_grad_() for t in (k, v))}
        order = BackwardOrder(k)
        chunks = attention._halo_chunks(local, None, dist.group.WORLD, "zigzag", halo.Reach(7), order)
        first, _ = next(chunks)
        events.append("chunk 0")
        losses = [(first[""][0] * first[""][1]).sum()]  # as the plan attends: before the next chunk's read
        losses[0].register_hook(lambda grad: events.append("chunk 0's backward"))  # about to start
        second, _ = next(chunks)
        losses.append((second[""][0] * second[""][1]).sum())
        # zigzag over 2 ranks, chunks of 8: rank 0 holds 0-7 (no halo) and 24-31 (halo 17-23, rank 1's), rank 1
        # 8-15 (halo 1-7, rank 0's) and 16-23 (halo 9-15, its own); batch c carries every rank's chunk c's pieces
        assert events == ["post", "post", "wait 0", "wait 0", "chunk 0", "wait 1", "wait 1"], events
        for (keys, values), (start, stop) in zip((first[""], second[""]), sequence_chunks(32, world, rank)):
            lo = max(0, start - 7)
            assert torch.equal(keys, k[:, :, lo:stop]) and torch.equal(values, v[:, :, lo:stop]), (start, stop)
        events.clear()
        order.tie(sum(losses)).backward()
        # values then keys (the reverse of their posts), the second chunk's first, in flight during the first's backward
        assert events == ["return 1", "return 1", "chunk 0's backward", "return 0", "return 0"] + ["wait for the gradients"] * 2, events
        whole = [t.clone().requires_grad_() for t in (k, v)]
        spans = [(max(0, start - 7), stop) for r in range(world) for start, stop in sequence_chunks(32, world, r)]
        expected = torch.autograd.grad(sum((whole[0][:, :, a:b] * whole[1][:, :, a:b]).sum() for a, b in spans), whole)
        for shard, want in zip(local[""], expected):
            torch.testing.assert_close(shard.grad, shard_sequence(want), atol=0, rtol=0)
        # Frozen keys (a LoRA on the values, say): their exchange posts no gradients back, which
        # nothing would wait for; the values' still go back and are waited for.
        frozen = {"": (shard_sequence(k), shard_sequence(v).requires_grad_())}
        order = BackwardOrder(k)
        chunks = attention._halo_chunks(frozen, None, dist.group.WORLD, "zigzag", halo.Reach(7), order)
        loss = sum((chunk[""][0] * chunk[""][1]).sum() for chunk, _ in chunks)
        events.clear()
        order.tie(loss).backward()
        assert [e for e in events if e.startswith(("return", "wait for"))] == ["return 1", "return 0", "wait for the gradients"], events
        torch.testing.assert_close(frozen[""][1].grad, local[""][1].grad, atol=0, rtol=0)
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc!r}")
    finally:
        halo.PendingPieces, dist.batch_isend_irecv = PendingPieces, batch
        halo._ReturnChunk.backward, halo._PostPieces.backward = staticmethod(returns), staticmethod(waits)
        dist.destroy_process_group()


@pytest.mark.parametrize("deferred", [False, True], ids=["gloo", "one deferred request per batch"])
def test_the_halo_plan_overlaps_its_chunks_forward_and_backward(deferred):
    _spawn(_halo_overlap_worker, 2, deferred)


def _pooled_overlap_worker(rank: int, world: int, port: int, failures) -> None:
    """The pooled plan (NSA, zigzag) posts both chunks' halos at once, pools each chunk and
    posts its pooled keys' gather as soon as that chunk's halo is in, chooses the first
    chunk's blocks before waiting for the second chunk's gathers, and attends to the first
    chunk before waiting for the second's selected blocks. In the backward, each gather's
    sum is waited for only after the backward of the work before it (the first chunk's)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import halo, pooled, shard_sequence
    from sparsedsl.distributed.sequence import _PostGather, _ReturnParts

    events, PendingPieces, PendingGather = [], halo.PendingPieces, pooled.PendingGather
    choose, attend, sums, awaits = pooled.selected_blocks, pooled.attend, _ReturnParts.backward, _PostGather.backward
    returns, waits = halo._ReturnChunk.backward, halo._PostPieces.backward

    class LoggedPieces(PendingPieces):
        def chunk(self, index):
            if self._exchange.batches.get(index):  # requests still open: this read waits
                events.append(f"wait {index}")
            return super().chunk(index)

    class LoggedGather(PendingGather):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            events.append("gather")

        def parts(self):
            if "work" in self._posted:
                events.append("wait gathered")
            return super().parts()

    def logged_attend(ir, checked, inputs, *args, **kwargs):
        chunk = events.count("attend")
        events.append("attend")
        out = attend(ir, checked, inputs, *args, **kwargs)
        out.register_hook(lambda grad: events.append(f"chunk {chunk}'s backward"))  # about to start
        return out

    def logged(name, function):
        def call(*args, **kwargs):
            events.append(name)
            return function(*args, **kwargs)

        return call

    try:
        halo.PendingPieces, pooled.PendingGather = LoggedPieces, LoggedGather
        pooled.selected_blocks, pooled.attend = logged("choose", choose), logged_attend
        _ReturnParts.backward, _PostGather.backward = staticmethod(logged("post sum", sums)), staticmethod(logged("wait sum", awaits))
        halo._ReturnChunk.backward = staticmethod(lambda ctx, *grads: logged(f"return {ctx.index}", returns)(ctx, *grads))
        halo._PostPieces.backward = staticmethod(logged("wait returns", waits))
        spec, options = CASES["nsa"]
        q, k, v, call = _inputs(64, options)
        local = [shard_sequence(t).requires_grad_() for t in (q, k, v, call["gates"])]
        out = _pattern(spec, options)(*local[:3], gates=local[3], cp_group=dist.group.WORLD)
        halo_and_pool = ["wait 0", "wait 0", "gather", "gather", "wait 1", "wait 1", "gather", "gather"]
        choices = ["wait gathered", "wait gathered", "choose", "wait gathered", "wait gathered", "choose"]
        blocks = ["wait 0", "wait 0", "attend", "wait 1", "wait 1", "attend"]  # the selected blocks beyond the halo
        assert events == halo_and_pool + choices + blocks, events
        events.clear()
        (out * torch.randn_like(out)).sum().backward()
        # round 2's second chunk's gradients go back while the first chunk's backward runs; the gathers' sums and the
        # halo's gradients only after it (their posts come before round 2's in the order every rank keeps)
        returns = ["wait sum", "wait sum", "return 1", "return 1", "wait sum", "wait sum", "return 0", "return 0", "wait returns", "wait returns"]
        assert events == ["chunk 1's backward", "return 1", "return 1", "chunk 0's backward", "return 0", "return 0", "wait returns",
                          "wait returns"] + ["post sum"] * 4 + returns, events  # fmt: skip
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc!r}")
    finally:
        halo.PendingPieces, pooled.PendingGather = PendingPieces, PendingGather
        pooled.selected_blocks, pooled.attend = choose, attend
        _ReturnParts.backward, _PostGather.backward = staticmethod(sums), staticmethod(awaits)
        halo._ReturnChunk.backward, halo._PostPieces.backward = staticmethod(returns), staticmethod(waits)
        dist.destroy_process_group()


def test_the_pooled_plan_overlaps_its_chunks():
    _spawn(_pooled_overlap_worker, 2)


def _traffic_worker(rank: int, world: int, port: int, failures) -> None:
    """Counts the floating-point bytes that arrive at this rank (all-gathers and halo
    receives), forward and backward, against sequence_traffic's plan."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import sequence_traffic, shard_sequence

    arrived = []
    all_gather, batch = dist.all_gather, dist.batch_isend_irecv

    def counted_all_gather(parts, x, *args, **kwargs):
        if x.is_floating_point():
            arrived.append(sum(p.numel() * p.element_size() for p in parts) - x.numel() * x.element_size())
        return all_gather(parts, x, *args, **kwargs)

    def counted_batch(ops):  # the halo exchanges' point-to-point messages
        arrived.extend(op.tensor.numel() * op.tensor.element_size() for op in ops
                       if op.op is dist.irecv and op.tensor.is_floating_point())  # fmt: skip
        return batch(ops)

    dist.all_gather, dist.batch_isend_irecv = counted_all_gather, counted_batch
    try:
        L = 128
        # "every block": a top 8 of 8 blocks of 16, so that the chunks fetch every block their halos lack
        cases = {name: CASES[name] for name in ("sliding_window", "streaming", "nsa", "compress_and_window", "nsa_all_gather")}
        for name, (spec, options) in {**cases, "every block": ("nsa", {"gates": True, "params": dict(sel_topk=8)})}.items():
            pattern = _pattern(spec, options)
            q, k, v, call = _inputs(L, options, torch.float32)
            local = [shard_sequence(t, dim=2).requires_grad_() for t in (q, k, v)]
            gates = {"gates": shard_sequence(call["gates"], dim=2)} if call else {}
            arrived.clear()
            out = pattern(*local, cp_group=dist.group.WORLD, cp_plan=options.get("plan", "auto"), **gates)
            forward = sum(arrived)
            arrived.clear()
            out.sum().backward()
            plan = sequence_traffic(pattern, L, world, kv_heads=2, head_dim=16, element_bytes=4, plan=options.get("plan", "auto"))
            expected = {"nsa": "pooled+selected", "every block": "pooled+selected", "compress_and_window": "pooled",
                        "nsa_all_gather": "all-gather"}  # fmt: skip
            assert plan.plan == expected.get(name, "halo"), (name, plan.plan)
            assert sum(part[rank] for _, part in plan.parts) == plan.received[rank], (name, plan.parts)
            if plan.plan == "pooled+selected":  # and the selected blocks beyond the halo, which selected_at_most bounds
                selected = forward - plan.received[rank]
                assert 0 < selected <= plan.selected_at_most[0][rank], (name, selected, plan.selected_at_most)
                assert name != "every block" or selected == plan.selected_at_most[0][rank], (selected, plan.selected_at_most)
            else:
                assert forward == plan.received[rank], (name, forward, plan.received[rank])
            if plan.plan == "halo":  # the gradients of the fetched pieces come back (all-reduce on gloo otherwise)
                assert sum(arrived) == plan.gradient_received[rank], (name, sum(arrived), plan.gradient_received[rank])
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc!r}")
    finally:
        dist.all_gather, dist.batch_isend_irecv = all_gather, batch
        dist.destroy_process_group()


def test_cp_options_are_checked_with_or_without_a_group():
    """A bad `cp_layout` or `cp_plan` never passes unseen: without `cp_group` too, in the
    layer too, and in sequence_traffic under its own argument names."""
    from sparsedsl.distributed import sequence_traffic

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(InputError, match=r"^`cp_plan` 'ring': expected one of 'auto', 'all-gather'$"):
        sparsedsl.load("causal")(q, q, q, cp_plan="ring")
    with pytest.raises(InputError, match=r"^`cp_layout` 'ring': expected one of 'zigzag', 'contiguous'$"):
        SparseAttention("causal", 32, 2, 2)(torch.randn(1, 8, 32), cp_layout="ring")
    with pytest.raises(InputError, match=r"^pattern `nsa_packed` is packed \(compress within=document\): only the packed plan serves it"):
        SparseAttention("nsa_packed", 32, 2, 2)(torch.randn(1, 8, 32), cp_plan="all-gather")
    with pytest.raises(InputError, match=r"^`plan` 'ring': expected one of 'auto', 'all-gather'$"):
        sequence_traffic(sparsedsl.load("nsa"), 1024, 2, kv_heads=1, head_dim=16, plan="ring")


def test_traffic_plan_counts_the_bytes_that_arrive():
    """sequence_traffic (no process group) gives the bytes each rank receives in a call's
    forward and, for the halo plan, its backward, on 2 gloo ranks."""
    _spawn(_traffic_worker, 2)
    from sparsedsl.distributed import sequence_traffic

    window = sequence_traffic(sparsedsl.load("sliding_window", window=4096), 1 << 20, 8, kv_heads=4, head_dim=128)
    # zigzag over 8 ranks: each of a rank's two chunks fetches 4,095 positions of 2 KiB from its left neighbour,
    # except chunk 0 (nothing before it) and chunk 8, whose neighbour, chunk 7, is rank 7's own
    assert window.received == tuple(4095 * 2048 * (1 if rank in (0, 7) else 2) for rank in range(8))
    everything = sequence_traffic(sparsedsl.load("causal"), 1 << 20, 8, kv_heads=4, head_dim=128)
    assert everything.received == tuple([7 * (1 << 17) * 2048] * 8)  # 7/8 of 1M positions of 2 KiB
    nsa = sequence_traffic(sparsedsl.load("nsa"), 1 << 20, 8, kv_heads=4, head_dim=128)
    # the window's halo (511 back) and the pooled keys of every other rank's two chunks,
    # 65,536 / 16 slots each
    assert nsa.plan == "pooled+selected" and max(nsa.received) == 2 * 511 * 2048 + 7 * 2 * 4096 * 2048
    halo = tuple(511 * 2048 * (1 if rank in (0, 7) else 2) for rank in range(8))
    assert dict(nsa.parts) == {"halo": halo, "pooled": (7 * 2 * 4096 * 2048,) * 8}
    # at most, a chunk fetches every position before its end that other ranks hold, less its halo:
    # rank 0's chunks end at 65,536 and 1,048,576 and it holds 131,072 positions itself
    received, sent = nsa.selected_at_most
    assert received[0] == ((1 << 20) - 2 * (1 << 16) - 511) * 2048
    assert sum(received) == sum(sent)
    with pytest.raises(InputError, match=r"pattern `nsa_packed` works within documents: its plan .* depends on the documents"):
        sequence_traffic(sparsedsl.load("nsa_packed"), 1 << 20, 8, kv_heads=4, head_dim=128)


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
        nsa = sparsedsl.load("nsa", **_NSA)
        with pytest.raises(InputError, match=r"the ranks' shards differ in shape \(rank 0: \(1, 2, 4, 16\), rank 1: \(1, 2, 6, 16\)\)"):
            nsa(q[:, :, :mine], k[:, :, :mine], v[:, :, :mine], gates=torch.rand(1, 4, mine, 3, dtype=q.dtype), cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"the ranks' shards differ in shape \(rank 0: \(1, 2, 4, 16\), rank 1: \(1, 2, 6, 16\)\)"):
            causal(q[:, :, :mine], k[:, :, :mine], v[:, :, :mine], cp_group=dist.group.WORLD)
        packed = sparsedsl.load("nsa_packed", **_NSA)
        with pytest.raises(InputError, match=r"pattern `nsa_packed` works within documents \(compress\(within=document\)\): with `cp_group` pass this rank's shard of the document ids as doc_ids="):  # noqa: E501
            packed(q, k, v, gates=torch.rand(1, 4, 16, 3, dtype=q.dtype), cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"`cp_layout` 'ring': expected one of 'zigzag', 'contiguous'"):
            causal(q, k, v, cp_group=dist.group.WORLD, cp_layout="ring")
        with pytest.raises(InputError, match=r"^`cp_plan` 'ring': expected one of 'auto', 'all-gather'$"):
            causal(q, k, v, cp_group=dist.group.WORLD, cp_plan="ring")
        with pytest.raises(InputError, match=r"^pattern `nsa_packed` is packed \(compress within=document\): only the packed plan serves it, so use cp_plan='auto', not 'all-gather'$"):  # noqa: E501
            packed(q, k, v, gates=torch.rand(1, 4, 16, 3, dtype=q.dtype), doc_ids=torch.zeros(1, 16, dtype=torch.long),
                   cp_group=dist.group.WORLD, cp_plan="all-gather")
        with pytest.raises(InputError, match=r"q and k are this rank's shards of one sequence and hold the same positions"):
            causal(q[:, :, :8], k, v, cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"`cp_group` must be a ProcessGroup or a one-dimensional DeviceMesh, got str"):
            causal(q, k, v, cp_group="world")
        learned = sparsedsl.load("nsa", **(_NSA | {"pool": "mlp"}))
        pooled = torch.zeros(1, 2, 1, 16, dtype=q.dtype)  # pooled keys cannot be sharded: functions that pool are
        with pytest.raises(InputError, match=r"pattern `nsa` with `cp_group`: compress branch `cmp` pools with a learned MLP; with `cp_group` a pooled window may cross the ranks' boundary, so pass k_cmp= and v_cmp= as functions"):  # noqa: E501
            learned(q, k, v, gates=torch.rand(1, 4, 16, 3, dtype=q.dtype), k_cmp=pooled, v_cmp=pooled, cp_group=dist.group.WORLD)
        with pytest.raises(InputError, match=r"pattern `causal` with `cp_group`: `branch_kv` must map branch names \(\w+\) to \(keys, values\) shards shaped like k, \(1, 2, 16, 16\)"):  # noqa: E501
            causal(q, k, v, branch_kv={"nothing": (k, v)}, cp_group=dist.group.WORLD)
        documents = sparsedsl.load("document")
        with pytest.raises(InputError, match=r"pattern `document`: pass documents as doc_ids= or as cu_seqlens=, not both"):
            documents(q, k, v, doc_ids=torch.zeros(1, 16, dtype=torch.long), cu_seqlens=torch.tensor([0, 32]), cp_group=dist.group.WORLD)
    except BaseException as exc:  # noqa: BLE001 - a failed pytest.raises is not an Exception
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


def test_bad_input_is_refused_on_every_rank():
    _spawn(_errors_worker, 2)


# With kv_per_branch=True every output branch after the first has keys of its own: here a
# learned compress branch (the pooled plan), and a window with sinks (the halo plan).
WINDOW_AND_LEARNED = sparsedsl.compile_source(
    """
    pattern window_and_learned() {
        win = causal & sliding(16)
        cmp = compress(block=16, stride=8, pool=mlp)
        return gate(win, cmp)
    }
    """
)
TWO_WINDOWS = sparsedsl.compile_source(
    """
    pattern two_windows() {
        near = causal & sliding(8)
        far = causal & (sink(2) | sliding(24))
        return gate(near, far)
    }
    """
)


def _layer_worker(rank: int, world: int, port: int, wrap: str, failures) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from sparsedsl.distributed import shard_sequence

    try:
        L = 128
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, L, 32, generator=generator, dtype=torch.float64)
        weights = torch.randn(1, L, 32, generator=generator, dtype=torch.float64)
        doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 50, 38]))[None]  # crossing the ranks
        cases = (
            ("nsa", dict(_NSA), {}),
            ("nsa", dict(_NSA, pool="mlp"), {}),
            ("nsa", dict(_NSA, pool="mlp"), {"cp_plan": "all-gather"}),  # the layer passes cp_plan on
            ("document", {}, {"doc_ids": doc_ids}),
            ("document", {}, {"cu_seqlens": torch.tensor([0, 40, 90, 128])}),  # the whole sequence's boundaries
            # independent keys and values per branch: sel's and win's travel by the pooled plan
            ("nsa", dict(_NSA, pool="mlp", kv_per_branch=True), {}),
            (WINDOW_AND_LEARNED, {"kv_per_branch": True}, {}),  # a learned compress branch pooling its own keys
            (TWO_WINDOWS, {"kv_per_branch": True}, {}),  # a branch's own keys by the halo plan
            # the packed plan: learned pooling of each document, with and without keys of its own
            ("nsa_packed", dict(_NSA, pool="mlp"), {"doc_ids": doc_ids}),
            ("nsa_packed", dict(_NSA, pool="mlp", kv_per_branch=True), {"cu_seqlens": torch.tensor([0, 40, 90, 128])}),
        )
        for name, options, call in cases:
            torch.manual_seed(0)
            layer = SparseAttention(name, 32, 4, 2, **options).double()
            with torch.no_grad():  # away from the initialisation (the compression MLP's last layer starts at 0)
                for parameter in layer.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
            full = hidden.clone().requires_grad_()
            expected = layer(full, **call)
            (expected * weights).sum().backward()
            expected_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            layer.zero_grad()
            if wrap == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(layer)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                model = fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
            shard = lambda t, dim=1: shard_sequence(t, dim=dim, layout="zigzag")  # noqa: E731
            mine = shard(hidden).requires_grad_()
            local_call = {"doc_ids": shard(doc_ids)} if "doc_ids" in call else call
            from sparsedsl.distributed import attention

            pooled_plan = attention.attend_pooled
            if call.get("cp_plan") == "all-gather":  # the layer passes it on: the pooled plan must not run
                attention.attend_pooled = lambda *args, **kwargs: pytest.fail("cp_plan='all-gather' ran the pooled plan")
            try:
                out = model(mine, cp_group=dist.group.WORLD, **local_call)
            finally:
                attention.attend_pooled = pooled_plan
            (out * shard(weights)).sum().backward()
            torch.testing.assert_close(out, shard(expected.detach()), atol=1e-9, rtol=1e-9, msg=lambda m: f"{name} output: {m}")
            torch.testing.assert_close(mine.grad, shard(full.grad), atol=1e-9, rtol=1e-9, msg=lambda m: f"{name} d hidden: {m}")
            # DDP and FSDP2 average the ranks' gradients; each rank's loss is its own part of the whole.
            for n, p in layer.named_parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                torch.testing.assert_close(grad * world, expected_grads[n], atol=1e-9, rtol=1e-9, msg=lambda m: f"{name} d{n}: {m}")
    except Exception as exc:
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_a_layer_under_ddp_or_fsdp2_with_context_parallelism_equals_one_process(wrap):
    """SparseAttention.forward(hidden, cp_group=...) on 2 gloo ranks, inside DDP or FSDP2
    (fully_shard): its output and the gradients of the input and of every parameter equal
    one process's, with rotary positions counted in the whole sequence and from each
    document's start (documents crossing the ranks' boundary, as doc_ids or cu_seqlens),
    and with independent keys and values per branch."""
    _spawn(_layer_worker, 2, wrap)
