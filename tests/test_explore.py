"""`sparsedsl explore`: the grid, the analytic columns against brute-force masks, the JSON
schema, bad arguments, interrupted sweeps, the pictures."""

import csv
import io
import json
import math
import sys

import pytest
import torch

import sparsedsl
from sparsedsl import reference
from sparsedsl.cli import main
from sparsedsl.tools import costs, explore
from sparsedsl.tools.explore_plot import draw_plots
from sparsedsl.tools.mask_stats import branch_masks
from sparsedsl.tools.measure import Inputs, random_inputs

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--heads", "2", "--kv-heads", "1", "--head-dim", "8"]


def explore_json(capsys, *args, shape=TINY) -> dict:
    assert main(["explore", *args, *shape, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def masked_deviation(inputs: Inputs, mask: torch.Tensor) -> float:
    """||attention under `mask` - causal attention|| / ||causal attention||, by hand."""
    q, k, v = (t.double() for t in (inputs.q, inputs.k, inputs.v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def attend(m):
        return torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v

    dense = attend(causal)
    return float((attend(mask) - dense).norm() / dense.norm())


# ---------------------------------------------------------------- analytic columns
MASKS = """
pattern dilated_window(w: int = 5, d: int = 3) { return causal & dilated(w, d) }
pattern globals() { return sliding(20) | global(7) }
pattern holes() { return causal & ~(sliding(30) & ~sink(3)) }
pattern pieces() { return (causal & chunked(25)) | (causal & sink(5)) | (sliding(3) & ~causal) }
"""


@pytest.mark.parametrize("name", ["dilated_window", "globals", "holes", "pieces", "streaming", "chunked", "nsa", "moba"])
def test_keys_read_match_the_element_masks(name):
    shipped = {"streaming": dict(window=20), "chunked": dict(chunk=32),
               "nsa": dict(window=24, sel_block=16, sel_topk=3, cmp_block=16, cmp_stride=8), "moba": dict(block=16, topk=2)}  # fmt: skip
    pattern = sparsedsl.load(name, **shipped[name]) if name in shipped else sparsedsl.compile_source(MASKS, name)
    checked = {b.name: b for b in pattern.checked.compress_branches()}
    for L in (1, 45, 97):
        masks = {m.name: m.mask for m in branch_masks(pattern, L)}  # selections: seeded random q, k
        for cost in costs.branch_costs(pattern, L):
            mask = masks[cost.name] if cost.name in masks else reference.compressed_mask(checked[cost.name], L, L)
            assert cost.pairs == int(mask.sum()), (cost, L)
            assert cost.last_row == int(mask[-1].sum()), (cost, L)
            assert cost.exact


def test_a_selection_without_keep_local_counts_an_upper_bound():
    pattern = sparsedsl.compile_source("""pattern s() {
        c = compress(block=16, stride=16, pool=mean)
        return select(block=16, topk=2, score=c, keep_first=0, keep_local=0)
    }""")
    for L in (20, 97):
        selection = costs.branch_costs(pattern, L)[0]
        chosen = next(m.mask for m in branch_masks(pattern, L) if m.name == "s")
        assert not selection.exact and selection.pairs >= int(chosen.sum())
        assert selection.pairs == sum(i + 1 if i // 16 + 1 <= 2 else 32 for i in range(L))


def test_long_hull_masks_are_estimated_from_sampled_rows():
    pattern = sparsedsl.compile_source(MASKS, "dilated_window", w=100, d=3)
    (cost,) = costs.branch_costs(pattern, costs.EXACT_ROWS_LIMIT + 1000)
    L = costs.EXACT_ROWS_LIMIT + 1000
    exact = sum(min(i // 3 + 1, 100) for i in range(L))
    assert not cost.exact and abs(cost.pairs - exact) / exact < 0.01 and cost.last_row == 100


def test_cpu_columns_of_a_sliding_window_by_brute_force(capsys):
    doc = explore_json(capsys, "patterns/sliding_window.attn", "--set", "window=16,200", "--seq", "64,100")
    assert doc["measured"] is False and doc["device"] == "cpu" and "CPU: analytic columns only" in doc["note"]
    assert [(r["params"]["window"], r["seq"]) for r in doc["rows"]] == [(16, 64), (200, 64), (16, 100), (200, 100)]
    pattern = sparsedsl.load("sliding_window")
    for row in doc["rows"]:
        L, w = row["seq"], row["params"]["window"]
        mask = pattern.with_params(window=w).dense_mask(L)["sliding_window"]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        pairs = int(mask.sum())
        assert row["density"] == pytest.approx(pairs / int(causal.sum()))
        assert row["branch_density"] == {"sliding_window": pytest.approx(row["density"])}
        assert row["keys_per_query"] == pytest.approx(pairs / L)
        assert row["fwd_gflop"] == pytest.approx(4 * 8 * pairs * 2 / 1e9)
        assert row["bwd_gflop"] == pytest.approx(10 * 8 * pairs * 2 / 1e9)
        assert row["dense_fwd_gflop"] == pytest.approx(4 * 8 * int(causal.sum()) * 2 / 1e9)
        assert row["decode_tokens"] == int(mask[-1].sum()) == min(L, w)
        assert row["decode_kv_bytes"] == min(L, w) * 2 * 8 * 2  # K and V, head dim 8, bf16, 1 KV head
        assert row["dense_decode_kv_bytes"] == L * 2 * 8 * 2
        assert row["deviation_seq"] == L
        inputs = random_inputs(costs.Shape(1, 2, 1, 8), L, 0, "cpu", torch.float64)
        assert row["deviation"] == pytest.approx(masked_deviation(inputs, mask), rel=1e-9)
        if w >= L:  # the window sees everything causal: the output is dense attention's
            assert row["deviation"] < 1e-12
        assert all(row[c] is None for c in explore.MEASURED_COLUMNS)


def test_cpu_deviation_is_computed_at_a_capped_length(capsys):
    doc = explore_json(capsys, "patterns/sliding_window.attn", "--set", "window=16", "--seq", "40,300", "--deviation-seq", "64")
    short, long = doc["rows"]
    assert (short["deviation_seq"], long["deviation_seq"]) == (40, 64)
    assert "at min(L, 64) positions" in doc["note"]
    mask = sparsedsl.load("sliding_window", window=16).dense_mask(64)["sliding_window"]
    inputs = random_inputs(costs.Shape(1, 2, 1, 8), 64, 0, "cpu", torch.float64)
    assert long["deviation"] == pytest.approx(masked_deviation(inputs, mask), rel=1e-9)


# ---------------------------------------------------------------- files and schema
ROW_TYPES = {
    "variant": str, "params": dict, "seq": int, "density": float, "branch_density": dict, "keys_per_query": float,
    "exact": bool, "fwd_gflop": float, "bwd_gflop": float, "dense_fwd_gflop": float, "dense_bwd_gflop": float,
    "decode_tokens": int, "decode_kv_bytes": int, "dense_decode_kv_bytes": int, "deviation": float,
    "deviation_seq": int, "decode_note": str,
}  # fmt: skip


def test_nsa_grid_writes_json_csv_and_pictures(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["explore", "patterns/nsa.attn", "--set", "window=32", "--set", "sel_topk=3,4", "--set", "sel_block=16",
            "--set", "cmp_block=16", "--set", "cmp_stride=8", "--seq", "96,160", "-o", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "sel_topk=4" in captured.out and "CPU: analytic columns only" in captured.out  # the table
    assert "[4/4] sel_topk=4, L=160" in captured.err  # progress, plain off a terminal
    doc = json.loads((out / "explore.json").read_text())
    assert doc["schema"] == explore.SCHEMA and doc["complete"] is True and doc["interrupted"] is False
    assert doc["pattern"] == "nsa" and doc["file"] == "patterns/nsa.attn" and doc["seq"] == [96, 160]
    assert doc["grid"] == {"window": [32], "sel_topk": [3, 4], "sel_block": [16], "cmp_block": [16], "cmp_stride": [8]}
    assert doc["fixed_params"] == {"pool": "mlp", "per": "token"}
    assert doc["shape"] == {"batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 8, "dtype": "bfloat16"}
    assert set(doc["versions"]) == {"sparsedsl", "torch", "triton", "python"} and doc["command"].startswith("sparsedsl explore ")
    assert set(doc["columns"]) >= set(ROW_TYPES) | set(explore.MEASURED_COLUMNS)
    assert [(r["variant"], r["params"]["sel_topk"], r["seq"]) for r in doc["rows"]] == [
        ("sel_topk=3", 3, 96), ("sel_topk=4", 4, 96), ("sel_topk=3", 3, 160), ("sel_topk=4", 4, 160)]  # fmt: skip
    for row in doc["rows"]:
        assert set(row) == set(doc["columns"])
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert set(row["branch_density"]) == {"cmp", "sel", "win"}
        assert row["density"] == pytest.approx(sum(row["branch_density"].values()))
        assert row["error"] is None and all(row[c] is None for c in explore.MEASURED_COLUMNS)
        # The paper's decode count: pooled keys, topk selected blocks (causal), the window.
        L, w, k = row["seq"], row["params"]["window"], row["params"]["sel_topk"]
        assert row["decode_tokens"] == (L - 16) // 8 + 1 + (min(k, (L - 1) // 16 + 1) - 1) * 16 + (L - 1) % 16 + 1 + min(L, w)
    # More selected blocks: denser, closer to dense attention.
    at = {(r["params"]["sel_topk"], r["seq"]): r for r in doc["rows"]}
    assert at[4, 160]["density"] > at[3, 160]["density"] and at[4, 160]["deviation"] < at[3, 160]["deviation"]

    table = list(csv.DictReader(io.StringIO((out / "explore.csv").read_text())))
    assert len(table) == 4 and {"window", "sel_topk", "density_cmp", "density_sel", "density_win", "fwd_ms"} <= set(table[0])
    assert float(table[0]["density"]) == pytest.approx(doc["rows"][0]["density"]) and table[0]["fwd_ms"] == ""
    for name in ("deviation.png", "density.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not (out / "speedup.png").exists()  # nothing was timed


def test_every_grid_point_in_the_csv_on_stdout(capsys):
    args = ["explore", "patterns/streaming.attn", "--set", "sinks=2,4", "--set", "window=8,16", "--seq", "32,40"]
    assert main([*args, *TINY, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["variant"], r["sinks"], r["window"], r["seq"]) for r in rows] == [
        (f"sinks={s} window={w}", str(s), str(w), str(L)) for L in (32, 40) for s in (2, 4) for w in (8, 16)
    ]
    assert all(r["density_streaming"] == r["density"] and r["fwd_ms"] == "" for r in rows)


def test_speedup_picture_from_measured_rows(tmp_path):
    rows = [
        {"variant": v, "seq": L, "deviation": 0.1, "deviation_seq": L, "density": 0.5, "decode_kv_bytes": 1 << 20,
         "dense_decode_kv_bytes": 4 << 20, "speedup_fwd": s, "speedup_bwd": s / 2, "speedup_decode": None}
        for v, s in (("a", 2.0), ("b", 3.0)) for L in (1024, 4096)
    ]  # fmt: skip
    paths = draw_plots({"pattern": "p", "device": "H100", "rows": rows}, tmp_path)
    assert sorted(p.name for p in paths) == ["density.png", "deviation.png", "speedup.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--set", "windw=3"], 1, "--set windw=3: pattern `sliding_window` has no parameter `windw`"),
        (["--set", "windw=3"], 1, "hint: did you mean `window`?"),
        (["--set", "window=16,big"], 1, "--set window=big: `window` is an int"),
        (["--set", "window=16,"], 1, "--set window=16,: empty value"),
        (["--set", "window=16,16"], 1, "a value is repeated"),
        (["--set", "window=16", "--set", "window=32"], 1, "--set window is given twice"),
        (["--set", "window=16,0"], 1, "the variant window=0 is not a valid `sliding_window`: argument `window` of `sliding` must be at least 1"),
        (["--seq", "64,x"], 2, "--seq 64,x: expected positive integers separated by commas"),
        (["--seq", "0"], 2, "--seq 0: lengths must be positive"),
        (["--heads", "3", "--kv-heads", "2"], 2, "--heads 3 is not a multiple of --kv-heads 2"),
        (["--inputs", "no/such.pt"], 2, "--inputs no/such.pt: no such file"),
    ],
)
def test_bad_arguments_are_named(args, code, message, capsys):
    assert main(["explore", "patterns/sliding_window.attn", "--seq", "32", *args]) == code
    assert message in capsys.readouterr().err


def test_a_file_with_several_patterns_needs_pattern(tmp_path, capsys):
    path = tmp_path / "two.attn"
    path.write_text(MASKS)
    assert main(["explore", str(path), "--seq", "16", *TINY]) == 1
    assert "defines several patterns (dilated_window, globals, holes, pieces); pick one with --pattern NAME" in capsys.readouterr().err
    assert main(["explore", str(path), "--pattern", "holes", "--seq", "16", *TINY, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["variant"] == "holes"


def test_cuda_without_cuda_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["explore", "patterns/sliding_window.attn", "--seq", "32", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "sparsedsl explore: error: --device cuda: CUDA is not available here" in err and "--device cpu" in err


# ---------------------------------------------------------------- inputs from a file
def test_inputs_from_a_file(tmp_path, capsys):
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 48, 8, generator=generator) for h in (4, 2, 2))
    path = tmp_path / "qkv.pt"
    torch.save({"q": q, "k": k, "v": v}, path)
    doc = explore_json(capsys, "patterns/sliding_window.attn", "--set", "window=8", "--seq", "40", "--inputs", str(path),
                       shape=["--heads", "4"])  # fmt: skip
    assert doc["inputs"] == str(path) and doc["shape"] == {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 8, "dtype": "bfloat16"}
    mask = sparsedsl.load("sliding_window", window=8).dense_mask(40)["sliding_window"]
    first_group = Inputs(q[:, :2, :40], k[:, :1, :40], v[:, :1, :40])
    assert doc["rows"][0]["deviation"] == pytest.approx(masked_deviation(first_group, mask), rel=1e-9)

    assert main(["explore", "patterns/sliding_window.attn", "--seq", "64", "--inputs", str(path)]) == 2
    assert "the tensors have 48 positions but the sweep uses 64" in capsys.readouterr().err
    assert main(["explore", "patterns/sliding_window.attn", "--seq", "40", "--inputs", str(path), "--heads", "8"]) == 2
    assert "--heads 8 disagrees with --inputs" in capsys.readouterr().err
    torch.save({"q": q, "k": k[:, :, :10]}, path)
    assert main(["explore", "patterns/sliding_window.attn", "--seq", "8", "--inputs", str(path)]) == 2
    assert "expected a dict with keys 'q', 'k', 'v'" in capsys.readouterr().err
    torch.save((q, k[:, :, :10], v), path)
    assert main(["explore", "patterns/sliding_window.attn", "--seq", "8", "--inputs", str(path)]) == 2
    assert "do not fit" in capsys.readouterr().err


# ---------------------------------------------------------------- interruptions
def stop_after(monkeypatch, rows: int, exception: BaseException) -> None:
    """Make the sweep raise ``exception`` when it starts row ``rows + 1``."""
    real = explore.measure_row
    calls = []

    def measure_row(*args, **kwargs):
        calls.append(1)
        if len(calls) > rows:
            raise exception
        return real(*args, **kwargs)

    monkeypatch.setattr(explore, "measure_row", measure_row)


def test_an_interrupted_sweep_keeps_its_rows(tmp_path, monkeypatch, capsys):
    stop_after(monkeypatch, 3, KeyboardInterrupt())
    out = tmp_path / "cut"
    args = ["explore", "patterns/sliding_window.attn", "--set", "window=8,16", "--seq", "32,64,128", "-o", str(out), *TINY]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert "interrupted; kept 3 of 6 rows" in captured.err and "interrupted: 3 rows kept." in captured.out
    doc = json.loads((out / "explore.json").read_text())
    assert doc["interrupted"] is True and doc["complete"] is False
    assert [(r["variant"], r["seq"]) for r in doc["rows"]] == [("window=8", 32), ("window=16", 32), ("window=8", 64)]
    assert len(list(csv.DictReader(io.StringIO((out / "explore.csv").read_text())))) == 3
    assert (out / "deviation.png").read_bytes()[:8] == PNG


def test_a_crash_keeps_the_rows_written_so_far(tmp_path, monkeypatch):
    stop_after(monkeypatch, 2, RuntimeError("boom"))
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="boom"):
        main(["explore", "patterns/sliding_window.attn", "--set", "window=8,16", "--seq", "32,64", "-o", str(out), *TINY])
    doc = json.loads((out / "explore.json").read_text())
    assert doc["complete"] is False and doc["interrupted"] is False and len(doc["rows"]) == 2


# ---------------------------------------------------------------- the GPU path, on the CPU
def test_measurement_path_runs_on_the_interpreter_with_stub_timers(monkeypatch):
    """The GPU code (leaves, pooled keys, gates, prefill, the decode step) on CPU tensors
    through Triton's interpreter, with timers that call the function instead of timing
    it: the decode step it times is the last row of a forward pass, every time."""
    from sparsedsl.tools import measure, timing

    steps = []

    def graph_us(fn, rep_ms=100.0):
        steps.extend([fn(), fn()])
        return 10.0

    monkeypatch.setattr(timing, "median_ms", lambda fn, budget_ms=200.0: 2.0)  # timed_fwd_bwd's warm-up still runs
    monkeypatch.setattr(timing, "graph_us", graph_us)
    pattern = sparsedsl.load("nsa", window=16, sel_block=16, sel_topk=3, cmp_block=16, cmp_stride=8)  # learned pooling
    inputs = random_inputs(costs.Shape(1, 2, 1, 16), 48, 0, "cpu", torch.float32)
    times = measure.pattern_times(pattern, inputs, 1.0)
    assert times == {"fwd_ms": 2.0, "bwd_ms": 0.0, "decode_us": 10.0, "decode_note": ""}
    full = pattern(inputs.q, inputs.k, inputs.v, **measure.call_arguments(pattern, inputs))
    assert len(steps) == 2
    for out in steps:
        torch.testing.assert_close(out, full[:, :, -1:], atol=2e-5, rtol=2e-5)
    dense = measure.dense_times(inputs, 1.0)
    assert dense == {"dense_fwd_ms": 2.0, "dense_bwd_ms": 0.0, "dense_decode_us": 10.0}
    assert measure.speedups({**times, **dense, "dense_fwd_ms": 5.0}) == {"speedup_fwd": 2.5, "speedup_bwd": None, "speedup_decode": 1.0}

    longformer = sparsedsl.load("longformer", window=8, globals=2)  # sees later keys: no decode
    decode = measure.decode_time(longformer, inputs)
    assert decode["decode_us"] is None and "lets a query see keys after it" in decode["decode_note"]


# ---------------------------------------------------------------- terminals
class Terminal(io.StringIO):
    def isatty(self):
        return True


DOCUMENT = {
    "pattern": "p", "file": "p.attn", "device": "cpu", "measured": False, "note": "CPU: analytic columns only",
    "interrupted": False,
    "rows": [{"variant": "window=8", "seq": 1024, "density": 0.25, "keys_per_query": 128.0, "fwd_gflop": 1234.6,
              "decode_kv_bytes": 3 << 20, "deviation": 0.5, "exact": True}],
}  # fmt: skip


def test_rich_on_a_terminal_and_plain_text_without_rich(monkeypatch):
    from sparsedsl.tools.explore_report import Progress, print_table

    screen = Terminal()
    print_table(DOCUMENT, screen)
    assert "window=8" in screen.getvalue() and "1,235" in screen.getvalue() and "3.0 MiB" in screen.getvalue()
    assert "----" not in screen.getvalue()  # rich draws its own rules

    monkeypatch.setitem(sys.modules, "rich", None)  # as if rich were not installed
    monkeypatch.setitem(sys.modules, "rich.console", None)
    screen = Terminal()
    print_table(DOCUMENT, screen)
    lines = screen.getvalue().splitlines()
    assert lines[1].split() == ["variant", "L", "density", "keys/query", "fwd", "GFLOP", "decode", "KV", "deviation"]
    assert lines[3].split() == ["window=8", "1,024", "25.00%", "128", "1,235", "3.0", "MiB", "0.500"]
    with Progress(2, screen) as progress:
        progress.start("window=8, L=1024")
        progress.advance()
    assert "[1/2] window=8, L=1024" in screen.getvalue()


def test_a_large_grid_shows_its_first_row_at_once_and_lowers_lazily(monkeypatch, capsys):
    """`--set window=1,...,300`: every variant is checked up front (a bad one fails at
    once), but each is lowered only when its row is measured; before, all were lowered
    (half a second each) before the first line of progress."""
    import sparsedsl.ir  # the driver lowers through it

    lowered = []
    real = sparsedsl.ir.lower_pattern
    monkeypatch.setattr(sparsedsl.ir, "lower_pattern", lambda checked: lowered.append(1) or real(checked))
    stop_after(monkeypatch, 2, KeyboardInterrupt())
    windows = ",".join(str(w) for w in range(1, 301))
    assert main(["explore", "patterns/sliding_window.attn", "--set", f"window={windows}", "--seq", "32", *TINY]) == 130
    assert len(lowered) == 2  # the two rows measured
    err = capsys.readouterr().err
    assert "[1/300] window=1, L=32" in err and "kept 2 of 300 rows" in err
