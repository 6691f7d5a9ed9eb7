"""Every fenced code block of README.md and docs/*.md is run, so that the docs cannot rot.

A block's info string (the word after the opening fence) says what it is:

- ``python``: run. The python blocks of one file run in order, in one namespace, so a
  block may use what an earlier one defined.
- ``console``: every ``$ `` line is a command that must exit with status 0. Other lines
  (output) are not allowed: output goes in a ``text`` block.
- ``console fails``: every ``$ `` line must fail cleanly: a non-zero status, no traceback.
- ``attn``: ``.attn`` source, compiled (parsed, checked, lowered, kernels generated) with
  default parameters. ``attn error``: must raise ``PatternError``. ``file=NAME`` also
  writes the block to ``NAME`` in the working directory, at its place among the file's
  python and console blocks (a tutorial's file); ``from=PATH`` checks that the block is
  quoted from ``PATH`` (in the repository), its ``#`` comments aside.
- ``text``: not run: output, diagrams, formulas, GPU-only commands.

Any other info string, or none, fails the test naming the file and line, so a block
cannot be added unexecuted by accident.

Each docs file is one test. Its python and console blocks run in one fresh subprocess
(this file run as a script), in a temporary working directory that links the
repository's ``patterns/``, so paths such as ``patterns/nsa.attn`` work and outputs land
in the temporary directory. A ``$ sparsedsl ARGS`` line without shell syntax runs in that
subprocess as ``sparsedsl.cli.main(ARGS)`` (the entry point's own function; starting
torch once per command would cost seconds each); any other line runs in ``bash`` with a
``sparsedsl`` on ``PATH`` that is ``python -m sparsedsl``. The environment is the test
suite's (tests/conftest.py): kernels on Triton's interpreter, a private kernel cache.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
SHELL_SYNTAX = set("|&;<>()$`\\\"'*?[]{}~")


@dataclass
class Block:
    """One fenced block: its info string split into a kind, flags and ``key=value`` options."""

    line: int  # of the opening fence, 1-based
    kind: str
    flags: set[str] = field(default_factory=set)
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""


def fenced_blocks(markdown: str) -> list[Block]:
    """The fenced code blocks of a CommonMark text, in order."""
    blocks, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        i += 1
        if not opening:
            continue
        indent, fence, info = opening.groups()
        words = info.split()
        block = Block(line=i, kind=words[0] if words else "")
        for word in words[1:]:
            if "=" in word:
                key, value = word.split("=", 1)
                block.options[key] = value
            else:
                block.flags.add(word)
        body = []
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence (or the end of the text, which closes it too)
        block.text = "\n".join(body) + "\n"
        blocks.append(block)
    return blocks


ALLOWED = {"python": ({}, set()), "console": ({}, {"fails"}), "attn": ({"file", "from"}, {"error"}), "text": ({}, set())}


def problems_with_info(block: Block) -> str | None:
    """Why a block's info string is not one this test knows, or None."""
    if block.kind not in ALLOWED:
        known = ", ".join(f"```{kind}" for kind in ALLOWED)
        return f"code block with info string {block.kind or '(none)'!r}: use one of {known} (see tests/test_docs.py)"
    options, flags = ALLOWED[block.kind]
    unknown = sorted(set(block.options) - set(options)) + sorted(block.flags - flags)
    if unknown:
        return f"```{block.kind} block with unknown option(s) {', '.join(unknown)}"
    if block.kind == "console":
        stray = [line for line in block.text.splitlines() if line.strip() and not line.startswith("$ ")]
        if stray:
            return f"```console block with a line that is not a `$ ` command: {stray[0]!r} (put output in a ```text block)"
    return None


