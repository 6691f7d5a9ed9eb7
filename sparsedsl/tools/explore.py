"""``sparsedsl explore``: a grid of variants of one pattern, costed and measured.

Each ``--set NAME=V1,V2`` names a parameter and its values; the grid is every combination.
For each variant and sequence length a row gets the analytic columns (:mod:`.costs`),
the deviation from dense causal attention (:mod:`.measure`) and, on a GPU, measured times
and speed-ups over dense SDPA. Rows are written as they come (``-o DIR``: ``explore.json``
and ``explore.csv`` rewritten after every row), so an interrupted sweep keeps what it
measured. :data:`COLUMNS` says what every column means; it goes into the JSON file too.

With ``--train TASK`` (:class:`TrainSettings`) every row also trains a small model with
the variant as its attention, over several seeds, and a dense SDPA baseline row is added
per length: the ``train_*`` columns say how well the pattern trains, which the deviation
does not.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..compiler import compile_definition
from ..errors import PatternError, SourceFile
from ..frontend import syntax as S
from ..frontend.check import check_pattern
from ..frontend.model import CheckedPattern
from ..frontend.primitives import MAX_SIZE
from ..pattern import Pattern
from ..training.loop import TrainConfig, train_seeds
from ..training.models import DENSE, DENSE_LABEL, ModelSpec
from ..training.objectives import make_objective
from ..training.stats import summarize
from . import measure
from .costs import Shape, analytic_columns, dense_columns
from .settings import grid_points, parse_grid

SCHEMA = "sparsedsl.explore/1"

# The CPU computes the deviation at no more than this many positions by default (float64
# reference attention costs memory quadratic in the length).
CPU_DEVIATION_SEQ = 512

COLUMNS = {
    "variant": "the swept parameters of this row, as NAME=VALUE (the pattern's name when nothing is swept)",
    "params": "the value of every --set parameter in this row",
    "seq": "sequence length L (queries = keys)",
    "density": "keys read by all output branches together, summed over queries, over the L(L+1)/2 pairs of dense "
    "causal attention; a branch's keys count separately (a key seen by two branches counts twice), a pooled key "
    "counts as one key, a selection counts the causal keys of its topk chosen blocks",
    "branch_density": "the same per output branch",
    "keys_per_query": "keys read by all output branches, averaged over the L queries",
    "exact": "whether every count is exact: false where a selection without keep_local may choose other blocks than "
    "its own (an upper bound) or a hull mask was counted on sampled rows",
    "fwd_gflop": "forward attention GFLOP for the whole batch: 4*D per (query head, key read) of every branch that "
    "runs, plus 2*D per (query head, pooled key) of a selection's score branch (the block scores)",
    "bwd_gflop": "backward attention GFLOP: 10*D per (query head, key read) of every output branch (QK^T again, dV, "
    "dP, dQ, dK); selections take no gradient",
    "dense_fwd_gflop": "the same for dense causal attention: 4*D*L(L+1)/2 per query head",
    "dense_bwd_gflop": "10*D*L(L+1)/2 per query head",
    "decode_tokens": "keys read per sequence and K/V head by one decode step at position L-1: every branch's keys "
    "(pooled keys, selected blocks, window...) counted once each, the paper's way of counting",
    "decode_kv_bytes": "bytes of K and V those keys are, for the whole batch: decode_tokens * 2 * D * bytes per "
    "element * batch * kv_heads",
    "dense_decode_kv_bytes": "the same for dense attention: all L keys",
    "deviation": "||out - dense|| / ||dense||: the relative distance of the pattern's output from dense causal "
    "attention on the same inputs (gated patterns: gates 1/N unless the inputs carry them); it measures closeness "
    "to dense on random inputs, not how well the pattern trains (see the train_* columns)",
    "deviation_seq": "the length the deviation was computed at: L, or --deviation-seq where shorter (default "
    f"{CPU_DEVIATION_SEQ} on the CPU, where the deviation also uses the first query group only)",
    "fwd_ms": "GPU: median forward time of the pattern's kernels, ms",
    "bwd_ms": "GPU: median forward+backward time minus fwd_ms, ms",
    "decode_us": "GPU: median time of one pattern.decode step at position L-1 (append, pooling, attention), "
    "replayed from a CUDA graph, us",
    "decode_note": "why decode_us is missing or was timed eagerly",
    "dense_fwd_ms": "GPU: dense causal SDPA forward, ms (K/V heads expanded inside)",
    "dense_bwd_ms": "GPU: dense causal SDPA forward+backward minus forward, ms",
    "dense_decode_us": "GPU: dense SDPA with one query over all L keys, CUDA graph, us",
    "speedup_fwd": "dense_fwd_ms / fwd_ms",
    "speedup_bwd": "dense_bwd_ms / bwd_ms",
    "speedup_decode": "dense_decode_us / decode_us",
    "error": "why a GPU measurement (or training) of this row failed (the other columns stand)",
    # With --train: the row's variant trained as the attention of a small model.
    "train_task": "--train: the task trained on (recall, needle or lm); the row `dense SDPA` is the dense baseline",
    "train_metric": "the metric of train_mean: accuracy (recall, needle; higher is better) or val_bpb (lm, "
    "validation bits per byte; lower is better)",
    "train_mean": "the mean over seeds of the final train_metric",
    "train_std": "the sample standard deviation of the final train_metric over seeds (0 for one seed)",
    "train_seeds": "how many seeds (independent trainings) the row's train_* columns summarize",
    "train_solved": "the share of seeds whose final accuracy is at least 0.99 (None for lm)",
    "train_step_ms": "the median training step time, ms, of the row's seeds trained together as one stacked model "
                     "(one step trains every seed; the dense row is stacked alike)",
    "train_peak_mb": "GPU: the largest peak memory allocated by a seed's training, MiB",
    "train_finals": "the final train_metric of every seed, in seed order",
}

TRAIN_COLUMNS = (
    "train_task", "train_metric", "train_mean", "train_std", "train_seeds", "train_solved",
    "train_step_ms", "train_peak_mb", "train_finals",
)  # fmt: skip
TASKS = ("recall", "needle", "lm")


# The columns only a GPU fills in (None on the CPU).
MEASURED_COLUMNS = (
    "fwd_ms", "bwd_ms", "decode_us", "dense_fwd_ms", "dense_bwd_ms", "dense_decode_us",
    "speedup_fwd", "speedup_bwd", "speedup_decode",
)  # fmt: skip


class ExploreError(ValueError):
    """A bad ``explore`` argument (not a pattern error): names the option and the fix."""


@dataclass(frozen=True)
class Variant:
    """One grid point: its parameter values, its label, the checked pattern and, compiled
    when first needed, the pattern itself. Checking is fast and happens for every variant
    before a sweep starts (a bad combination fails at once); lowering takes a good part of
    a second per variant, so each variant is lowered when its first row is measured and a
    sweep of a thousand variants shows its first row at once."""

    params: dict
    label: str
    definition: S.PatternDef = field(repr=False, compare=False)
    source: SourceFile = field(repr=False, compare=False)
    checked: CheckedPattern = field(repr=False, compare=False)

    @cached_property
    def pattern(self) -> Pattern:
        try:
            return compile_definition(self.definition, self.source, self.params)
        except PatternError as exc:  # lowering refused it (too many interval pieces)
            raise _variant_error(self, exc) from None


@dataclass
class Settings:
    """Everything a sweep needs besides the variants."""

    seqs: list[int]
    device: str = "cpu"
    shape: Shape = field(default_factory=Shape)
    seed: int = 0
    inputs: measure.Inputs | None = None
    inputs_path: str | None = None
    deviation_seq: int | None = None
    budget_ms: float = 200.0
    train: TrainSettings | None = None

    @property
    def measured(self) -> bool:
        return self.device == "cuda"

    def deviation_length(self, seq: int) -> int:
        cap = self.deviation_seq if self.deviation_seq is not None else (None if self.measured else CPU_DEVIATION_SEQ)
        return seq if cap is None else min(seq, cap)


@dataclass(frozen=True)
class TrainSettings:
    """How ``--train`` trains every row: task, seeds, steps, batch and the model's size.
    :meth:`defaults` gives a real run on a GPU and a smoke test on the CPU."""

    task: str
    seeds: int = 2
    steps: int = 1000
    batch: int = 64
    device: str = "cuda"
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    eval_batches: int = 4

    @classmethod
    def defaults(cls, task: str, device: str, seeds: int | None = None, steps: int | None = None) -> TrainSettings:
        if task not in TASKS:
            raise ExploreError(f"--train {task}: expected one of {', '.join(TASKS)}")
        seeds = 2 if seeds is None else seeds
        if device == "cuda":
            return cls(task, seeds, 1000 if steps is None else steps, device=device)
        return cls(task, seeds, 8 if steps is None else steps, batch=4, device=device, hidden=32, heads=2, kv_heads=1, eval_batches=2)

    def objective(self, seq: int):
        """The task at length ``seq``, with options that fit short lengths."""
        if self.task == "recall":
            count = max(1, min(8, seq // 16))
            return make_objective("recall", seq, pairs=count, queries=count)
        if self.task == "needle":
            return make_objective("needle", seq, distractors=max(0, min(8, (seq - 4) // 3 - 1)))
        return make_objective("lm", seq, max_bytes=2_000_000 if self.device == "cpu" else None)

    def config(self, seed: int):
        return TrainConfig(
            steps=self.steps, batch=self.batch, warmup=min(200, self.steps // 10), seed=seed,
            eval_every=self.steps, eval_batches=self.eval_batches, device=self.device,
        )  # fmt: skip

    def describe(self) -> dict:
        """The settings as the JSON document records them, with the baseline rows' label."""
        return {**asdict(self), "baseline": DENSE_LABEL}


