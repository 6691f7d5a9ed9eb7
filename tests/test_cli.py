"""The command line: check, show, mask, demo."""

import subprocess
import sys
from pathlib import Path

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


def test_demo_runs_on_cpu(capsys, monkeypatch):
    """What `make demo` does on a machine without a GPU: the reference path (the NSA kernels
    at this length take minutes in the interpreter; tests/test_nsa.py tests them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["demo", "--seq", "512", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "output (1, 8, 512, 64)" in out and "finite: True" in out and "dense PyTorch reference" in out


def test_mask_of_a_pattern_within_documents(tmp_path, capsys):
    """`compress(within=document)`: example documents start on the block grid, and every
    branch's mask stays inside the query's document, pooled keys counted from its start."""
    from sparsedsl import load
    from sparsedsl.ir.evaluate import EMPTY
    from sparsedsl.tools.mask_stats import branch_masks, example_documents

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


# ---------------------------------------------------------------- hostile input
STREAMING = "patterns/streaming.attn"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "{tmp}"], "-o {tmp} is a folder; give a file name, such as {tmp}/mask.png"),  # it wrote {tmp}.png
        (["-o", "{tmp}/no/such/x.png"], "-o {tmp}/no/such/x.png: the folder {tmp}/no/such does not exist; create it first"),
        (["-o", "{tmp}/m.txt"], "-o {tmp}/m.txt: pictures are .png (or .svg, .pdf) files, not .txt"),
        (["--seq", "100000"], "--seq 100000: at most 16384 (every branch's seq x seq mask is built in memory)"),
    ],
)
def test_mask_refuses_bad_options_before_any_work(args, message, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["mask", STREAMING, "--seq", "64", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the table was printed before the error
    assert captured.err.startswith(f"sparsedsl mask: error: {message.format(tmp=tmp_path)}")
    assert list(tmp_path.iterdir()) == []


def test_mask_names_the_file_it_really_writes(tmp_path, capsys):
    assert main(["mask", STREAMING, "--seq", "64", "-o", str(tmp_path / "pic")]) == 0
    assert f"wrote {tmp_path / 'pic.png'}\n" in capsys.readouterr().out  # it said "wrote pic"
    assert (tmp_path / "pic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mask_and_demo_of_a_sequence_shorter_than_a_block(capsys):
    assert main(["mask", "patterns/nsa.attn", "--seq", "3"]) == 0  # a ZeroDivisionError
    assert "cmp          compress             0    0.00%" in capsys.readouterr().out
    assert main(["demo", "--seq", "3", "--device", "cpu"]) == 0  # the same, in its density table
    assert "output (1, 8, 3, 64)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq", "0"], "sparsedsl demo: error: --seq 0: the sequence length must be positive"),
        (["--seq", "-5"], "sparsedsl demo: error: --seq -5: the sequence length must be positive"),
        (["--device", "cuda"], "sparsedsl demo: error: --device cuda: CUDA is not available here; use --device cpu"),
    ],
)
def test_demo_refuses_bad_options(args, message, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", *args]) == 2
    assert capsys.readouterr().err == message + "\n"


def test_demo_refuses_an_unknown_device(capsys):
    with pytest.raises(SystemExit) as info:  # argparse's own exit: a usage line and the error
        main(["demo", "--device", "tpu"])
    assert info.value.code == 2
    assert "sparsedsl demo: error: argument --device: invalid choice: 'tpu' (choose from" in capsys.readouterr().err


def test_compile_output_errors_name_the_option(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("")
    assert main(["compile", STREAMING, "-o", str(existing)]) == 2
    assert capsys.readouterr().err == f"sparsedsl compile: error: -o {existing} is a file, not a folder; give a folder for the <pattern>.py files\n"
    assert main(["compile", STREAMING, "-o", str(existing / "sub")]) == 2
    assert capsys.readouterr().err == f"sparsedsl compile: error: -o {existing / 'sub'}: cannot create the folder (Not a directory)\n"


def test_compile_into_a_read_only_folder(read_only_dir, capsys):
    assert main(["compile", STREAMING, "-o", str(read_only_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsedsl compile: error: -o {read_only_dir}: cannot write {read_only_dir / 'streaming.py'} (")


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\xff\xfe\x00\x01binary", "{path}:1:1: error: the file is not UTF-8 text: byte 0xff here is not valid UTF-8"),
        (b"pattern p() {\n  return caus\xe9al\n}", "{path}:2:14: error: the file is not UTF-8 text: byte 0xe9 here is not valid UTF-8"),
        (("pattern p() { return " + "~" * 1000 + "causal }").encode(), "{path}:1:22: error: this expression nests more than 32 levels deep"),
    ],
)
def test_check_of_binary_and_hostile_files_is_one_located_error(data, message, tmp_path, capsys):
    path = tmp_path / "bad.attn"
    path.write_bytes(data)
    assert main(["check", str(path)]) == 1  # a UnicodeDecodeError or a RecursionError before
    assert capsys.readouterr().err.splitlines()[0] == message.format(path=path)


def test_check_accepts_a_byte_order_mark(tmp_path, capsys):
    path = tmp_path / "bom.attn"
    path.write_bytes(b"\xef\xbb\xbfpattern p() { return causal }")
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (p)\n"


@pytest.mark.parametrize(
    "args, first_line",
    [
        # printed as valid before
        (["--set", "window=100000000000000000000000000"], f"{STREAMING}:4:35: error: bad value for parameter: `window` does not fit in 64 bits (27 digits)"),
        (["--set", "window=2147483648"], f"{STREAMING}:5:44: error: argument `window` of `sliding` must be at most 1,073,741,824, got 2,147,483,648"),
        # these errors began with `<pattern>:`
        (["--set", "window=big"], f"{STREAMING}: error: --set window=big: `window` is an int"),
        (["--pattern", "nope"], f"{STREAMING}: error: {STREAMING} has no pattern `nope`"),
    ],
)
def test_show_errors_name_the_file(args, first_line, capsys):
    assert main(["show", STREAMING, *args]) == 1
    assert capsys.readouterr().err.splitlines()[0] == first_line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--heads", "100000", "--head-dim", "100000"], "--batch 1 --heads 100000 --kv-heads 4 --head-dim 100000: q, k and v at 64 positions take 4.7 TiB, more than this machine's"),
        (["--seq", str(2**31)], "--seq 2147483648: lengths are at most 1,073,741,824"),
    ],
)
def test_explore_refuses_shapes_beyond_the_machine(args, message, capsys):
    assert main(["explore", STREAMING, "--seq", "64", *args]) == 2  # an allocator error
    assert capsys.readouterr().err.startswith(f"sparsedsl explore: error: {message}")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_check_of_an_endless_file_stops(capsys):
    assert main(["check", "/dev/zero", "/"]) == 1  # it read /dev/zero until memory ran out
    assert capsys.readouterr().err.splitlines() == [
        "/dev/zero: error: /dev/zero is larger than 1024 KiB: not a pattern file",
        "/: error: cannot read /: Is a directory",
    ]
