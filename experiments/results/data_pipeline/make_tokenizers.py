"""Tokenizer files of each kind trained on the bundled corpus, for the per-tokenizer runs
in NOTES.md: SentencePiece BPE (``tokenizers.train_sentencepiece``), a Hugging Face
byte-level BPE (``tokenizer.json``) and the same BPE as a tiktoken ranks file.

    python experiments/results/data_pipeline/make_tokenizers.py /tmp/toks 512
    # prints the four data.tokenizer specs (byte first)
"""

import base64
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mhc_jax import data, tokenizers


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's alphabet), inverted."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def main(out: str, vocab: int) -> None:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    docs = data.read_documents(None)[1]
    specs = ["byte", tokenizers.train_sentencepiece(docs, vocab, str(root / "spm.model"))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(docs, trainer)
    bpe.save(str(root / "tokenizer.json"))
    specs.append(f"hf:{root / 'tokenizer.json'}")
    # the same BPE for tiktoken: its tokens as bytes, ranked by id (the merge order)
    to_byte = _byte_decoder()
    ranked = sorted(
        (i, bytes(to_byte[c] for c in tok))
        for tok, i in bpe.get_vocab().items()
        if tok != "<|endoftext|>"
    )
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, (_, t) in enumerate(ranked)]
    (root / "bpe.tiktoken").write_text("\n".join(lines) + "\n")
    specs.append(f"tiktoken:{root / 'bpe.tiktoken'}")
    for spec in specs:
        tok = tokenizers.load(spec)
        assert tok.decode(tok.encode(docs[0])) == docs[0], spec
        print(spec)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
