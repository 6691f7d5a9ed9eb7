"""The training harness's data: synthetic tasks and the packed byte-level corpus."""

import hashlib
from pathlib import Path

import pytest
import torch

import sparsedsl
from sparsedsl.training.corpus import (
    Corpus,
    load_corpus,
    packed_batch,
    split_of,
    stdlib_files,
    validation_batches,
)
from sparsedsl.training.tasks import (
    IGNORE,
    Batch,
    RecallVocab,
    needle_batch,
    needle_position,
    recall_batch,
)

VOCAB = RecallVocab()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- recall
# The tokens the original examples/train_recall.py drew for recall_batch(3, 64, 10, 4,
# (16 keys, 8 values, 4 noise)) from seeds 0, 1, 2 (SHA-256 of their int64 bytes): the
# task was moved here unchanged, so the runs documented before stay reproducible.
EXAMPLE_TOKENS = ["21fcf496a80681324ec30140eb39feb4", "3d10eaaddd771151226a07be39d6d53f", "49beebb1fa7ecd1e2cfcdac71ace54d3"]


def test_recall_matches_the_example_token_for_token():
    vocab = RecallVocab(keys=16, values=8, noise=4)
    for seed, digest in enumerate(EXAMPLE_TOKENS):
        got = recall_batch(3, 64, 10, 4, vocab, generator(seed))
        assert hashlib.sha256(got.tokens.numpy().astype("int64").tobytes()).hexdigest()[:32] == digest
        assert torch.equal(got.scored.nonzero()[:, 1].view(3, 4), torch.tensor([56, 58, 60, 62]).expand(3, 4))


def test_recall_targets_are_the_values_after_each_query_key():
    batch = recall_batch(4, 96, 12, 5, VOCAB, generator())
    assert batch.tokens.dtype == batch.targets.dtype == torch.int64 and batch.doc_ids is None
    assert batch.scored.sum(1).tolist() == [5] * 4
    rows, at = batch.scored.nonzero(as_tuple=True)
    assert torch.equal(batch.targets[rows, at], batch.tokens[rows, at + 1])
    assert ((batch.tokens[rows, at] >= VOCAB.key_base) & (batch.tokens[rows, at] < VOCAB.value_base)).all()
    assert (batch.targets[rows, at] >= VOCAB.value_base).all() and (batch.targets[rows, at] < VOCAB.size).all()


def test_recall_queried_keys_occur_once_in_the_context_followed_by_their_value():
    queries = 5
    batch = recall_batch(4, 96, 12, queries, VOCAB, generator(1))
    context = 96 - 2 * queries
    for row in range(4):
        tokens = batch.tokens[row]
        for at in batch.scored[row].nonzero().flatten().tolist():
            found = (tokens[:context] == tokens[at]).nonzero().flatten()
            assert len(found) == 1
            assert tokens[found + 1] == batch.targets[row, at]


def test_recall_is_deterministic_and_moves_to_a_device():
    first, second = (recall_batch(2, 32, 4, 2, VOCAB, generator(7)) for _ in range(2))
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.targets, second.targets)
    moved = first.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tokens, first.tokens) and moved.doc_ids is None


@pytest.mark.parametrize(
    "arguments, name",
    [
        ({"pairs": 65}, "pairs"),  # more pairs than keys
        ({"queries": 16, "seq": 32}, "queries"),  # 2 * queries >= seq
        ({"queries": 5, "pairs": 4}, "queries"),
        ({"pairs": 9}, "pairs"),  # 9 two-token slots do not fit in 32 - 2 * 8 tokens
        ({"batch": 0}, "batch"),
    ],
)
def test_recall_rejects_bad_arguments_by_name(arguments, name):
    call = {"batch": 2, "seq": 32, "pairs": 8, "queries": 8, "vocab": VOCAB, "generator": generator()} | arguments
    with pytest.raises(ValueError, match=f"^{name}"):
        recall_batch(**call)


