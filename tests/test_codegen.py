"""Stage 4: the generated source. Readable, headed, and immune to hostile input."""

import ast
import re

import pytest
import torch

from sparsedsl import compile_source, reference
from sparsedsl.cli import main
from sparsedsl.codegen.kernel_specs import SPECS
from sparsedsl.codegen.render import render_module, source_key
from sparsedsl.runtime.inputs import validate_call
from sparsedsl.runtime.launch.common import launch


def render(pattern):
    return render_module(pattern.ir, source_key(pattern.ir, "test"))


def test_header_names_pattern_source_line_and_ir():
    pattern = compile_source("\n\npattern streaming(w: int = 64) { return causal & (sink(4) | sliding(w)) }", filename="my/streaming.attn")
    source = render(pattern)
    header = source.split('"""', 1)[0]
    assert "# pattern streaming, defined at my/streaming.attn:3" in header
    assert "#   sparsedsl compile my/streaming.attn -o DIR" in header
    assert "#   pattern streaming(w=64)  # my/streaming.attn:3" in header
    assert "key blocks of qb:   touched [(max(0, (q0 - 63)) // BK), ((q1 // BK) + 1))" in header
    ast.parse(source)  # valid Python
    assert "seg1_start = (tl.maximum(0, (q0 - 63)) // BLOCK_N)" in source
    assert "# segment 1: keys [(i - 63), i]" in source


def test_names_from_the_pattern_never_become_identifiers():
    text = "pattern tl() {\n  triton = causal & sliding(6)\n  os = causal & sink(2)\n  return gate(triton, os)\n}"
    pattern = compile_source(text)
    tree = ast.parse(render(pattern))
    identifiers = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
    }
    assert "os" not in identifiers and "tl" in identifiers  # `tl` is only the module alias
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", i) for i in identifiers)
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    gates = torch.rand(1, 2, 12, 2)
    out = pattern(q, k, v, gates=gates)  # the kernels still run, named by position
    want = reference.attention(pattern.checked, validate_call(pattern.ir, q.double(), k.double(), v.double(), gates=gates.double())).out
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_a_hostile_file_name_cannot_inject_code(tmp_path):
    marker = tmp_path / "pwned"
    filename = f"evil\nimport os; os.system('touch {marker}')\n\"\"\"\n.attn"
    pattern = compile_source("pattern p() { return causal }", filename=filename)
    source = render(pattern)
    tree = ast.parse(source)
    imports = [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert imports == ["triton", "triton.language"]
    assert "os.system" not in "".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    pattern(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16))  # imports the module
    assert not marker.exists()


def test_compile_command_writes_readable_kernels(tmp_path, capsys):
    assert main(["compile", "patterns/streaming.attn", "-o", str(tmp_path)]) == 0
    written = (tmp_path / "streaming.py").read_text()
    assert written.startswith("# ====") and "def b0_forward(" in written and "def b0_backward_dkdv(" in written
    assert main(["compile", "patterns/nsa.attn", "-o", str(tmp_path)]) == 0
    nsa = (tmp_path / "nsa.py").read_text()
    # compress (b0), select (b1) with its scores, window (b2); the select kernels walk a table
    for name in ("b0_forward", "b1_scores", "b1_forward", "b1_backward_dq", "b1_backward_dkdv", "b2_backward_dkdv"):
        assert f"def {name}(" in nsa
    assert "# branch 1: sel = select(block=64, topk=16, score=cmp, keep_first=1, keep_local=2, per=token)" in nsa


def test_kernels_are_defined_and_launched_from_one_spec():
    """A kernel's `def` is rendered from its KernelSpec, and a launch is checked against the
    same spec: a keyword the spec does not know (or one it misses) fails at the launch."""
    source = render(compile_source("pattern d() { return causal & document }"))
    for name in ("static_forward", "static_backward_dq", "static_backward_dkdv"):
        opening = f"def b0_{SPECS[name].name.removeprefix('static_')}("
        assert opening + SPECS[name].signature(True, len(opening)) + "):" in source
    opening = "def backward_preprocess("
    assert opening + SPECS["backward_preprocess"].signature(False, len(opening)) + "):" in source

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda **arguments: calls.append((grid, arguments))

    o = torch.zeros(2, 3, 5, 4)
    common = dict(O=o, DO=o, DELTA=o[..., 0], num_heads=3, HEAD_DIM=4, D_PAD=16, BLOCK_M=16)
    launch(Kernel(), SPECS["backward_preprocess"], (1, 6), Lq=5, **common)
    assert calls[0][0] == (1, 6) and calls[0][1]["stride_oh"] == 20 and calls[0][1]["stride_dom"] == 4
    with pytest.raises(TypeError, match=r"launch of backward_preprocess: missing \['Lq'\], unexpected \['lq'\]"):
        launch(Kernel(), SPECS["backward_preprocess"], (1, 6), lq=5, **common)
