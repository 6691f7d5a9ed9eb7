"""Where the pipeline's data files live: the grammar (``grammar/attn.lark``, read by the
parser), the kernel templates (``codegen/templates/*.j2``, read by the renderer in
:mod:`sparsedsl.codegen.render`) and the shipped patterns (``patterns/*.attn``).

They sit at the top of the repository, beside the package, because they are part of the
pipeline's story rather than Python code. An installed wheel carries them inside the
package, under ``sparsedsl/_data/`` (the ``force-include`` of ``pyproject.toml``).
:func:`data_dir` is the one place that knows both locations; everything else asks it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # sparsedsl/
_LOCATIONS = {  # kind: its folder at the top of the repository
    "grammar": ("grammar",),
    "templates": ("codegen", "templates"),
    "patterns": ("patterns",),
}


@cache
def data_dir(kind: str) -> Path:
    """The folder of one kind of data file, ``grammar``, ``templates`` or ``patterns``: in
    the wheel's ``sparsedsl/_data/<kind>``, else at the top of the source checkout."""
    parts = _LOCATIONS[kind]
    for candidate in (_PACKAGE_DIR / "_data" / kind, _PACKAGE_DIR.parent.joinpath(*parts)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"sparsedsl's {kind} folder is missing (looked in {_PACKAGE_DIR / '_data' / kind} "
        f"and {_PACKAGE_DIR.parent.joinpath(*parts)}); reinstall the package"
    )


def shipped_pattern_path(name: str) -> Path | None:
    """The shipped ``patterns/<name>.attn`` file, or None if there is none by that name."""
    path = data_dir("patterns") / f"{name}.attn"
    return path if path.is_file() else None


def shipped_pattern_names() -> list[str]:
    """The names (file stems) of the shipped patterns."""
    return sorted(p.stem for p in data_dir("patterns").glob("*.attn"))
