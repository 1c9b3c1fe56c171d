"""LM data pipeline: bundled corpus, documents, prepared directories, grain loaders.

A prepared directory (``prepare.prepare_corpus``) holds meta.json and ArrayRecord shards
train-XXXXX.array_record, validation-XXXXX.array_record (listed in meta.json). One
record is one document: its UTF-8 bytes for the byte tokenizer, its token ids as
little-endian uint32 for the others (``tokenizers``); meta.json records the tokenizer's
identity.
Sources and prepared directories may be local or in cloud storage (gs://); the loaders read
local shards only (data_cache.py finds, prepares and copies a run's data).

Loaders view a split as one token stream: its documents in stored order, each as its
tokens then the tokenizer's EOS. Window i (seq_len L) is stream[i * L : i * L + L + 1]:
first L tokens = inputs, last L = targets, so each token after the first is a target once
per epoch.
Windows cross document boundaries (the EOS between documents is an ordinary target;
attention is not masked there).
"""

from __future__ import annotations

import json
import lzma
from importlib import resources

import grain
import numpy as np
from etils import epath

from mhc_jax import paths, tokenizers
from mhc_jax import sources as sources_lib

BOS_ID, EOS_ID, PAD_ID = tokenizers.BYTE_BOS, tokenizers.BYTE_EOS, tokenizers.BYTE_PAD
VOCAB_SIZE = tokenizers.BYTE_VOCAB
ByteTokenizer = tokenizers.ByteTokenizer

SPLITS = ("train", "validation")
META_FILE = "meta.json"
MAX_DOC_CHARS = 8192
BUNDLED_CORPUS = "shakespeare.txt.xz"


def load_bundled_corpus() -> str:
    """Returns the bundled ~1 MB Shakespeare text (see `corpus/ATTRIBUTION.md`)."""
    packed = resources.files("mhc_jax").joinpath("corpus", BUNDLED_CORPUS).read_bytes()
    return lzma.decompress(packed).decode("utf-8")


