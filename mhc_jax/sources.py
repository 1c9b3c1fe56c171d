"""Text sources in the formats public corpora ship in, read one document at a time.

    *.txt, *.txt.xz                   the whole file is one text, read in pieces
    *.jsonl, *.jsonl.gz, *.json.gz,   one JSON object per line; its ``text_field`` holds
    *.jsonl.zst, *.jsonl.xz           the document
    *.parquet                         the ``text_field`` column, one document per row

A source is a file, a directory (searched recursively for those suffixes) or a glob
(``*``, ``?``, ``[...]`` in any component; no ``**``), local or ``gs://``. Records that
are not JSON objects, lack the field, or hold no string there are counted and skipped
(``SourceStats``); a file that cannot be read at all raises an error naming it.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from typing import cast

from etils import epath

from mhc_jax import paths

TEXT_SUFFIXES = (".txt", ".txt.xz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024
TEXT_PIECE_BYTES = 1 << 20  # a .txt file is read in pieces of this size


class SourceError(ValueError):
    """A source file that cannot be read; the message names it."""


@dataclasses.dataclass
class SourceStats:
    """What reading the sources found: documents read, records skipped (by reason), per
    file, in reading order."""

    documents: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)  # first few skipped

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.documents} documents, no malformed records"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (
            f"{self.documents} documents; skipped {sum(self.skipped.values())} malformed "
            f"records ({reasons}); first: {'; '.join(self.examples)}"
        )


def _is_source(path: epath.Path) -> bool:
    return path.name.endswith(SUFFIXES)


def collect_files(sources: list[str]) -> list[epath.Path]:
    """Expands files, directories (recursively) and globs into the files to read.

    Raises:
      ValueError: naming a source that matches nothing readable.
    """
    if not sources:
        raise ValueError("sources is empty; pass None for the bundled corpus")
    files = []
    for src in sources:
        parts = src.split("/")
        wild = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
        if wild is not None:  # a glob: the components before the first wildcard are its base
            base = paths.path("/".join(parts[:wild]) or ".")
            try:
                found = [p for p in sorted(base.glob("/".join(parts[wild:]))) if _is_source(p)]
            except NotImplementedError as e:  # epath refuses "**"
                raise ValueError(f"source {src!r}: {e}") from None
            if not found:
                raise ValueError(f"source {src!r} matches no files ending in {SUFFIXES}")
            files.extend(found)
            continue
        path = paths.path(src)
        if not path.exists():
            raise ValueError(f"source {src!r} does not exist")
        if path.is_dir():
            found = [p for p in paths.walk_files(path) if _is_source(p)]
            if not found:
                raise ValueError(f"source directory {src!r} holds no files ending in {SUFFIXES}")
            files.extend(found)
        else:
            files.append(path)
    return files


def _decompressed(path: epath.Path) -> io.BufferedIOBase:
    raw = path.open("rb")
    name = path.name
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if name.endswith(".zst"):
        import zstandard

        # a readable binary stream, though not declared an io.BufferedIOBase
        return cast(io.BufferedIOBase, zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def _text_pieces(path: epath.Path) -> Iterator[str]:
    """The file's text in consecutive pieces of about TEXT_PIECE_BYTES."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes decoded before this block, less those the decoder holds back
    with _decompressed(path) as f:
        while True:
            block = f.read(TEXT_PIECE_BYTES)
            held = len(decoder.getstate()[0])
            try:
                piece = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset - held + e.start
                msg = f"{path}: not valid UTF-8 at byte offset {at} ({e.reason})"
                raise SourceError(msg) from e
            offset += len(block)
            if piece:
                yield piece
            if not block:
                return


def _jsonl_file(path: epath.Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    with _decompressed(path) as f:
        for n, raw in enumerate(io.BufferedReader(f), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip(f"{path}:{n}", "not UTF-8")
                continue
            except json.JSONDecodeError:
                stats.skip(f"{path}:{n}", "not JSON")
                continue
            if not isinstance(record, dict) or text_field not in record:
                stats.skip(f"{path}:{n}", f"no {text_field!r} field")
            elif not isinstance(record[text_field], str):
                stats.skip(f"{path}:{n}", f"{text_field!r} is not a string")
            else:
                yield record[text_field]


def _parquet_file(path: epath.Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        table = pq.ParquetFile(f)
        if text_field not in table.schema_arrow.names:
            raise SourceError(
                f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                "set the text field"
            )
        row = 0
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    yield value
                else:
                    stats.skip(f"{path} row {row}", f"{text_field!r} is not a string")
                row += 1


def _guarded(path: epath.Path, items: Iterator[str]) -> Iterator[str]:
    """``items``, any reader failure re-raised as a ValueError naming ``path``."""
    try:
        yield from items
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure names its file
        raise SourceError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def iter_texts(
    files: list[epath.Path], text_field: str = "text", stats: SourceStats | None = None
) -> Iterator[tuple[str, Iterator[str]]]:
    """(file name, the text's pieces) for every text of ``files`` in order: a record's text
    comes in one piece, a text file's in pieces of about TEXT_PIECE_BYTES (consume them
    before the next item). ``stats`` (if given) counts the texts and the records skipped.

    Raises:
      ValueError: naming a file that cannot be read (or decoded) at all.
    """
    stats = SourceStats() if stats is None else stats
    for path in files:
        name = path.name
        if name.endswith(JSONL_SUFFIXES) or name.endswith(PARQUET_SUFFIXES):
            reader = _jsonl_file if name.endswith(JSONL_SUFFIXES) else _parquet_file
            for text in _guarded(path, reader(path, text_field, stats)):
                stats.documents += 1
                yield str(path), iter((text,))
        else:  # .txt, .txt.xz, or any file named explicitly: plain text
            stats.documents += 1
            yield str(path), _guarded(path, _text_pieces(path))
