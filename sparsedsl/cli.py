"""The ``sparsedsl`` command: check, show, mask, compile, demo, explore."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .compiler import compile_definition, read_source
from .errors import InputError, PatternError
from .frontend.model import branch_text
from .frontend.parse import parse_source
from .pattern import Pattern, patterns_of
from .tools.settings import parse_value, split_setting

# `mask` and `demo` materialise every branch's (seq x seq) mask: about 35 bytes per pair
# (9 GB at this length), and the CPU demo runs dense attention as well.
MAX_MASK_SEQ = 16384


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except PatternError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except InputError as exc:  # a bad option value, or an output that cannot be written
        print(f"sparsedsl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedsl", description="A compiler for sparse attention patterns.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="check .attn files and report errors like a compiler")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=_check)

    show = commands.add_parser("show", help="print a file's patterns (and their block IR)")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--ir", action="store_true", help="also print the block IR")
    _pattern_options(show)
    show.set_defaults(run=_show)

    mask = commands.add_parser("mask", help="the masks of a pattern: density table and picture")
    mask.add_argument("file", metavar="FILE")
    mask.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    mask.add_argument("--block", type=int, default=64, help="block size for the full/partial picture (default 64)")
    mask.add_argument("--docs", type=int, default=4, help="example documents for `document` masks (default 4)")
    mask.add_argument("-o", "--output", metavar="PNG", help="write a picture of each branch's mask")
    _pattern_options(mask)
    mask.set_defaults(run=_mask)

    compile_ = commands.add_parser("compile", help="write the generated Triton kernels of a file's patterns")
    compile_.add_argument("file", metavar="FILE")
    compile_.add_argument("-o", "--output", metavar="DIR", required=True, help="folder for <pattern>.py files")
    _pattern_options(compile_)
    compile_.set_defaults(run=_compile)

    demo = commands.add_parser("demo", help="load patterns/nsa.attn, show it and run it on random inputs")
    demo.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if available)")
    demo.set_defaults(run=_demo)

    _add_explore(commands)
    return parser


def _add_explore(commands) -> None:
    explore = commands.add_parser(
        "explore",
        help="sweep a grid of parameter values: density, FLOPs, decode bytes, deviation (and times on a GPU)",
        description="Every combination of the --set values, at every --seq length: density versus dense causal "
        "attention, attention FLOPs, K/V bytes per decode step, deviation from dense attention and, on a GPU, "
        "forward, backward and decode times with the speed-up over dense SDPA.",
    )
    explore.add_argument("file", metavar="FILE")
    explore.add_argument("--pattern", metavar="NAME", help="the pattern to use when the file defines several")
    explore.add_argument(
        "--set", action="append", default=[], metavar="NAME=V1,V2",
        help="a parameter and its values (repeatable; the grid is every combination)",
    )  # fmt: skip
    explore.add_argument("--seq", default="4096,8192,16384,32768", metavar="L1,L2", help="sequence lengths (default 4096,8192,16384,32768)")
    explore.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if available)")
    explore.add_argument("--format", choices=("table", "json", "csv"), default="table", help="what to print (default table)")
    explore.add_argument("-o", "--output", metavar="DIR", help="write explore.json, explore.csv and PNG plots here")
    explore.add_argument("--inputs", metavar="FILE", help="q, k, v (and gates) saved with torch.save, instead of random ones")
    explore.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    explore.add_argument("--heads", type=int, default=None, help="query heads (default 64)")
    explore.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 4)")
    explore.add_argument("--head-dim", type=int, default=None, help="head dimension (default 128)")
    explore.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="GPU dtype, and bytes per element (default bfloat16)")
    explore.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    explore.add_argument(
        "--deviation-seq", type=int, default=None, metavar="N",
        help=f"compute the deviation at no more than N positions (default: all on a GPU, {_cpu_deviation_seq()} on the CPU)",
    )  # fmt: skip
    explore.add_argument("--budget-ms", type=float, default=200.0, help="GPU time per timing (default 200 ms)")
    explore.add_argument(
        "--train", choices=("recall", "needle", "lm"), default=None,
        help="also train a small model with each variant as its attention on this task (and a dense SDPA baseline "
        "per length): the train_* columns",
    )  # fmt: skip
    explore.add_argument("--seeds", type=int, default=None, metavar="N", help="--train: seeds per row (default 2)")
    explore.add_argument(
        "--steps", type=int, default=None, metavar="N",
        help="--train: training steps per seed (default 1000 on a GPU, 8 on the CPU: a smoke test)",
    )  # fmt: skip
    explore.set_defaults(run=_explore)


def _cpu_deviation_seq() -> int:
    from .tools.explore import CPU_DEVIATION_SEQ

    return CPU_DEVIATION_SEQ


def _pattern_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", metavar="NAME", help="the pattern to use when the file defines several")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter (repeatable)"
    )


def _check(args) -> int:
    failed = 0
    for path in args.files:
        try:
            module = parse_source(read_source(path), path)
            names = [compile_definition(d, module.source).name for d in patterns_of(module)]
        except PatternError as exc:
            print(exc.render(), file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({', '.join(names) or 'no patterns'})")
    return 1 if failed else 0


def _selected_patterns(args) -> list[Pattern]:
    module = parse_source(read_source(args.file), args.file)
    definitions = patterns_of(module)
    if args.pattern is not None:
        definitions = [d for d in definitions if d.name == args.pattern]
        if not definitions:
            raise _no_pattern(module, args.pattern)
    patterns = []
    for definition in definitions:
        try:
            overrides = _overrides(args.set, definition, args.file) if args.set else {}
        except PatternError as exc:  # a --set error is about this file's pattern: name the file
            raise PatternError(exc.message, source=module.source, hint=exc.hint) from None
        patterns.append(compile_definition(definition, module.source, overrides))
    return patterns


def _no_pattern(module, name: str) -> PatternError:
    from .errors import did_you_mean

    names = [d.name for d in module.patterns]
    return PatternError(
        f"{module.source.name} has no pattern `{name}`",
        source=module.source,
        hint=did_you_mean(name, names) or f"it defines: {', '.join(names) or 'none'}",
    )


def _overrides(settings: list[str], definition, file: str) -> dict:
    """``NAME=VALUE`` strings, each value read as the parameter's declared type."""
    types = {p.name: p.type_name for p in definition.params}
    overrides = {}
    for setting in settings:
        name, text = split_setting(setting)
        if name not in types:
            # The checker reports unknown names with a hint; give it the raw text.
            overrides[name] = text
            continue
        overrides[name] = parse_value(text, types[name], name)
    return overrides


