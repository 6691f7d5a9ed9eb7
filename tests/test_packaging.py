"""An installed wheel (not only an editable checkout) carries the grammar, the templates
and the shipped patterns, and works from anywhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("sparsedsl-*.whl")
    return path


def test_wheel_carries_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sparsedsl/_data/grammar/attn.lark" in names
    shipped = {p.name for p in (ROOT / "patterns").glob("*.attn")}
    assert {f"sparsedsl/_data/patterns/{n}" for n in shipped} <= names
    templates = {p.relative_to(ROOT / "codegen" / "templates").as_posix() for p in (ROOT / "codegen" / "templates").rglob("*") if p.is_file()}
    assert {f"sparsedsl/_data/templates/{t}" for t in templates} <= names
    assert not any(n.startswith(("tests/", "patterns/", "grammar/")) for n in names)


def test_installed_wheel_loads_patterns_from_its_own_data(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import sparsedsl, sparsedsl.frontend.resources as r\n"
        "from sparsedsl.patterns.nsa import nsa\n"
        "print(sparsedsl.__file__)\n"
        "print(r.data_dir('grammar'))\n"
        "print(nsa.name, sparsedsl.load('moba').params['topk'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    module_file, grammar, names = result.stdout.splitlines()
    assert module_file.startswith(str(target)) and grammar.startswith(str(target / "sparsedsl" / "_data"))
    assert names == "nsa 3"


def test_wheel_declares_every_dependency_it_imports(wheel):
    """torch warns "Failed to initialize NumPy" without NumPy, and Triton's interpreter
    needs it: a fresh environment with only the declared dependencies must have it."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    required = {line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split(";")[0].strip().lower()
                for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}  # fmt: skip
    assert {"torch", "triton", "lark", "jinja2", "sympy", "numpy"} <= required
