"""Every mask primitive of the table is handled by every place that "Adding a primitive"
(docs/architecture.md) lists: the checker, the lowering to segments and their inverses,
the IR's evaluator and printers, the reference, the tests and the docs.

The test runs over ``PRIMITIVES``: a primitive added to the table but missing from one of
those places fails here. Tiny sizes, the frontend and the IR only (no kernels, no Triton).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import re
from pathlib import Path

import pytest
import sympy
import torch

from sparsedsl import reference
from sparsedsl.errors import SourceFile
from sparsedsl.frontend import check_pattern, parse_source
from sparsedsl.frontend import model as M
from sparsedsl.frontend.kinds import Category
from sparsedsl.frontend.primitives import (
    ENUMS,
    MASK_PRIMITIVES,
    PRIMITIVE_OF_MASK,
    PRIMITIVES,
    Primitive,
)
from sparsedsl.ir import evaluate as E
from sparsedsl.ir import lower_pattern
from sparsedsl.ir.expressions import DocEnd, DocStart, ExpressionPrinter
from sparsedsl.ir.nodes import RawKeys, StaticBlocks
from sparsedsl.ir.segments import ATOMS
from sparsedsl.ir.text import format_ir

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(MASK_PRIMITIVES)
# (Lq, Lk) with queries the last Lq positions, tiles of 4: partial, full and empty blocks.
SIZES = [(9, 9), (5, 11)]
TILE = 4
DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3]])


def example_arguments(primitive: Primitive) -> list[dict[str, object]]:
    """Two calls' worth of valid arguments: all small, and distinct where there are several."""
    values = {"int": [(2, 3), (3, 2), (4, 4)], "bool": [("true", "false")] * 3}
    calls = []
    for n in range(2):
        call = {}
        for k, argument in enumerate(primitive.arguments):
            if argument.type in ENUMS:
                call[argument.name] = ENUMS[argument.type][n % len(ENUMS[argument.type])]
            elif argument.type in values:
                call[argument.name] = values[argument.type][k % 3][n]
            else:  # pragma: no cover - a new kind of argument: teach this test its examples
                pytest.fail(f"`{primitive.name}`: no example value for an argument of type {argument.type}")
        calls.append(call)
    return calls


def call_text(primitive: Primitive, arguments: dict[str, object]) -> str:
    if not arguments:
        return primitive.name
    return f"{primitive.name}({', '.join(f'{k}={v}' for k, v in arguments.items())})"


def checked(body: str) -> M.CheckedPattern:
    text = f"pattern p() {{ return {body} }}"
    return check_pattern(parse_source(text).patterns[0], SourceFile("<string>", text))


def python_value(text):
    return {"true": True, "false": False}.get(text, text)


@functools.cache
def naive_oracle():
    """``visible`` of tests/test_reference.py, the per-pair oracle written from the definitions."""
    spec = importlib.util.spec_from_file_location("_reference_oracle", REPO / "tests" / "test_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.visible


def checklist() -> str:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "\n## Adding a primitive\n" in text, "docs/architecture.md has no section `## Adding a primitive`"
    section = text.split("\n## Adding a primitive\n", 1)[1]
    return section.split("\n## ", 1)[0]


# ---------------------------------------------------------------- the table and the model
def test_the_table_has_the_mask_primitives_and_only_they_name_a_model_class():
    assert NAMES, "no mask primitive in PRIMITIVES"
    assert set(MASK_PRIMITIVES) == {n for n, p in PRIMITIVES.items() if p.kind == Category.MASK}
    assert all(p.mask is None for p in PRIMITIVES.values() if p.kind != Category.MASK)
    assert len(PRIMITIVE_OF_MASK) == len(MASK_PRIMITIVES), "two mask primitives share a model class"


@pytest.mark.parametrize("name", NAMES)
def test_model_class_matches_the_signature(name):
    primitive = MASK_PRIMITIVES[name]
    cls = primitive.mask
    assert issubclass(cls, M.Atom) and dataclasses.is_dataclass(cls), f"{cls} is not a dataclass subclassing M.Atom"
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} is not frozen"
    assert cls.__name__.lower() == name, f"mask_text prints {cls.__name__.lower()!r} for `{name}`"
    assert [f.name for f in dataclasses.fields(cls)] == [a.name for a in primitive.arguments]
    assert primitive.summary, f"`{name}` has no summary"
    assert cls in ATOMS, f"ir/segments.py: ATOMS has no entry for {cls.__name__}"
    assert cls in reference.ELEMENT_MASKS, f"reference.py: ELEMENT_MASKS has no entry for {cls.__name__}"