def _show(args) -> int:
    for pattern in _selected_patterns(args):
        checked = pattern.checked
        print(f"{checked.source_name}:{checked.line}: pattern {pattern.name}")
        params = ", ".join(f"{k}={v}" for k, v in checked.params) or "none"
        print(f"  parameters: {params}")
        print("  source:")
        for line in pattern.source_text().splitlines():
            print(f"    {line}")
        print(f"  branches{' (mixed by gate)' if checked.gated else ''}:")
        for branch in checked.branches:
            print(f"    {branch.name}: {branch_text(branch)}")
        if args.ir:
            print("  block IR:")
            for line in pattern.ir_text.splitlines():
                print(f"  {line}")
        print()
    return 0


def _mask(args) -> int:
    from .tools.mask_stats import branch_masks, density_rows, format_density_table

    if args.seq < 1 or args.block < 1 or args.docs < 1:
        print("sparsedsl mask: --seq, --block and --docs must be positive", file=sys.stderr)
        return 2
    _check_mask_seq(args.seq)
    patterns = _selected_patterns(args)
    outputs = {}
    if args.output:  # every picture's place is checked before any work is done
        outputs = {p.name: _picture_path(args.output, p.name if len(patterns) > 1 else None) for p in patterns}
    for pattern in patterns:
        print(f"pattern {pattern.name}")
        print(format_density_table(density_rows(pattern, args.seq, args.block, args.docs), args.seq, args.block))
        if args.output:
            from .tools.mask_plot import draw_masks

            out = outputs[pattern.name]
            masks = branch_masks(pattern, args.seq, args.block, args.docs)
            try:
                draw_masks(masks, out, f"{pattern.name}, sequence {args.seq}", args.block)
            except OSError as exc:
                raise InputError(f"-o {args.output}: cannot write {out} ({exc.strerror or exc})") from None
            print(f"wrote {out}")
        print()
    return 0


