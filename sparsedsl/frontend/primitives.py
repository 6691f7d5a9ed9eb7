"""The primitives of the language and their signatures: the checker's one table.

Each argument has a type (``int``, ``float``, ``bool``, an enumeration, or ``branch``)
and bounds where they apply; the checker enforces them and reports the argument by name.
"""

from __future__ import annotations

from dataclasses import dataclass

ENUMS: dict[str, tuple[str, ...]] = {
    "pool": ("mean", "max", "mlp"),
    "per": ("token", "block"),
    "within": ("sequence", "document"),
}

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
    type: str
    minimum: int | None = None
    default: object = None  # None: required
    maximum: int | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Primitive:
    name: str
    kind: str  # "mask" | "compress" | "select" | "gate"
    arguments: tuple[Argument, ...] = ()
    summary: str = ""

    @property
    def bare(self) -> bool:
        """Written without parentheses (``causal``) as well as with them (``causal()``)."""
        return self.kind == "mask" and not self.arguments


def _size(name: str, maximum: int = MAX_SIZE) -> Argument:
    return Argument(name, "int", minimum=1, maximum=maximum)


PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in (
        Primitive("full", "mask", summary="every key"),
        Primitive("causal", "mask", summary="j <= i"),
        Primitive("document", "mask", summary="doc[i] == doc[j] (doc_ids given at call time)"),
        Primitive("sliding", "mask", (_size("window"),), "|i - j| < window"),
        Primitive("sink", "mask", (_size("size"),), "j < size"),
        Primitive("global", "mask", (_size("size"),), "j < size or i < size"),
        Primitive("chunked", "mask", (_size("size"),), "i // size == j // size"),
        Primitive(
            "dilated",
            "mask",
            (_size("window"), _size("dilation")),
            "(i - j) % dilation == 0 and |i - j| < window * dilation",
        ),
        Primitive(
            "compress",
            "compress",
            (
                _size("block"),
                _size("stride"),
                Argument("pool", "pool", default="mean"),
                Argument("within", "within", default="sequence"),
            ),
            "attention over pooled blocks of keys",
        ),
        Primitive(
            "select",
            "select",
            (
                _size("block"),
                _size("topk", MAX_TOPK),
                Argument("score", "branch"),
                Argument("keep_first", "int", minimum=0, default=0, maximum=MAX_TOPK),
                Argument("keep_local", "int", minimum=0, default=0, maximum=MAX_TOPK),
                Argument("per", "per", default="token"),
            ),
            "attention over the top-k key blocks scored by a compress branch",
        ),
        Primitive("gate", "gate", summary="separate softmaxes mixed by call-time gates"),
    )
}

# Selected blocks are walked in whole Triton tiles: a power of two, at least 16 (the
# smallest tile the tensor cores take).
SELECT_BLOCK_SIZES = tuple(2**n for n in range(4, 13))