def check_training(variants: list[Variant], settings: Settings) -> None:
    """Refuse up front what ``--train`` cannot do: lm with a pattern without ``document``,
    a length too short for the task."""
    train = settings.train
    if train is None:
        return
    if train.task == "lm":
        for variant in variants:
            if not variant.pattern.checked.needs_documents:
                raise ExploreError(
                    f"--train lm packs source files into rows with document ids, but `{variant.pattern.name}` "
                    f"({variant.label}) does not use `document`; train it on recall or needle, or explore a "
                    "pattern with `document` such as patterns/nsa_packed.attn"
                )
        return
    for seq in settings.seqs:
        try:
            train.objective(seq).batch(1, torch.Generator().manual_seed(0))
        except ValueError as exc:
            raise ExploreError(f"--seq {seq} is too short for --train {train.task}: {exc}") from None


def train_together(spec, objective, config, seeds: list[int]) -> list[dict]:
    """The logs of ``seeds`` trained together as one stacked model (tests replace this)."""
    return train_seeds(spec, objective, config, seeds).logs


def train_columns(attention, seq: int, train: TrainSettings) -> dict:
    """The train_* columns of one attention (a Pattern, or ``"dense"``) at length ``seq``:
    ``train.seeds`` seeds trained together (:func:`train_together`), summarized."""
    objective = train.objective(seq)
    spec = ModelSpec(vocab=objective.vocab_size, attention=attention, hidden=train.hidden, layers=train.layers,
                     heads=train.heads, kv_heads=train.kv_heads)  # fmt: skip
    logs = train_together(spec, objective, train.config(0), list(range(train.seeds)))
    if train.device == "cuda":
        torch.cuda.empty_cache()
    finals = [float(log["final"]) for log in logs]
    summary = summarize(finals, [log.get("solved") for log in logs])
    step_ms = [log["step_ms"] for log in logs if log.get("step_ms") is not None]
    peaks = [log["peak_memory_mb"] for log in logs if log.get("peak_memory_mb") is not None]
    return {
        "train_task": train.task, "train_metric": objective.metric, "train_mean": summary["mean"],
        "train_std": summary["std"], "train_seeds": summary["n"], "train_solved": summary["solved_share"],
        "train_step_ms": statistics.median(step_ms) if step_ms else None, "train_peak_mb": max(peaks) if peaks else None,
        "train_finals": finals,
    }  # fmt: skip



