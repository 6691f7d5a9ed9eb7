"""Where the grammar, the kernel templates and the shipped patterns live.

In a source checkout (or an editable install) they sit at the top of the repository;
an installed wheel carries them inside the package under ``_data/``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_LOCATIONS = {
    "grammar": ("grammar",),
    "templates": ("codegen", "templates"),
    "patterns": ("patterns",),
}


@cache
def data_dir(kind: str) -> Path:
    """The folder holding one kind of data file: ``grammar``, ``templates`` or ``patterns``."""
    parts = _LOCATIONS[kind]
    for candidate in (_PACKAGE_DIR / "_data" / kind, _PACKAGE_DIR.parent.joinpath(*parts)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"sparsedsl's {kind} folder is missing (looked in {_PACKAGE_DIR / '_data' / kind} "
        f"and {_PACKAGE_DIR.parent.joinpath(*parts)}); reinstall the package"
    )


def grammar_path() -> Path:
    return data_dir("grammar") / "attn.lark"


def shipped_pattern_path(name: str) -> Path | None:
    """The shipped ``patterns/<name>.attn`` file, or None if there is none by that name."""
    path = data_dir("patterns") / f"{name}.attn"
    return path if path.is_file() else None


def shipped_pattern_names() -> list[str]:
    return sorted(p.stem for p in data_dir("patterns").glob("*.attn"))
