"""`sparsedsl explore --train`: the train_* columns, the dense SDPA baseline rows, the
refusal of lm without `document`, interrupted training sweeps.

Training here runs the dense PyTorch reference (TRITON_INTERPRET unset for these tests:
the interpreter would take minutes) at tiny lengths, a couple of steps each."""

import csv
import io
import json

import pytest

from sparsedsl.cli import main
from sparsedsl.tools import explore

TINY = ["--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--device", "cpu"]
pytestmark = pytest.mark.filterwarnings("ignore:sparsedsl. CPU tensors run the dense PyTorch reference")
WINDOWS = ["patterns/sliding_window.attn", "--set", "window=16,32", "--seq", "64"]


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["explore", *args, *TINY])
    out, err = capsys.readouterr()
    return code, out, err


def fake_log(final=0.5, solved=False):
    return {"final": final, "solved": solved, "step_ms": 1.0, "peak_memory_mb": None}


def test_train_columns_and_the_dense_baseline(capsys):
    code, out, _ = run(capsys, *WINDOWS, "--train", "recall", "--seeds", "2", "--steps", "2", "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert document["train"]["task"] == "recall" and document["train"]["seeds"] == 2 and document["train"]["steps"] == 2
    assert set(explore.TRAIN_COLUMNS) <= set(document["columns"])
    assert "not how well the pattern trains" in document["columns"]["deviation"]
    rows = document["rows"]
    assert [r["variant"] for r in rows] == ["dense SDPA", "window=16", "window=32"]
    dense, *patterns = rows
    assert dense["params"] == {} and dense["seq"] == 64
    for key in ("density", "deviation", "fwd_gflop", "keys_per_query", "fwd_ms", "speedup_fwd"):
        assert dense[key] is None
    assert dense["dense_fwd_gflop"] > 0
    assert all(p["deviation"] is not None and p["density"] > 0 for p in patterns)
    for row in rows:
        assert set(row) == set(document["columns"])
        assert row["train_task"] == "recall" and row["train_metric"] == "accuracy"
        assert isinstance(row["train_mean"], float) and 0 <= row["train_mean"] <= 1
        assert isinstance(row["train_std"], float) and row["train_std"] >= 0
        assert row["train_seeds"] == 2
        assert isinstance(row["train_solved"], float) and 0 <= row["train_solved"] <= 1
        assert isinstance(row["train_step_ms"], float) and row["train_step_ms"] > 0
        assert row["train_peak_mb"] is None  # CPU
        assert len(row["train_finals"]) == 2 and all(isinstance(v, float) for v in row["train_finals"])
        assert row["train_mean"] == pytest.approx(sum(row["train_finals"]) / 2)


def test_table_and_csv_with_training(capsys, monkeypatch):
    monkeypatch.setattr(explore, "train_together", lambda spec, objective, config, seeds: [fake_log(0.25 + s / 2) for s in seeds])
    code, out, _ = run(capsys, *WINDOWS, "--train", "needle", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["variant"] for r in rows] == ["dense SDPA", "window=16", "window=32"]
    assert rows[0]["density"] == "" and rows[0]["train_mean"] == "0.5" and rows[0]["train_finals"] == "0.25 0.75"
    code, out, _ = run(capsys, *WINDOWS, "--train", "needle")
    assert code == 0
    assert "train acc" in out and "dense SDPA" in out and "trained on needle" in out


@pytest.mark.parametrize("final, solved, warned", [(0.02, False, True), (0.999, True, False), (0.6, False, False)])
def test_a_baseline_that_did_not_learn_the_task_is_called_out(capsys, monkeypatch, final, solved, warned):
    monkeypatch.setattr(explore, "train_together", lambda spec, objective, config, seeds: [fake_log(final, solved) for _ in seeds])
    code, out, _ = run(capsys, *WINDOWS, "--train", "recall", "--steps", "3")
    assert code == 0
    note = "L=64: `dense SDPA` ends at accuracy"
    assert (note in out) is warned
    if warned:
        assert "in 3 steps the task is not learned at this length" in out and "--steps" in out


def test_lm_needs_a_document_pattern(capsys):
    code, _, err = run(capsys, *WINDOWS, "--train", "lm")
    assert code == 2
    assert "--train lm" in err and "patterns/nsa_packed.attn" in err


def test_lm_trains_a_document_pattern(capsys):
    code, out, _ = run(capsys, "patterns/document.attn", "--seq", "64", "--train", "lm", "--seeds", "1", "--steps", "1", "--format", "json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["variant"] for r in rows] == ["dense SDPA", "document"]
    for row in rows:
        assert row["train_metric"] == "val_bpb" and row["train_solved"] is None and row["train_seeds"] == 1
        assert row["train_mean"] > 0 and row["train_std"] == 0.0


@pytest.mark.parametrize(
    "args, option",
    [(["--train", "recall", "--seeds", "0"], "--seeds"), (["--train", "recall", "--steps", "-1"], "--steps"), (["--steps", "5"], "--steps")],
)
def test_bad_training_options(capsys, args, option):
    code, _, err = run(capsys, *WINDOWS, *args)
    assert code == 2 and option in err


def test_an_interrupted_training_sweep_keeps_its_rows(capsys, monkeypatch, tmp_path):
    calls = []

    def train_together(spec, objective, config, seeds):
        calls.append(seeds)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [fake_log() for _ in seeds]

    monkeypatch.setattr(explore, "train_together", train_together)
    code, _, err = run(capsys, *WINDOWS, "--train", "recall", "--seeds", "1", "-o", str(tmp_path))
    assert code == 130 and "interrupted" in err
    document = json.loads((tmp_path / "explore.json").read_text())
    assert document["interrupted"] and not document["complete"]
    assert [r["variant"] for r in document["rows"]] == ["dense SDPA"]
    assert document["rows"][0]["train_mean"] == 0.5
    assert (tmp_path / "explore.csv").read_text().count("\n") == 2
