"""Synthetic long-context tasks, each a pure function of a ``torch.Generator``.

A task returns a :class:`Batch`: the tokens a decoder reads, the next token to predict at
every position where a loss is taken (``IGNORE`` elsewhere) and, for packed rows, the
document of every token. The same generator state always gives the same batch, so two
models trained or evaluated from equal seeds see identical data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE = -100  # cross_entropy's default ignore_index: no loss is taken at such a target


@dataclass(frozen=True)
class Batch:
    """Tokens (B, L), next-token targets (B, L) with ``IGNORE`` where no loss is taken, and
    the document of every token (B, L) when several documents share a row (else None)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        doc_ids = None if self.doc_ids is None else self.doc_ids.to(device)
        return Batch(self.tokens.to(device), self.targets.to(device), doc_ids)

    @property
    def scored(self) -> torch.Tensor:
        """Boolean (B, L): the positions where a loss is taken."""
        return self.targets != IGNORE


@dataclass(frozen=True)
class RecallVocab:
    """Token ids of the key-value tasks: ``noise`` filler ids first, then ``keys``, then
    ``values`` (the layout of ``examples/train_recall.py``)."""

    keys: int = 64
    values: int = 64
    noise: int = 64

    def __post_init__(self) -> None:
        for name in ("keys", "values", "noise"):
            count = getattr(self, name)
            if count < 1:
                raise ValueError(f"RecallVocab.{name} is {count}: every kind of token needs at least one id")

    @property
    def size(self) -> int:
        """Number of token ids: the embedding and output size of a model."""
        return self.noise + self.keys + self.values

    @property
    def key_base(self) -> int:
        """Id of key 0."""
        return self.noise

    @property
    def value_base(self) -> int:
        """Id of value 0."""
        return self.noise + self.keys


