"""Stage 5: the on-disk kernel cache. Reuse, two processes at once, damaged files."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsedsl import compile_source
from sparsedsl.runtime import cache as cache_module
from sparsedsl.runtime.cache import KernelCache, verified_source

ROOT = Path(__file__).resolve().parents[1]
TEXT = "pattern p() { return causal & sliding(11) }"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_generation_happens_once_and_is_reused(cache_dir, monkeypatch):
    kernels = KernelCache()
    pattern = compile_source(TEXT)
    first = kernels.kernels(pattern.ir)
    files = list(cache_dir.glob("kernels_*.py"))
    assert len(files) == 1 and verified_source(files[0]) is not None
    monkeypatch.setattr(cache_module, "render_module", lambda *a: pytest.fail("rendered twice"))
    assert kernels.kernels(pattern.ir) is first  # same process: the module
    assert KernelCache().kernels(pattern.ir).__file__ == first.__file__  # the file


def test_other_processes_reuse_the_file(cache_dir):
    pattern = compile_source(TEXT)
    KernelCache().kernels(pattern.ir)  # writes the file here
    script = textwrap.dedent(
        f"""
        import sparsedsl.runtime.cache as c
        def refuse(*a):
            raise SystemExit("rendered again")
        c.render_module = refuse
        import sparsedsl
        sparsedsl.compile_source({TEXT!r})
        print("reused")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert result.stdout.strip() == "reused", result.stderr


def test_two_processes_generating_at_once_both_succeed(cache_dir):
    script = f"import sparsedsl; sparsedsl.compile_source({TEXT!r}); print('ok')"
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    (file,) = cache_dir.glob("kernels_*.py")
    assert verified_source(file) is not None
    assert not list(cache_dir.glob(".*.tmp"))  # no temporary files left behind


def test_a_damaged_file_is_regenerated(cache_dir):
    pattern = compile_source(TEXT)
    KernelCache().kernels(pattern.ir)
    (file,) = cache_dir.glob("kernels_*.py")
    file.write_text(file.read_text()[:500])  # truncated, e.g. by a full disk
    with pytest.warns(UserWarning, match="regenerating the damaged kernel cache file"):
        module = KernelCache().kernels(pattern.ir)
    assert verified_source(file) is not None and hasattr(module, "BRANCHES")


def test_cache_key_follows_ir_templates_and_triton(monkeypatch):
    from sparsedsl.codegen import render

    a, b = compile_source(TEXT), compile_source(TEXT.replace("11", "12"))
    assert render.source_key(a.ir, "3.6") != render.source_key(b.ir, "3.6")
    assert render.source_key(a.ir, "3.6") != render.source_key(a.ir, "3.7")
    elsewhere = compile_source(TEXT, filename="other/place.attn")
    assert render.source_key(a.ir, "3.6") == render.source_key(elsewhere.ir, "3.6")
    key = render.source_key(a.ir, "3.6")
    monkeypatch.setattr(render, "TEMPLATE_VERSION", render.TEMPLATE_VERSION + 1)
    assert render.source_key(a.ir, "3.6") != key
