"""Byte-level language-modelling data that every machine has offline: the source files of
the running Python's standard library.

Files are split into train and validation by a fixed hash of their relative path, so the
split of a file never changes between runs, machines or Python versions. Rows of a batch
are packed: each is a random stretch of the concatenated files, with the file of every
byte as its document, so that attention can be kept inside one file.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import IGNORE, Batch

SPLITS = ("train", "validation")
VALIDATION_SEED = 20_240_601  # every model is evaluated on the batches of this seed
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages are not the stdlib


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Non-empty ``*.py`` files under ``root`` (default: the running Python's standard
    library), without installed packages or ``__pycache__``, sorted by relative POSIX path."""
    base = _root(root)
    found = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base)
        if _SKIPPED_DIRS.intersection(relative.parts[:-1]) or not path.is_file() or path.stat().st_size == 0:
            continue
        found.append(path)
    return sorted(found, key=lambda path: path.relative_to(base).as_posix())


def _root(root: str | Path | None) -> Path:
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"no directory {base} to read source files from")
    return base


def split_of(relative_path: str, validation_share: float = 0.05) -> str:
    """``"train"`` or ``"validation"`` for a file, from a fixed hash of its relative POSIX
    path (SHA-256, not Python's salted ``hash``): about ``validation_share`` of files go to
    validation."""
    if not 0.0 <= validation_share <= 1.0:
        raise ValueError(f"validation_share is {validation_share}: it is a fraction, between 0 and 1")
    draw = int.from_bytes(hashlib.sha256(relative_path.encode("utf-8")).digest()[:8], "big")
    return "validation" if draw < validation_share * 2**64 else "train"


@dataclass(frozen=True)
class Corpus:
    """The bytes of the files of one split, concatenated (1-D uint8), the offset where each
    file starts (1-D int64, ascending, from 0), and the files' relative paths."""

    tokens: torch.Tensor
    starts: torch.Tensor
    paths: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.starts) != len(self.paths) or len(self.starts) == 0 or self.starts[0] != 0:
            raise ValueError("Corpus.starts must hold one offset per path, the first 0")


def load_corpus(split: str, root: str | Path | None = None, max_bytes: int | None = None,
                validation_share: float = 0.05) -> Corpus:
    """The files of ``split`` (see :func:`split_of`) under ``root`` (default: the standard
    library), read as bytes in path order. With ``max_bytes``, stops before the first file
    that would pass it: whole files only, but always at least one."""
    if split not in SPLITS:
        raise ValueError(f"split is {split!r}: it must be one of {', '.join(SPLITS)}")
    base = _root(root)
    contents: list[bytes] = []
    paths: list[str] = []
    total = 0
    for path in stdlib_files(base):
        relative = path.relative_to(base).as_posix()
        if split_of(relative, validation_share) != split:
            continue
        data = path.read_bytes()
        if max_bytes is not None and contents and total + len(data) > max_bytes:
            break
        contents.append(data)
        paths.append(relative)
        total += len(data)
    if not contents:
        raise ValueError(f"split {split!r} of {base} is empty (validation_share {validation_share}): "
                         "no non-empty .py file hashes into it")
    lengths = torch.tensor([len(data) for data in contents], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    tokens = torch.frombuffer(bytearray(b"".join(contents)), dtype=torch.uint8)
    return Corpus(tokens, starts, tuple(paths))


def packed_batch(corpus: Corpus, batch: int, seq: int, generator: torch.Generator) -> Batch:
    """Rows of ``seq`` bytes from random offsets of the corpus (a row usually spans several
    files). Targets are the next byte, except where it starts another file (``IGNORE``: no
    prediction across files); ``doc_ids`` number the files of a row from 0, so attention
    kept to equal ids never crosses a file."""
    if seq < 1 or batch < 1:
        raise ValueError(f"batch ({batch}) and seq ({seq}) must be at least 1")
    if len(corpus.tokens) < seq + 1:
        raise ValueError(f"the corpus has {len(corpus.tokens)} bytes, fewer than seq + 1 = {seq + 1}; lower seq")
    offsets = torch.randint(0, len(corpus.tokens) - seq, (batch,), generator=generator)
    at = offsets[:, None] + torch.arange(seq + 1)  # seq tokens and the byte after the last
    window = corpus.tokens[at].long()
    file = torch.searchsorted(corpus.starts, at, right=True) - 1
    boundary = file[:, 1:] != file[:, :-1]  # boundary[:, t]: token t is its file's last byte
    targets = window[:, 1:].masked_fill(boundary, IGNORE)
    doc_ids = torch.cat([torch.zeros(batch, 1, dtype=torch.int64), boundary[:, :-1].long().cumsum(1)], 1)
    return Batch(window[:, :-1], targets, doc_ids)


def validation_batches(corpus: Corpus, batch: int, seq: int, count: int) -> list[Batch]:
    """``count`` packed batches drawn from a constant seed: identical for every model."""
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    return [packed_batch(corpus, batch, seq, generator) for _ in range(count)]
