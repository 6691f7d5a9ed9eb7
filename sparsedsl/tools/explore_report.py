"""How ``sparsedsl explore`` shows its rows: JSON, CSV, a table, and progress while it runs.

On a terminal the table and the progress bar are drawn with ``rich`` (imported when used;
without it, or when the output is not a terminal, plain text does the same job).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import TextIO

# Table columns: (heading, row key, format); GPU-only columns last.
_ANALYTIC = [
    ("density", "density", "{:.2%}"),
    ("keys/query", "keys_per_query", "{:,.0f}"),
    ("fwd GFLOP", "fwd_gflop", "number"),
    ("decode KV", "decode_kv_bytes", "bytes"),
    ("deviation", "deviation", "{:.3f}"),
]
_MEASURED = [
    ("fwd ms", "fwd_ms", "{:.3f}"),
    ("bwd ms", "bwd_ms", "{:.3f}"),
    ("decode us", "decode_us", "{:.1f}"),
    ("fwd x", "speedup_fwd", "{:.2f}x"),
    ("bwd x", "speedup_bwd", "{:.2f}x"),
    ("decode x", "speedup_decode", "{:.2f}x"),
]

# With --train: the training columns (the heading of train_mean names the metric).
_TRAIN = [
    ("{metric}", "train_mean", "{:.3f}"),
    ("+-", "train_std", "{:.3f}"),
    ("solved", "train_solved", "{:.0%}"),
    ("step ms", "train_step_ms", "{:.1f}"),
]

# CSV: these first, then the swept parameters and per-branch densities, then the rest.
_CSV_FIRST = ["variant", "seq"]
_CSV_LAST = [
    "density", "keys_per_query", "exact", "fwd_gflop", "bwd_gflop", "dense_fwd_gflop", "dense_bwd_gflop",
    "decode_tokens", "decode_kv_bytes", "dense_decode_kv_bytes", "deviation", "deviation_seq",
    "fwd_ms", "bwd_ms", "decode_us", "dense_fwd_ms", "dense_bwd_ms", "dense_decode_us",
    "speedup_fwd", "speedup_bwd", "speedup_decode", "decode_note",
    "train_task", "train_metric", "train_mean", "train_std", "train_seeds", "train_solved",
    "train_step_ms", "train_peak_mb", "train_finals", "error",
]  # fmt: skip


def to_json(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


def csv_columns(rows: list[dict]) -> list[str]:
    """The CSV header: variant, seq, one column per parameter, one ``density_<branch>``
    per output branch, then the other columns present in the rows."""
    params = list(dict.fromkeys(name for row in rows for name in row["params"]))
    branches = list(dict.fromkeys(name for row in rows for name in row["branch_density"]))
    present = {key for row in rows for key in row}
    return _CSV_FIRST + params + [f"density_{b}" for b in branches] + [c for c in _CSV_LAST if c in present]


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV (empty cells for missing values)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = csv_columns(rows) if rows else _CSV_FIRST + _CSV_LAST
    writer.writerow(columns)
    for row in rows:
        flat = {**row, **row["params"], **{f"density_{b}": d for b, d in row["branch_density"].items()}}
        writer.writerow([_cell(flat.get(c)) for c in columns])
    return out.getvalue()


def _cell(value) -> str:
    """A CSV cell: empty for None, a list (train_finals) as its values separated by spaces."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return value


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _number(x: float) -> str:
    """Three significant digits, without an exponent for numbers of 100 and more."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table_cells(rows: list[dict], measured: bool) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted cells of the summary table."""
    columns = _ANALYTIC + (_MEASURED if measured else [])
    metric = next((row["train_metric"] for row in rows if row.get("train_metric")), None)
    if metric is not None:
        columns = columns + [(h.format(metric="val bpb" if metric == "val_bpb" else "train acc"), k, f) for h, k, f in _TRAIN]
    headings = ["variant", "L"] + [c[0] for c in columns]
    cells = []
    for row in rows:
        line = [row["variant"], f"{row['seq']:,}"]
        for _, key, fmt in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif fmt == "bytes":
                line.append(_bytes(value))
            elif fmt == "number":
                line.append(_number(value))
            else:
                line.append(fmt.format(value))
        if row.get("error"):
            line[-1] += " (error)"
        cells.append(line)
    return headings, cells


