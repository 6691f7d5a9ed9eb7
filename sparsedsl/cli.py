"""The ``sparsedsl`` command: check, show, mask, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PatternError
from .frontend.model import branch_text
from .frontend.parse import parse_source
from .frontend.primitives import ENUMS
from .pattern import Pattern, patterns_of


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PatternError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
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
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.set_defaults(run=_demo)
    return parser


def _pattern_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", metavar="NAME", help="the pattern to use when the file defines several")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a parameter (repeatable)"
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PatternError(f"cannot read {path}: {exc.strerror}") from None


def _check(args) -> int:
    failed = 0
    for path in args.files:
        try:
            module = parse_source(_read(path), path)
            names = [Pattern(d, module.source).name for d in patterns_of(module)]
        except PatternError as exc:
            print(exc.render(), file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({', '.join(names) or 'no patterns'})")
    return 1 if failed else 0


def _selected_patterns(args) -> list[Pattern]:
    module = parse_source(_read(args.file), args.file)
    definitions = patterns_of(module)
    if args.pattern is not None:
        definitions = [d for d in definitions if d.name == args.pattern]
        if not definitions:
            raise PatternError(f"{args.file} has no pattern `{args.pattern}`")
    patterns = []
    for definition in definitions:
        overrides = _overrides(args.set, definition, args.file) if args.set else {}
        patterns.append(Pattern(definition, module.source, overrides))
    return patterns


def _overrides(settings: list[str], definition, file: str) -> dict:
    """``NAME=VALUE`` strings, each value read as the parameter's declared type."""
    types = {p.name: p.type_name for p in definition.params}
    overrides = {}
    for setting in settings:
        name, sep, text = setting.partition("=")
        if not sep:
            raise PatternError(f"--set expects NAME=VALUE, got `{setting}`")
        if name not in types:
            # The checker reports unknown names with a hint; give it the raw text.
            overrides[name] = text
            continue
        overrides[name] = _parse_value(text, types[name], name)
    return overrides


def _parse_value(text: str, type_name: str, name: str):
    try:
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError:
        raise PatternError(f"--set {name}={text}: `{name}` is {'an' if type_name == 'int' else 'a'} {type_name}") from None
    if type_name == "bool":
        if text not in ("true", "false"):
            raise PatternError(f"--set {name}={text}: `{name}` is a bool: true or false")
        return text == "true"
    if text not in ENUMS.get(type_name, ()):
        raise PatternError(f"--set {name}={text}: `{name}` is one of {', '.join(ENUMS[type_name])}")
    return text


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
    from .maskstats import branch_masks, density_rows, format_density_table

    if args.seq < 1 or args.block < 1 or args.docs < 1:
        print("sparsedsl mask: --seq, --block and --docs must be positive", file=sys.stderr)
        return 2
    patterns = _selected_patterns(args)
    for pattern in patterns:
        print(f"pattern {pattern.name}")
        print(format_density_table(density_rows(pattern, args.seq, args.block, args.docs), args.seq, args.block))
        if args.output:
            from .maskplot import draw_masks

            out = Path(args.output)
            if len(patterns) > 1:
                out = out.with_name(f"{out.stem}_{pattern.name}{out.suffix}")
            masks = branch_masks(pattern, args.seq, args.block, args.docs)
            draw_masks(masks, out, f"{pattern.name}, sequence {args.seq}", args.block)
            print(f"wrote {out}")
        print()
    return 0


def _compile(args) -> int:
    import triton

    from .codegen.render import render_module, source_key

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _selected_patterns(args):
        path = out / f"{pattern.name}.py"
        path.write_text(render_module(pattern.ir, source_key(pattern.ir, triton.__version__)))
        print(f"wrote {path}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(seq=args.seq, device=args.device)

