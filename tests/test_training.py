"""The training-quality harness: models, the training loop, resuming, statistics, and the
layer changes that the trainability investigation made (float32 gates, keys and values
per branch)."""

import argparse
import importlib.util
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sparsedsl
from sparsedsl.errors import InputError
from sparsedsl.nn import NativeSparseAttention, SparseAttention
from sparsedsl.training.loop import TrainConfig, train, train_seeds
from sparsedsl.training.models import Decoder, ModelSpec
from sparsedsl.training.objectives import make_objective
from sparsedsl.training.stacking import clip_grad_norm_per_seed_, member_state, stack
from sparsedsl.training.stats import fisher_exact, permutation_test, summarize

warnings.filterwarnings("ignore", category=UserWarning)
SMALL_NSA = dict(cmp_block=8, cmp_stride=4, sel_block=16, sel_topk=3, window=8)


@pytest.fixture
def reference_path(monkeypatch):
    """Patterns on the CPU run the dense reference here: training many steps through the
    kernel interpreter would take minutes (the kernels are tested in their own files)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def tiny(attention="dense", params=None, task="recall", seq=32, **options):
    objective = make_objective(task, seq, **options)
    return ModelSpec(vocab=objective.vocab_size, attention=attention, params=params or {}, hidden=32, heads=2, kv_heads=1), objective


@pytest.mark.parametrize(
    "attention, params, task, seq, options",
    [
        ("dense", None, "recall", 32, dict(pairs=4, queries=4)),
        ("nsa", SMALL_NSA, "recall", 32, dict(pairs=4, queries=4)),
        ("dense", None, "needle", 32, dict(distractors=2)),
        ("nsa_packed", SMALL_NSA, "lm", 64, dict(max_bytes=100_000)),
    ],
)
def test_a_few_steps_lower_the_loss(reference_path, attention, params, task, seq, options):
    spec, objective = tiny(attention, params, task, seq, **options)
    run = train(spec, objective, TrainConfig(steps=24, batch=8, eval_every=24, eval_batches=1, warmup=2, lr=3e-3))
    first, last = (sum(run.log["loss"][i : i + 4]) / 4 for i in (0, 20))
    assert last < first
    assert run.complete and run.log["evals"][-1]["step"] == 24
    assert run.log["final"] == run.log["evals"][-1][objective.metric]
    assert (run.log["solved"] is None) == (task == "lm")


def test_a_stopped_run_resumed_equals_one_run():
    spec, objective = tiny(pairs=4, queries=4)
    config = TrainConfig(steps=12, batch=4, eval_every=6, eval_batches=1, warmup=2)
    whole = train(spec, objective, config)
    part = train(spec, objective, config, time_limit=-1.0)  # stops before its first step
    assert not part.complete and part.state["step"] == 0
    rest = train(spec, objective, config, resume=part.state)
    assert rest.log["loss"] == whole.log["loss"]
    assert [e["accuracy"] for e in rest.log["evals"]] == [e["accuracy"] for e in whole.log["evals"]]


def test_a_curriculum_phase_trains_and_evaluates_at_its_own_batch(monkeypatch):
    spec, objective = tiny(pairs=4, queries=4)
    seen = []
    real_batch = type(objective).batch
    monkeypatch.setattr(type(objective), "batch", lambda self, rows, generator: seen.append((self.seq, rows))
                        or real_batch(self, rows, generator))  # fmt: skip
    config = TrainConfig(steps=4, batch=4, eval_every=2, eval_batches=1, warmup=1, curriculum=((2, {"seq": 16, "batch": 6}),))
    run = train(spec, objective, config)
    # two training steps and one evaluation per phase, each at the phase's batch
    assert seen == [(16, 6)] * 3 + [(32, 4)] * 3
    assert run.log["phases"] == [{"steps": 2, "seq": 16, "batch": 6}, {"steps": 2, "seq": 32, "batch": 4}]
    with pytest.raises(ValueError, match="batch is 0; it must be a positive integer"):
        train(spec, objective, replace(config, curriculum=((2, {"batch": 0}),)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a state saved there is loaded onto it")
def test_a_state_loaded_onto_the_gpu_resumes(tmp_path):
    """torch.load(map_location="cuda") moves the data generators' states there too; they
    go back to the CPU, where generators keep them (the first resumed sweep failed here)."""
    spec, objective = tiny(pairs=4, queries=4)
    config = TrainConfig(steps=4, batch=4, eval_every=2, eval_batches=1, warmup=2, device="cuda")
    part = train(spec, objective, config, time_limit=-1.0)
    torch.save(part.state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", map_location="cuda", weights_only=False)
    assert train(spec, objective, config, resume=state).complete


@pytest.mark.parametrize("attention, params", [("dense", None), ("nsa", SMALL_NSA)])
def test_seeds_trained_together_are_the_seeds_trained_alone(reference_path, attention, params):
    """One stacked model of seeds 0 and 3: each seed's losses and evaluations are those of
    its run alone (own initialisation, data, clipping and optimizer state)."""
    spec, objective = tiny(attention, params, pairs=4, queries=4)
    config = TrainConfig(steps=8, batch=4, eval_every=4, eval_batches=1, warmup=2, lr=3e-3)
    together = train_seeds(spec, objective, config, [0, 3])
    for seed, log, model in zip([0, 3], together.logs, together.models):
        alone = train(spec, objective, TrainConfig(**{**config.__dict__, "seed": seed}))
        assert log["config"]["seed"] == seed and log["stacked_seeds"] == 2
        torch.testing.assert_close(torch.tensor(log["loss"]), torch.tensor(alone.log["loss"]), rtol=1e-5, atol=1e-5)
        assert [e["accuracy"] for e in log["evals"]] == [e["accuracy"] for e in alone.log["evals"]]
        # atol: the pooled keys' bias shifts every compressed logit of a query alike, so its
        # gradient is rounding noise, which AdamW's normalisation turns into steps of ~lr.
        for got, expected in zip(model.state_dict().values(), alone.model.state_dict().values()):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert together.logs[0]["loss"] != together.logs[1]["loss"]
    with pytest.raises(ValueError, match="each once"):
        train_seeds(spec, objective, config, [1, 1])


def test_a_stack_computes_each_model_on_its_part_and_clips_each_seed_alone(reference_path):
    spec, _ = tiny("nsa", dict(SMALL_NSA, pool="mlp"))
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(Decoder(spec))
    stacked = stack(models)
    tokens = torch.randint(0, spec.vocab, (6, 40))
    out = stacked(tokens)
    for index, model in enumerate(models):
        torch.testing.assert_close(out[2 * index : 2 * index + 2], model(tokens[2 * index : 2 * index + 2]), rtol=1e-4, atol=1e-5)
        assert all(torch.equal(member_state(stacked, index)[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="a stack of 3 seeds got a batch of 4 rows"):
        stacked(tokens[:4])
    # Clipping: seed 1's huge gradient is scaled to norm 1; seed 0's small one is left alone.
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    weight.grad = torch.tensor([[0.1, 0.0, 0.0], [30.0, 40.0, 0.0]])
    norms = clip_grad_norm_per_seed_([weight], 1.0, 2)
    torch.testing.assert_close(norms, torch.tensor([0.1, 50.0]))
    torch.testing.assert_close(weight.grad, torch.tensor([[0.1, 0.0, 0.0], [0.6, 0.8, 0.0]]), rtol=1e-5, atol=1e-6)

    class Raw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="cannot stack `the model` \\(Raw\\)"):
        stack([Raw(), Raw()])


def test_the_recall_example_trains_stops_resumes_and_plots(reference_path, tmp_path, monkeypatch):
    """examples/train_recall.py on the library: a curriculum with fewer pairs first, a run
    stopped by --time-limit and resumed equals one run, and its plot is written."""
    path = Path(__file__).resolve().parents[1] / "examples" / "train_recall.py"
    spec = importlib.util.spec_from_file_location("train_recall_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = ["--attention", "dense", "--seq", "32", "--pairs", "4", "--queries", "4", "--hidden", "32", "--heads", "2",
              "--steps", "12", "--batch", "4", "--eval-every", "6", "--eval-batches", "1", "--warmup", "2",
              "--device", "cpu", "--curriculum", "16:2:4"]  # fmt: skip

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["train_recall.py", *common, *args])
        example.main()

    main("--out", str(tmp_path / "one.json"))
    main("--time-limit", "-1", "--save", str(tmp_path / "run.pt"))
    main("--resume", str(tmp_path / "run.pt"), "--out", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert one["phases"] == [{"steps": 4, "seq": 16, "batch": 4}, {"steps": 8, "seq": 32, "batch": 4}]
    assert one["loss"] == two["loss"] and len(one["loss"]) == 12
    assert [e["accuracy"] for e in one["evals"]] == [e["accuracy"] for e in two["evals"]]
    monkeypatch.setattr(sys, "argv", ["train_recall.py", "--plot", str(tmp_path / "one.json"), "--png", str(tmp_path / "p.png")])
    example.main()
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_language_modelling_needs_a_document_pattern(reference_path):
    spec, objective = tiny("nsa", SMALL_NSA, "lm", 64, max_bytes=10_000)
    with pytest.raises(ValueError, match="document"):
        train(spec, objective, TrainConfig(steps=1))


def test_dense_baseline_keeps_documents_apart():
    """The dense model's document mask: a change in the first file does not reach the second."""
    spec = ModelSpec(vocab=256, hidden=16, heads=2, kv_heads=1)
    torch.manual_seed(0)
    model = Decoder(spec)
    tokens = torch.randint(0, 256, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    other = tokens.clone()
    other[0, :5] = (other[0, :5] + 1) % 256
    a, b = model(tokens, doc_ids), model(other, doc_ids)
    assert torch.equal(a[0, 5:], b[0, 5:]) and not torch.equal(a[0, :5], b[0, :5])
    # ...and positions restart: the second file alone gives the same output.
    alone = model(tokens[:, 5:], torch.zeros(1, 7, dtype=torch.int64))
    torch.testing.assert_close(alone[0], a[0, 5:], rtol=1e-5, atol=1e-5)


def test_summaries_and_tests():
    assert summarize([1.0, 0.0, 1.0], [True, False, True]) == pytest.approx(
        {"mean": 2 / 3, "std": math.sqrt(1 / 3), "n": 3, "solved_share": 2 / 3}
    )
    assert summarize([2.5])["std"] == 0.0 and summarize([2.5])["solved_share"] is None
    # Fisher: 8/8 against 0/8 is p = 2 / C(16, 8); equal shares give 1.
    assert fisher_exact(8, 8, 0, 8) == pytest.approx(2 / math.comb(16, 8))
    assert fisher_exact(3, 6, 3, 6) == pytest.approx(1.0)
    assert fisher_exact(5, 7, 3, 7) == pytest.approx(0.5921, abs=1e-4)  # scipy.stats.fisher_exact
    # Permutation: fully separated groups of 3 reach the smallest p, 2 / C(6, 3).
    assert permutation_test([1.0, 1.1, 1.2], [2.0, 2.1, 2.2]) == pytest.approx(2 / 20)
    assert permutation_test([1.0, 2.0], [1.0, 2.0]) == pytest.approx(1.0)
    # Beyond `limit` splits, random ones estimate the same p-value.
    a, b = [0.1 * i for i in range(6)], [0.1 * i + 0.25 for i in range(6)]
    assert permutation_test(a, b, limit=100, draws=20_000) == pytest.approx(permutation_test(a, b), abs=0.015)
    assert permutation_test([1.0] * 20, [2.0] * 20, draws=999) == pytest.approx(1 / 1000)


# ---------------------------------------------------------------- layer changes
def test_saturated_gates_keep_their_gradient_under_bf16_autocast(reference_path):
    """Gates were a bf16 sigmoid under autocast: above 0.998 they rounded to 1 and their
    gradient g * (1 - g) to 0, so a saturated gate could never move again."""
    torch.manual_seed(0)
    layer = SparseAttention(sparsedsl.compile_source("pattern two() {\n a = causal\n b = causal\n return gate(a, b)\n}"), 32, 2)
    torch.nn.init.zeros_(layer.gate_proj.weight)
    torch.nn.init.constant_(layer.gate_proj.bias, 7.0)  # sigmoid(7) = 0.99909
    hidden = torch.randn(2, 16, 32)

    def bias_gradient(autocast: bool, dtype) -> torch.Tensor:
        copy = layer.to(dtype)
        copy.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = copy(hidden.to(dtype))
        out.float().pow(2).sum().backward()
        return copy.gate_proj.bias.grad.double().clone()

    exact = bias_gradient(False, torch.float64)
    mixed = bias_gradient(True, torch.float32)
    assert exact.abs().min() > 0
    torch.testing.assert_close(mixed, exact, rtol=0.1, atol=0)


def test_normalized_gates_mix_a_weighted_mean_of_the_branches():
    """normalize_gates=True divides the gates by their sum: two branches over the same keys
    then give exactly that one attention, whatever the gates (the paper's sum would scale it)."""
    torch.manual_seed(2)
    two = sparsedsl.compile_source("pattern two() {\n a = causal\n b = causal\n return gate(a, b)\n}")
    mixed = SparseAttention(two, 32, 2, normalize_gates=True)
    summed = SparseAttention(two, 32, 2)
    causal = SparseAttention("causal", 32, 2)
    causal.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("gate_proj")})
    summed.load_state_dict(mixed.state_dict())
    torch.nn.init.normal_(mixed.gate_proj.bias, std=2.0)
    summed.gate_proj.load_state_dict(mixed.gate_proj.state_dict())
    hidden = torch.randn(2, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixed(hidden), causal(hidden), rtol=1e-5, atol=1e-5)
        assert (summed(hidden) - causal(hidden)).abs().max() > 1e-2


