"""The checked pattern: what a pattern means, with every parameter resolved to a value.

The checker (:mod:`.check`) builds these from the syntax tree; lowering
(:mod:`sparsedsl.ir.lower`), the dense reference and the mask pictures read them.
Masks are element predicates over (query position ``i``, key position ``j``); branches
are the separately normalised attentions a pattern mixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .kinds import Per, Pool, Within


# ---------------------------------------------------------------- element masks
class Atom:
    """A primitive element mask: one frozen dataclass per mask primitive, named after it
    (``mask_text`` prints ``type(mask).__name__.lower()``), whose fields are the
    primitive's arguments in order. ``primitives.PRIMITIVES`` names the class;
    ``ir.segments.ATOMS`` (segments and predicate) and ``reference.ELEMENT_MASKS`` (the
    oracle's element mask) give it its meaning. See "Adding a primitive" in
    docs/architecture.md."""

    __slots__ = ()


@dataclass(frozen=True)
class Full(Atom):
    """Every pair."""


@dataclass(frozen=True)
class Causal(Atom):
    """``j <= i``."""


@dataclass(frozen=True)
class Sliding(Atom):
    """``|i - j| < window``."""

    window: int


@dataclass(frozen=True)
class Sink(Atom):
    """``j < size``: the first keys, seen by every query."""

    size: int


@dataclass(frozen=True)
class Global(Atom):
    """``j < size or i < size``: Longformer's global tokens."""

    size: int


@dataclass(frozen=True)
class Chunked(Atom):
    """``i // size == j // size``."""

    size: int


@dataclass(frozen=True)
class Dilated(Atom):
    """``(i - j) % dilation == 0 and |i - j| < window * dilation``."""

    window: int
    dilation: int


@dataclass(frozen=True)
class Document(Atom):
    """``doc[i] == doc[j]``, with document ids given at call time."""


@dataclass(frozen=True)
class And:
    left: Mask
    right: Mask


@dataclass(frozen=True)
class Or:
    left: Mask
    right: Mask


@dataclass(frozen=True)
class Not:
    operand: Mask


# A new primitive's class joins this by subclassing Atom.
Mask = Union[Atom, And, Or, Not]


def mask_atoms(mask: Mask) -> list[Mask]:
    """The primitive masks a mask is built from, left to right."""
    if isinstance(mask, (And, Or)):
        return mask_atoms(mask.left) + mask_atoms(mask.right)
    if isinstance(mask, Not):
        return mask_atoms(mask.operand)
    return [mask]


def uses_documents(mask: Mask) -> bool:
    return any(isinstance(atom, Document) for atom in mask_atoms(mask))


def is_causal(mask: Mask) -> bool:
    """Whether ``mask`` provably lets no query see a later key: it keeps ``causal`` on every
    path (an intersection with it, or a union of such masks). Sound, not complete: a
    causal mask written without ``causal`` (``~sliding(...)``-style tricks) is not proved."""
    if isinstance(mask, Causal):
        return True
    if isinstance(mask, And):
        return is_causal(mask.left) or is_causal(mask.right)
    if isinstance(mask, Or):
        return is_causal(mask.left) and is_causal(mask.right)
    return False


# ---------------------------------------------------------------- branches
@dataclass(frozen=True)
class MaskBranch:
    """Attention over the raw keys that ``mask`` lets each query see."""

    name: str
    mask: Mask


@dataclass(frozen=True)
class CompressBranch:
    """Attention over pooled keys: pooled key ``c`` summarises keys ``[c*stride, c*stride+block)``."""

    name: str
    block: int
    stride: int
    pool: Pool
    # "document": every document of a packed batch is its own sequence (pooled blocks,
    # and the blocks of selections scored by this branch, start at its first position).
    within: Within = Within.SEQUENCE

    def __post_init__(self) -> None:  # members, also when built from strings
        object.__setattr__(self, "pool", Pool(self.pool))
        object.__setattr__(self, "within", Within(self.within))


@dataclass(frozen=True)
class SelectBranch:
    """Attention over the ``topk`` key blocks scored highest by the ``score`` branch,
    chosen for every query (``per="token"``) or shared by the queries of each query block
    of ``block`` positions (``per="block"``)."""

    name: str
    block: int
    topk: int
    score: CompressBranch
    keep_first: int
    keep_local: int
    per: Per = Per.TOKEN

    def __post_init__(self) -> None:
        object.__setattr__(self, "per", Per(self.per))

    @property
    def within(self) -> Within:
        """Selections count blocks as their score branch does."""
        return self.score.within


Branch = Union[MaskBranch, CompressBranch, SelectBranch]


@dataclass(frozen=True)
class CheckedPattern:
    """A pattern with resolved parameters: its output branches and how they combine.

    ``gated`` patterns return ``gate(...)``: each branch is its own softmax and the
    output is the gate-weighted sum. Otherwise there is exactly one branch.
    """

    name: str
    params: tuple[tuple[str, object], ...]
    branches: tuple[Branch, ...]
    gated: bool
    source_name: str
    line: int

    @property
    def needs_documents(self) -> bool:
        return self.packed or any(isinstance(b, MaskBranch) and uses_documents(b.mask) for b in self.branches)

    @property
    def packed(self) -> bool:
        """Compress (and select) branches work within documents: a packed batch."""
        return any(c.within == Within.DOCUMENT for c in self.compress_branches())

    def later_keys(self) -> tuple[Branch, ...]:
        """The branches a cache of past keys cannot serve: masks that may see later keys,
        and selections shared per block (a block's queries take the choice of its first
        query in the call, which a cache does not keep)."""
        return tuple(
            b
            for b in self.branches
            if (isinstance(b, MaskBranch) and not is_causal(b.mask)) or (isinstance(b, SelectBranch) and b.per == Per.BLOCK)
        )

    def compress_branches(self) -> tuple[CompressBranch, ...]:
        """Every compress branch, the ones only used to score a selection included, once each."""
        found: dict[str, CompressBranch] = {}
        for branch in self.branches:
            if isinstance(branch, CompressBranch):
                found.setdefault(branch.name, branch)
            elif isinstance(branch, SelectBranch):
                found.setdefault(branch.score.name, branch.score)
        return tuple(found.values())


# ---------------------------------------------------------------- text
def mask_text(mask: Mask) -> str:
    """The mask in the language's own syntax, with parameters as numbers."""
    return _mask_text(mask)[0]


def _mask_text(mask: Mask) -> tuple[str, int]:
    if isinstance(mask, (And, Or)):
        precedence = 2 if isinstance(mask, And) else 1
        left, lp = _mask_text(mask.left)
        right, rp = _mask_text(mask.right)
        left = left if lp >= precedence else f"({left})"
        right = right if rp > precedence else f"({right})"
        return f"{left} {'&' if isinstance(mask, And) else '|'} {right}", precedence
    if isinstance(mask, Not):
        text, p = _mask_text(mask.operand)
        return f"~{text if p >= 5 else f'({text})'}", 5
    name = type(mask).__name__.lower()
    values = [str(getattr(mask, f)) for f in mask.__dataclass_fields__]
    return (f"{name}({', '.join(values)})" if values else name), 6


def branch_text(branch: Branch) -> str:
    if isinstance(branch, MaskBranch):
        return mask_text(branch.mask)
    if isinstance(branch, CompressBranch):
        within = ", within=document" if branch.within == Within.DOCUMENT else ""
        return f"compress(block={branch.block}, stride={branch.stride}, pool={branch.pool}{within})"
    return (
        f"select(block={branch.block}, topk={branch.topk}, score={branch.score.name}, "
        f"keep_first={branch.keep_first}, keep_local={branch.keep_local}, per={branch.per})"
    )
