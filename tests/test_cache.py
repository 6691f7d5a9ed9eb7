"""Stage 5: the on-disk kernel cache. Reuse, two processes at once, damaged files, keys
that follow the generator, and caches that cannot be written (which never block work)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from sparsedsl import compile_source
from sparsedsl.runtime import cache as cache_module
from sparsedsl.runtime.cache import CacheWarning, KernelCache, verified_source
from sparsedsl.runtime.dispatch import SlowPathWarning

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
        sparsedsl.compile_source({TEXT!r}).kernels.load()
        print("reused")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert result.stdout.strip() == "reused", result.stderr


def test_two_processes_generating_at_once_both_succeed(cache_dir):
    script = f"import sparsedsl; sparsedsl.compile_source({TEXT!r}).kernels.load(); print('ok')"
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
    with pytest.warns(CacheWarning, match=r"kernel cache file .* is damaged \(truncated or edited: its checksum does not match\); regenerating it"):
        module = KernelCache().kernels(pattern.ir)
    assert verified_source(file) is not None and hasattr(module, "BRANCHES")


def test_cache_key_follows_ir_generator_and_triton():
    from sparsedsl.codegen import render

    a, b = compile_source(TEXT), compile_source(TEXT.replace("11", "12"))
    assert render.source_key(a.ir, "3.6") != render.source_key(b.ir, "3.6")
    assert render.source_key(a.ir, "3.6") != render.source_key(a.ir, "3.7")
    elsewhere = compile_source(TEXT, filename="other/place.attn")
    assert render.source_key(a.ir, "3.6") == render.source_key(elsewhere.ir, "3.6")
    assert render.source_key(a.ir, "3.6") == render.source_key(a.ir, "3.6", render.generator_digest())
    assert render.source_key(a.ir, "3.6") != render.source_key(a.ir, "3.6", "another generator")


def test_the_generator_digest_covers_templates_renderer_and_ir_printing(tmp_path):
    """An edit to any file that shapes the generated source changes the key: there is no
    version number to forget to bump."""
    from sparsedsl.codegen import render

    files = render.generator_files()
    names = {f"{f.parent.name}/{f.name}" for f in files}
    assert {"templates/attention.py.j2", "templates/static.j2", "codegen/render.py", "codegen/plan.py", "ir/expressions.py"} <= names
    copies = []
    for index, path in enumerate(files):
        copy = tmp_path / str(index) / path.parent.name / path.name
        copy.parent.mkdir(parents=True)
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    digest = render.files_digest(copies)
    assert digest == render.generator_digest()
    for name in ("static.j2", "plan.py"):
        copy = next(c for c in copies if c.name == name)
        original = copy.read_bytes()
        copy.write_bytes(original + b"\n# an edit\n")
        assert render.files_digest(copies) != digest, name
        copy.write_bytes(original)


# ---------------------------------------------------------------- only launches touch the cache
def test_nothing_but_a_kernel_launch_touches_the_cache(tmp_path, monkeypatch, capsys):
    from sparsedsl.cli import main

    folder = tmp_path / "cache"
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(folder))
    attn = tmp_path / "lazy_mod.attn"
    attn.write_text("pattern lazy_mod() { return causal & sliding(19) }")
    monkeypatch.syspath_prepend(str(tmp_path))
    import lazy_mod  # an .attn import

    pattern = compile_source("pattern p() { return causal & sliding(21) }")
    pattern.dense_mask(16)
    assert pattern.ir_text and lazy_mod.lazy_mod.ir_text
    for command in (["check", str(attn)], ["show", str(attn), "--ir"], ["mask", str(attn), "--seq", "32"]):
        assert main(command) == 0
    q = torch.randn(1, 2, 16, 16)
    pattern.reference(q, q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU reference path
    with pytest.warns(SlowPathWarning):
        pattern(q, q, q)
    assert not folder.exists()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a launch: now the kernels are generated
    pattern(q, q, q)
    assert len(list(folder.glob("kernels_*.py"))) == 1


def unwritable_cache(kind: str, tmp_path: Path, read_only: Path | None) -> Path:
    if kind == "read-only folder":
        return read_only
    if kind == "a file in the folder's place":
        (tmp_path / "plain").write_text("")
        return tmp_path / "plain"
    if kind == "under a file":
        (tmp_path / "plain").write_text("")
        return tmp_path / "plain" / "cache"
    if not Path("/proc/self").exists():
        pytest.skip("no procfs here")
    return Path("/proc/sparsedsl-cache")  # no one can create files there, root included


@pytest.mark.parametrize("kind", ["read-only folder", "a file in the folder's place", "under a file", "/proc"])
def test_an_unwritable_cache_never_blocks_work(kind, tmp_path, monkeypatch, capsys, request):
    from sparsedsl.cli import main

    read_only = request.getfixturevalue("read_only_dir") if kind == "read-only folder" else None
    folder = unwritable_cache(kind, tmp_path, read_only)
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(folder))
    monkeypatch.setattr(cache_module, "_fallback", cache_module._Fallback())  # warnings as in a new process
    attn = tmp_path / "ro_mod.attn"
    attn.write_text("pattern ro_mod() { return causal & sliding(23) }")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # nothing below may even warn
        for command in (["check", str(attn)], ["show", str(attn), "--ir"], ["mask", str(attn), "--seq", "32"]):
            assert main(command) == 0, command
        monkeypatch.syspath_prepend(str(tmp_path))
        import ro_mod  # noqa: F401

        q = torch.randn(1, 2, 16, 16)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        first = compile_source(f"pattern p() {{ return causal & sliding({len(kind) + 30}) }}")
        first.reference(q, q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    second = compile_source(f"pattern p() {{ return causal & sliding({len(kind) + 60}) }}")
    with pytest.warns(CacheWarning) as caught:
        out = first(q, q, q)  # kernels compiled from a temporary folder
        second(q, q, q)
    assert len(caught) == 1  # once, for both patterns
    assert f"cannot write the kernel cache in {folder} (" in str(caught[0].message)
    assert "Set SPARSEDSL_CACHE_DIR to a writable folder" in str(caught[0].message)
    torch.testing.assert_close(out, first.reference(q, q, q, dtype=torch.float32).out, rtol=1e-4, atol=1e-5)


def test_a_file_in_place_of_the_cache_folder_is_named(tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("")
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path / "plain" / "cache"))
    monkeypatch.setattr(cache_module, "_fallback", cache_module._Fallback())
    with pytest.warns(CacheWarning, match=rf"\({tmp_path / 'plain'} is a file, not a folder\)"):
        KernelCache().kernels(compile_source("pattern p() { return causal & sliding(25) }").ir)


def test_a_kernel_file_replaced_by_a_folder_falls_back(cache_dir, monkeypatch):
    pattern = compile_source("pattern p() { return causal & sliding(27) }")
    monkeypatch.setattr(cache_module, "_fallback", cache_module._Fallback())
    path = cache_dir / f"kernels_{pattern.source_key}.py"
    path.mkdir()
    with pytest.warns(CacheWarning, match=rf"\({path} is a folder, not a file\)"):
        module = KernelCache().kernels(pattern.ir)
    assert hasattr(module, "BRANCHES") and Path(module.__file__).parent != cache_dir


def test_an_unreadable_file_is_not_called_damaged(cache_dir, monkeypatch):
    pattern = compile_source("pattern p() { return causal & sliding(29) }")
    KernelCache().kernels(pattern.ir)
    (path,) = [p for p in cache_dir.glob("kernels_*.py") if pattern.source_key in p.name]
    real = Path.read_bytes

    def read_bytes(self):  # what mode 000 does to anyone but root
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert cache_module.read_cached(path) == (None, "cannot be read (Permission denied)")
    with pytest.warns(CacheWarning, match=rf"the kernel cache file {path} cannot be read \(Permission denied\); regenerating it"):
        KernelCache().kernels(pattern.ir)


@pytest.mark.parametrize("text", ["[1, 2]", '{"k": {"block_m": "x"}}', '{"k": 3}', "{not json", '{"k": {"block_m": 64}}'])
def test_a_damaged_tuning_file_is_ignored(text, cache_dir):
    from sparsedsl.runtime.tuning import TileConfig, Tuner

    good = {"block_m": 64, "block_n": 32, "heads": 1, "num_warps": 4, "num_stages": 2}
    (cache_dir / "tuning.json").write_text(text[:-1] + f', "ok": {json.dumps(good)}}}' if text.startswith('{"') else text)
    tuner = Tuner()
    tuner._load()  # it raised AttributeError for a list, and kept strings as tile sizes
    assert set(tuner._chosen) <= {"ok"} and all(isinstance(c, TileConfig) for c in tuner._chosen.values())
    if text.startswith('{"'):
        assert tuner._chosen["ok"] == TileConfig(**good)


def test_a_misnamed_kernel_fails_when_the_module_loads(cache_dir):
    """The runtime reads each branch's kernels into a typed record at load: a kernel the
    BRANCHES table misnames fails there, not at its first launch."""
    pattern = compile_source(TEXT)
    source = cache_module.render_module(pattern.ir, pattern.source_key).replace("forward=b0_forward", "forwad=b0_forward")
    (cache_dir / f"kernels_{pattern.source_key}.py").write_text(cache_module.with_checksum(source))
    with pytest.raises(TypeError, match="forwad"):
        KernelCache().kernels(pattern.ir, pattern.source_key)
