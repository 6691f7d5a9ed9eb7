"""The command line: check, show, mask, demo."""

import subprocess
import sys

import pytest
import torch

from sparsedsl.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "sparsedsl", *args], capture_output=True, text=True)


def test_check_reports_errors_like_a_compiler(tmp_path, capsys):
    good = tmp_path / "good.attn"
    good.write_text("pattern a() { return causal }\npattern b(w: int = 3) { return sliding(w) }\n")
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern a() {\n    return causal & slidin(4)\n}\n")
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (a, b)\n"
    assert main(["check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{bad}:2:21: error: unknown primitive `slidin`",
        "        return causal & slidin(4)",
        "                        ^~~~~~",
        "hint: did you mean `sliding`?",
    ]


def test_check_a_missing_file(capsys):
    assert main(["check", "no/such.attn"]) == 1
    assert "cannot read no/such.attn: No such file or directory" in capsys.readouterr().err


def test_show_prints_pattern_and_ir(capsys):
    assert main(["show", "patterns/nsa.attn", "--ir", "--set", "window=256", "--set", "pool=mean"]) == 0
    out = capsys.readouterr().out
    assert "pattern nsa" in out and "parameters: cmp_block=32, cmp_stride=16, sel_block=64, sel_topk=16, window=256, pool=mean" in out
    assert "win: causal & sliding(256)" in out and "sel: select(block=64, topk=16, score=cmp, keep_first=1, keep_local=2, per=token)" in out
    assert "key blocks of qb:   touched [(max(0, (q0 - 255)) // BK), ((q1 // BK) + 1))" in out


@pytest.mark.parametrize(
    "setting, message",
    [("window=big", "--set window=big: `window` is an int"), ("windw=3", "pattern `nsa` has no parameter `windw`"), ("pool=median", "--set pool=median: `pool` is one of mean, max, mlp")],
)
def test_show_rejects_bad_settings(setting, message, capsys):
    assert main(["show", "patterns/nsa.attn", "--set", setting]) == 1
    assert message in capsys.readouterr().err


def test_mask_prints_densities_and_draws(tmp_path, capsys):
    png = tmp_path / "m.png"
    assert main(["mask", "patterns/streaming.attn", "--seq", "256", "--set", "window=64", "-o", str(png)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("streaming"))
    # 4 sinks + a causal window of 64 over 256 tokens, against 256*257/2 causal pairs
    pairs = sum(min(i + 1, 64) + max(0, min(4, i + 1 - 64)) for i in range(256))
    assert f"{pairs:,}" in line and f"{pairs / (256 * 257 // 2):.2%}" in line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_and_exit_codes(tmp_path):
    bad = tmp_path / "x.attn"
    bad.write_text("pattern x() { return }")
    result = run("check", str(bad))
    assert result.returncode == 1 and f"{bad}:1:22: error: unexpected `}}`" in result.stderr
    assert run("--help").returncode == 0


def test_demo_runs_on_cpu(capsys):
    assert main(["demo", "--seq", "512", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "output (1, 8, 512, 64)" in out and "finite: True" in out


def test_mask_of_a_pattern_within_documents(tmp_path, capsys):
    """`compress(within=document)`: example documents start on the block grid, and every
    branch's mask stays inside the query's document, pooled keys counted from its start."""
    from sparsedsl import load
    from sparsedsl.ir.evaluate import EMPTY
    from sparsedsl.maskstats import branch_masks, example_documents

    png = tmp_path / "packed.png"
    assert main(["mask", "patterns/nsa_packed.attn", "--seq", "512", "-o", str(png)]) == 0
    assert "4 example documents" in capsys.readouterr().out and png.is_file()
    pattern = load("nsa_packed", window=128)
    doc_ids = example_documents(512, 4, seed=0, alignment=pattern.ir.document_alignment)[0]
    starts = torch.tensor([int(torch.nonzero(doc_ids == doc_ids[i])[0]) for i in range(512)])
    assert pattern.ir.document_alignment == 64 and (starts % 64 == 0).all() and len(set(starts.tolist())) == 4
    masks = {m.name: m for m in branch_masks(pattern, 512)}
    i, j = torch.arange(512)[:, None], torch.arange(512)[None, :]
    assert torch.equal(masks["win"].mask, (j <= i) & (i - j < 128) & (j >= starts[:, None]))
    assert not (masks["sel"].mask & ((j > i) | (j < starts[:, None]))).any()
    pooled = ((i[:, 0] - starts + 1 - 32).div(16, rounding_mode="floor") + 1).clamp(min=0)
    assert torch.equal(masks["cmp"].mask.sum(1), pooled)  # the document's complete windows
    for name in ("cmp", "win"):  # the IR's blocks (what the kernels walk) cover every visible pair
        m = masks[name]
        blocks = m.classes.repeat_interleave(64, 0)[:512].repeat_interleave(64, 1)[:, : m.mask.shape[1]]
        assert not (m.mask & (blocks == EMPTY)).any()
