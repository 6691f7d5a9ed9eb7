"""The demo: load ``patterns/nsa.attn``, show its IR and densities, run it on random inputs."""

from __future__ import annotations

import os
import time

import torch

from .. import load
from ..nn import CompressionMLP
from .mask_stats import density_rows, format_density_table


def run_demo(seq: int = 2048, device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    nsa = load("nsa")
    print(f"loaded {nsa}\n")
    print(nsa.source_text(), "\n")
    print("block IR:")
    print(nsa.ir_text)
    print(format_density_table(density_rows(nsa, seq, block=64), seq, 64), "\n")

    generator = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D = 1, 8, 2, 64
    # bf16 on a GPU, as models run there; float32 on the CPU (the reference, or the interpreter).
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, h, seq, D, generator=generator).to(device, dtype) for h in (Hq, Hkv, Hkv))
    block, stride = nsa.params["cmp_block"], nsa.params["cmp_stride"]
    # NSA's learned compression, untrained (it starts as mean pooling plus a learned term).
    compress = CompressionMLP(block, stride, D).to(device, dtype)
    with torch.no_grad():
        k_cmp, v_cmp = compress(k), compress(v)
    gates = torch.sigmoid(torch.randn(B, Hq, seq, 3, generator=generator)).to(device, dtype)

    print(f"running nsa on random inputs: q {tuple(q.shape)}, k/v {tuple(k.shape)}, {dtype}, {device}")
    start = time.perf_counter()
    out = nsa(q, k, v, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp)
    elapsed = time.perf_counter() - start
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1), is_causal=True)
    print(f"  output {tuple(out.shape)} in {elapsed * 1e3:.0f} ms; finite: {bool(torch.isfinite(out).all())}")
    print(f"  mean |out| {out.abs().mean():.4f}; relative distance from dense causal attention "
          f"{(out - dense).norm() / dense.norm():.3f} (the gates mix three differently normalised branches)")
    print(f"  out[0, 0, -1, :6] = {[round(x, 4) for x in out[0, 0, -1, :6].tolist()]}")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("  (on the CPU this ran the dense PyTorch reference; on a GPU, or with TRITON_INTERPRET=1, "
              "the generated kernels run)")
    return 0
