"""Running a pattern variant on inputs: its deviation from dense causal attention, and (on
a GPU) its forward, backward and decode times next to dense SDPA's.

Inputs are ``q`` (B, Hq, L, D) and ``k``, ``v`` (B, Hkv, L, D), random (seeded) or loaded
from a file. What a pattern needs beyond them is made up the same way for every variant:

- gates, for gated patterns: ``1/N`` for each of the N branches (their plain mean), unless
  the inputs carry ``gates``;
- pooled keys of learned (``pool=mlp``) compress branches: mean pooling, as there are no
  trained weights here;
- documents, for patterns that use them: one document spanning the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import reference
from ..pattern import Pattern
from ..runtime.inputs import validate_call
from .costs import Shape

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class InputsFileError(ValueError):
    """A ``--inputs`` file that cannot serve: unreadable, or tensors of the wrong kind."""


@dataclass(frozen=True)
class Inputs:
    """Query, key and value tensors (and optional gates) at one length."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor | None = None

    @property
    def seq(self) -> int:
        return self.q.shape[2]

    def prefix(self, seq: int) -> Inputs:
        """The first ``seq`` positions."""
        return Inputs(*(t[:, :, :seq] for t in (self.q, self.k, self.v)), None if self.gates is None else self.gates[:, :, :seq])

    def first_group(self) -> Inputs:
        """Only the first K/V head and the query heads that read it."""
        group = self.q.shape[1] // self.k.shape[1]
        return Inputs(self.q[:, :group], self.k[:, :1], self.v[:, :1], None if self.gates is None else self.gates[:, :group])

    def to(self, device, dtype: torch.dtype) -> Inputs:
        return Inputs(*(None if t is None else t.to(device, dtype) for t in (self.q, self.k, self.v, self.gates)))


def random_inputs(shape: Shape, seq: int, seed: int, device: str, dtype: torch.dtype) -> Inputs:
    """Standard normal q, k and v, the same for a seed and shape whatever the variant."""
    generator = torch.Generator(device=device).manual_seed(seed)
    B, D = shape.batch, shape.head_dim
    q, k, v = (torch.randn(B, h, seq, D, generator=generator, device=device, dtype=torch.float32).to(dtype)
               for h in (shape.heads, shape.kv_heads, shape.kv_heads))  # fmt: skip
    return Inputs(q, k, v)


