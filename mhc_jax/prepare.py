"""Streaming preparation of a corpus: documents are read, tokenized and written to
ArrayRecord shards as they come, so memory stays bounded at any corpus size.

- Documents come from ``data.iter_documents`` (the ``sources`` formats, all streamed: a
  ``.txt`` file in pieces, JSON lines and parquet record by record).
- Each document goes to validation by a keyed hash of its text (``val_fraction`` of
  them in expectation, the same documents for the same ``seed``), with no pass over the
  whole corpus. The last document of each split is held back to the end, so that
  validation is not empty when ``val_fraction > 0`` and train is not empty (with two
  or more documents).
- Tokenizing runs on ``processes`` worker processes, a bounded window of batches ahead
  (a worker that dies stops the preparation with an error); ``progress`` shows
  documents, tokens and MB/s.
- meta.json is written last: a directory without it is not a prepared dataset, and
  training refuses it. An interrupted preparation (its marker file still there, in a
  local or a gs:// out_dir) is cleared and started again cleanly.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import tempfile
import time
from concurrent import futures
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from mhc_jax import data, paths, tokenizers
from mhc_jax import sources as sources_lib

MARKER = ".preparing"  # present while a preparation writes into a directory
BATCH_DOCS = 64  # documents per tokenizing task
_WORKER_TOKENIZER = None


def is_validation(doc: str, seed: int, val_fraction: float) -> bool:
    """Whether ``doc`` goes to validation: its BLAKE2 hash keyed by ``seed``, read as a
    number in [0, 1), is below ``val_fraction``."""
    key = seed.to_bytes(8, "little", signed=True)
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


class _ShardWriter:
    """One split's records, ``records_per_shard`` per ArrayRecord file, as they come."""

    def __init__(self, out_dir: epath.Path, split: str, records_per_shard: int):
        self.out_dir, self.split, self.per_shard = out_dir, split, records_per_shard
        self.info: dict[str, Any] = {"num_docs": 0, "num_bytes": 0, "num_tokens": 0, "shards": []}
        self._writer: ArrayRecordWriter | None = None
        self._in_shard = 0

    def write(self, record: bytes, num_bytes: int, num_tokens: int) -> None:
        if self._writer is None or self._in_shard == self.per_shard:
            self.close()
            name = f"{self.split}-{len(self.info['shards']):05d}.array_record"
            writer = self._writer = ArrayRecordWriter(str(self.out_dir / name), "group_size:1")
            self.info["shards"].append(name)
        else:
            writer = self._writer
        writer.write(record)
        self._in_shard += 1
        self.info["num_docs"] += 1
        self.info["num_bytes"] += num_bytes
        self.info["num_tokens"] += num_tokens + 1  # one EOS per document

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0


def _encode(tok, docs: list[str]) -> list[tuple[bytes, int, int]]:
    """(record, UTF-8 bytes, tokens) per document."""
    out = []
    for doc in docs:
        utf8 = doc.encode("utf-8")
        if tok.kind == "byte":
            out.append((utf8, len(utf8), len(utf8)))
        else:
            ids = tok.encode(doc)
            out.append((ids.astype("<u4").tobytes(), len(utf8), len(ids)))
    return out


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizers.load(spec)


def _encode_in_worker(docs: list[str]):
    return docs, _encode(_WORKER_TOKENIZER, docs)


def _batches(docs, size: int):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded(docs, spec: str, processes: int):
    """(doc, record, bytes, tokens) in corpus order, tokenized here or on ``processes``
    workers with at most 2 batches per worker in flight (bounded memory)."""
    if processes <= 1:
        tok = tokenizers.load(spec)
        for batch in _batches(docs, BATCH_DOCS):
            yield from ((d, *e) for d, e in zip(batch, _encode(tok, batch)))
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run JAX
    # An executor, not a Pool: a worker that dies raises BrokenProcessPool here instead of
    # leaving its task pending forever.
    with futures.ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_worker, initargs=(spec,)
    ) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batches(docs, BATCH_DOCS):
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * processes:
                batch_docs, encoded = pending.popleft().result()
                yield from ((d, *e) for d, e in zip(batch_docs, encoded))
        while pending:
            batch_docs, encoded = pending.popleft().result()
            yield from ((d, *e) for d, e in zip(batch_docs, encoded))


def check_out_dir(out_dir: str) -> None:
    """Raises ValueError unless ``out_dir`` may take a preparation: missing, empty, or
    left by an interrupted one (reads only)."""
    out = paths.path(out_dir)
    if not out.exists() or not any(out.iterdir()):
        return
    if not ((out / MARKER).exists() and not (out / data.META_FILE).exists()):
        raise ValueError(f"out_dir {out_dir!r} is not empty; choose a new directory")


def _remove_contents(out: epath.Path) -> None:
    for child in out.iterdir():
        child.rmtree() if child.is_dir() else child.unlink()


def _clear_interrupted(out: epath.Path, out_dir: str) -> None:
    check_out_dir(out_dir)
    if out.exists() and any(out.iterdir()):  # an interrupted preparation's leftovers
        print(f"{out_dir}: removing an interrupted preparation and starting again", flush=True)
        _remove_contents(out)


