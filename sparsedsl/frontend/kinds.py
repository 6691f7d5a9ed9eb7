"""The closed sets of names the language and the IR use: pooling, selection units, what
a compress branch counts within, and the categories of primitives.

Each is a :class:`Kind`, an ``Enum`` whose members *are* their strings: they compare,
hash, print, format, ``repr`` and serialise to JSON exactly as the plain strings did
(``Pool.MEAN == "mean"``, ``f"{Pool.MEAN}" == "mean"``), so text built from them (the IR's
printout, the generated kernels, error messages) is unchanged, while code can name the
members and iterate over a set.
"""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """A name from a closed set that behaves as its string everywhere."""

    # Enum replaces these for mixed-in types (Python 3.10 and 3.11 differently, 3.12 again):
    # pin the string's own behaviour.
    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)

    def __repr__(self) -> str:
        return str.__repr__(self)

    __hash__ = str.__hash__

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The members' strings, in order (what error messages list)."""
        return tuple(member.value for member in cls)


class Pool(Kind):
    """How a compress branch summarises a window of keys (``compress(pool=...)``)."""

    MEAN = "mean"
    MAX = "max"
    MLP = "mlp"  # learned: the caller passes the pooled keys and values


class Per(Kind):
    """What one top-k choice of a select branch serves (``select(per=...)``)."""

    TOKEN = "token"  # every query
    BLOCK = "block"  # the queries of one query block


class Within(Kind):
    """What a compress branch pools over (``compress(within=...)``)."""

    SEQUENCE = "sequence"
    DOCUMENT = "document"  # every document of a packed batch on its own


class Category(Kind):
    """What a primitive of the language builds."""

    MASK = "mask"  # an element mask: combine with &, |, ~
    COMPRESS = "compress"  # a branch over pooled keys
    SELECT = "select"  # a branch over top-k key blocks
    GATE = "gate"  # the gated mix of separate branches