# ---------------------------------------------------------------- needle
@pytest.mark.parametrize("depth, key_at", [(0.0, 0), (1.0, 60), (0.5, 30)])
def test_needle_key_sits_at_its_depth(depth, key_at):
    seq = 64  # context 62: the last slot that still holds the value is 60
    batch = needle_batch(3, seq, depth, VOCAB, generator())
    assert needle_position(seq, depth) == key_at
    assert torch.equal(batch.tokens[:, key_at], batch.tokens[:, seq - 2])
    assert torch.equal(batch.tokens[:, key_at + 1], batch.tokens[:, seq - 1])


def test_needle_middle_depth_is_within_one_slot_of_the_middle():
    for seq in range(4, 40):
        assert abs(needle_position(seq, 0.5) - (seq - 4) / 2) <= 1


def test_needle_asks_its_key_last_and_scores_only_there():
    seq = 50
    batch = needle_batch(4, seq, 0.3, VOCAB, generator(2), distractors=6)
    assert batch.scored.sum(1).tolist() == [1] * 4
    assert batch.scored[:, seq - 2].all()
    assert torch.equal(batch.targets[:, seq - 2], batch.tokens[:, seq - 1])
    is_key = (batch.tokens >= VOCAB.key_base) & (batch.tokens < VOCAB.value_base)
    assert is_key[:, seq - 2].all() and (batch.tokens[:, seq - 1] >= VOCAB.value_base).all()


def test_needle_distractors_have_other_keys_each_followed_by_a_value():
    seq, distractors = 40, 12  # the most that fit: (40 - 4) // 3
    batch = needle_batch(8, seq, 0.7, VOCAB, generator(3), distractors=distractors)
    key_at = needle_position(seq, 0.7)
    for row in batch.tokens:
        context = row[: seq - 2]
        keys_at = ((context >= VOCAB.key_base) & (context < VOCAB.value_base)).nonzero().flatten()
        assert len(keys_at) == distractors + 1 and key_at in keys_at.tolist()
        assert (context[keys_at + 1] >= VOCAB.value_base).all()  # pairs never overlap
        assert (context[keys_at] == row[seq - 2]).sum() == 1  # no distractor repeats the needle's key
        assert len(set(context[keys_at].tolist())) == distractors + 1


def test_needle_is_deterministic():
    first, second = (needle_batch(2, 30, 0.4, VOCAB, generator(5), distractors=3) for _ in range(2))
    assert torch.equal(first.tokens, second.tokens)


@pytest.mark.parametrize(
    "arguments, name",
    [({"depth": 1.5}, "depth"), ({"depth": -0.1}, "depth"), ({"seq": 3}, "seq"),
     ({"distractors": 10}, "distractors"), ({"distractors": -1}, "distractors")],
)
def test_needle_rejects_bad_arguments_by_name(arguments, name):
    call = {"batch": 2, "seq": 32, "depth": 0.5, "vocab": VOCAB, "generator": generator()} | arguments
    with pytest.raises(ValueError, match=f"^{name}"):
        needle_batch(**call)


# ---------------------------------------------------------------- corpus
def test_split_is_a_fixed_hash_of_the_path():
    assert split_of("copyreg.py") == "validation"
    assert split_of("os.py") == "train"
    assert split_of("json/decoder.py") == "train"
    assert split_of("json/decoder.py", validation_share=0.5) == "validation"
    assert split_of("os.py", validation_share=0.0) == "train"
    assert split_of("os.py", validation_share=1.0) == "validation"


