"""The three tasks as training objectives: where batches come from, how a trained model
is evaluated, and what counts as solving the task.

- ``recall``: associative recall (:func:`.tasks.recall_batch`), accuracy on the queried values;
- ``needle``: one key-value pair at a controlled depth (:func:`.tasks.needle_batch`),
  accuracy at every depth of ``depths`` and their mean;
- ``lm``: next-byte prediction on the standard library's source files, packed with
  document ids (:mod:`.corpus`), validation bits per byte.

Evaluation draws from a generator of its own (seeded apart from training), so every model
is evaluated on the same held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .corpus import Corpus, load_corpus, packed_batch, validation_batches
from .tasks import Batch, RecallVocab, needle_batch, recall_batch

HELD_OUT_SEED = 10_000  # evaluation data: generator seed HELD_OUT_SEED + run seed
SOLVED = 0.99  # recall and needle: a seed solves the task at this accuracy


@dataclass(frozen=True)
class _KeyValueTask:
    """What the key-value tasks share: their vocabulary, and accuracy as the metric."""

    vocab: RecallVocab = field(default_factory=RecallVocab)
    metric = "accuracy"
    uses_documents = False

    @property
    def vocab_size(self) -> int:
        return self.vocab.size


@dataclass(frozen=True)
class Recall(_KeyValueTask):
    """Associative recall: accuracy on the queried values."""

    seq: int = 128
    pairs: int = 8
    queries: int = 8
    name = "recall"

    def batch(self, batch: int, generator: torch.Generator) -> Batch:
        return recall_batch(batch, self.seq, self.pairs, min(self.queries, self.pairs), self.vocab, generator)

    def evaluate(self, model, batch: int, count: int, generator: torch.Generator, device) -> dict:
        return {"accuracy": _accuracy(model, [self.batch(batch, generator) for _ in range(count)], device)}


@dataclass(frozen=True)
class Needle(_KeyValueTask):
    """One needle at a random depth in training; accuracy at each of ``depths`` and their mean."""

    seq: int = 1024
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    distractors: int = 8
    name = "needle"

    def batch(self, batch: int, generator: torch.Generator) -> Batch:
        depth = float(torch.rand((), generator=generator))  # training sees every depth
        return needle_batch(batch, self.seq, depth, self.vocab, generator, self.distractors)

    def evaluate(self, model, batch: int, count: int, generator: torch.Generator, device) -> dict:
        by_depth = {
            str(depth): _accuracy(
                model, [needle_batch(batch, self.seq, depth, self.vocab, generator, self.distractors) for _ in range(count)], device
            )
            for depth in self.depths
        }
        return {"accuracy": sum(by_depth.values()) / len(by_depth), "accuracy_by_depth": by_depth}


@dataclass(frozen=True)
class LanguageModel:
    """Next-byte prediction on packed standard-library files; validation bits per byte."""

    seq: int = 2048
    max_bytes: int | None = None  # of the training split (None: all of it)
    # The splits, read on first use; shared by the copies a curriculum's phases make.
    corpora: dict = field(default_factory=dict, compare=False, repr=False)
    name = "lm"
    metric = "val_bpb"
    uses_documents = True
    vocab_size = 256

    def _corpus(self, split: str) -> Corpus:
        if split not in self.corpora:
            self.corpora[split] = load_corpus(split, max_bytes=self.max_bytes if split == "train" else None)
        return self.corpora[split]

    def batch(self, batch: int, generator: torch.Generator) -> Batch:
        return packed_batch(self._corpus("train"), batch, self.seq, generator)

    def evaluate(self, model, batch: int, count: int, generator: torch.Generator, device) -> dict:
        total = scored = 0.0
        with torch.no_grad():
            for data in validation_batches(self._corpus("validation"), batch, self.seq, count):
                data = data.to(device)
                logits = model(data.tokens, data.doc_ids, data.scored).float()
                total += F.cross_entropy(logits, data.targets[data.scored], reduction="sum").item()
                scored += data.scored.sum().item()
        return {"val_bpb": total / scored / math.log(2)}


def solved(objective, value: float) -> bool | None:
    """Whether a final metric solves the task (None for language modelling)."""
    return value >= SOLVED if objective.metric == "accuracy" else None


def make_objective(task: str, seq: int, **options):
    """``recall``, ``needle`` or ``lm`` at length ``seq``; ``options`` are its fields."""
    kinds = {"recall": Recall, "needle": Needle, "lm": LanguageModel}
    if task not in kinds:
        raise ValueError(f"task {task!r}: expected one of {', '.join(kinds)}")
    return kinds[task](seq=seq, **options)


def _accuracy(model, batches: list[Batch], device) -> float:
    correct = total = 0
    with torch.no_grad():
        for data in batches:
            data = data.to(device)
            predicted = model(data.tokens, data.doc_ids, data.scored).argmax(-1)
            correct += (predicted == data.targets[data.scored]).sum().item()
            total += predicted.numel()
    return correct / total