def test_keys_and_values_per_branch_match_the_reference():
    """branch_kv: each branch attends to its own keys and values, on the kernels as in the reference."""
    pattern = sparsedsl.load("nsa", pool="mean", **SMALL_NSA)
    torch.manual_seed(1)
    B, H, L, D = 1, 2, 40, 16
    q, k, v, k2, v2, k3, v3 = (torch.randn(B, H, L, D) for _ in range(7))
    gates = torch.rand(B, H, L, 3)
    own = {"sel": (k2, v2), "win": (k3, v3)}
    out = pattern(q, k, v, gates=gates, branch_kv=own)
    expected = pattern.reference(q, k, v, gates=gates, branch_kv=own)
    torch.testing.assert_close(out.double(), expected.out, rtol=2e-4, atol=2e-4)
    # The window branch attends to k3/v3 alone: the same as a plain call on them.
    window = sparsedsl.load("sliding_window", window=8).reference(q, k3, v3).out
    torch.testing.assert_close(expected.branches["win"], window)
    assert not torch.allclose(expected.out, pattern.reference(q, k, v, gates=gates).out)
    # Packed documents: the kernels' aligned layout pads the branch's own keys too.
    packed = sparsedsl.load("nsa_packed", pool="mean", **SMALL_NSA)
    doc_ids = torch.tensor([[0] * 23 + [1] * 17])
    out = packed(q, k, v, gates=gates, doc_ids=doc_ids, branch_kv=own)
    expected = packed.reference(q, k, v, gates=gates, doc_ids=doc_ids, branch_kv=own)
    torch.testing.assert_close(out.double(), expected.out, rtol=2e-4, atol=2e-4)