def _check_mask_seq(seq: int) -> None:
    if seq > MAX_MASK_SEQ:
        raise InputError(
            f"--seq {seq}: at most {MAX_MASK_SEQ} (every branch's seq x seq mask is built in memory); "
            "for longer sequences use `sparsedsl explore`, whose columns are computed from the block IR"
        )


def _picture_path(output: str, pattern: str | None) -> Path:
    """Where ``mask -o`` writes: a PNG file (``.png`` added to a name without a suffix),
    one per pattern when the file has several, in a folder that exists."""
    out = Path(output)
    if out.is_dir():
        raise InputError(f"-o {output} is a folder; give a file name, such as {out / 'mask.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")  # what matplotlib would write: say so
    if pattern is not None:
        out = out.with_name(f"{out.stem}_{pattern}{out.suffix}")
    if not out.parent.is_dir():
        raise InputError(f"-o {output}: the folder {out.parent} does not exist; create it first")
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"-o {output}: pictures are .png (or .svg, .pdf) files, not {out.suffix}")
    return out


def _compile(args) -> int:
    import triton

    from .codegen.render import render_module, source_key

    patterns = _selected_patterns(args)
    out = _output_folder(args.output)
    for pattern in patterns:
        path = out / f"{pattern.name}.py"
        text = render_module(pattern.ir, source_key(pattern.ir, triton.__version__))
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise InputError(f"-o {args.output}: cannot write {path} ({exc.strerror or exc})") from None
        print(f"wrote {path}")
    return 0


