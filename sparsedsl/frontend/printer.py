"""The syntax tree back to ``.attn`` text: canonical layout, parentheses only where needed.

``parse_source(format_module(m))`` equals ``m`` for every module the parser produces.
"""

from __future__ import annotations

from . import syntax as S

_PRECEDENCE = {"|": 1, "&": 2, "+": 3, "-": 3, "*": 4, "//": 4, "/": 4, "%": 4}
_UNARY = 5
_ATOM = 6


def format_expr(node: S.Expr) -> str:
    return _expr(node)[0]


def _expr(node: S.Expr) -> tuple[str, int]:
    """The text of ``node`` and the precedence of its outermost operator."""
    if isinstance(node, S.Number):
        return repr(node.value), _ATOM
    if isinstance(node, S.Boolean):
        return ("true" if node.value else "false"), _ATOM
    if isinstance(node, S.Name):
        return node.id, _ATOM
    if isinstance(node, S.Call):
        args = [format_expr(a) for a in node.args] + [f"{k.name}={format_expr(k.value)}" for k in node.keywords]
        return f"{node.func}({', '.join(args)})", _ATOM
    if isinstance(node, S.UnaryOp):
        text, precedence = _expr(node.operand)
        if precedence < _UNARY:
            text = f"({text})"
        return f"{node.op}{text}", _UNARY
    precedence = _PRECEDENCE[node.op]
    left, left_precedence = _expr(node.left)
    right, right_precedence = _expr(node.right)
    if left_precedence < precedence:
        left = f"({left})"
    if right_precedence <= precedence:  # the operators are left-associative
        right = f"({right})"
    return f"{left} {node.op} {right}", precedence


def format_pattern(pattern: S.PatternDef) -> str:
    params = ", ".join(
        f"{p.name}: {p.type_name}" + (f" = {format_expr(p.default)}" if p.default is not None else "")
        for p in pattern.params
    )
    lines = [f"pattern {pattern.name}({params}) {{"]
    for statement in pattern.body:
        if isinstance(statement, S.Assign):
            lines.append(f"    {statement.target} = {format_expr(statement.value)}")
        else:
            lines.append(f"    return {format_expr(statement.value)}")
    lines.append("}")
    return "\n".join(lines)


def format_module(module: S.Module) -> str:
    return "\n\n".join(format_pattern(p) for p in module.patterns) + "\n"