# ---------------------------------------------------------------- checker, lowering, reference
@pytest.mark.parametrize("name", NAMES)
def test_checker_lowering_evaluator_and_reference_agree(name):
    primitive = MASK_PRIMITIVES[name]
    visible = naive_oracle()
    first, second = example_arguments(primitive)
    # Alone, then with other arguments complemented and intersected (`causal & ~x`, which
    # may be empty), so that the complement's bounds are inverted too.
    cases = [(call_text(primitive, first), first), (f"causal & ~{call_text(primitive, second)}", second)]
    for n, (body, arguments) in enumerate(cases):
        # The checker binds the call to the table's signature and builds the model class.
        pattern = checked(body)
        (branch,) = pattern.branches
        atom = primitive.mask(**{k: python_value(v) for k, v in arguments.items()})
        assert atom in M.mask_atoms(branch.mask), f"checking `{body}` did not build {atom!r}"
        # Printed back in the language's syntax, the mask checks to itself.
        assert checked(M.mask_text(branch.mask)).branches[0].mask == branch.mask
        # Lowering gives segments and, through ir/inverse.py, their transposed ranges.
        ir = lower_pattern(pattern)
        (lowered,) = ir.branches
        assert isinstance(lowered.keys, RawKeys) and isinstance(lowered.blocks, StaticBlocks)
        assert lowered.blocks.segments or n, f"`{body}` lowers to no segment"
        assert format_ir(ir)
        _prints_for_triton(lowered)
        for Lq, Lk in SIZES:
            docs = DOC_IDS[:, :Lk] if pattern.needs_documents else None
            row = docs[0] if docs is not None else None
            want = reference.element_mask(branch.mask, Lq, Lk, docs)
            want = want[0] if want.dim() == 3 else want
            # The IR's predicate, evaluated, is the reference's element mask.
            assert torch.equal(E.predicate_mask(lowered, Lq, Lk, row), want), f"`{body}` at Lq={Lq}, Lk={Lk}"
            # The naive oracle of tests/test_reference.py agrees.
            doc = row.tolist() if row is not None else None
            try:
                naive = torch.tensor([[visible(branch.mask, r + Lk - Lq, j, doc) for j in range(Lk)] for r in range(Lq)])
            except Exception as exc:
                pytest.fail(f"tests/test_reference.py's visible() cannot evaluate `{body}`: {exc!r}")
            assert torch.equal(naive, want), f"tests/test_reference.py's visible() differs on `{body}`"
            # Block ranges, both walks, are sound against the element mask.
            truth = _true_classes(want)
            for classes in (
                E.block_classes(lowered, Lq, Lk, TILE, TILE, row),
                E.block_classes_by_key_block(lowered, Lq, Lk, TILE, TILE, row),
            ):
                assert bool(((truth > 0) <= (classes > 0)).all()), f"`{body}`: a visible block is not listed"
                assert bool(((classes == E.FULL) <= (truth == E.FULL)).all()), f"`{body}`: a block called full is not"


@pytest.mark.parametrize("name", [n for n in NAMES if MASK_PRIMITIVES[n].bare])
def test_bare_primitives_are_written_with_or_without_parentheses(name):
    assert checked(name).branches == checked(f"{name}()").branches


def _prints_for_triton(branch) -> None:
    """Every formula of the branch prints as Triton code (document tables as names)."""
    exprs = [branch.predicate]
    for segment in branch.blocks.segments:
        exprs += [getattr(segment, f.name) for f in dataclasses.fields(segment) if f.name != "exact"]
    for expr in exprs:
        expr = sympy.sympify(expr)
        if expr.has(sympy.oo, -sympy.oo):  # segment bounds may be infinite; ranges are not
            continue
        names = {t: f"table{n}" for n, t in enumerate(expr.atoms(DocStart, DocEnd))}
        ExpressionPrinter("triton", names)(expr)