def recall_batch(batch: int, seq: int, pairs: int, queries: int, vocab: RecallVocab,
                 generator: torch.Generator) -> Batch:
    """Associative recall: ``pairs`` key-value pairs (a key token then its value token, at
    distinct even offsets) in noise, then the last ``2 * queries`` tokens ask ``queries`` of
    those keys again, each followed by its value. The loss is taken at each query key: the
    value to predict needs the pair seen far back.

    Draws from ``generator`` in the order of ``examples/train_recall.py``'s
    ``recall_batch``, so equal generator states give equal tokens.
    """
    _check_recall(batch, seq, pairs, queries, vocab)
    context = seq - 2 * queries
    tokens = torch.randint(0, vocab.noise, (batch, seq), generator=generator)
    keys = torch.stack([torch.randperm(vocab.keys, generator=generator)[:pairs] for _ in range(batch)])
    values = torch.randint(0, vocab.values, (batch, pairs), generator=generator)
    # Pair slots: distinct even offsets in the context, so pairs never overlap.
    slots = torch.stack([torch.randperm(context // 2, generator=generator)[:pairs] for _ in range(batch)]) * 2
    rows = torch.arange(batch)[:, None]
    tokens[rows, slots] = vocab.key_base + keys
    tokens[rows, slots + 1] = vocab.value_base + values
    asked = torch.stack([torch.randperm(pairs, generator=generator)[:queries] for _ in range(batch)])
    query_at = context + 2 * torch.arange(queries)
    tokens[:, query_at] = vocab.key_base + keys.gather(1, asked)
    tokens[:, query_at + 1] = vocab.value_base + values.gather(1, asked)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, query_at] = tokens[:, query_at + 1]
    return Batch(tokens, targets)


def _check_recall(batch: int, seq: int, pairs: int, queries: int, vocab: RecallVocab) -> None:
    if batch < 1:
        raise ValueError(f"batch is {batch}: it must be at least 1")
    if queries < 1:
        raise ValueError(f"queries is {queries}: ask at least 1 query, or nothing is scored")
    if 2 * queries >= seq:
        raise ValueError(f"queries ({queries}) take 2 * queries = {2 * queries} tokens, leaving no context in "
                         f"seq ({seq}): lower queries or raise seq")
    if queries > pairs:
        raise ValueError(f"queries ({queries}) exceeds pairs ({pairs}): each query asks a distinct pair; lower queries")
    if pairs > vocab.keys:
        raise ValueError(f"pairs ({pairs}) exceeds vocab.keys ({vocab.keys}): the keys of a row are distinct; "
                         "lower pairs or raise vocab.keys")
    slots = (seq - 2 * queries) // 2
    if pairs > slots:
        raise ValueError(f"pairs ({pairs}) do not fit: the context (seq - 2 * queries = {seq - 2 * queries} tokens) "
                         f"holds {slots} two-token slots; lower pairs or raise seq")


def needle_position(seq: int, depth: float) -> int:
    """Position of the needle's key at ``depth`` of the context (the first ``seq - 2``
    tokens): 0 at depth 0, the last slot that still holds the value at depth 1."""
    _check_needle_depth(seq, depth)
    last_slot = seq - 4  # context seq - 2, minus the value after the key
    return math.floor(depth * last_slot + 0.5)


def _check_needle_depth(seq: int, depth: float) -> None:
    if seq < 4:
        raise ValueError(f"seq is {seq}: a needle needs at least 4 tokens "
                         "(key and value in the context, then the query)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth is {depth}: it is a fraction of the context, between 0 and 1")


def needle_batch(batch: int, seq: int, depth: float, vocab: RecallVocab, generator: torch.Generator,
                 distractors: int = 0) -> Batch:
    """Single needle in a haystack (RULER-style): noise filler with one key-value pair whose
    key sits at fraction ``depth`` of the context (see :func:`needle_position`), plus
    ``distractors`` pairs with other keys at random non-overlapping positions. The last two
    tokens are the needle's key and value; the loss is taken at that key only.
    """
    _check_needle(batch, seq, depth, vocab, distractors)
    key_at = needle_position(seq, depth)
    tokens = torch.randint(0, vocab.noise, (batch, seq), generator=generator)
    for row in range(batch):
        keys = torch.randperm(vocab.keys, generator=generator)[: distractors + 1]  # keys[0] is the needle's
        values = torch.randint(0, vocab.values, (distractors + 1,), generator=generator)
        starts = torch.tensor([key_at] + _distractor_starts(seq - 2, key_at, distractors, generator))
        tokens[row, starts] = vocab.key_base + keys
        tokens[row, starts + 1] = vocab.value_base + values
    tokens[:, seq - 2] = tokens[:, key_at]
    tokens[:, seq - 1] = tokens[:, key_at + 1]
    targets = torch.full_like(tokens, IGNORE)
    targets[:, seq - 2] = tokens[:, seq - 1]
    return Batch(tokens, targets)


def _check_needle(batch: int, seq: int, depth: float, vocab: RecallVocab, distractors: int) -> None:
    if batch < 1:
        raise ValueError(f"batch is {batch}: it must be at least 1")
    _check_needle_depth(seq, depth)
    if distractors < 0:
        raise ValueError(f"distractors is {distractors}: it must be 0 or more")
    if distractors + 1 > vocab.keys:
        raise ValueError(f"distractors ({distractors}) need {distractors + 1} distinct keys with the needle, but "
                         f"vocab.keys is {vocab.keys}; lower distractors or raise vocab.keys")
    # The greedy placement below always finds room while the context has 3 * distractors + 2 tokens.
    most = (seq - 4) // 3
    if distractors > most:
        raise ValueError(f"distractors ({distractors}) do not fit: seq {seq} leaves room for at most {most}; "
                         "lower distractors or raise seq")


def _distractor_starts(context: int, key_at: int, count: int, generator: torch.Generator) -> list[int]:
    """Start positions of ``count`` key-value pairs in the context that overlap neither
    each other nor the needle at ``key_at``: candidates in a random order, each taken unless
    it overlaps one already taken."""
    if count == 0:
        return []
    taken: list[int] = []
    blocked = {key_at - 1, key_at, key_at + 1}  # a pair starting here would overlap the needle
    for start in torch.randperm(context - 1, generator=generator).tolist():
        if start not in blocked:
            taken.append(start)
            if len(taken) == count:
                break
            blocked.update((start - 1, start, start + 1))
    return taken