def split_documents(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cuts `text` into consecutive chunks of at most `max_chars` characters.

    Each chunk ends at the last paragraph break (blank line) inside the limit, else at the
    last newline, else exactly at the limit. ``"".join(chunks) == text``.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2, got {max_chars}")
    chunks, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            if cut > start:
                end = cut + 2
            elif (cut := text.rfind("\n", start, end)) > start:
                end = cut + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def split_stream(pieces, max_chars: int = MAX_DOC_CHARS):
    """`split_documents` of the concatenated text ``pieces``, yielded as they complete: a
    chunk depends only on the next `max_chars` characters, so the text is never held
    whole."""
    buffer, pos = "", 0
    for piece in pieces:
        buffer = buffer[pos:] + piece
        pos = 0
        while len(buffer) - pos > max_chars:
            chunk = split_documents(buffer[pos : pos + max_chars + 1], max_chars)[0]
            yield chunk
            pos += len(chunk)
    yield from split_documents(buffer[pos:], max_chars)


def iter_documents(
    sources: list[str] | None,
    max_doc_chars: int = MAX_DOC_CHARS,
    text_field: str = "text",
    stats: sources_lib.SourceStats | None = None,
):
    """(source file names, an iterator over documents) of sources in any ``sources``
    format (or the bundled corpus for None), each text cut by `split_documents`; `stats`
    counts the texts read and the malformed records skipped."""
    if sources is None:
        names, texts = [f"bundled:{BUNDLED_CORPUS}"], iter([iter([load_bundled_corpus()])])
    else:
        files = sources_lib.collect_files(list(sources))
        names = [str(f) for f in files]
        texts = (pieces for _, pieces in sources_lib.iter_texts(files, text_field, stats))
    return names, (doc for pieces in texts for doc in split_stream(pieces, max_doc_chars))


def read_documents(sources: list[str] | None, **kwargs) -> tuple[list[str], list[str]]:
    """``iter_documents`` with the documents in a list (held in memory)."""
    names, docs = iter_documents(sources, **kwargs)
    docs = list(docs)
    if not docs:
        raise ValueError(f"empty corpus: the source files {names} contain no text")
    return names, docs


def _record_itemsize(kind: str) -> int:
    return 1 if kind == "byte" else 4


def tokenizer_meta(meta: dict) -> dict:
    """meta.json's tokenizer entry with "kind", "eos" and "pad" (older byte-tokenizer
    directories name the kind "type")."""
    info = dict(meta["tokenizer"])
    info.setdefault("kind", info.get("type", "byte"))
    return info


def copy_prepared(src: epath.Path, dst: epath.Path) -> None:
    """Copies a prepared directory's shards, then its meta.json: a directory holding
    meta.json is complete."""
    meta = json.loads((src / META_FILE).read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            (src / shard).copy(dst / shard, overwrite=True)
    (src / META_FILE).copy(dst / META_FILE, overwrite=True)


def read_meta(data_dir: str) -> dict:
    """Returns the meta.json dict of a prepared data directory (see ``prepare``)."""
    path = paths.path(data_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{data_dir!r} has no {META_FILE}: not prepared (see prepare_corpus)")
    return json.loads(path.read_text())


def _doc_tokens(record: bytes, kind: str, eos: int) -> np.ndarray:
    """int32: a stored document's tokens (its bytes, or its uint32 ids), then EOS."""
    ids = np.frombuffer(record, dtype=np.uint8 if kind == "byte" else "<u4")
    return np.append(ids.astype(np.int32), np.int32(eos))


def _make_example(tokens: np.ndarray, seq_len: int, pad: int = PAD_ID) -> dict[str, np.ndarray]:
    """Pads a window of n <= seq_len + 1 tokens; weights are 1 on the n - 1 real targets."""
    window = np.full(seq_len + 1, pad, dtype=np.int32)
    window[: len(tokens)] = tokens
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "weights": (np.arange(seq_len) < len(tokens) - 1).astype(np.float32),
    }


class _SplitWindows:
    """Random-access windows of a split's token stream (picklable for grain workers).

    Item i: `_make_example` of stream[i * L : i * L + L + 1], i.e. "inputs", "targets"
    int32 (L,), "weights" float32 (L,). `partial` adds a final short, padded window.
    """

    def __init__(self, data_dir: str, split: str, seq_len: int, *, partial: bool):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if paths.is_remote(data_dir):
            raise ValueError(
                f"{data_dir!r}: the loaders read local shards only (ArrayRecord's reader); "
                "copy it to this host with data_cache.ensure_prepared or data_cache.stage"
            )
        meta = read_meta(data_dir)
        info, tok = meta["splits"][split], tokenizer_meta(meta)
        self._kind, self._eos, self.pad = tok["kind"], tok["eos"], tok["pad"]
        if info["num_docs"] == 0:
            raise ValueError(f"split {split!r} of {data_dir!r} has no documents")
        self._source = grain.sources.ArrayRecordDataSource(
            [str(paths.path(data_dir) / shard) for shard in info["shards"]]
        )
        size = _record_itemsize(self._kind)
        lengths = [len(self._source[i]) // size + 1 for i in range(len(self._source))]
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # int64 (num_docs + 1,)
        self.num_tokens = int(self._starts[-1])
        if seq_len + 1 > self.num_tokens:
            raise ValueError(
                f"seq_len + 1 = {seq_len + 1} exceeds the {self.num_tokens} tokens of split "
                f"{split!r} in {data_dir!r}; use a smaller seq_len or more text"
            )
        self._seq_len = seq_len
        num_targets = self.num_tokens - 1
        self._len = -(-num_targets // seq_len) if partial else num_targets // seq_len

    def __len__(self) -> int:
        return self._len

    def stream_slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens stream[start:stop] as int32 (stop - start,); 0 <= start < stop <= total."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        records = [self._source[d] for d in range(first, last + 1)]
        tokens = np.concatenate([_doc_tokens(r, self._kind, self._eos) for r in records])
        offset = start - int(self._starts[first])
        return tokens[offset : offset + stop - start]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start = index * self._seq_len
        stop = min(start + self._seq_len + 1, self.num_tokens)
        return _make_example(self.stream_slice(start, stop), self._seq_len, self.pad)


def _check_hosts(batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the host layout; returns the per-host batch size."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index=}, {process_count=}"
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of {process_count=}")
    return batch_size // process_count


def make_train_iterator(
    data_dir: str,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Returns an infinite, shuffled, resumable grain iterator over packed train windows.

    The full windows of the train stream (module docstring; a tail of < seq_len targets is
    unused) get a fresh permutation every epoch, forever; this global order depends only on
    `seed` (>= 0). Process p of P takes items p, p + P, p + 2P, ...: hosts see disjoint
    examples and together consume the global order. Batches are dicts with "inputs",
    "targets" int32 (B, seq_len) (targets = inputs shifted by one) and "weights" float32
    (B, seq_len) (all 1: no padding in training), B = global_batch_size // process_count.

    Resume: ``it.get_state()`` is a JSON-serialisable dict (``{"next_index": k}`` with
    worker_count=0); a fresh iterator with the same arguments, after ``set_state(state)``,
    continues at the exact next batch. `worker_count` > 0 uses grain worker processes
    (absl flags must be parsed, e.g. inside `absl.app.run`).
    """
    local_batch = _check_hosts(global_batch_size, process_index, process_count)
    if seed < 0 or worker_count < 0:
        raise ValueError(f"seed and worker_count must be >= 0, got {seed=}, {worker_count=}")
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = grain.MapDataset.source(_SplitWindows(data_dir, "train", seq_len, partial=False))
    ds = ds.shuffle(seed=shuffle_seed).repeat()[process_index::process_count]
    # drop_remainder=True: grain sizes a non-dropping batch of an infinite dataset with a
    # float ceil, which overflows.
    iter_ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    )
    if worker_count:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


def eval_batches(
    data_dir: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Returns this process's share of the validation windows, in order, as batches.

    All consecutive validation windows (module docstring), the last one short and padded.
    `batch_size` is global: global batch b holds windows [b * batch_size, (b + 1) *
    batch_size) and process p gets its rows [p * B, (p + 1) * B), B = batch_size //
    process_count. The last batch is padded with weight-0 rows, never dropped, so every
    process gets the same number of batches (at most `max_batches`) and, with all batches,
    summing weights * loss counts each validation target once. Batches are dicts of
    "inputs", "targets" int32 (B, seq_len) and "weights" float32 (B, seq_len).
    """
    local_batch = _check_hosts(batch_size, process_index, process_count)
    windows = _SplitWindows(data_dir, "validation", seq_len, partial=True)
    num_batches = -(-len(windows) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    padding = _make_example(np.zeros(0, dtype=np.int32), seq_len, windows.pad)
    batches = []
    for b in range(num_batches):
        first = b * batch_size + process_index * local_batch
        rows = [
            windows[i] if i < len(windows) else padding for i in range(first, first + local_batch)
        ]
        batches.append({k: np.stack([row[k] for row in rows]) for k in padding})
    return batches
