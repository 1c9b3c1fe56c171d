"""Streaming preparation (``mhc_jax.prepare``): the split by hash, worker processes,
interrupted and failed preparations."""

import json
from pathlib import Path

import pytest

from mhc_jax import data, prepare, tokenizers

DOCS = [f"{i}: " + "lorem ipsum dolor sit amet " * (1 + i % 7) for i in range(300)]


@pytest.fixture
def jsonl(tmp_path) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return str(path)


def _records(out: Path, split: str) -> list[bytes]:
    meta = data.read_meta(str(out))
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for shard in meta["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(out / shard))
        records += reader.read_all()
        reader.close()
    return records


def test_validation_is_chosen_by_hash_in_corpus_order(jsonl, tmp_path):
    meta = prepare.prepare_corpus([jsonl], str(tmp_path / "out"), val_fraction=0.1, seed=3)
    val = [r.decode() for r in _records(tmp_path / "out", "validation")]
    assert val == [d for d in DOCS if prepare.is_validation(d, 3, 0.1)]
    assert 15 <= len(val) <= 45 and meta["splits"]["validation"]["num_docs"] == len(val)
    assert meta["splits"]["train"]["num_docs"] == len(DOCS) - len(val)
    assert not (tmp_path / "out" / prepare.MARKER).exists()


def test_validation_is_never_empty_when_asked_for(tmp_path):
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "first"}\n{"text": "second"}\n')
    meta = prepare.prepare_corpus([str(two)], str(tmp_path / "out"), val_fraction=1e-9)
    assert meta["splits"]["validation"]["num_docs"] == 1
    assert _records(tmp_path / "out", "validation") == [b"second"]


def test_worker_processes_write_the_same_dataset(jsonl, tmp_path):
    spec = tokenizers.train_sentencepiece(DOCS, 300, str(tmp_path / "spm.model"))
    kw = dict(tokenizer=spec, records_per_shard=50)
    one = prepare.prepare_corpus([jsonl], str(tmp_path / "one"), processes=1, **kw)
    two = prepare.prepare_corpus([jsonl], str(tmp_path / "two"), processes=2, **kw)
    assert one["splits"] == two["splits"]
    for split in data.SPLITS:
        assert _records(tmp_path / "one", split) == _records(tmp_path / "two", split)


def test_interrupted_preparation_starts_again_and_bad_input_leaves_nothing(jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / prepare.MARKER).write_text("")
    (out / "train-00000.array_record").write_bytes(b"half written")
    prepare.prepare_corpus([jsonl], str(out))
    assert data.read_meta(str(out))["splits"]["train"]["num_docs"] > 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        prepare.prepare_corpus([jsonl], str(foreign))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8"):
        prepare.prepare_corpus([jsonl, str(bad)], str(tmp_path / "fails"))
    assert not (tmp_path / "fails").exists() and (foreign / "keep.txt").exists()


def test_train_is_never_empty_either(tmp_path):
    """Documents that all hash into validation still leave train one, and a corpus of one
    document goes to train."""
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "first"}\n{"text": "second"}\n')
    meta = prepare.prepare_corpus([str(two)], str(tmp_path / "a"), val_fraction=1 - 1e-12)
    assert _records(tmp_path / "a", "train") == [b"second"]
    assert _records(tmp_path / "a", "validation") == [b"first"]
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "only"}\n')
    meta = prepare.prepare_corpus([str(one)], str(tmp_path / "b"), val_fraction=1 - 1e-12)
    assert meta["splits"]["train"]["num_docs"] == 1
    assert meta["splits"]["validation"]["num_docs"] == 0


def test_out_dir_is_checked_before_anything_runs(jsonl, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        prepare.check_out_dir(str(tmp_path / "busy"))
    prepare.check_out_dir(str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
