"""Stage 2 of the pipeline: the syntax tree of one pattern to a :class:`CheckedPattern`.

The checker resolves parameters (defaults, then overrides), folds the integer
arithmetic in arguments, binds every call to its primitive's signature and enforces
the language's rules. Anything malformed or impossible raises :class:`PatternError`
pointing at the offending text. Nothing is ever evaluated as Python.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Mapping

from ..errors import PatternError, SourceFile, Span, did_you_mean
from . import model as M
from . import syntax as S
from .kinds import Category, Per, Pool, Within
from .parse import MAX_NESTING
from .primitives import (
    ENUM_KINDS,
    ENUMS,
    MAX_GATE_BRANCHES,
    MAX_INTEGER,
    MAX_SIZE,
    MAX_TOPK,
    PARAM_TYPES,
    PRIMITIVES,
    SELECT_BLOCK_SIZES,
    Argument,
    Primitive,
)  # fmt: skip

# What a checked expression is: a number, a bool, a member of an enumeration (by its
# type name), a mask, a branch, or the returned gate ("branch": any of the three branches).
ValueType = Literal["int", "float", "bool", "pool", "per", "within", "mask", "compress", "select", "gate", "branch"]

_BRANCH_TYPES: tuple[ValueType, ...] = ("mask", "compress", "select")

_BOUND_HINT = (
    f"the kernels index positions with 32-bit integers: sizes (and sequence lengths) are at most 2^30 = {MAX_SIZE:,}"
)
_TOPK_HINT = f"the top-k kernel unrolls one step per chosen block at compile time: at most {MAX_TOPK} blocks"


@dataclass(frozen=True)
class _Compress:
    block: int
    stride: int
    pool: Pool
    within: Within


@dataclass(frozen=True)
class _Select:
    block: int
    topk: int
    score: _Value
    keep_first: int
    keep_local: int
    per: Per


@dataclass(frozen=True)
class _Gate:
    branches: tuple[_Value, ...]


@dataclass(frozen=True)
class _Value:
    """A checked expression: its type, its value, where it was written, and the
    variable it was read from (branch names come from variables)."""

    type: ValueType
    value: object
    span: Span
    variable: str | None = None
    # How many `&`, `|` and `~` a mask nests, counted through the variables it reads.
    depth: int = 0


def _describe_type(type_: ValueType) -> str:
    if type_ in ENUMS:
        return f"a {type_} ({', '.join(ENUMS[type_])})"
    return {
        "int": "an int",
        "float": "a float",
        "bool": "a bool",
        "mask": "a mask",
        "compress": "a compress branch",
        "select": "a select branch",
        "gate": "a gate",
        "branch": "a branch",
    }[type_]


def check_pattern(
    definition: S.PatternDef, source: SourceFile, overrides: Mapping[str, object] | None = None
) -> M.CheckedPattern:
    """Check one pattern of a parsed file, with parameter ``overrides`` applied."""
    return _Checker(definition, source).run(dict(overrides or {}))


def check_override_value(param: S.Param, value: object) -> object:
    """The override ``value`` converted to ``param``'s type, or a ``TypeError`` saying why not."""
    type_ = param.type_name
    if type_ == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_ == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if type_ == "bool" and isinstance(value, bool):
        return value
    if type_ in ENUMS and value in ENUMS[type_]:
        return value
    raise TypeError(f"parameter `{param.name}` is {_describe_type(type_)}, got {value!r}")