def _output_folder(output: str) -> Path:
    """``compile -o``'s folder, created if missing; a file in its place is an error."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {output} is a file, not a folder; give a folder for the <pattern>.py files")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"-o {output}: cannot create the folder ({exc.strerror or exc})") from None
    return out


def _demo(args) -> int:
    from .tools.demo import run_demo

    if args.seq < 1:
        raise InputError(f"--seq {args.seq}: the sequence length must be positive")
    _check_mask_seq(args.seq)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available here; use --device cpu")
    return run_demo(seq=args.seq, device=args.device)



def _explore(args) -> int:
    from .tools.explore import ExploreError
    from .tools.measure import InputsFileError

    try:
        return _run_explore(args)
    except (ExploreError, InputsFileError) as exc:
        print(f"sparsedsl explore: error: {exc}", file=sys.stderr)
        return 2


def _run_explore(args) -> int:
    from .tools import explore as E
    from .tools.explore_report import Progress, write_stdout
    from .tools.measure import load_inputs

    seqs = E.parse_lengths(args.seq)
    for option, value in (("--batch", args.batch), ("--heads", args.heads), ("--kv-heads", args.kv_heads),
                          ("--head-dim", args.head_dim), ("--deviation-seq", args.deviation_seq),
                          ("--seeds", args.seeds), ("--steps", args.steps)):  # fmt: skip
        if value is not None and value < 1:
            raise E.ExploreError(f"{option} {value}: must be a positive integer")
    if not args.budget_ms > 0:
        raise E.ExploreError(f"--budget-ms {args.budget_ms}: must be positive")
    if args.train is None:
        for option, value in (("--seeds", args.seeds), ("--steps", args.steps)):
            if value is not None:
                raise E.ExploreError(f"{option} {value}: only with --train recall|needle|lm")
    device = E.resolve_device(args.device)
    train = E.TrainSettings.defaults(args.train, device, args.seeds, args.steps) if args.train else None
    module = parse_source(read_source(args.file), args.file)
    definition = _one_definition(module, args.pattern, args.file)
    variants = E.expand_grid(definition, module.source, args.set)
    inputs = load_inputs(args.inputs) if args.inputs else None
    settings = E.Settings(
        seqs=seqs, device=device, shape=_shape(args, inputs), seed=args.seed, inputs=inputs,
        inputs_path=args.inputs, deviation_seq=args.deviation_seq, budget_ms=args.budget_ms, train=train,
    )  # fmt: skip
    if inputs is not None:
        E.check_inputs(inputs, settings)
    else:
        _check_input_memory(settings)
    E.check_training(variants, settings)
    total = (len(variants) + (train is not None)) * len(seqs)
    files = E.ResultFiles(args.output) if args.output else None
    sweep = E.Sweep(E.describe(variants, settings, args.file, args.argv))

    with Progress(total) as progress:

        def on_row(current):
            if files is not None:
                files.write(current)
            progress.advance()

        try:
            E.run_sweep(variants, settings, sweep, on_row, progress.start)
        finally:  # a crash keeps the rows so far, marked incomplete
            if files is not None:
                files.write(sweep)
    document = sweep.document()
    write_stdout(document, args.format)
    if files is not None:
        written = [files.json_path, files.csv_path]
        if sweep.rows:
            from .tools.explore_plot import draw_plots

            written += draw_plots(document, files.folder)
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if sweep.interrupted:
        print(f"sparsedsl explore: interrupted; kept {len(sweep.rows)} of {total} rows", file=sys.stderr)
        return 130
    return 0


def _check_input_memory(settings) -> None:
    """Refuse, before the sweep, random inputs larger than the machine's memory (they are
    made at the longest length the sweep runs; float64 on the CPU, for the deviation)."""
    import torch

    from .tools.explore import ExploreError
    from .tools.measure import DTYPES

    shape = settings.shape
    seq = max(settings.seqs) if settings.measured else max(settings.deviation_length(s) for s in settings.seqs)
    element = DTYPES[shape.dtype].itemsize if settings.measured else 8
    needed = shape.batch * (shape.heads + 2 * shape.kv_heads) * seq * shape.head_dim * element
    if settings.measured:
        available, where = torch.cuda.get_device_properties(0).total_memory, "the GPU's"
    else:
        available, where = _physical_memory(), "this machine's"
    if available is not None and needed > available:
        raise ExploreError(
            f"--batch {shape.batch} --heads {shape.heads} --kv-heads {shape.kv_heads} --head-dim {shape.head_dim}: "
            f"q, k and v at {seq} positions take {_size_text(needed)}, more than {where} {_size_text(available)} "
            "of memory; use fewer or smaller heads" + ("" if settings.measured else ", or a shorter --deviation-seq")
        )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return None


def _size_text(n: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    size, unit = float(n), 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{n} bytes" if unit == 0 else f"{size:.1f} {units[unit]}"


def _one_definition(module, name: str | None, file: str):
    """The pattern of ``file`` that ``--pattern`` names, or its only one."""
    definitions = patterns_of(module)
    if name is not None:
        definitions = [d for d in definitions if d.name == name]
        if not definitions:
            raise _no_pattern(module, name)
    if len(definitions) != 1:
        names = ", ".join(d.name for d in patterns_of(module)) or "none"
        raise PatternError(
            f"{file} defines {'several patterns' if definitions else 'no pattern'} ({names}); pick one with --pattern NAME",
            source=module.source,
        )
    return definitions[0]


def _shape(args, inputs):
    """The attention shape: from the --inputs tensors when given (the options must agree),
    else from the options and their defaults."""
    from .tools.costs import Shape
    from .tools.explore import ExploreError

    given = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    if inputs is not None:
        B, Hq, _, D = inputs.q.shape
        found = {"batch": B, "heads": Hq, "kv_heads": inputs.k.shape[1], "head_dim": D}
        for name, value in given.items():
            if value is not None and value != found[name]:
                option = "--" + name.replace("_", "-")
                raise ExploreError(f"{option} {value} disagrees with --inputs {args.inputs}, whose tensors have {name} {found[name]}")
        return Shape(**found, dtype=args.dtype)
    defaults = Shape()
    values = {name: getattr(defaults, name) if value is None else value for name, value in given.items()}
    if values["heads"] % values["kv_heads"]:
        raise ExploreError(f"--heads {values['heads']} is not a multiple of --kv-heads {values['kv_heads']} (grouped-query attention)")
    return Shape(**values, dtype=args.dtype)