def test_bad_branch_kv_is_named():
    pattern = sparsedsl.load("nsa", pool="mean", **SMALL_NSA)
    q = k = v = torch.randn(1, 2, 40, 16)
    gates = torch.rand(1, 2, 40, 3)
    with pytest.raises(InputError, match="`branch_kv` names `nope`, which is not a branch"):
        pattern(q, k, v, gates=gates, branch_kv={"nope": (k, v)})
    with pytest.raises(InputError, match=r"`branch_kv\['win'\]` must be a pair"):
        pattern(q, k, v, gates=gates, branch_kv={"win": k})
    with pytest.raises(InputError, match=r"branch_kv\['win'\] k` must have shape"):
        pattern(q, k, v, gates=gates, branch_kv={"win": (k[:, :1], v)})


def test_layer_with_keys_and_values_per_branch(reference_path):
    layer = NativeSparseAttention(32, 2, kv_per_branch=True, **SMALL_NSA)
    assert set(layer.branch_kv_proj) == {"sel", "win"}
    hidden = torch.randn(1, 40, 32, requires_grad=True)
    layer(hidden).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.branch_kv_proj.parameters())
    with pytest.raises(InputError, match="kv_per_branch=True"):
        layer(hidden, cache=layer.make_cache(1, 64))


def _bench_module(monkeypatch, name: str):
    """bench/NAME.py as a module (bench/ on the path for its own imports)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_quality_study_trains_a_curriculum_and_asks_the_needle(reference_path, tmp_path, monkeypatch):
    """bench/train_quality.py's recall study on a tiny model: each phase at its own length,
    then the trained model's needle accuracy by length and depth, pooled by `summary`."""
    quality = _bench_module(monkeypatch, "train_quality")
    quality.main(["run", "--study", "smoke_recall", "--layer", "dense", "--seeds", "0-1", "--device", "cpu",
                  "--out", str(tmp_path)])  # fmt: skip
    rows = quality.summary(argparse.Namespace(folders=[str(tmp_path)], json=None))
    row = rows["smoke_recall dense"]
    assert sorted(row["phase_ends"]) == ["32", "64"] and all(len(v) == 2 for v in row["phase_ends"].values())
    assert sorted(row["needle"]) == ["32", "64"]
    assert list(row["needle"]["64"]) == ["0.0", "0.25", "0.5", "0.75", "1.0"]
    assert all(len(seeds) == 2 and all(0 <= a <= 1 for a in seeds) for seeds in row["needle"]["64"].values())


