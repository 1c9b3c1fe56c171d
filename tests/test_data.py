"""Tests for mhc_jax.data: tokenizer, corpus preparation, grain train loader, eval batches."""

import json
import lzma
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mhc_jax import data, data_cache, prepare, sources

MAX_DOC_CHARS = 2000
_WORDS = ["the", "king", "wörld", "straße", "日本語", "🙂", "crown", "ale", "thou", "naïve"]


def _random_text(rng: np.random.Generator, num_paragraphs: int) -> str:
    """Random paragraphs of random words (non-ASCII included), blank-line separated."""
    paragraphs = []
    for _ in range(num_paragraphs):
        lines = [
            " ".join(rng.choice(_WORDS, size=rng.integers(3, 12)))
            for _ in range(rng.integers(1, 8))
        ]
        paragraphs.append("\n".join(lines) + "\n")
    return "\n".join(paragraphs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A source directory: a.txt, sub/b.txt, c.txt.xz and an ignored notes.md."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = {"a.txt": _random_text(rng, 120), "sub/b.txt": _random_text(rng, 60)}
    (root / "sub").mkdir()
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    texts["c.txt.xz"] = _random_text(rng, 30)
    (root / "c.txt.xz").write_bytes(lzma.compress(texts["c.txt.xz"].encode()))
    (root / "notes.md").write_text("not a source\n")
    return {"root": str(root), **texts}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare.prepare_corpus(
        [corpus["root"]],
        str(out),
        val_fraction=0.2,
        records_per_shard=4,
        max_doc_chars=MAX_DOC_CHARS,
    )
    return str(out)


def _records(data_dir: str, split: str) -> list[bytes]:
    """All records of a split, in stored order, read without grain."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    records = []
    for shard in meta["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(Path(data_dir) / shard))
        records.extend(reader.read_all())
        reader.close()
    return records


def _stream(data_dir: str, split: str) -> np.ndarray:
    """The split's packed token stream: each record's bytes followed by EOS."""
    tokens = []
    for record in _records(data_dir, split):
        tokens.extend(record)
        tokens.append(data.EOS_ID)
    return np.array(tokens, dtype=np.int32)


def _window_starts(data_dir: str, seq_len: int) -> dict[tuple, int]:
    """Maps every full train window (seq_len + 1 tokens, stride seq_len) to its index."""
    stream = _stream(data_dir, "train")
    num = (len(stream) - 1) // seq_len
    windows = {tuple(stream[i * seq_len : i * seq_len + seq_len + 1]): i for i in range(num)}
    assert len(windows) == num  # Random text: windows are unique.
    return windows


def _row_windows(batch: dict) -> list[tuple]:
    return [tuple(np.append(x, y[-1])) for x, y in zip(batch["inputs"], batch["targets"])]


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def test_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "Hello, wörld! 日本語 🙂\nnaïve"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32
    assert ids.shape == (len(text.encode()) + 2,)
    assert ids[0] == data.BOS_ID and ids[-1] == data.EOS_ID
    assert ids.max() < data.VOCAB_SIZE == tok.vocab_size == 259
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, [data.PAD_ID, data.PAD_ID]).reshape(2, -1)) == text
    assert list(tok.encode("Ab")) == [65, 98]
    assert tok.decode([0xFF, 65, data.EOS_ID]) == "\ufffdA"


def test_bundled_corpus_is_about_one_megabyte():
    text = data.load_bundled_corpus()
    assert 900_000 < len(text.encode("utf-8")) < 1_200_000
    assert "HAMLET" in text and "\r" not in text


def test_split_documents_partitions_text(corpus):
    text = corpus["a.txt"]
    chunks = data.split_documents(text, max_chars=500)
    assert "".join(chunks) == text
    assert len(chunks) > 10 and all(0 < len(c) <= 500 for c in chunks)
    assert all(c.endswith("\n\n") for c in chunks[:-1])  # Cut at paragraph breaks.
    assert data.split_documents("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_prepare_writes_every_byte_once(corpus, prepared):
    expected = sorted(
        doc.encode()
        for name in ("a.txt", "sub/b.txt", "c.txt.xz")
        for doc in data.split_documents(corpus[name], MAX_DOC_CHARS)
    )
    train, val = _records(prepared, "train"), _records(prepared, "validation")
    assert sorted(train + val) == expected
    meta = data.read_meta(prepared)
    want_val = [d for d in expected if prepare.is_validation(d.decode(), 0, 0.2)]
    assert meta["splits"]["validation"]["num_docs"] == len(val) and sorted(val) == want_val
    assert 0 < len(val) < len(expected)
    for split, records in (("train", train), ("validation", val)):
        info = meta["splits"][split]
        assert info["num_docs"] == len(records)
        assert info["num_bytes"] == sum(map(len, records))
        assert info["num_tokens"] == info["num_bytes"] + len(records)
        n = len(info["shards"])
        assert n == -(-len(records) // 4)
        assert info["shards"] == [f"{split}-{i:05d}.array_record" for i in range(n)]
    assert [Path(s).name for s in meta["sources"]] == ["a.txt", "c.txt.xz", "b.txt"]
    assert meta["tokenizer"]["vocab_size"] == data.VOCAB_SIZE


def test_prepare_is_deterministic_by_seed(corpus, prepared, tmp_path):
    kwargs = dict(val_fraction=0.2, records_per_shard=4, max_doc_chars=MAX_DOC_CHARS)
    prepare.prepare_corpus([corpus["root"]], str(tmp_path / "same"), seed=0, **kwargs)
    prepare.prepare_corpus([corpus["root"]], str(tmp_path / "other"), seed=1, **kwargs)
    assert _records(str(tmp_path / "same"), "validation") == _records(prepared, "validation")
    assert _records(str(tmp_path / "other"), "validation") != _records(prepared, "validation")


def test_train_batches_are_packed_windows(prepared):
    seq_len = 64
    windows = _window_starts(prepared, seq_len)
    it = data.make_train_iterator(prepared, seq_len=seq_len, global_batch_size=8, seed=0)
    for batch in _take(it, 5):
        assert batch["inputs"].shape == batch["targets"].shape == (8, seq_len)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert all(row in windows for row in _row_windows(batch))


def test_each_epoch_is_a_fresh_permutation(prepared):
    seq_len = 64
    windows = _window_starts(prepared, seq_len)
    num = len(windows)
    it = data.make_train_iterator(prepared, seq_len=seq_len, global_batch_size=1, seed=3)
    order = [windows[row] for batch in _take(it, 2 * num) for row in _row_windows(batch)]
    assert sorted(order[:num]) == sorted(order[num:]) == list(range(num))
    assert order[:num] != order[num:]


def test_same_seed_same_batches_other_seed_differs(prepared):
    def batches(seed):
        it = data.make_train_iterator(prepared, seq_len=32, global_batch_size=4, seed=seed)
        return np.stack([b["inputs"] for b in _take(it, 4)])

    np.testing.assert_array_equal(batches(7), batches(7))
    assert not np.array_equal(batches(7), batches(8))


def test_resume_continues_at_next_batch(prepared):
    kwargs = dict(seq_len=48, global_batch_size=4, seed=5)
    reference = _take(data.make_train_iterator(prepared, **kwargs), 6)
    it = data.make_train_iterator(prepared, **kwargs)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = data.make_train_iterator(prepared, **kwargs)
    resumed.set_state(state)
    for expected, got in zip(reference[3:], _take(resumed, 3)):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(expected[key], got[key])


def test_processes_see_disjoint_slices_covering_the_epoch(prepared):
    num_tokens = data.read_meta(prepared)["splits"]["train"]["num_tokens"]
    seq_len = next(n for n in range(40, 90) if ((num_tokens - 1) // n) % 4 == 0)
    windows = _window_starts(prepared, seq_len)
    seen = []
    for p in range(2):
        it = data.make_train_iterator(
            prepared,
            seq_len=seq_len,
            global_batch_size=4,
            seed=1,
            process_index=p,
            process_count=2,
        )
        batches = _take(it, len(windows) // 4)
        assert batches[0]["inputs"].shape == (2, seq_len)
        seen.append({windows[row] for b in batches for row in _row_windows(b)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(windows)))
    with pytest.raises(ValueError, match="multiple of process_count=2"):
        data.make_train_iterator(
            prepared, seq_len=seq_len, global_batch_size=3, seed=1, process_count=2
        )


def test_eval_batches_cover_validation_once(prepared):
    seq_len, batch_size = 64, 4
    stream = _stream(prepared, "validation")
    batches = data.eval_batches(prepared, seq_len=seq_len, batch_size=batch_size)
    num_windows = -(-(len(stream) - 1) // seq_len)
    assert len(batches) == -(-num_windows // batch_size)
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    weights = np.concatenate([b["weights"] for b in batches]).reshape(-1)
    assert weights.sum() == len(stream) - 1
    np.testing.assert_array_equal(targets[weights == 1], stream[1:])
    np.testing.assert_array_equal(inputs[weights == 1], stream[:-1])
    assert np.all(targets[weights == 0] == data.PAD_ID)
    assert weights.size > weights.sum()  # The partial last window is padded, not dropped.

    hosts = [
        data.eval_batches(
            prepared, seq_len=seq_len, batch_size=batch_size, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for single, h0, h1 in zip(batches, *hosts, strict=True):
        for key in single:
            np.testing.assert_array_equal(single[key], np.concatenate([h0[key], h1[key]]))
    assert len(data.eval_batches(prepared, seq_len=seq_len, batch_size=2, max_batches=1)) == 1


def test_ensure_prepared_caches(corpus, prepared, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bundled = data_cache.ensure_prepared("", str(cache))
    assert data.read_meta(bundled)["sources"] == ["bundled:shakespeare.txt.xz"]
    text_dir = data_cache.ensure_prepared(corpus["root"], str(cache))
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [Path(bundled).name, Path(text_dir).name]
    )  # No temporary directories left behind.

    def fail(*args, **kwargs):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(prepare, "prepare_corpus", fail)
    assert data_cache.ensure_prepared("", str(cache)) == bundled
    assert data_cache.ensure_prepared(corpus["root"], str(cache)) == text_dir
    assert data_cache.ensure_prepared(prepared, str(cache)) == prepared


def test_prepare_errors(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*holds no files ending in"):
        prepare.prepare_corpus([str(tmp_path / "empty_dir")], out)
    with pytest.raises(ValueError, match="missing.txt.*does not exist"):
        prepare.prepare_corpus([str(tmp_path / "missing.txt")], out)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus.*blank.txt"):
        prepare.prepare_corpus([str(tmp_path / "blank.txt")], out)
    (tmp_path / "latin1.txt").write_bytes(b"hello\xe9 world")
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8 at byte offset 5"):
        prepare.prepare_corpus([str(tmp_path / "blank.txt"), str(tmp_path / "latin1.txt")], out)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare.prepare_corpus(None, out, val_fraction=1.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prepare.prepare_corpus(None, str(tmp_path / "full"))
    assert not Path(out).exists()


def test_loader_errors(prepared, tmp_path):
    num_tokens = data.read_meta(prepared)["splits"]["train"]["num_tokens"]
    with pytest.raises(ValueError, match=rf"seq_len \+ 1 = {num_tokens + 1}.*{num_tokens}.*train"):
        data.make_train_iterator(prepared, seq_len=num_tokens, global_batch_size=1, seed=0)
    (tmp_path / "one.txt").write_text("a single short document\n")
    prepare.prepare_corpus([str(tmp_path / "one.txt")], str(tmp_path / "one"), val_fraction=0.0)
    with pytest.raises(ValueError, match="'validation'.*no documents"):
        data.eval_batches(str(tmp_path / "one"), seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match="no meta.json"):
        data.make_train_iterator(str(tmp_path), seq_len=4, global_batch_size=1, seed=0)


def test_check_source_and_local_only_loaders(corpus, prepared, tmp_path):
    for ok in ("", prepared, corpus["root"], str(Path(corpus["root"]) / "a.txt")):
        data_cache.check_source(ok)
    with pytest.raises(ValueError, match=r"data.path='.*nope' is invalid \(source .* not exist\)"):
        data_cache.check_source(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="gs://bucket/corpus.*read local shards only"):
        data.make_train_iterator("gs://bucket/corpus", seq_len=4, global_batch_size=1, seed=0)


def test_directory_sources_keep_pathlib_order(tmp_path):
    """Files of a source directory come in pathlib's order (component by component), as
    they always did, so the same sources give the same documents and split."""
    for name in ("a/b.txt", "a-c.txt", "a/z/y.txt.xz", "b.txt", "a/notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [str(p) for p in sources.collect_files([str(tmp_path)])]
    want = sorted(p for p in tmp_path.rglob("*") if p.name.endswith((".txt", ".txt.xz")))
    assert found == [str(p) for p in want]
    assert [p.split("/")[-1] for p in found] == ["b.txt", "y.txt.xz", "a-c.txt", "b.txt"]
