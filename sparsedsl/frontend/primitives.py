"""The primitives of the language: the one table that describes each of them.

Every primitive has a name, a :class:`~.kinds.Category`, a signature and a one-line
summary; a mask primitive also names the class of :mod:`.model` its calls build (its
fields are the arguments). Each argument has a type (``int``, ``float``, ``bool``, an
enumeration, or ``branch``) and bounds where they apply; the checker enforces them and
reports the argument by name. What a mask primitive means is given, once each, by the
lowering's ``ir.segments.ATOMS`` and the reference's ``reference.ELEMENT_MASKS``; "Adding a
primitive" in docs/architecture.md lists every place a new one touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import model as M
from .kinds import Category, Kind, Per, Pool, Within

# The enumerations a parameter or argument may have, by type name (`p: pool = mean`).
ENUM_KINDS: dict[str, type[Kind]] = {"pool": Pool, "per": Per, "within": Within}
ENUMS: dict[str, tuple[str, ...]] = {name: kind.names() for name, kind in ENUM_KINDS.items()}

# The types an argument of a primitive may have; a parameter may have any but `branch`.
ArgumentType = Literal["int", "float", "bool", "pool", "per", "within", "branch"]
PARAM_TYPES = ("int", "float", "bool", *ENUMS)

# The kernels index positions with 32-bit integers and add sizes to them (`i + window - 1`):
# with positions and sizes both at most 2^30 every such sum fits. Every size argument, and
# a dilated window's span window * dilation, is at most this; so are sequence lengths and
# cache capacities at call time.
MAX_SIZE = 2**30
# The top-k kernel unrolls its loop over ranks (one per chosen block) at compile time.
MAX_TOPK = 256
# The gate kernels take one argument per branch and unroll their loop over branches.
MAX_GATE_BRANCHES = 16
# Integer arithmetic in a pattern folds to 64-bit values at most.
MAX_INTEGER = 2**63 - 1


@dataclass(frozen=True)
class Argument:
    name: str
    type: ArgumentType
    minimum: int | None = None
    default: object = None  # None: required
    maximum: int | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Primitive:
    name: str
    kind: Category
    arguments: tuple[Argument, ...] = ()
    summary: str = ""
    # Mask primitives: the model class a call builds, from its arguments by name.
    mask: type[M.Atom] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Category(self.kind))
        if (self.mask is not None) != (self.kind == Category.MASK):
            raise ValueError(f"primitive `{self.name}`: every mask primitive, and nothing else, names a model class")

    @property
    def bare(self) -> bool:
        """Written without parentheses (``causal``) as well as with them (``causal()``)."""
        return self.kind == Category.MASK and not self.arguments


def _size(name: str, maximum: int = MAX_SIZE) -> Argument:
    return Argument(name, "int", minimum=1, maximum=maximum)


def _mask(name: str, mask: type[M.Atom], arguments: tuple[Argument, ...], summary: str) -> Primitive:
    return Primitive(name, Category.MASK, arguments, summary, mask)


PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in (
        _mask("full", M.Full, (), "every key"),
        _mask("causal", M.Causal, (), "j <= i"),
        _mask("document", M.Document, (), "doc[i] == doc[j] (doc_ids given at call time)"),
        _mask("sliding", M.Sliding, (_size("window"),), "|i - j| < window"),
        _mask("sink", M.Sink, (_size("size"),), "j < size"),
        _mask("global", M.Global, (_size("size"),), "j < size or i < size"),
        _mask("chunked", M.Chunked, (_size("size"),), "i // size == j // size"),
        _mask(
            "dilated",
            M.Dilated,
            (_size("window"), _size("dilation")),
            "(i - j) % dilation == 0 and |i - j| < window * dilation",
        ),
        Primitive(
            "compress",
            Category.COMPRESS,
            (
                _size("block"),
                _size("stride"),
                Argument("pool", "pool", default=Pool.MEAN),
                Argument("within", "within", default=Within.SEQUENCE),
            ),
            "attention over pooled blocks of keys",
        ),
        Primitive(
            "select",
            Category.SELECT,
            (
                _size("block"),
                _size("topk", MAX_TOPK),
                Argument("score", "branch"),
                Argument("keep_first", "int", minimum=0, default=0, maximum=MAX_TOPK),
                Argument("keep_local", "int", minimum=0, default=0, maximum=MAX_TOPK),
                Argument("per", "per", default=Per.TOKEN),
            ),
            "attention over the top-k key blocks scored by a compress branch",
        ),
        Primitive("gate", Category.GATE, summary="separate softmaxes mixed by call-time gates"),
    )
}

# The mask primitives, and the primitive each model class of a mask belongs to.
MASK_PRIMITIVES: dict[str, Primitive] = {n: p for n, p in PRIMITIVES.items() if p.kind == Category.MASK}
PRIMITIVE_OF_MASK: dict[type[M.Atom], Primitive] = {p.mask: p for p in MASK_PRIMITIVES.values()}

# Selected blocks are walked in whole Triton tiles: a power of two, at least 16 (the
# smallest tile the tensor cores take).
SELECT_BLOCK_SIZES = tuple(2**n for n in range(4, 13))
