"""First-call times of NSA, forward + backward: cold (empty caches) and warm (cached).

A first call pays for everything a steady-state call does not: lowering the pattern,
rendering its kernels, Triton's compilation of every tile candidate the tuner tries, and
the timing of those candidates. Each measurement runs in a fresh process: *cold* with an
empty ``SPARSEDSL_CACHE_DIR`` and ``TRITON_CACHE_DIR`` (temporary folders), *warm* a
second process over the caches the cold one filled (kernels, compiled binaries and
``tuning.json``). The times cover load, first forward and first backward (synchronised);
the import of torch and sparsedsl is reported apart.

Cases (the shapes of issue 14): NSA at T=1024, 8 query heads, 2 KV heads, D=128, in
bfloat16 and float32; NSA with per-token selection at T=16384, 64 query heads (``--heads``
to use fewer where memory is short), 4 KV heads, D=128, bfloat16. Mean pooling, so that
every stage runs in generated kernels.

    python bench/bench_first_call.py --out first_call.json          # on a GPU
    python bench/bench_first_call.py --smoke --out /tmp/smoke.json  # CPU, TRITON_INTERPRET=1, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()

# NSA's hyperparameters, cut down so that the interpreter runs a smoke test in seconds.
SMOKE_PARAMS = dict(cmp_block=16, cmp_stride=8, sel_block=16, sel_topk=3, window=32)


def cases(smoke: bool, heads_16k: int) -> list[dict]:
    """The measurements to make, each a dict the child process runs."""
    if smoke:
        shape = dict(seq=64, heads=2, kv_heads=1, head_dim=16, device="cpu", params=SMOKE_PARAMS)
        return [
            dict(name="nsa T=64 bf16 (smoke)", dtype="bfloat16", **shape),
            dict(name="nsa T=64 fp32 (smoke)", dtype="float32", **shape),
        ]
    short = dict(seq=1024, heads=8, kv_heads=2, head_dim=128, device="cuda", params={})
    return [
        dict(name="nsa T=1024 bf16", dtype="bfloat16", **short),
        dict(name="nsa T=1024 fp32", dtype="float32", **short),
        dict(name=f"nsa per token T=16384 H={heads_16k} bf16", dtype="bfloat16", seq=16384, heads=heads_16k,
             kv_heads=4, head_dim=128, device="cuda", params={"per": "token"}),
    ]  # fmt: skip


# ---------------------------------------------------------------- the child process
def run_case(case: dict) -> dict:
    """Load NSA and run one forward and backward; the seconds of each phase."""
    started = time.perf_counter()
    import torch

    import sparsedsl

    imported = time.perf_counter()
    device, dtype = case["device"], getattr(torch, case["dtype"])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(0)
    B, H, Hkv, L, D = 1, case["heads"], case["kv_heads"], case["seq"], case["head_dim"]

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype).requires_grad_()

    q, k, v = tensor(B, H, L, D), tensor(B, Hkv, L, D), tensor(B, Hkv, L, D)
    gates = torch.rand(B, H, L, 3, generator=generator, device=device).to(dtype)
    sync()
    t0 = time.perf_counter()
    nsa = sparsedsl.load("nsa", pool="mean", **case["params"])
    t1 = time.perf_counter()
    out = nsa(q, k, v, gates=gates)
    sync()
    t2 = time.perf_counter()
    out.float().square().sum().backward()
    sync()
    t3 = time.perf_counter()
    # A second call: what the same call costs once everything is compiled and tuned.
    out = nsa(q, k, v, gates=gates)
    out.float().square().sum().backward()
    sync()
    t4 = time.perf_counter()
    return {
        "import_s": imported - started, "load_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2,
        "first_call_s": t3 - t0, "second_call_s": t4 - t3, "finite": bool(torch.isfinite(out).all()),
    }  # fmt: skip


# ---------------------------------------------------------------- the parent
def measure(case: dict, smoke: bool, timeout: float) -> dict:
    """The cold and the warm first call of ``case``, each in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="sparsedsl-first-call-") as folder:
        env = {
            **os.environ,
            "SPARSEDSL_CACHE_DIR": str(Path(folder) / "sparsedsl"),
            "TRITON_CACHE_DIR": str(Path(folder) / "triton"),
        }
        if smoke:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        row = {"case": case["name"], **{k: case[k] for k in ("seq", "heads", "kv_heads", "head_dim", "dtype")}}
        for phase in ("cold", "warm"):
            # The cold call logs each kernel's compilation and each candidate's timing.
            row[phase] = _child(case, {**env, "SPARSEDSL_TUNING_LOG": "1"} if phase == "cold" else env, timeout)
    return row


def _child(case: dict, env: dict, timeout: float) -> dict:
    """The child's measurements, with the tuner's log lines (also of a child that timed out)."""
    command = [sys.executable, str(SCRIPT), "--child", json.dumps(case)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout.decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
        return {"error": f"did not finish within {timeout:.0f} s", "tuning": _tuning_lines(output)}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1][:300]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "tuning": _tuning_lines(done.stdout)}


def _tuning_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("sparsedsl tuning")]


def table(rows: list[dict]) -> str:
    """The rows as text: per case, the cold and warm first call and a steady call."""
    lines = [f"{'case':<36} {'cold first call':>16} {'warm first call':>16} {'second call':>12}"]
    for row in rows:
        cells = []
        for phase in ("cold", "warm"):
            r = row[phase]
            cells.append("error" if "error" in r else f"{r['first_call_s']:.1f} s")
        second = row["warm"].get("second_call_s") if "error" not in row["warm"] else None
        lines.append(f"{row['case']:<36} {cells[0]:>16} {cells[1]:>16} {'-' if second is None else f'{second:.3f} s':>12}")
        for phase in ("cold", "warm"):
            if "error" in row[phase]:
                lines.append(f"    {phase}: {row[phase]['error']}")
    return "\n".join(lines)


def environment(smoke: bool) -> dict:
    import torch
    import triton

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="JSON", help="write the rows and the environment here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--heads", type=int, default=64, help="query heads of the 16k case (default 64)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per process before it counts as failed")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            result = run_case(json.loads(args.child))
        except Exception as exc:  # reported in the parent's table; one line of it
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        print(json.dumps(result))
        return 0
    if args.heads < 4 or args.heads % 4:
        parser.error(f"--heads {args.heads}: a positive multiple of the 4 KV heads")
    rows, env = [], environment(args.smoke)
    for case in cases(args.smoke, args.heads):
        print(f"{case['name']}: cold, then warm ...", file=sys.stderr, flush=True)
        rows.append(measure(case, args.smoke, args.timeout))
        # Written after every case, so that a run cut short keeps the cases it finished.
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    failed = any("error" in row[phase] for row in rows for phase in ("cold", "warm"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