def prepare_corpus(
    sources: list[str] | None,
    out_dir: str,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    records_per_shard: int = 1024,
    max_doc_chars: int = data.MAX_DOC_CHARS,
    tokenizer: str = "byte",
    text_field: str = "text",
    processes: int = 1,
    progress: bool = False,
) -> dict:
    """Streams sources into train/validation ArrayRecord shards and meta.json (module
    docstring); each split keeps corpus order.

    Args:
        sources: files, directories or globs in the formats of ``mhc_jax.sources``,
            local or gs://, or None for the bundled corpus.
        out_dir: output directory, local or gs:// (shards are written locally, then
            uploaded, meta.json last); missing, empty, or an interrupted preparation.
        val_fraction: expected share of documents for validation, in [0, 1).
        seed: key of the validation hash.
        records_per_shard: documents per ArrayRecord shard.
        max_doc_chars: maximum document length in characters (``data.split_documents``).
        tokenizer: a ``tokenizers.load`` spec; its identity goes into meta.json.
        text_field: the JSON field or parquet column holding a document's text.
        processes: tokenizing worker processes (1: in this process).
        progress: show a progress bar.

    Returns:
        The meta.json dict; meta["splits"][split] has "num_docs", "num_bytes" (UTF-8),
        "num_tokens" (tokens + one EOS per document) and "shards" (file names);
        meta["skipped"] counts the malformed records skipped, by reason.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    tok = tokenizers.load(tokenizer)
    out = paths.path(out_dir)
    _clear_interrupted(out, out_dir)
    stats = sources_lib.SourceStats()
    names, docs = data.iter_documents(sources, max_doc_chars, text_field, stats)
    existed = out.exists()
    try:
        return _write(
            names,
            docs,
            out,
            tok,
            tokenizer,
            stats,
            val_fraction=val_fraction,
            seed=seed,
            records_per_shard=records_per_shard,
            max_doc_chars=max_doc_chars,
            processes=processes,
            progress=progress,
        )
    except Exception:  # bad input: leave out_dir as it was (an interrupt leaves the marker)
        if not paths.is_remote(out) and out.exists():
            _remove_contents(out)
            if not existed:
                out.rmdir()
        raise


def _write(
    names,
    docs,
    out,
    tok,
    tokenizer,
    stats,
    *,
    val_fraction,
    seed,
    records_per_shard,
    max_doc_chars,
    processes,
    progress,
) -> dict:
    """``prepare_corpus`` past its checks: streams ``docs`` into shards, meta.json last."""
    remote = paths.is_remote(out)
    with tempfile.TemporaryDirectory(prefix="mhc_jax_prepare-") as tmp:
        local = epath.Path(tmp) if remote else out  # ArrayRecordWriter opens local files only
        local.mkdir(parents=True, exist_ok=True)
        (local / MARKER).write_text("")
        if remote:  # an upload cut short is then recognised as interrupted
            out.mkdir(parents=True, exist_ok=True)
            (out / MARKER).write_text("")
        writers = {s: _ShardWriter(local, s, records_per_shard) for s in data.SPLITS}
        # each split's newest document (record, bytes, tokens), written late
        held: dict[str, tuple[bytes, int, int] | None] = dict.fromkeys(data.SPLITS)
        start = time.time()
        bar = _progress_bar() if progress else None
        for doc, record, num_bytes, num_tokens in _encoded(docs, tokenizer, processes):
            split = "validation" if is_validation(doc, seed, val_fraction) else "train"
            newest = held[split]
            if newest is not None:
                writers[split].write(*newest)
            held[split] = (record, num_bytes, num_tokens)
            if bar is not None:
                _advance(bar, num_bytes, num_tokens, start)
        _write_held(writers, held, val_fraction)
        if bar is not None:
            bar.close()
        for w in writers.values():
            w.close()
        if sum(w.info["num_docs"] for w in writers.values()) == 0:
            raise ValueError(f"empty corpus: the source files {names} contain no text")
        meta = {
            "format_version": 2,
            "tokenizer": {**tok.identity, "spec": tokenizer, "eos": tok.eos_id, "pad": tok.pad_id},
            "sources": names,
            "seed": seed,
            "val_fraction": val_fraction,
            "max_doc_chars": max_doc_chars,
            "skipped": stats.skipped,
            "splits": {s: w.info for s, w in writers.items()},
        }
        (local / data.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (local / MARKER).unlink()
        if remote:
            data.copy_prepared(local, out)
            (out / MARKER).unlink()
    return meta


def _write_held(writers: dict, held: dict, val_fraction: float) -> None:
    """Writes each split's held-back document, moving one across where a split would
    otherwise end empty: validation takes train's when it has none (val_fraction > 0 and
    train keeps one), train takes validation's when it has none (a one-document corpus
    goes to train)."""
    count = {s: w.info["num_docs"] for s, w in writers.items()}
    train, val = held["train"], held["validation"]
    if val_fraction > 0 and count["validation"] == 0 and val is None and count["train"]:
        writers["validation"].write(*train)
        train = None
    if count["train"] == 0 and train is None and val is not None:  # train before validation
        writers["train"].write(*val)
        val = None
    for split, doc in (("train", train), ("validation", val)):
        if doc is not None:
            writers[split].write(*doc)


def _progress_bar():
    from tqdm import tqdm

    return tqdm(unit=" docs", dynamic_ncols=True, mininterval=1.0)


def _advance(bar, num_bytes: int, num_tokens: int, start: float) -> None:
    bar.n_bytes = getattr(bar, "n_bytes", 0) + num_bytes
    bar.n_tokens = getattr(bar, "n_tokens", 0) + num_tokens
    bar.update(1)
    if bar.n % 256 == 0:
        rate = bar.n_bytes / 1e6 / max(time.time() - start, 1e-9)
        bar.set_postfix(tokens=f"{bar.n_tokens:,}", MB_s=f"{rate:.1f}", refresh=False)
