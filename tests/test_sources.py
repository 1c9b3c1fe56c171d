"""Source formats (``mhc_jax.sources``): text, JSON lines (plain, gzip, zstd, xz) and
parquet, written here with malformed records among them."""

import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mhc_jax import data, prepare, sources

DOCS = [f"document {i}: " + "words " * (i + 1) for i in range(12)]


def _jsonl(docs, bad=True) -> bytes:
    lines = [json.dumps({"text": d, "id": i}).encode() for i, d in enumerate(docs)]
    if bad:
        lines[1:1] = [b"{not json", json.dumps({"body": "no"}).encode(), b'{"text": 7}']
        lines.append(b'{"text": "caf\xe9"}')  # latin-1, not UTF-8
    return b"\n".join(lines) + b"\n\n"


@pytest.fixture
def corpus(tmp_path):
    """The same 12 documents spread over every format, 3 malformed JSON records each."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.jsonl").write_bytes(_jsonl(DOCS[0:2]))
    (root / "b.json.gz").write_bytes(gzip.compress(_jsonl(DOCS[2:4])))
    (root / "sub" / "c.jsonl.zst").write_bytes(zstandard.compress(_jsonl(DOCS[4:6])))
    (root / "sub" / "d.jsonl.xz").write_bytes(lzma.compress(_jsonl(DOCS[6:8])))
    table = pa.table({"text": DOCS[8:11] + [None], "url": ["u"] * 4})
    pq.write_table(table, root / "e.parquet", row_group_size=2)
    (root / "f.txt").write_text(DOCS[11])
    (root / "notes.md").write_text("not a source")
    return root


def test_every_format_gives_its_documents_and_skips_malformed_records(corpus):
    files = sources.collect_files([str(corpus)])
    assert [f.name for f in files] == [
        "a.jsonl", "b.json.gz", "e.parquet", "f.txt", "c.jsonl.zst", "d.jsonl.xz"
    ]  # fmt: skip
    stats = sources.SourceStats()
    texts = ["".join(pieces) for _, pieces in sources.iter_texts(files, "text", stats)]
    assert sorted(texts) == sorted(DOCS)
    assert stats.documents == 12
    assert stats.skipped == {
        "not UTF-8": 4,
        "not JSON": 4,
        "no 'text' field": 4,
        "'text' is not a string": 5,  # 4 JSON records, 1 parquet null
    }
    assert "a.jsonl:2: not JSON" in stats.summary()


def test_globs_and_other_fields(corpus, tmp_path):
    files = sources.collect_files([f"{corpus}/*.jsonl", f"{corpus}/s*/*.jsonl.?st"])
    assert [f.name for f in files] == ["a.jsonl", "c.jsonl.zst"]
    with pytest.raises(ValueError, match=r"Recursive `\*\*` pattern not supported"):
        sources.collect_files([f"{corpus}/**/*.jsonl"])
    (tmp_path / "g.jsonl").write_bytes(b'{"content": "elsewhere"}\n')
    got = sources.iter_texts(sources.collect_files([str(tmp_path / "g.jsonl")]), "content")
    assert ["".join(pieces) for _, pieces in got] == ["elsewhere"]
    with pytest.raises(ValueError, match=r"matches no files ending in"):
        sources.collect_files([f"{corpus}/*.csv"])


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"broken.json.gz: cannot be read \(BadGzipFile"):
        [list(p) for _, p in sources.iter_texts([sources.collect_files([str(tmp_path)])[0]])]
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"corrupt.parquet: cannot be read \(ArrowInvalid"):
        [list(p) for _, p in sources.iter_texts([tmp_path / "corrupt.parquet"])]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text' \(columns: \['body'\]\)"):
        [list(p) for _, p in sources.iter_texts([tmp_path / "p.parquet"])]


def test_prepared_from_mixed_formats(corpus, tmp_path):
    meta = prepare.prepare_corpus([str(corpus)], str(tmp_path / "out"), val_fraction=0.2)
    assert sum(s["num_docs"] for s in meta["splits"].values()) == 12
    assert sum(s["num_bytes"] for s in meta["splits"].values()) == sum(
        len(d.encode()) for d in DOCS
    )
    assert meta["skipped"]["not JSON"] == 4


def test_text_files_stream_in_pieces_and_cut_as_whole(monkeypatch, tmp_path):
    """A .txt file read in small pieces gives the documents of the whole text, and a bad
    byte is reported at its offset in the file."""
    monkeypatch.setattr(sources, "TEXT_PIECE_BYTES", 7)
    text = "".join(f"para {i} " + "é" * (i % 5) + "\n" * (1 + i % 3) for i in range(200))
    (tmp_path / "t.txt").write_text(text)
    files = [tmp_path / "t.txt"]
    pieces = [p for _, ps in sources.iter_texts(files) for p in ps]
    assert len(pieces) > 100 and "".join(pieces) == text
    for max_chars in (16, 50, 97):
        streamed = list(data.split_stream(iter(pieces), max_chars))
        assert streamed == data.split_documents(text, max_chars)
    (tmp_path / "bad.txt").write_bytes("é".encode() * 20 + b"\xff" + b"tail")
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8 at byte offset 40"):
        [list(p) for _, p in sources.iter_texts([tmp_path / "bad.txt"])]
