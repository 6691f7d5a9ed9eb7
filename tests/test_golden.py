"""Stage 5: golden snapshots of two generated modules (`streaming`, `nsa`), so that a change
to the templates or the renderer shows up as a reviewable diff of the kernels it writes.

After an intended change, rewrite them with ``SPARSEDSL_UPDATE_GOLDEN=1 pytest tests/test_golden.py``
and review ``git diff tests/golden``.
"""

import os
import re
from pathlib import Path

import pytest

import sparsedsl
from sparsedsl.codegen import render_module

GOLDEN = Path(__file__).parent / "golden"


def rendered(name: str) -> str:
    """The module as rendered, without what changes with every edit of the generator (its
    hash) or with the checkout's path."""
    pattern = sparsedsl.load(name)
    text = render_module(pattern.ir, "KEY")
    text = re.sub(r'^GENERATOR = ".*"$', 'GENERATOR = "..."', text, flags=re.M)
    return text.replace(str(pattern.source.name), f"patterns/{name}.attn")


@pytest.mark.parametrize("name", ["streaming", "nsa"])
def test_generated_module_matches_its_golden_snapshot(name):
    path = GOLDEN / f"{name}.py.txt"
    text = rendered(name)
    if os.environ.get("SPARSEDSL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: run with SPARSEDSL_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name}'s kernels changed: review, then SPARSEDSL_UPDATE_GOLDEN=1 pytest {__file__}"