def write_tree(root: Path) -> None:
    for name in ("a.py", "b.py", "pkg/c.py", "pkg/d.py", "test/test_e.py", "tests/f.py", "g.py", "h.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    (root / "empty.py").write_text("")
    (root / "notes.txt").write_text("not python\n")
    for skipped in ("site-packages/x.py", "pkg/__pycache__/y.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("skipped\n")


def test_stdlib_files_keeps_tests_and_skips_packages_caches_and_empty_files(tmp_path):
    write_tree(tmp_path)
    found = [path.relative_to(tmp_path).as_posix() for path in stdlib_files(tmp_path)]
    assert found == ["a.py", "b.py", "g.py", "h.py", "pkg/c.py", "pkg/d.py", "test/test_e.py", "tests/f.py"]


def test_splits_are_disjoint_and_cover_every_file(tmp_path):
    write_tree(tmp_path)
    train, validation = (load_corpus(split, root=tmp_path, validation_share=0.5) for split in ("train", "validation"))
    assert train.paths and validation.paths and not set(train.paths) & set(validation.paths)
    every = sorted(path.relative_to(tmp_path).as_posix() for path in stdlib_files(tmp_path))
    assert sorted(train.paths + validation.paths) == every
    for corpus in (train, validation):
        assert bytes(corpus.tokens.tolist()) == b"".join((tmp_path / p).read_bytes() for p in corpus.paths)


def test_an_empty_split_is_an_error(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(ValueError, match="validation"):
        load_corpus("validation", root=tmp_path, validation_share=0.0)


def test_load_corpus_of_the_stdlib_stops_at_max_bytes():
    corpus = load_corpus("validation", max_bytes=20_000)
    assert corpus.tokens.dtype == torch.uint8 and corpus.starts.dtype == torch.int64
    assert len(corpus.tokens) <= 20_000 or len(corpus.paths) == 1
    assert all(split_of(path) == "validation" for path in corpus.paths)
    assert len(corpus.starts) == len(corpus.paths) and corpus.starts[0] == 0
    tiny = load_corpus("validation", max_bytes=1)  # smaller than any file: still one whole file
    assert len(tiny.paths) == 1 and len(tiny.tokens) > 1


FILES = [b"alpha", b"bravo!!", b"cat123"]  # lengths 5, 7, 6: a row of 12 always spans a boundary


def hand_corpus() -> Corpus:
    lengths = torch.tensor([len(data) for data in FILES])
    tokens = torch.tensor(list(b"".join(FILES)), dtype=torch.uint8)
    return Corpus(tokens, torch.cumsum(lengths, 0) - lengths, ("a.py", "b.py", "c.py"))


def test_packed_rows_shift_by_one_and_stop_at_file_boundaries():
    corpus, seq = hand_corpus(), 12
    batch = packed_batch(corpus, 16, seq, generator())
    assert batch.tokens.shape == batch.targets.shape == batch.doc_ids.shape == (16, seq)
    assert batch.tokens.dtype == batch.doc_ids.dtype == torch.int64
    text = bytes(corpus.tokens.tolist())
    for tokens, targets, doc_ids in zip(batch.tokens, batch.targets, batch.doc_ids):
        offset = text.find(bytes(tokens.tolist()))  # every window of 12 is unique in this corpus
        files = [int((corpus.starts <= offset + i).sum()) - 1 for i in range(seq + 1)]
        for t in range(seq):
            crosses = files[t + 1] != files[t]
            assert targets[t] == (IGNORE if crosses else text[offset + t + 1])
        assert doc_ids.tolist() == [f - files[0] for f in files[:seq]]  # from 0, +1 at each boundary
        assert doc_ids[-1] >= 1


def test_validation_batches_are_identical_every_time():
    corpus = hand_corpus()
    first, second = validation_batches(corpus, 4, 8, 3), validation_batches(corpus, 4, 8, 3)
    assert len(first) == 3
    for a, b in zip(first, second):
        for field in ("tokens", "targets", "doc_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(first[0].tokens, first[1].tokens)


def test_doc_ids_keep_attention_inside_a_file():
    """Changing the keys and values of a row's first file leaves the document pattern's
    output at its second file exactly as it was; plain causal attention sees the change."""
    batch = packed_batch(hand_corpus(), 4, 12, generator(1))
    doc_ids = batch.doc_ids
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    first = (doc_ids == 0)[:, None, :, None]  # (B, 1, L, 1): positions of each row's first file
    assert (doc_ids == 1).any(1).all()  # every row reaches a second file
    second = (doc_ids == 1)[:, None, :].expand(4, 2, 12)  # (B, H, L): positions of each row's second file
    k2, v2 = k + 3.0 * first, v + 5.0 * first
    document, causal = sparsedsl.load("document"), sparsedsl.load("causal")
    before, after = document(q, k, v, doc_ids=doc_ids), document(q, k2, v2, doc_ids=doc_ids)
    assert torch.equal(before[second], after[second])
    assert not torch.equal(before, after)  # the first file's own outputs did change
    assert not torch.equal(causal(q, k, v)[second], causal(q, k2, v2)[second])