def load_inputs(path: str | Path) -> Inputs:
    """``q``, ``k``, ``v`` (and optional ``gates``) saved with ``torch.save`` as a dict or a
    (q, k, v) tuple; checked: 4-D floating tensors, q (B, Hq, L, D), k and v (B, Hkv, L, D)
    with ``Hq % Hkv == 0``, gates (B, Hq, L, N)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputsFileError(f"--inputs {path}: no such file") from None
    except Exception as exc:  # unpickling errors come in many types
        raise InputsFileError(f"--inputs {path}: not a file torch.load can read ({type(exc).__name__}: {exc})") from None
    if isinstance(data, (tuple, list)) and len(data) == 3:
        data = dict(zip("qkv", data))
    if not isinstance(data, dict) or not {"q", "k", "v"} <= set(data):
        raise InputsFileError(
            f"--inputs {path}: expected a dict with keys 'q', 'k', 'v' (and optionally 'gates') or a (q, k, v) tuple, "
            f"got {type(data).__name__}{' with keys ' + ', '.join(map(str, data)) if isinstance(data, dict) else ''}"
        )
    tensors = {}
    for name in ("q", "k", "v", "gates"):
        t = data.get(name)
        if t is None and name == "gates":
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputsFileError(f"--inputs {path}: `{name}` must be a 4-D floating-point tensor, got {got}")
        tensors[name] = t
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    B, Hq, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != L or k.shape[3] != D or Hq % k.shape[1]:
        raise InputsFileError(
            f"--inputs {path}: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: expected q "
            "(batch, heads, length, head_dim) and k, v (batch, kv_heads, length, head_dim) with heads a multiple of kv_heads"
        )
    gates = tensors.get("gates")
    if gates is not None and gates.shape[:3] != q.shape[:3]:
        raise InputsFileError(f"--inputs {path}: `gates` must have shape ({B}, {Hq}, {L}, branches), got {tuple(gates.shape)}")
    return Inputs(q, k, v, gates)


def call_arguments(pattern: Pattern, inputs: Inputs) -> dict:
    """The keyword arguments of ``pattern(q, k, v, ...)`` beyond q, k and v (see the
    module's docstring)."""
    q, k = inputs.q, inputs.k
    B, Hq, L, _ = q.shape
    args: dict = {}
    branches = len(pattern.ir.output_branches)
    if pattern.checked.gated:
        gates = inputs.gates
        if gates is not None and gates.shape[-1] != branches:
            raise InputsFileError(f"--inputs: `gates` has {gates.shape[-1]} branches but pattern `{pattern.name}` mixes {branches}")
        args["gates"] = gates.to(q.dtype) if gates is not None else q.new_full((B, Hq, L, branches), 1 / branches)
    learned = pattern.ir.learned_pooling
    if learned:
        args["k_cmp"] = {b.name: reference.pool(k, b.keys.block, b.keys.stride, "mean") for b in learned}
        args["v_cmp"] = {b.name: reference.pool(inputs.v, b.keys.block, b.keys.stride, "mean") for b in learned}
    if pattern.checked.needs_documents:
        args["doc_ids"] = torch.zeros(B, L, dtype=torch.int64, device=q.device)
    return args


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention, K/V heads expanded to q's (a backend for every dtype)."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)


def deviation(pattern: Pattern, inputs: Inputs) -> float:
    """``||out - dense|| / ||dense||``: how far the pattern's output is from dense causal
    attention on the same inputs. On the CPU both are computed in float64 (the pattern by
    the reference); on a GPU the pattern runs its kernels in the inputs' dtype and dense
    attention in float32."""
    if inputs.q.is_cuda:
        with torch.no_grad():
            out = pattern(inputs.q, inputs.k, inputs.v, **call_arguments(pattern, inputs)).float()
            dense = dense_causal(*(t.float() for t in (inputs.q, inputs.k, inputs.v)))
    else:
        exact = inputs.to("cpu", torch.float64)
        checked_call = validate_call(pattern.ir, exact.q, exact.k, exact.v, **call_arguments(pattern, exact))
        out = reference.attention(pattern.checked, checked_call).out
        dense = dense_causal(exact.q, exact.k, exact.v)
    return float((out - dense).norm() / dense.norm())


# ---------------------------------------------------------------- times on a GPU
def pattern_times(pattern: Pattern, inputs: Inputs, budget_ms: float) -> dict:
    """Forward and backward times (ms) of the pattern's kernels on CUDA ``inputs``, and
    one decode step's (us) at the last position (``decode_us`` None, with a
    ``decode_note``, for patterns that cannot decode)."""
    from .timing import timed_fwd_bwd

    leaves, fwd = _differentiable_call(pattern, inputs)
    dout = torch.randn_like(inputs.q)
    fwd_ms, both_ms = timed_fwd_bwd(fwd, leaves, dout, budget_ms)
    del leaves, fwd, dout
    times = {"fwd_ms": fwd_ms, "bwd_ms": both_ms - fwd_ms}
    try:
        times.update(decode_time(pattern, inputs))
    except Exception as exc:  # the forward and backward times stand without it
        times.update(decode_us=None, decode_note=f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    return times


def _differentiable_call(pattern: Pattern, inputs: Inputs):
    """The tensors a training step differentiates (q, k, v, gates, pooled keys), and a
    forward over them."""
    args = call_arguments(pattern, inputs)
    q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    leaves = [q, k, v]
    if "gates" in args:
        args["gates"] = args["gates"].detach().requires_grad_()
        leaves.append(args["gates"])
    for key in ("k_cmp", "v_cmp"):
        if key in args:
            args[key] = {name: t.detach().requires_grad_() for name, t in args[key].items()}
            leaves.extend(args[key].values())
    return leaves, lambda: pattern(q, k, v, **args)


def decode_time(pattern: Pattern, inputs: Inputs) -> dict:
    """One decode step at position L - 1 after a prefill of L - 1 tokens: the whole
    ``pattern.decode`` call (append, pooling, attention), replayed from a CUDA graph where
    it can be captured, else timed eagerly (said in ``decode_note``)."""
    from ..errors import InputError
    from .timing import graph_us, median_ms

    q, k, v = inputs.q, inputs.k, inputs.v
    B, Hkv, L, D = k.shape
    if L < 2:
        return {"decode_us": None, "decode_note": "needs at least 2 positions"}
    args = call_arguments(pattern, inputs)
    gates = args.get("gates")
    learned = [b.name for b in pattern.ir.learned_pooling]
    poolers = {name: (_mean_window, _mean_window) for name in learned}
    try:
        cache = pattern.cache(batch=B, kv_heads=Hkv, head_dim=D, capacity=L, dtype=k.dtype, device=k.device)
    except InputError as exc:  # e.g. a mask that sees later keys
        return {"decode_us": None, "decode_note": str(exc).split(": ", 1)[-1]}
    head, last = slice(0, L - 1), slice(L - 1, L)
    with torch.no_grad():
        prompt = [t[:, :, head].contiguous() for t in (q, k, v)]
        pattern.prefill(*prompt, cache, gates=None if gates is None else gates[:, :, head].contiguous(), poolers=poolers)
        del prompt
        step_args = dict(gates=None if gates is None else gates[:, :, last].contiguous(), poolers=poolers)
        q1, k1, v1 = (t[:, :, last].contiguous() for t in (q, k, v))

        def step():  # the same step from the same context every time
            cache.seqlens = [L - 1] * B
            cache.lengths.fill_(L - 1)
            return pattern.decode(q1, k1, v1, cache, **step_args)

        if cache.doc_ids is None:  # a step with documents synchronises with the host
            try:
                return {"decode_us": graph_us(step), "decode_note": ""}
            except Exception as exc:  # a step that cannot be captured: time it eagerly
                torch.cuda.synchronize()
                note = f"eager (no CUDA graph: {type(exc).__name__})"
        else:
            note = "eager (documents: the step reads them on the host)"
        return {"decode_us": median_ms(step, 100.0) * 1e3, "decode_note": note}


def _mean_window(windows: torch.Tensor) -> torch.Tensor:
    """(n, Hkv, block, D) windows to (n, Hkv, D): mean pooling in place of a learned one."""
    return windows.mean(-2)


def dense_times(inputs: Inputs, budget_ms: float) -> dict:
    """Dense causal SDPA on the same CUDA inputs: forward and backward (ms; K/V heads
    expanded inside, torch's choice of backend) and one decode step at the last position
    (us, one query over all keys, ``enable_gqa``, CUDA graph)."""
    from .timing import graph_us, timed_fwd_bwd

    q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    dout = torch.randn_like(q)
    fwd_ms, both_ms = timed_fwd_bwd(lambda: dense_causal(q, k, v), (q, k, v), dout, budget_ms)
    q1 = inputs.q[:, :, -1:].contiguous()
    kd, vd = inputs.k.detach(), inputs.v.detach()
    with torch.no_grad():
        decode_us = graph_us(lambda: F.scaled_dot_product_attention(q1, kd, vd, enable_gqa=True))
    return {"dense_fwd_ms": fwd_ms, "dense_bwd_ms": both_ms - fwd_ms, "dense_decode_us": decode_us}


def speedups(row: dict) -> dict:
    """Dense time over the pattern's, for the forward, the backward and a decode step."""
    def ratio(dense, ours):
        return dense / ours if dense and ours and math.isfinite(dense) and ours > 0 else None

    return {
        "speedup_fwd": ratio(row.get("dense_fwd_ms"), row.get("fwd_ms")),
        "speedup_bwd": ratio(row.get("dense_bwd_ms"), row.get("bwd_ms")),
        "speedup_decode": ratio(row.get("dense_decode_us"), row.get("decode_us")),
    }