def _with_training(row: dict, attention, seq: int, settings: Settings) -> dict:
    """``row`` with its train_* columns; on a GPU a failing training is recorded in ``error``."""
    row.update(dict.fromkeys(TRAIN_COLUMNS), train_task=settings.train.task)
    try:
        row.update(train_columns(attention, seq, settings.train))
    except Exception as exc:
        if not settings.measured:
            raise
        message = f"training: {type(exc).__name__}: {str(exc)[:300]}"
        row["error"] = f"{row['error']}; {message}" if row.get("error") else message
        torch.cuda.empty_cache()
    return row


def dense_row(seq: int, settings: Settings) -> dict:
    """The dense SDPA baseline row of ``--train`` at length ``seq``: the train_* columns and
    the dense_* analytic ones; the pattern's columns are None."""
    row = dict.fromkeys(COLUMNS)
    row.update(variant=DENSE_LABEL, params={}, seq=seq, branch_density={}, decode_note="", **dense_columns(seq, settings.shape))
    return _with_training(row, DENSE, seq, settings)


# ---------------------------------------------------------------- the grid
def parse_lengths(text: str, option: str = "--seq") -> list[int]:
    """``"8192,32768"`` as [8192, 32768]: positive integers, each once."""
    try:
        values = [int(piece) for piece in text.split(",")]
    except ValueError:
        raise ExploreError(f"{option} {text}: expected positive integers separated by commas, e.g. {option} 1024,4096") from None
    if not values or any(v < 1 for v in values):
        raise ExploreError(f"{option} {text}: lengths must be positive")
    if any(v > MAX_SIZE for v in values):
        raise ExploreError(
            f"{option} {text}: lengths are at most {MAX_SIZE:,} (the kernels index positions with 32-bit integers)"
        )
    if len(set(values)) != len(values):
        raise ExploreError(f"{option} {text}: a length is repeated")
    return values


