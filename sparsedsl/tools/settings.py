"""``--set NAME=VALUE[,VALUE...]`` strings from the command line, read as parameter values.

Each value is read as the parameter's declared type (int, float, bool or an enum such as
``pool``); a wrong name or value raises :class:`PatternError` naming the setting and how
to fix it. ``show``, ``mask`` and ``compile`` take one value per name; ``explore`` takes
a list and sweeps every combination.
"""

from __future__ import annotations

import itertools

from ..errors import PatternError, SourceFile, did_you_mean
from ..frontend import syntax as S
from ..frontend.primitives import ENUMS


def parse_value(text: str, type_name: str, name: str):
    """``text`` read as a value of the declared type ``type_name`` of parameter ``name``."""
    try:
        if type_name == "int":
            return int(text)
        if type_name == "float":
            return float(text)
    except ValueError:
        raise PatternError(f"--set {name}={text}: `{name}` is {'an' if type_name == 'int' else 'a'} {type_name}") from None
    if type_name == "bool":
        if text not in ("true", "false"):
            raise PatternError(f"--set {name}={text}: `{name}` is a bool: true or false")
        return text == "true"
    if text not in ENUMS.get(type_name, ()):
        raise PatternError(f"--set {name}={text}: `{name}` is one of {', '.join(ENUMS[type_name])}")
    return text


def split_setting(setting: str) -> tuple[str, str]:
    """``NAME=VALUE`` as (name, value text)."""
    name, sep, text = setting.partition("=")
    if not sep or not name:
        raise PatternError(f"--set expects NAME=VALUE, got `{setting}`")
    return name, text


def parse_grid(settings: list[str], definition: S.PatternDef, source: SourceFile | None = None) -> dict[str, list]:
    """``NAME=V1,V2,...`` settings as {name: [values]}, each value read as its parameter's
    type. Names must be parameters of ``definition`` and appear once; values must be
    distinct. Errors name ``source``'s file."""
    try:
        return _parse_grid(settings, definition)
    except PatternError as exc:
        if source is None or exc.file is not None:
            raise
        raise PatternError(exc.message, source=source, hint=exc.hint) from None


def _parse_grid(settings: list[str], definition: S.PatternDef) -> dict[str, list]:
    types = {p.name: p.type_name for p in definition.params}
    grid: dict[str, list] = {}
    for setting in settings:
        name, text = split_setting(setting)
        if name not in types:
            known = ", ".join(types) or "none"
            raise PatternError(
                f"--set {setting}: pattern `{definition.name}` has no parameter `{name}`",
                hint=did_you_mean(name, types) or f"its parameters: {known}",
            )
        if name in grid:
            raise PatternError(
                f"--set {name} is given twice",
                hint=f"give every value in one setting: --set {name}=VALUE1,VALUE2",
            )
        pieces = [piece.strip() for piece in text.split(",")]
        if any(not piece for piece in pieces):
            raise PatternError(
                f"--set {setting}: empty value", hint=f"give one or more values separated by commas: --set {name}=A,B"
            )
        values = [parse_value(piece, types[name], name) for piece in pieces]
        if len(set(values)) != len(values):
            raise PatternError(f"--set {setting}: a value is repeated", hint="give each value once")
        grid[name] = values
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, the last name varying fastest; one empty
    combination for an empty grid."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
