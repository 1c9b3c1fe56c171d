"""Tokenizers behind one interface: UTF-8 bytes (the default), SentencePiece, Hugging Face
``tokenizers`` and tiktoken, selected by a spec string (``data.tokenizer``):

    "byte"                      ids 0..255 are bytes, then BOS, EOS, PAD (259 in all)
    "sentencepiece:PATH.model"  a SentencePiece model
    "hf:PATH/tokenizer.json"    a Hugging Face tokenizers file
    "tiktoken:PATH"             a tiktoken BPE file (base64 token, rank per line), with
                                the cl100k regex; one EOS token is appended after the ranks

Every tokenizer has ``vocab_size``, ``eos_id`` and ``pad_id`` (EOS ends each document;
PAD fills padded windows, weight 0), ``encode(text) -> int32 ids`` (no special tokens),
``decode(ids) -> str``, and an ``identity`` dict (kind, vocab size, the file's SHA-256)
that prepared data and run configs record, so that training, resume and sampling use the
tokenizer the data was made with. Paths may be local or ``gs://``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import tempfile
from typing import Any

import numpy as np
from etils import epath

from mhc_jax import paths

KINDS = ("byte", "sentencepiece", "hf", "tiktoken")
BYTE_VOCAB, BYTE_BOS, BYTE_EOS, BYTE_PAD = 259, 256, 257, 258
# the pre-tokenisation regex of tiktoken's cl100k_base
TIKTOKEN_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then BOS, EOS, PAD."""

    kind = "byte"
    vocab_size, bos_id, eos_id, pad_id = BYTE_VOCAB, BYTE_BOS, BYTE_EOS, BYTE_PAD
    identity = {"kind": "byte", "vocab_size": BYTE_VOCAB}

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """int32 (len(text.encode()) + add_bos + add_eos,): [BOS] UTF-8 bytes [EOS]."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        parts = [[BYTE_BOS]] * add_bos + [ids] + [[BYTE_EOS]] * add_eos
        return np.concatenate(parts).astype(np.int32)

    def decode(self, ids) -> str:
        """Ids of any shape (flattened), dropping ids >= 256; bad UTF-8 -> U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class _FileTokenizer:
    """A tokenizer read from one file: its kind, path and content hash make its identity."""

    kind = ""
    vocab_size: int
    pad_id: int

    def __init__(self, path: str):
        self.path = paths.path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.kind} tokenizer file {path!r} does not exist")
        self.data = self.path.read_bytes()

    def _identity(self) -> dict:
        digest = hashlib.sha256(self.data).hexdigest()
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": digest}

    def _drop_out_of_range(self, ids) -> list[int]:
        ids = np.asarray(ids).reshape(-1)
        return [int(i) for i in ids if 0 <= i < self.vocab_size and i != self.pad_id]


class SentencePieceTokenizer(_FileTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        super().__init__(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.data)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path!r} has no EOS piece; train it with one")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.identity = self._identity()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode(self._drop_out_of_range(ids))


class HFTokenizer(_FileTokenizer):
    kind = "hf"

    def __init__(self, path: str):
        import tokenizers

        super().__init__(path)
        self._tok = tokenizers.Tokenizer.from_str(self.data.decode("utf-8"))
        self._tok.encode_special_tokens = True  # "</s>" in a document is text, not EOS
        self.vocab_size = self._tok.get_vocab_size()
        ids = (self._tok.token_to_id(t) for t in HF_EOS_TOKENS)
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"hf tokenizer {path!r} has none of the end-of-text tokens {HF_EOS_TOKENS}"
            )
        self.eos_id = self.pad_id = found[0]
        self.identity = self._identity()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode(self._drop_out_of_range(ids), skip_special_tokens=False)


class TiktokenTokenizer(_FileTokenizer):
    kind = "tiktoken"

    def __init__(self, path: str):
        import tiktoken

        super().__init__(path)
        ranks = {}
        for n, line in enumerate(self.data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError as e:
                    raise ValueError(f"tiktoken file {path!r} line {n}: {line!r} ({e})") from e
        self.eos_id = self.pad_id = max(ranks.values()) + 1
        self.vocab_size = self.eos_id + 1
        self._enc = tiktoken.Encoding(
            name=f"mhc_jax:{self.path.name}",
            pat_str=TIKTOKEN_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": self.eos_id},
        )
        self.identity = self._identity()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), np.int32)

    def decode(self, ids) -> str:
        ids = [i for i in self._drop_out_of_range(ids) if i != self.eos_id]
        return self._enc.decode(ids, errors="replace")


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer | TiktokenTokenizer


def identity_string(identity: dict) -> str:
    """A tokenizer's ``identity`` as one string, "kind:vocab_size[:sha256]" (the form
    ``data.tokenizer_id`` records)."""
    parts = [identity["kind"], str(identity["vocab_size"])]
    return ":".join(parts + ([identity["sha256"]] if "sha256" in identity else []))


BYTE_IDENTITY = "byte:259"


def load(spec: str) -> Tokenizer:
    """The tokenizer a spec string names (module docstring)."""
    kind, _, path = spec.partition(":")
    if kind == "byte" and not path:
        return ByteTokenizer()
    classes: dict[str, type[SentencePieceTokenizer | HFTokenizer | TiktokenTokenizer]] = {
        "sentencepiece": SentencePieceTokenizer,
        "hf": HFTokenizer,
        "tiktoken": TiktokenTokenizer,
    }
    if kind not in classes or not path:
        raise ValueError(
            f"data.tokenizer={spec!r} is invalid: must be 'byte' or KIND:PATH with KIND in "
            f"{KINDS[1:]}"
        )
    return classes[kind](path)


def train_sentencepiece(
    texts, vocab_size: int, out_path: str, *, max_documents: int = 100_000
) -> str:
    """Trains a BPE SentencePiece model with ``vocab_size`` pieces (EOS id 1, no BOS, PAD
    id 0 unused by text) on the first ``max_documents`` strings of an iterable (they are
    held in memory while it trains); writes it to ``out_path`` (local or gs://), which
    must not exist, and returns its spec string ``sentencepiece:out_path``. One thread:
    the same texts give the same model."""
    import sentencepiece

    if vocab_size < 260:  # 256 byte-fallback pieces, PAD, EOS, UNK, and one more
        raise ValueError(f"sentencepiece:VOCAB needs VOCAB >= 260, got {vocab_size}")
    out = paths.path(out_path)
    if out.exists():
        raise ValueError(
            f"{out_path} exists: runs and data made with it record its hash, so it is "
            "not overwritten; choose a new tokenizer path"
        )
    with tempfile.TemporaryDirectory(prefix="mhc_jax_spm-") as tmp:
        prefix = os.path.join(tmp, "spm")
        train = sentencepiece.SentencePieceTrainer.train
        kwargs: dict[str, Any] = dict(
            sentence_iterator=itertools.islice(iter(texts), max_documents),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",  # lossless: decode(encode(t)) == t
            remove_extra_whitespaces=False,
            split_by_whitespace=True,
            max_sentence_length=1 << 20,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        try:
            train(**kwargs)
        except RuntimeError as e:  # e.g. fewer pieces than the text's distinct characters
            raise ValueError(f"training sentencepiece:{vocab_size} failed: {e}") from e
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(epath.Path(prefix + ".model").read_bytes())
    return f"sentencepiece:{out_path}"