def expand_grid(definition: S.PatternDef, source: SourceFile, settings: list[str]) -> list[Variant]:
    """Every combination of the ``--set`` values as a checked pattern. A combination the
    checker refuses raises its error, naming the combination."""
    grid = parse_grid(settings, definition, source)
    swept = [name for name, values in grid.items() if len(values) > 1]
    variants = []
    for point in grid_points(grid):
        label = " ".join(f"{name}={_text(point[name])}" for name in swept) or definition.name
        try:
            checked = check_pattern(definition, source, point)
        except PatternError as exc:
            raise _variant_error(Variant(point, label, definition, source, None), exc) from None
        variants.append(Variant(point, label, definition, source, checked))
    return variants


def _variant_error(variant: Variant, exc: PatternError) -> PatternError:
    """``exc`` said of the variant it is about (unchanged for a sweep of one)."""
    if not variant.params:
        return exc
    given = " ".join(f"{k}={_text(v)}" for k, v in variant.params.items())
    return PatternError(
        f"the variant {given} is not a valid `{variant.definition.name}`: {exc.message}",
        source=variant.source,
        span=exc.span if exc.file == variant.source.name else None,
        hint=exc.hint,
    )


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ---------------------------------------------------------------- the device
def resolve_device(requested: str | None) -> str:
    """``cpu`` or ``cuda``: the default is cuda where available; asking for cuda on a
    machine without it is an error."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ExploreError(
            f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
            f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}); "
            "run on a machine with an NVIDIA GPU, or use --device cpu for the analytic columns"
        )
    return requested


def check_inputs(inputs: measure.Inputs, settings: Settings) -> None:
    """The ``--inputs`` tensors are long enough for every length they are used at."""
    needed = max(settings.deviation_length(seq) for seq in settings.seqs)
    if inputs.seq < needed:
        raise ExploreError(
            f"--inputs {settings.inputs_path}: the tensors have {inputs.seq} positions but the sweep uses {needed}; "
            f"pass shorter --seq (or --deviation-seq) or longer inputs"
        )


# ---------------------------------------------------------------- one row
def measure_row(variant: Variant, seq: int, settings: Settings, cache: dict) -> dict:
    """The row of one variant at one length: analytic columns, deviation and (on a GPU)
    times. A failing GPU measurement is recorded in ``error``; other failures raise.
    ``cache`` keeps what rows share: dense times per length, CPU deviations per capped
    length."""
    row = {"variant": variant.label, "params": dict(variant.params), "seq": seq}
    row.update(analytic_columns(variant.pattern, seq, settings.shape))
    dev_seq = settings.deviation_length(seq)
    # Every row has every column: what the CPU does not measure stays None.
    row.update(dict.fromkeys(MEASURED_COLUMNS), deviation=None, deviation_seq=dev_seq, decode_note="", error=None)
    if settings.measured:
        try:
            inputs = _inputs_at(settings, seq)
        except Exception as exc:  # e.g. out of memory: the analytic columns stand
            row["error"] = f"inputs: {type(exc).__name__}: {str(exc)[:300]}"
            return _with_training(row, variant.pattern, seq, settings) if settings.train is not None else row

        def dense():
            if seq not in cache:
                cache[seq] = measure.dense_times(inputs, settings.budget_ms)
            return cache[seq]

        errors = []
        for what, part in (
            ("dense SDPA", dense),
            ("pattern times", lambda: measure.pattern_times(variant.pattern, inputs, settings.budget_ms)),
            ("deviation", lambda: {"deviation": measure.deviation(variant.pattern, inputs.prefix(dev_seq))}),
        ):
            try:
                row.update(part())
            except Exception as exc:  # out of memory, a kernel that does not compile: keep going
                errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
            finally:
                torch.cuda.empty_cache()
        row.update(measure.speedups(row), error="; ".join(errors) or None)
    else:
        key = (variant.label, dev_seq)
        if key not in cache:  # lengths beyond the cap share one deviation
            cache[key] = measure.deviation(variant.pattern, _inputs_at(settings, dev_seq).first_group())
        row["deviation"] = cache[key]
    if settings.train is not None:
        _with_training(row, variant.pattern, seq, settings)
    return row


def _inputs_at(settings: Settings, seq: int) -> measure.Inputs:
    dtype = measure.DTYPES[settings.shape.dtype] if settings.measured else torch.float64
    if settings.inputs is not None:
        return settings.inputs.prefix(seq).to(settings.device, dtype)
    return measure.random_inputs(settings.shape, seq, settings.seed, settings.device, dtype)


# ---------------------------------------------------------------- the sweep
@dataclass
class Sweep:
    """The rows of a sweep so far and what they are of (the JSON file's content)."""

    meta: dict
    rows: list[dict] = field(default_factory=list)
    complete: bool = False
    interrupted: bool = False

    def document(self) -> dict:
        return {**self.meta, "complete": self.complete, "interrupted": self.interrupted, "rows": self.rows}


def describe(variants: list[Variant], settings: Settings, file: str, command: list[str]) -> dict:
    """The metadata of a sweep: pattern, grid, device, shapes, versions, date, columns."""
    base = variants[0].checked
    grid = {name: list(dict.fromkeys(v.params[name] for v in variants)) for name in variants[0].params}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - platforms without Triton
        triton_version = None
    longest = max(settings.seqs)
    positions = "L" if settings.deviation_length(longest) == longest else f"min(L, {settings.deviation_length(longest)})"
    if settings.measured:
        device = torch.cuda.get_device_name(0)
        note = (
            f"measured on the GPU: times and speed-ups of the generated kernels ({settings.shape.dtype}); the deviation "
            f"of their output at {positions} positions"
        )
    else:
        device = "cpu"
        note = (
            "CPU: analytic columns only, no times (run with --device cuda on a GPU for those); the deviation is "
            f"computed in float64 by the reference at {positions} positions on the first query group"
        )
    shape = settings.shape
    return {
        "schema": SCHEMA,
        "pattern": base.name,
        "file": file,
        "grid": grid,
        "fixed_params": {k: v for k, v in dict(base.params).items() if k not in grid},
        "seq": list(settings.seqs),
        "device": device,
        "measured": settings.measured,
        "note": note,
        "shape": {"batch": shape.batch, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "dtype": shape.dtype},
        "inputs": settings.inputs_path or f"random normal q, k, v (seed {settings.seed})",
        "versions": {"sparsedsl": __version__, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["sparsedsl", *command]),
        "train": settings.train.describe() if settings.train is not None else None,
        # The train_* columns are there with --train only.
        "columns": COLUMNS if settings.train is not None else {k: v for k, v in COLUMNS.items() if k not in TRAIN_COLUMNS},
    }


def run_sweep(
    variants: list[Variant],
    settings: Settings,
    sweep: Sweep,
    on_row: Callable[[Sweep], None],
    progress: Callable[[str], None],
) -> Sweep:
    """Measure every (length, variant), shortest lengths first, calling ``on_row`` after
    each row and ``progress`` before it; with ``--train`` each length starts with the dense
    SDPA baseline row. Ctrl-C stops the sweep with the rows so far (``sweep.interrupted``);
    any other exception propagates, the rows so far saved."""
    cache: dict = {}
    try:
        for seq in settings.seqs:
            if settings.train is not None:
                progress(f"{DENSE_LABEL}, L={seq}")
                sweep.rows.append(dense_row(seq, settings))
                on_row(sweep)
            for variant in variants:
                progress(f"{variant.label}, L={seq}")
                sweep.rows.append(measure_row(variant, seq, settings, cache))
                on_row(sweep)
        sweep.complete = True
    except KeyboardInterrupt:
        sweep.interrupted = True
    return sweep


# ---------------------------------------------------------------- files
class ResultFiles:
    """``explore.json`` and ``explore.csv`` in a folder, rewritten whole after every row
    (through a temporary file and a rename: a crash never leaves half a file)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExploreError(f"-o {folder}: cannot create the folder ({exc.strerror})") from None

    @property
    def json_path(self) -> Path:
        return self.folder / "explore.json"

    @property
    def csv_path(self) -> Path:
        return self.folder / "explore.csv"

    def write(self, sweep: Sweep) -> None:
        from .explore_report import to_csv, to_json

        _replace(self.json_path, to_json(sweep.document()))
        _replace(self.csv_path, to_csv(sweep.rows))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