class _Checker:
    def __init__(self, definition: S.PatternDef, source: SourceFile) -> None:
        self.definition = definition
        self.source = source
        self.params: dict[str, _Value] = {}
        self.variables: dict[str, _Value] = {}
        self.used: set[str] = set()

    def error(self, message: str, span: Span, hint: str | None = None) -> PatternError:
        return PatternError(message, source=self.source, span=span, hint=hint)

    # ------------------------------------------------------------ parameters
    def run(self, overrides: dict[str, object]) -> M.CheckedPattern:
        d = self.definition
        declared = {p.name: p for p in d.params}
        for name in overrides:
            if name not in declared:
                known = ", ".join(declared) or "none"
                hint = did_you_mean(name, declared) or f"its parameters are: {known}"
                raise self.error(f"pattern `{d.name}` has no parameter `{name}`", d.name_span, hint)
        for param in d.params:
            self._check_param(param, overrides)
        return self._check_body()

    def _check_param(self, param: S.Param, overrides: dict[str, object]) -> None:
        if param.name in self.params:
            raise self.error(f"parameter `{param.name}` is declared twice", param.span, "rename one of them")
        if param.name in PRIMITIVES:
            raise self.error(
                f"parameter `{param.name}` has the name of a primitive", param.span, "choose another name"
            )
        if param.type_name not in PARAM_TYPES:
            hint = did_you_mean(param.type_name, PARAM_TYPES) or f"types are: {', '.join(PARAM_TYPES)}"
            raise self.error(f"unknown type `{param.type_name}` for parameter `{param.name}`", param.span, hint)
        if param.name in overrides:
            try:
                value = check_override_value(param, overrides[param.name])
            except TypeError as exc:
                raise self.error(f"bad value for parameter: {exc}", param.span) from None
            if param.type_name == "int" and abs(value) > MAX_INTEGER:  # as in the pattern's own arithmetic
                raise self.error(
                    f"bad value for parameter: `{param.name}` does not fit in 64 bits ({_digits(value)} digits)",
                    param.span,
                    f"sizes are at most {MAX_SIZE:,}",
                )
            self.params[param.name] = _Value(param.type_name, value, param.span)
            return
        if param.default is None:
            raise self.error(
                f"parameter `{param.name}` has no default and no value was given",
                param.span,
                f"give it a default (`{param.name}: {param.type_name} = ...`) or pass {param.name}=... when loading",
            )
        if param.type_name in ENUMS:
            default = self._enum_argument(param.default, param.type_name, f"the default of `{param.name}`")
        else:
            default = self.expr(param.default)
            if default.type == "int":
                self._number("int", default.value, param.default)
        self.params[param.name] = _Value(
            param.type_name, self._convert(default, param.type_name, f"the default of `{param.name}`").value, param.span
        )

    def _convert(self, value: _Value, type_: str, what: str) -> _Value:
        if value.type == type_:
            return value
        if type_ == "float" and value.type == "int":
            return replace(value, type="float", value=float(value.value))
        if type_ == "branch" and value.type in _BRANCH_TYPES:
            return value
        shown = f" ({value.value!r})" if value.type in ("int", "float", "bool") or value.type in ENUMS else ""
        raise self.error(f"{what} must be {_describe_type(type_)}, got {_describe_type(value.type)}{shown}", value.span)

    # ------------------------------------------------------------ statements
    def _check_body(self) -> M.CheckedPattern:
        d = self.definition
        returns = [s for s in d.body if isinstance(s, S.Return)]
        if not returns:
            raise self.error(
                f"pattern `{d.name}` has no `return`",
                d.name_span,
                "end the body with `return <branch>` or `return gate(a, b, ...)`",
            )
        for statement in d.body[:-1]:
            if isinstance(statement, S.Return):
                raise self.error(
                    "`return` must be the last statement of a pattern",
                    statement.span,
                    "a pattern has exactly one `return`, at the end",
                )
        for statement in d.body[:-1]:
            self._assign(statement)
        result = self.expr(d.body[-1].value)
        for statement in d.body[:-1]:
            if statement.target not in self.used:
                raise self.error(
                    f"variable `{statement.target}` is assigned but never used",
                    statement.span,
                    "use it in the returned expression, or remove it",
                )
        branches = self._output_branches(result)
        return M.CheckedPattern(
            name=d.name,
            params=tuple((name, value.value) for name, value in self.params.items()),
            branches=branches,
            gated=result.type == "gate",
            source_name=self.source.name,
            line=d.span.line,
        )

    def _assign(self, statement: S.Assign) -> None:
        name = statement.target
        if name in self.variables:
            raise self.error(f"variable `{name}` is assigned twice", statement.span, "give the second one another name")
        if name in self.params:
            raise self.error(f"variable `{name}` hides the parameter of that name", statement.span, "rename the variable")
        if name in PRIMITIVES:
            raise self.error(f"variable `{name}` hides the primitive `{name}`", statement.span, "rename the variable")
        value = self.expr(statement.value)
        if value.type == "gate":
            raise self.error(
                "gate(...) must be the returned expression", statement.value.span, "write `return gate(...)`"
            )
        self.variables[name] = replace(value, variable=name)

    def _output_branches(self, result: _Value) -> tuple[M.Branch, ...]:
        if result.type == "gate":
            values = result.value.branches
            names = [v.variable or f"branch{k}" for k, v in enumerate(values)]
        elif result.type in _BRANCH_TYPES:
            values = (result,)
            names = [result.variable or self.definition.name]
        else:
            raise self.error(
                f"a pattern must return a branch or a gate, not {_describe_type(result.type)}",
                result.span,
                "return a mask such as `causal & sliding(512)`, a compress/select branch, or gate(...)",
            )
        branches = tuple(self._branch(v, name) for v, name in zip(values, names))
        packed = any(isinstance(b, (M.CompressBranch, M.SelectBranch)) and b.within == Within.DOCUMENT for b in branches)
        for value, branch in zip(values, branches):
            # A packed batch's documents are separate sequences for every branch.
            if packed and isinstance(branch, M.MaskBranch) and not M.uses_documents(branch.mask):
                raise self.error(
                    f"branch `{branch.name}` attends across documents, but a compress branch works within them",
                    value.span,
                    "add `& document` to the mask, so that every branch treats each document as its own sequence",
                )
        return branches

    def _branch(self, value: _Value, name: str) -> M.Branch:
        if value.type == "mask":
            return M.MaskBranch(name, value.value)
        if value.type == "compress":
            c = value.value
            return M.CompressBranch(name, c.block, c.stride, c.pool, c.within)
        s = value.value
        score = self._branch(s.score, s.score.variable or f"{name}_score")
        return M.SelectBranch(name, s.block, s.topk, score, s.keep_first, s.keep_local, s.per)

    # ------------------------------------------------------------ expressions
    def expr(self, node: S.Expr) -> _Value:
        if isinstance(node, S.Number):
            return _Value("int" if isinstance(node.value, int) else "float", node.value, node.span)
        if isinstance(node, S.Boolean):
            return _Value("bool", node.value, node.span)
        if isinstance(node, S.Name):
            return self._name(node)
        if isinstance(node, S.Call):
            return self._call(node)
        if isinstance(node, S.UnaryOp):
            return self._unary(node)
        return self._binary(node)

    def _name(self, node: S.Name) -> _Value:
        if node.id in self.variables:
            self.used.add(node.id)
            return replace(self.variables[node.id], span=node.span)
        if node.id in self.params:
            return replace(self.params[node.id], span=node.span)
        primitive = PRIMITIVES.get(node.id)
        if primitive is not None:
            if primitive.bare:
                return _Value("mask", primitive.mask(), node.span)
            raise self.error(
                f"`{node.id}` needs arguments", node.span, f"write {node.id}({', '.join(a.name for a in primitive.arguments)})"
            )
        for enum, members in ENUMS.items():
            if node.id in members:
                raise self.error(
                    f"`{node.id}` is a value of `{enum}` and can only be passed as {enum}={node.id}", node.span
                )
        if any(s.target == node.id for s in self.definition.body if isinstance(s, S.Assign)):
            raise self.error(f"variable `{node.id}` is used before it is assigned", node.span, "move its assignment up")
        candidates = [*self.variables, *self.params, *(p for p in PRIMITIVES.values() if p.bare)]
        candidates = [c if isinstance(c, str) else c.name for c in candidates]
        raise self.error(f"undefined name `{node.id}`", node.span, did_you_mean(node.id, candidates))

    def _unary(self, node: S.UnaryOp) -> _Value:
        operand = self.expr(node.operand)
        if node.op == "~":
            self._require_mask(operand, "~")
            return self._mask_value(M.Not(operand.value), node, operand)
        if operand.type not in ("int", "float"):
            raise self.error(f"cannot negate {_describe_type(operand.type)}", node.span)
        return self._number(operand.type, -operand.value, node)

    def _mask_value(self, mask: M.Mask, node: S.Expr, *operands: _Value) -> _Value:
        # The parser bounds how deeply text nests; variables can stack masks deeper still
        # (`a1 = a0 & x`, `a2 = a1 & x`, ...), and every later pass recurses over them.
        depth = 1 + max(o.depth for o in operands)
        if depth > MAX_NESTING:
            raise self.error(
                f"this mask nests more than {MAX_NESTING} operators deep (counting those of the variables it uses)",
                node.span,
                "combine fewer masks: `&`, `|` and `~` of the same masks again add nothing",
            )
        return _Value("mask", mask, node.span, depth=depth)

    def _number(self, type_: str, value, node: S.Expr) -> _Value:
        if type_ == "int" and abs(value) > MAX_INTEGER:
            raise self.error(
                f"integer overflow: the value does not fit in 64 bits ({_digits(value)} digits)",
                node.span,
                f"sizes are at most {MAX_SIZE:,}",
            )
        return _Value(type_, value, node.span)

    def _require_mask(self, value: _Value, op: str) -> None:
        if value.type == "mask":
            return
        if value.type in ("compress", "select", "gate"):
            raise self.error(
                f"`{op}` cannot combine {_describe_type(value.type)}: it attends with its own softmax",
                value.span,
                "mix separately normalised branches with gate(...)",
            )
        raise self.error(
            f"`{op}` combines masks, not {_describe_type(value.type)}",
            value.span,
            "masks are primitives such as causal, sliding(w) and their combinations",
        )

    def _binary(self, node: S.BinaryOp) -> _Value:
        left = self.expr(node.left)
        if node.op in ("&", "|"):
            self._require_mask(left, node.op)
            right = self.expr(node.right)
            self._require_mask(right, node.op)
            combine = M.And if node.op == "&" else M.Or
            return self._mask_value(combine(left.value, right.value), node, left, right)
        right = self.expr(node.right)
        for operand in (left, right):
            if operand.type not in ("int", "float"):
                hint = "combine masks with `&`, `|` and `~`" if operand.type == "mask" else None
                raise self.error(f"`{node.op}` needs numbers, not {_describe_type(operand.type)}", operand.span, hint)
        if node.op == "/":
            raise self.error("`/` is not allowed: sizes are integers", node.span, "use `//` for integer division")
        is_int = left.type == right.type == "int"
        if node.op in ("//", "%"):
            if not is_int:
                raise self.error(f"`{node.op}` needs integers", node.span)
            if right.value == 0:
                raise self.error("division by zero", node.right.span)
        a, b = left.value, right.value
        result = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "//": lambda: a // b, "%": lambda: a % b}[
            node.op
        ]()
        return self._number("int" if is_int else "float", result, node)

    # ------------------------------------------------------------ calls
    def _call(self, node: S.Call) -> _Value:
        primitive = PRIMITIVES.get(node.func)
        if primitive is None:
            if node.func in self.variables or node.func in self.params:
                raise self.error(f"`{node.func}` is not a primitive and cannot be called", node.func_span)
            raise self.error(
                f"unknown primitive `{node.func}`",
                node.func_span,
                did_you_mean(node.func, PRIMITIVES) or f"primitives are: {', '.join(PRIMITIVES)}",
            )
        if primitive.kind == Category.GATE:
            return self._gate(node)
        bound = self._bind(primitive, node)
        if primitive.kind == Category.MASK:
            if primitive.name == "dilated" and bound["window"] * bound["dilation"] > MAX_SIZE:
                raise self.error(
                    f"dilated window spans window * dilation = {bound['window'] * bound['dilation']:,} positions, "
                    f"more than {MAX_SIZE:,}",
                    node.span,
                    _BOUND_HINT,
                )
            return _Value("mask", primitive.mask(**bound), node.span)
        if primitive.kind == Category.COMPRESS:
            if bound["stride"] > bound["block"]:
                raise self.error(
                    f"compress stride ({bound['stride']}) is larger than its block ({bound['block']})",
                    node.span,
                    "keys between pooled blocks would be summarised by none: use stride <= block",
                )
            return _Value("compress", _Compress(bound["block"], bound["stride"], bound["pool"], bound["within"]), node.span)
        return self._select(node, bound)

    def _select(self, node: S.Call, bound: dict) -> _Value:
        score: _Value = bound["score"]
        if score.type != "compress":
            raise self.error(
                f"the score of select(...) must be a compress branch, got {_describe_type(score.type)}",
                score.span,
                "define `cmp = compress(block=..., stride=...)` and pass score=cmp",
            )
        if bound["block"] not in SELECT_BLOCK_SIZES:
            raise self.error(
                f"select block {bound['block']} cannot be served by the kernels",
                node.span,
                f"selected blocks are walked in whole tiles: use a power of two from 16 to {SELECT_BLOCK_SIZES[-1]}",
            )
        forced = bound["keep_first"] + bound["keep_local"]
        if bound["topk"] < forced:
            raise self.error(
                f"select topk ({bound['topk']}) is smaller than the blocks it must always keep ({forced})",
                node.span,
                "topk must be at least keep_first + keep_local",
            )
        return _Value(
            "select",
            _Select(bound["block"], bound["topk"], score, bound["keep_first"], bound["keep_local"], bound["per"]),
            node.span,
        )

    def _gate(self, node: S.Call) -> _Value:
        if node.keywords:
            raise self.error("gate(...) takes only positional branches", node.keywords[0].span)
        if not node.args:
            raise self.error("gate(...) needs at least one branch", node.span, "write gate(a, b, ...)")
        if len(node.args) > MAX_GATE_BRANCHES:
            raise self.error(
                f"gate(...) mixes at most {MAX_GATE_BRANCHES} branches, got {len(node.args)}",
                node.args[MAX_GATE_BRANCHES].span,
                "the gate kernels take one argument per branch and unroll over them",
            )
        branches = []
        for arg in node.args:
            value = self.expr(arg)
            if value.type == "gate":
                raise self.error("gates cannot be nested", arg.span, "list every branch in one gate(...)")
            self._convert(value, "branch", "an argument of gate(...)")
            if value.variable and any(b.variable == value.variable for b in branches):
                raise self.error(f"branch `{value.variable}` appears twice in gate(...)", arg.span)
            branches.append(value)
        return _Value("gate", _Gate(tuple(branches)), node.span)

    def _bind(self, primitive: Primitive, node: S.Call) -> dict:
        """Match a call's arguments to the primitive's signature, checking each one."""
        signature = primitive.arguments
        if len(node.args) > len(signature):
            raise self.error(
                f"`{primitive.name}` takes {len(signature)} argument{'s' * (len(signature) != 1)} "
                f"but {len(node.args)} were given",
                node.args[len(signature)].span,
                f"its signature is {_signature_text(primitive)}",
            )
        given: dict[str, tuple[Argument, S.Expr, Span]] = {}
        for argument, expr in zip(signature, node.args):
            given[argument.name] = (argument, expr, expr.span)
        by_name = {a.name: a for a in signature}
        for keyword in node.keywords:
            argument = by_name.get(keyword.name)
            if argument is None:
                raise self.error(
                    f"`{primitive.name}` has no argument `{keyword.name}`",
                    keyword.span,
                    did_you_mean(keyword.name, by_name) or f"its signature is {_signature_text(primitive)}",
                )
            if keyword.name in given:
                raise self.error(f"argument `{keyword.name}` of `{primitive.name}` is given twice", keyword.span)
            given[keyword.name] = (argument, keyword.value, keyword.span)
        bound = {}
        for argument in signature:
            if argument.name not in given:
                if argument.required:
                    raise self.error(
                        f"`{primitive.name}` needs argument `{argument.name}`",
                        node.span,
                        f"its signature is {_signature_text(primitive)}",
                    )
                bound[argument.name] = argument.default
                continue
            _, expr, span = given[argument.name]
            what = f"argument `{argument.name}` of `{primitive.name}`"
            if argument.type in ENUMS:
                value = self._enum_argument(expr, argument.type, what)
            else:
                value = self._convert(self.expr(expr), argument.type, what)
            if argument.minimum is not None and value.value < argument.minimum:
                raise self.error(
                    f"{what} must be at least {argument.minimum}, got {value.value}",
                    span,
                    "sizes count tokens or blocks and cannot be zero or negative" if argument.minimum else None,
                )
            if argument.maximum is not None and value.value > argument.maximum:
                raise self.error(
                    f"{what} must be at most {argument.maximum:,}, got {_show_int(value.value)}",
                    span,
                    _TOPK_HINT if argument.maximum == MAX_TOPK else _BOUND_HINT,
                )
            if argument.type in ENUM_KINDS:
                bound[argument.name] = ENUM_KINDS[argument.type](value.value)
            else:
                bound[argument.name] = value if argument.type == "branch" else value.value
        return bound

    def _enum_argument(self, expr: S.Expr, enum: str, what: str) -> _Value:
        # A member's name wins over a variable or parameter of another type (`per=block`
        # in a pattern with an int parameter `block`).
        shadowing = self.params.get(expr.id) or self.variables.get(expr.id) if isinstance(expr, S.Name) else None
        if isinstance(expr, S.Name) and (shadowing is None or (expr.id in ENUMS[enum] and shadowing.type != enum)):
            if expr.id in ENUMS[enum]:
                return _Value(enum, expr.id, expr.span)
            raise self.error(
                f"{what} must be one of {', '.join(ENUMS[enum])}, got `{expr.id}`",
                expr.span,
                did_you_mean(expr.id, ENUMS[enum]),
            )
        return self._convert(self.expr(expr), enum, what)


def _digits(value: int) -> int:
    """How many decimal digits ``value`` has, without converting it to text (Python refuses
    to convert integers of more than 4300 digits)."""
    digits = max(1, int(abs(value).bit_length() * 0.30102999566398120))
    return digits + (abs(value) >= 10**digits)


def _show_int(value: int) -> str:
    return f"{value:,}" if abs(value) <= MAX_INTEGER else f"a number of {_digits(value)} digits"


def _signature_text(primitive: Primitive) -> str:
    parts = []
    for a in primitive.arguments:
        parts.append(a.name if a.required else f"{a.name}={a.default}")
    return f"{primitive.name}({', '.join(parts)})"
