"""Stage 4: the generated source. Readable, headed, and immune to hostile input."""

import ast
import re

import pytest
import torch

import sparsedsl
from sparsedsl import compile_source, reference
from sparsedsl.cli import main
from sparsedsl.codegen.kernel_specs import (
    SPECS,
    decode_merge,
    gate_backward,
    gate_forward,
)
from sparsedsl.codegen.layout import within_columns
from sparsedsl.codegen.plan import plan_module
from sparsedsl.codegen.render import render_module, render_template, source_key
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


def test_a_launch_reads_its_spec_once(monkeypatch):
    """A launch's host time counts on short calls (the 4k window calls were bound by it):
    the stride names and the parameter set of a spec are worked out once, not per launch."""
    from sparsedsl.codegen.kernel_specs import Tensor

    built = []
    original = Tensor.stride_names
    monkeypatch.setattr(Tensor, "stride_names", lambda self: built.append(self.name) or original(self))

    class Kernel:
        def __getitem__(self, grid):
            return lambda **arguments: None

    q = torch.zeros(1, 2, 16, 16)
    arguments = dict(Q=q, K=q, V=q, O=q, LSE=q[..., 0], Lq=16, Lk=16, Nk=16, num_kv_heads=2, qk_scale=1.0, GROUP=1,
                     HEADS=1, HEAD_DIM=16, D_PAD=16, BLOCK_M=16, BLOCK_N=16, PRECISION="ieee")  # fmt: skip
    launch(Kernel(), SPECS["static_forward"], (1, 1), **arguments)
    first = len(built)
    for _ in range(3):
        launch(Kernel(), SPECS["static_forward"], (1, 1), **arguments)
    assert len(built) == first


@pytest.mark.parametrize("name, step", [
    ("nsa", {"cache_append", "pool_latest", "decode_pooled", "decode", "decode_merge"}),
    ("sliding_window", {"cache_append", "decode", "decode_merge"}),
])  # fmt: skip
def test_a_decode_steps_kernels_wait_for_the_previous_kernel_before_touching_memory(name, step):
    """Launched as programmatic dependents (PDL), a decode step's kernels may start while
    the previous kernel runs: each one's first statement waits for that kernel's writes
    (under a PDL constant the interpreter never sees), and no other kernel takes PDL."""
    pattern = sparsedsl.load(name).with_params(pool="mean") if name == "nsa" else sparsedsl.load(name)
    tree = ast.parse(render(pattern))
    kernels = [node for node in tree.body if isinstance(node, ast.FunctionDef) and "PDL" in (a.arg for a in node.args.args)]
    assert {re.sub(r"^b\d+_", "", node.name) for node in kernels} == step
    for node in kernels:
        first = node.body[1]  # after the docstring
        assert ast.unparse(first.test) == "PDL", node.name
        assert [ast.unparse(s) for s in first.body] == ["tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"]


def test_a_launch_with_pdl_is_compiled_to_launch_as_a_dependent():
    """PDL=True also asks Triton for a programmatic dependent launch; PDL=False does not,
    and tensors off a Hopper GPU never take it."""
    from sparsedsl.runtime.launch.common import dependent_launches

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda **arguments: calls.append(arguments)

    new = torch.zeros(1, 2, 1, 16)
    common = dict(K_NEW=new, V_NEW=new, K=new, V=new, LENGTHS=torch.zeros(1, dtype=torch.int32), PAGES=new[0, 0],
                  n=1, num_kv_heads=2, capacity=1, HEAD_DIM=16, D_PAD=16, ROWS=2, PAGE=0)  # fmt: skip
    for pdl in (False, True):
        launch(Kernel(), SPECS["cache_append"], (2,), **common, PDL=pdl)
    assert [c.get("launch_pdl") for c in calls] == [None, True]
    assert not dependent_launches(new)


@pytest.mark.parametrize("name", ["nsa", "nsa_packed", "streaming"])
def test_every_kernel_is_defined_from_its_spec(name):
    """Every generated kernel's parameters are its KernelSpec's, in order (so that a
    keyword launch checked against the spec reaches the parameter it names)."""
    pattern = sparsedsl.load(name).with_params(pool="mean") if name.startswith("nsa") else sparsedsl.load(name)
    plan = plan_module(pattern.ir)
    tree = ast.parse(render(pattern))
    defined = {node.name: tuple(a.arg for a in node.args.args) for node in tree.body if isinstance(node, ast.FunctionDef)}
    shared = [SPECS["backward_preprocess"], SPECS["cache_append"], decode_merge(plan.outputs, plan.gates > 0)]
    if plan.gates:
        shared += [gate_forward(plan.gates), gate_backward(plan.gates)]
    expected = {spec.name: spec.parameters(False) for spec in shared}
    for b in plan.branches:
        if b.select:
            kernels = dict(forward="select_forward", backward_dq="select_backward_dq", backward_dkdv="select_backward_dkdv",
                           scores="select_scores", top="select_top", decode="select_decode",
                           decode_pooled="select_decode_pooled")  # fmt: skip
        else:
            kernels = dict(forward="static_forward", backward_dq="static_backward_dq", backward_dkdv="static_backward_dkdv",
                           decode="decode")  # fmt: skip
        if b.pool:
            kernels.update(pool="pool", pool_backward="pool_backward", pool_latest="pool_latest")
        expected.update({f"b{b.index}_{kernel}": SPECS[spec].parameters(b.uses_documents) for kernel, spec in kernels.items()})
    assert {function: defined[function] for function in expected} == expected


@pytest.mark.parametrize("name", ["nsa", "streaming", "document", "moba", "longformer"])
def test_generated_modules_stay_within_120_columns_and_mean_what_the_templates_wrote(name):
    pattern = sparsedsl.load(name)
    written = render_template(pattern.ir, "KEY")
    laid_out = within_columns(written)
    assert laid_out == render_module(pattern.ir, "KEY")
    assert max(len(line) for line in laid_out.splitlines()) <= 120
    assert ast.dump(ast.parse(laid_out)) == ast.dump(ast.parse(written))


def test_layout_breaks_inside_parentheses_only():
    source = (
        "def f(a, b):\n"
        '    """A docstring line that is much longer than the width given here and must stay as it is."""\n'
        "    x = g(aaaaaaaa, bbbbbbbb[1, 2], cccccccc) | (dddddddd & eeeeeeee)  # a comment after the code\n"
        "    # a comment that is far longer than the width, so that it wraps at a space: # here\n"
        "    return x\n"
    )
    unbreakable = '    f(aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa="b",\n      c=1)\n'
    assert within_columns(unbreakable, width=30) == unbreakable  # a break at the end would leave a line of spaces
    out = within_columns(source, width=40)
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(source))
    lines = out.splitlines()
    assert lines[1] == source.splitlines()[1]  # strings never change
    assert "bbbbbbbb[1, 2]" in out  # subscripts never break
    assert lines[2] == "    x = g(aaaaaaaa, bbbbbbbb[1, 2],"
    assert lines[3].startswith("          cccccccc)")  # under the first argument
    comments = [line for line in lines if line.lstrip().startswith("#")]
    assert len(comments) > 1 and all(len(line) <= 40 for line in comments) and comments[-1].endswith("# here")
