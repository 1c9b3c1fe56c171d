"""Tokenizers (``mhc_jax.tokenizers``) and the data and runs made with them: tiny
tokenizers of each kind trained or written here, on the bundled corpus."""

import base64

import numpy as np
import pytest

from mhc_jax import config as config_lib
from mhc_jax import data, data_cache, prepare, tokenizers
from mhc_jax.train import LN2, eval_metrics

DOCS = data.read_documents(None)[1]


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    return tokenizers.train_sentencepiece(DOCS, 384, str(path))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(DOCS[:40], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return f"hf:{path}"


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> str:
    """All 256 bytes, then a few merges, in tiktoken's file format."""
    merges = [b"th", b"he", b"the", b"in", b"an", b"and", b"ou", b"er"]
    tokens = [bytes([b]) for b in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path = tmp_path_factory.mktemp("tiktoken") / "tiny.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    return f"tiktoken:{path}"


@pytest.mark.parametrize("kind", ["byte", "spm", "hf", "tiktoken_file"])
def test_every_tokenizer_round_trips_the_corpus(kind, request):
    spec = "byte" if kind == "byte" else request.getfixturevalue(kind)
    tok = tokenizers.load(spec)
    assert 0 <= tok.eos_id < tok.vocab_size and 0 <= tok.pad_id < tok.vocab_size
    for doc in DOCS[:5]:
        ids = tok.encode(doc)
        assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
        assert tok.decode(ids) == doc
    if kind != "byte":
        assert sum(len(tok.encode(d)) for d in DOCS[:5]) < sum(len(d.encode()) for d in DOCS[:5])
        assert len(tok.identity["sha256"]) == 64
    assert tokenizers.identity_string(tok.identity).startswith(f"{tok.kind}:{tok.vocab_size}")


def test_special_tokens_in_text_stay_text(hf, spm, tmp_path):
    tok = tokenizers.load(hf)
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|endoftext|> b"
    with pytest.raises(ValueError, match="exists: runs and data made with it"):
        tokenizers.train_sentencepiece(DOCS, 384, spm.split(":", 1)[1])


def test_tiktoken_takes_its_eos_after_the_ranks(tiktoken_file):
    tok = tokenizers.load(tiktoken_file)
    assert tok.vocab_size == 265 and tok.eos_id == 264
    assert tok.decode([*tok.encode("the end"), tok.eos_id]) == "the end"


def test_bad_specs_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer='bpe:x' is invalid: must be 'byte'"):
        tokenizers.load("bpe:x")
    with pytest.raises(ValueError, match=r"sentencepiece tokenizer file .* does not exist"):
        tokenizers.load(f"sentencepiece:{tmp_path}/missing.model")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken' line 2"):
        tokenizers.load(f"tiktoken:{bad}")
    with pytest.raises(ValueError, match=r"needs VOCAB >= 260, got 100"):
        tokenizers.train_sentencepiece(DOCS, 100, str(tmp_path / "x.model"))
    with pytest.raises(
        ValueError, match=r"training sentencepiece:300 failed: .*smaller than required_chars"
    ):
        tokenizers.train_sentencepiece(DOCS, 300, str(tmp_path / "x.model"))


def test_prepared_data_holds_token_ids_and_the_tokenizer(spm, tmp_path):
    meta = prepare.prepare_corpus(None, str(tmp_path / "d"), tokenizer=spm, records_per_shard=64)
    tok = tokenizers.load(spm)
    info = data.tokenizer_meta(meta)
    assert info["kind"] == "sentencepiece" and info["sha256"] == tok.identity["sha256"]
    val = meta["splits"]["validation"]
    assert val["num_bytes"] < 2 * val["num_tokens"] < 2 * val["num_bytes"]
    windows = data._SplitWindows(str(tmp_path / "d"), "train", 64, partial=False)
    assert windows.num_tokens == meta["splits"]["train"]["num_tokens"]
    first = windows[0]["inputs"]  # the first train document's first 64 tokens
    assert first.max() < tok.vocab_size and tok.eos_id not in first
    assert any(d.startswith(tok.decode(first)) for d in DOCS)


def test_runs_take_the_tokenizers_vocab_and_refuse_a_mismatch(spm, tmp_path):
    cfg = config_lib.default_config()
    cfg.data.tokenizer = spm
    tok = config_lib.resolve_tokenizer(cfg)
    assert cfg.model.vocab_size == tok.vocab_size == 384
    assert cfg.data.tokenizer_id == tokenizers.identity_string(tok.identity)
    cfg.model.vocab_size = 512
    with pytest.raises(ValueError, match=r"model.vocab_size=512 is invalid: .* has 384 tokens"):
        config_lib.resolve_tokenizer(cfg)
    prepare.prepare_corpus(None, str(tmp_path / "bytes"))
    with pytest.raises(ValueError, match=r"prepared with tokenizer byte:259 .* is sentencepiece"):
        data_cache.check_tokenizer(str(tmp_path / "bytes"), cfg.data.tokenizer_id)
    data_cache.check_tokenizer(str(tmp_path / "bytes"), tokenizers.BYTE_IDENTITY)


def test_bits_per_byte_charge_the_loss_to_the_texts_bytes():
    """Two tokenizers of one text: equal total nats give equal bits per byte."""
    text_bytes, nats = 1000, 1200.0
    coarse = eval_metrics(nats, 400, tokens_per_byte=400 / text_bytes)
    fine = eval_metrics(nats, 1000, tokens_per_byte=1000 / text_bytes)
    assert coarse["loss"] != fine["loss"]
    assert coarse["bits_per_byte"] == pytest.approx(fine["bits_per_byte"])
    assert fine["bits_per_byte"] == pytest.approx(nats / text_bytes / LN2)