def check_attn(block: Block, where: str) -> None:
    """Compile an ``attn`` block; an ``attn error`` block must be refused."""
    from sparsedsl import PatternError
    from sparsedsl.compiler import compile_file

    name = block.options.get("file", where)
    if "error" in block.flags:
        try:
            compile_file(block.text, name)
        except PatternError:
            return
        raise AssertionError(f"{where}: this ```attn error block compiles without an error")
    try:
        patterns = compile_file(block.text, name)
    except PatternError as exc:
        raise AssertionError(f"{where}: this ```attn block does not compile:\n{exc}") from None
    assert patterns, f"{where}: this ```attn block defines no pattern"
    for pattern in patterns.values():
        pattern.kernels.load()  # generated on a first launch otherwise
    if "from" in block.options:
        source = REPO / block.options["from"]
        assert source.is_file(), f"{where}: from={block.options['from']}: no such file in the repository"
        assert _code(block.text) in _code(source.read_text()), f"{where}: the block differs from {block.options['from']}"


def _code(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip()


def docs_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def run_markdown(markdown: str, name: str, workdir: Path) -> subprocess.CompletedProcess | None:
    """Check every block of a markdown text named ``name`` (AssertionError on a bad info
    string or ``attn`` block), then run its python and console blocks in a subprocess in
    ``workdir``; None when there is nothing to run."""
    blocks = fenced_blocks(markdown)
    errors = [f"{name}:{b.line}: {message}" for b in blocks if (message := problems_with_info(b))]
    if errors:
        raise AssertionError("\n".join(errors))
    steps = []
    for block in blocks:
        where = f"{name}:{block.line}"
        if block.kind == "attn":
            check_attn(block, where)
            if "file" in block.options:
                steps.append({"kind": "file", "where": where, "name": block.options["file"], "text": block.text})
        elif block.kind == "python":
            steps.append({"kind": "python", "where": where, "text": block.text})
        elif block.kind == "console":
            commands = [line[2:] for line in block.text.splitlines() if line.startswith("$ ")]
            steps.append({"kind": "console", "where": where, "commands": commands, "fails": "fails" in block.flags})
    if not any(step["kind"] in ("python", "console") for step in steps):
        return None
    (workdir / "patterns").symlink_to(REPO / "patterns")
    plan = workdir / ".docs-steps.json"
    plan.write_text(json.dumps(steps))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, __file__, str(plan)],
        cwd=workdir,
        env={**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("doc", DOCS, ids=docs_id)
def test_docs_code_blocks_run(doc: Path, tmp_path: Path) -> None:
    name = docs_id(doc)
    done = run_markdown(doc.read_text(encoding="utf-8"), name, tmp_path)
    assert done is None or done.returncode == 0, f"{name}: a code block failed; the run's output:\n{done.stdout[-12000:]}"


# ------------------------------------------------------------------ the checker's own tests
def test_blocks_without_a_known_info_string_are_refused():
    markdown = "a\n```\nx\n```\n```bash\nls\n```\n```console\n$ true\noutput\n```\n```attn from=x spam\n```\n"
    with pytest.raises(AssertionError) as failure:
        run_markdown(markdown, "x.md", Path("/nonexistent"))
    lines = failure.value.args[0].splitlines()
    assert [line.split(": ")[0] for line in lines[:4]] == ["x.md:2", "x.md:5", "x.md:8", "x.md:12"]
    assert "'(none)'" in lines[0] and "'bash'" in lines[1] and "'output'" in lines[2] and "spam" in lines[3]


def test_fences_nest_by_length():
    blocks = fenced_blocks("````text\n```python\nnot run\n```\n````\n  ```attn error file=a.attn\n  pattern\n  ```\n")
    assert [(b.line, b.kind, b.flags, b.options) for b in blocks] == [
        (1, "text", set(), {}),
        (6, "attn", {"error"}, {"file": "a.attn"}),
    ]
    assert blocks[0].text == "```python\nnot run\n```\n" and blocks[1].text == "pattern\n"


@pytest.mark.parametrize(
    "markdown, message",
    [
        ("```attn\npattern p() { return casual }\n```\n", "does not compile"),
        ("```attn error\npattern p() { return causal }\n```\n", "compiles without an error"),
        ("```attn from=patterns/causal.attn\npattern causal() { return full }\n```\n", "differs from patterns/causal.attn"),
    ],
)
def test_attn_blocks_are_compiled(markdown, message, tmp_path):
    with pytest.raises(AssertionError, match=message):
        run_markdown(markdown, "x.md", tmp_path)


def test_shell_lines_find_the_sparsedsl_command(tmp_path):
    """A line with shell syntax runs in bash, where `sparsedsl` is `python -m sparsedsl`."""
    done = run_markdown("```console\n$ sparsedsl check patterns/*.attn | grep -c ': ok'\n```\n", "x.md", tmp_path)
    assert done.returncode == 0 and f"\n{len(list((REPO / 'patterns').glob('*.attn')))}\n" in done.stdout, done.stdout


@pytest.mark.parametrize(
    "block",
    [
        "```python\nx = 1\n```\n\n```python\nassert x == 2, 'wrong'\n```\n",
        "```console\n$ true\n$ false\n```\n",
        "```console fails\n$ false\n$ true\n```\n",
        "```console fails\n$ python3 -c 'raise SystemExit(\"Traceback (most recent call last):\")'\n```\n",
    ],
    ids=["python", "console", "console-fails", "console-crash"],
)
def test_a_failing_example_fails(block, tmp_path):
    done = run_markdown(block, "x.md", tmp_path)
    assert done.returncode != 0 and "x.md:" in done.stdout


# ------------------------------------------------------------------ the subprocess
def run_steps(plan: Path) -> int:
    """Run the python and console blocks of one docs file, in order, in this process."""
    import linecache
    import traceback

    workdir = Path.cwd()
    sys.path[0] = str(workdir)  # `import mypatterns.variants` finds files the docs wrote here
    shim = workdir / ".bin" / "sparsedsl"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sparsedsl "$@"\n')
    shim.chmod(0o755)
    shell_env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    namespace = {"__name__": "__main__"}
    started = time.perf_counter()
    for step in json.loads(plan.read_text()):
        where = step["where"]
        print(f"=== {where}: {step['kind']} (at {time.perf_counter() - started:.1f} s)", flush=True)
        if step["kind"] == "file":
            target = workdir / step["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(step["text"])
        elif step["kind"] == "python":
            filename = f"<{where}>"
            linecache.cache[filename] = (len(step["text"]), None, step["text"].splitlines(True), filename)
            try:
                exec(compile(step["text"], filename, "exec"), namespace)  # noqa: S102 - the docs' own examples
            except BaseException:  # noqa: BLE001 - report any failure of a block, SystemExit included
                traceback.print_exc()
                print(f"{where}: this python block raised", file=sys.stderr)
                return 1
        else:
            for command in step["commands"]:
                print(f"$ {command}", flush=True)
                status, crashed = run_command(command, shell_env)
                sys.stdout.flush()
                sys.stderr.flush()
                if crashed or (status != 0) != step["fails"]:
                    expected = "fail cleanly" if step["fails"] else "succeed"
                    print(f"{where}: `{command}` exited with {status}{' (a crash)' if crashed else ''}; it should {expected}", file=sys.stderr)
                    return 1
    print(f"=== done in {time.perf_counter() - started:.1f} s")
    return 0


def run_command(command: str, env: dict) -> tuple[int, bool]:
    """The exit status of one console line, and whether it crashed (a traceback)."""
    words = shlex.split(command, comments=True)
    if words and words[0] == "sparsedsl" and not SHELL_SYNTAX & set(command.split("#")[0]):
        from sparsedsl.cli import main

        try:
            return main(words[1:]), False
        except SystemExit as exc:  # argparse's errors
            return (exc.code if isinstance(exc.code, int) else int(exc.code is not None)), False
        except Exception:  # noqa: BLE001 - a crash fails even a `console fails` block
            import traceback

            traceback.print_exc()
            return 1, True
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode, "Traceback (most recent call last)" in done.stderr


if __name__ == "__main__":
    sys.exit(run_steps(Path(sys.argv[1])))