def _true_classes(mask: torch.Tensor) -> torch.Tensor:
    Lq, n = mask.shape
    classes = torch.zeros(-(-Lq // TILE), -(-n // TILE), dtype=torch.int8)
    for a, b in itertools.product(range(classes.shape[0]), range(classes.shape[1])):
        block = mask[a * TILE : (a + 1) * TILE, b * TILE : (b + 1) * TILE]
        classes[a, b] = E.FULL if block.all() and block.shape[1] == TILE else E.PARTIAL if block.any() else E.EMPTY
    return classes


# ---------------------------------------------------------------- tests and docs
@pytest.mark.parametrize("name", NAMES)
def test_the_tests_and_docs_name_every_primitive(name):
    primitive = MASK_PRIMITIVES[name]
    word = re.compile(rf"\b{re.escape(name)}\b")
    for test in ("tests/test_lower.py", "tests/test_kernels.py"):
        found = word.search((REPO / test).read_text(encoding="utf-8")) is not None
        assert found, f"{test} never uses `{name}`"
    signature = f"`{name}({', '.join(a.name for a in primitive.arguments)})`" if primitive.arguments else f"`{name}`"
    language = (REPO / "docs" / "language.md").read_text(encoding="utf-8")
    assert f"| {signature} |" in language, f"docs/language.md has no row `| {signature} |` in its table of masks"
    semantics = (REPO / "docs" / "semantics.md").read_text(encoding="utf-8")
    found = re.search(rf"^\| `{re.escape(name)}[(`]", semantics, re.M) is not None
    assert found, f"docs/semantics.md has no row for `{name}`"


# Each file the checklist must name, and what in it the checklist must name.
CHECKLIST = {
    "sparsedsl/frontend/model.py": ["Atom", "mask_text", "is_causal", "uses_documents"],
    "sparsedsl/frontend/primitives.py": ["PRIMITIVES", "_mask", "_size", "MAX_SIZE"],
    "sparsedsl/frontend/check.py": ["_Checker._call", "_Checker._bind", "_Checker._name"],
    "grammar/attn.lark": [],
    "sparsedsl/ir/segments.py": ["ATOMS", "AtomLowering", "Segment", "mask_segments", "mask_predicate"],
    "sparsedsl/ir/lower.py": ["lower_segment", "_transposed_ranges", "_lower_branch"],
    "sparsedsl/ir/inverse.py": ["last_at_most"],
    "sparsedsl/ir/expressions.py": ["ExpressionPrinter._print", "provably_le"],
    "sparsedsl/ir/evaluate.py": ["predicate_mask", "block_classes", "block_classes_by_key_block", "_ARGUMENTS"],
    "sparsedsl/reference.py": ["ELEMENT_MASKS"],
    "tests/test_reference.py": ["visible"],
    "tests/test_lower.py": ["atoms", "SINGLE_SEGMENT"],
    "tests/test_kernels.py": ["MASKS"],
    "tests/test_primitives_checklist.py": [],
    "docs/language.md": [],
    "docs/semantics.md": [],
}


def test_the_checklist_names_every_place_and_every_place_exists():
    section = checklist()
    named = set(re.findall(r"`((?:sparsedsl|tests|docs|grammar|codegen)/[\w/.]*)`", section))
    for path in named:
        assert (REPO / path).exists(), f"the checklist names `{path}`, which does not exist"
    for path, names in CHECKLIST.items():
        assert path in named, f"the checklist does not name `{path}`"
        source = (REPO / path).read_text(encoding="utf-8")
        for name in names:
            in_code = rf"`[^`\n]*(?<![\w.]){re.escape(name)}(?![\w])[^`\n]*`"
            found = re.search(in_code, section) is not None
            assert found, f"the checklist does not name `{name}` of {path}"
            for part in name.split("."):
                found = re.search(rf"\b{re.escape(part)}\b", source) is not None
                assert found, f"{path} has no `{part}` (named by the checklist)"