def plain_table(rows: list[dict], measured: bool) -> str:
    """The table as aligned text: the variant column left-aligned, numbers right-aligned."""
    headings, cells = table_cells(rows, measured)
    widths = [max(len(h), *(len(line[n]) for line in cells)) if cells else len(h) for n, h in enumerate(headings)]

    def line(values):
        return "  ".join(v.ljust(w) if n == 0 else v.rjust(w) for n, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headings), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def print_table(document: dict, stream: TextIO | None = None) -> None:
    """The summary: a rich table on a terminal, aligned text elsewhere; then the notes."""
    stream = stream or sys.stdout
    rows, measured = document["rows"], document["measured"]
    title = f"{document['pattern']} ({document['file']}) on {document['device']}"
    console = _rich_console(stream)
    if console is not None:
        from rich import box
        from rich.table import Table

        headings, cells = table_cells(rows, measured)
        table = Table(title=title, box=box.SIMPLE_HEAD)  # no vertical rules: room for the columns
        widest = max((len(line[0]) for line in cells), default=0)
        for n, heading in enumerate(headings):
            # Numbers never wrap; a variant label keeps its width and folds only if it must.
            table.add_column(heading, justify="left" if n == 0 else "right", no_wrap=n > 0, overflow="fold",
                             min_width=min(widest, 40) if n == 0 else None)  # fmt: skip
        for line in cells:
            table.add_row(*line)
        console.print(table)
    else:
        print(title, file=stream)
        print(plain_table(rows, measured), file=stream)
    for note in summary_notes(document):
        print(note, file=stream)


def summary_notes(document: dict) -> list[str]:
    """The lines under the table: what ran where, what is missing, errors."""
    notes = [document["note"] + "."]
    notes.append("density: keys read / dense causal pairs; decode KV: K and V bytes one decode step reads at the last position.")
    if any(row.get("exact") is False for row in document["rows"]):
        notes.append("some counts are bounds or estimates (column `exact` in the JSON/CSV).")
    for row in document["rows"]:
        if row.get("error"):
            notes.append(f"{row['variant']}, L={row['seq']}: {row['error']}")
        elif row.get("decode_note"):
            notes.append(f"{row['variant']}, L={row['seq']}: decode {row['decode_note']}")
    train = document.get("train")
    if train:
        notes.append(
            f"trained on {train['task']}: {train['seeds']} seed(s) x {train['steps']} steps, batch {train['batch']}, "
            f"{train['layers']} layers of width {train['hidden']}, {train['heads']} heads ({train['kv_heads']} K/V); "
            f"`{train['baseline']}` is the same model with dense SDPA attention; +- is the std over seeds."
        )
        notes += _unlearned_notes(document["rows"], train)
    if document["interrupted"]:
        notes.append(f"interrupted: {len(document['rows'])} rows kept.")
    return notes


# Below this mean accuracy, with no seed solved, the dense baseline has not learned a task.
UNLEARNED_ACCURACY = 0.5


def _unlearned_notes(rows: list[dict], train: dict) -> list[str]:
    """A warning per length at which the dense baseline did not learn the task: the
    training columns there rank noise, not variants."""
    notes = []
    for row in rows:
        mean = row.get("train_mean")
        if row["variant"] != train["baseline"] or row.get("train_metric") != "accuracy" or mean is None:
            continue
        if mean < UNLEARNED_ACCURACY and not row.get("train_solved"):
            notes.append(
                f"L={row['seq']:,}: `{train['baseline']}` ends at accuracy {mean:.3f} and solves no seed, so in "
                f"{train['steps']} steps the task is not learned at this length and the training columns cannot "
                "rank the variants; recall leaves its plateau only after 2,000-5,000 steps even at 128 tokens "
                "(docs/training.md): train longer (--steps) or shorter (--seq 128), with 8 or more --seeds."
            )
    return notes


def _rich_console(stream: TextIO):
    """A rich console for ``stream`` when it is a terminal and rich is installed."""
    if not stream.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream)


class Progress:
    """Progress over ``total`` rows on stderr: a rich bar on a terminal, else a line per
    row. Use as a context manager; ``start(label)`` before a row, ``advance()`` after."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self._bar = None
        console = _rich_console(self.stream)
        if console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=True,
            )  # fmt: skip

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)


def write_stdout(document: dict, fmt: str) -> None:
    """The rows on stdout: ``table``, ``json`` (the whole document) or ``csv``."""
    if fmt == "table":
        print_table(document)
    elif fmt == "json":
        sys.stdout.write(to_json(document))
    else:
        sys.stdout.write(to_csv(document["rows"]))