def test_gradient_errors_of_a_solved_model_are_measured_against_the_largest_gradient(monkeypatch):
    """bench/diagnose_recall.py: a solved model's loss gradients are all below 1e-6; the
    check used to keep only gradients above 1e-6 and then failed on an empty max()."""
    diagnose = _bench_module(monkeypatch, "diagnose_recall")
    exact = {"blocks.0.attention.q_proj.weight": torch.full((4,), 1e-8), "head.weight": torch.full((4,), 2e-8),
             "embed.weight": torch.zeros(4)}  # fmt: skip
    got = {name: value * 1.01 for name, value in exact.items()}
    errors = diagnose.relative_errors(got, exact)
    assert errors["worst"] == pytest.approx(0.01, rel=1e-3) and errors["worst_name"] != "embed.weight"
    assert errors["attention"] == pytest.approx(0.01, rel=1e-3)
    assert diagnose.relative_errors(got, {name: torch.zeros(4) for name in exact})["worst"] is None


def test_a_study_s_layer_takes_the_layer_s_options_apart_from_the_pattern_s(monkeypatch):
    """bench/train_quality.py --layer nsa_packed:normalize_gates=1,window=256: the option
    goes to SparseAttention, the parameter to the pattern, and the label names both."""
    quality = _bench_module(monkeypatch, "train_quality")
    model = quality.layer_spec(quality.STUDIES["smoke"], "nsa_packed:normalize_gates=1,window=32")
    assert model.params == {"window": 32} and model.normalize_gates and not model.kv_per_branch
    assert model.label == "nsa_packed window=32 normalize_gates"
    assert Decoder(model).blocks[0].attention.normalize_gates
