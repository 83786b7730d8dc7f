"""The ``phone`` tokenizer: English phones through espeak-ng, offline; and a phone-level LSTM
teacher distilled into a character student through an aux decoder (hierarchical KD, paper 000)."""

from __future__ import annotations

import json
import shutil

import pytest

from kdcache.data.tokenizer import LEXICON_FILE, SPACE_PIECE, Tokenizer, TokenizerError

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

TEXTS = ["the cat sat on the mat", "a dog and a cat", "don't stop the music", "hello world"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.build_phone(TEXTS)


def _phones(tok, text):
    return [tok.id_to_piece(i) for i in tok.encode(text)]


def test_known_phones(tok):
    assert _phones(tok, "cat") == ["k", "a", "t"]  # espeak-ng -x mnemonics, stress removed
    assert _phones(tok, "sat") == ["s", "a", "t"]
    assert _phones(tok, "the cat")[-4:] == [SPACE_PIECE, "k", "a", "t"]  # word boundary piece
    assert "D" in _phones(tok, "the")  # "th" of "the"
    assert tok.decode(tok.encode("the cat sat")).endswith("k a t | s a t")  # lossy: phones


def test_vocabulary_and_specials(tok):
    assert tok.kind == "phone"
    assert [tok.id_to_piece(i) for i in range(4)] == ["<blank>", "<sos/eos>", "<unk>", SPACE_PIECE]
    assert (tok.blank_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 1, 2)
    phones = [tok.id_to_piece(i) for i in range(4, tok.vocab_size)]
    assert phones == sorted(phones) and len(set(phones)) == len(phones)
    assert not any(("'" in p or "," in p) for p in phones)  # no stress marks
    for t in TEXTS:  # every phone of the build text is in the vocabulary
        assert tok.unk_id not in tok.encode(t)
    assert set(tok.lexicon) == {w for t in TEXTS for w in t.split()}
    assert tok.g2p["backend"] == "espeak-ng" and tok.g2p["version"] and tok.g2p["voice"] == "en-us"


def test_deterministic_and_batch_equals_single(tok):
    again = Tokenizer.build_phone(TEXTS)
    assert again.content_hash() == tok.content_hash()
    texts = TEXTS + ["zebra crossing at noon"]  # out-of-lexicon words go through espeak-ng
    singles = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts) == singles == [again.encode(t) for t in texts]
    assert tok.encode("") == []


def test_save_load_round_trip(tok, tmp_path):
    d = tok.save(tmp_path / "phone")
    assert (d / LEXICON_FILE).exists()
    back = Tokenizer.load(d)
    assert back.kind == "phone" and back.vocab_size == tok.vocab_size
    assert back.content_hash() == tok.content_hash()
    assert back.g2p == tok.g2p
    for t in TEXTS + ["zebra"]:
        assert back.encode(t) == tok.encode(t)
    meta = json.loads((d / "kdcache_tokenizer.json").read_text())
    assert meta["g2p"] == tok.g2p and meta["content_hash"] == tok.content_hash()


def test_hash_covers_backend_version_and_lexicon(tok, tmp_path):
    d = tok.save(tmp_path / "phone")
    meta_file = d / "kdcache_tokenizer.json"
    meta = json.loads(meta_file.read_text())
    meta["g2p"]["version"] = "0.0-other"
    meta_file.write_text(json.dumps(meta))
    other = Tokenizer.load(d)
    assert other.content_hash() != tok.content_hash()
    lex = json.loads((d / LEXICON_FILE).read_text())
    lex["cat"] = ["k", "a", "a", "t"]
    (d / LEXICON_FILE).write_text(json.dumps(lex))
    assert Tokenizer.load(d).content_hash() not in (tok.content_hash(), other.content_hash())
    (d / LEXICON_FILE).unlink()
    with pytest.raises(TokenizerError, match="phone lexicon"):
        Tokenizer.load(d)


def test_cli_train_phone(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    text = tmp_path / "lm.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    r = CliRunner().invoke(app, ["tokenizer", "train", "--kind", "phone", "--text", str(text),
                                 "--out", str(tmp_path / "tok")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (
        Tokenizer.load(tmp_path / "tok").content_hash()
        == Tokenizer.build_phone(TEXTS).content_hash()
    )
    r = CliRunner().invoke(app, ["tokenizer", "show", str(tmp_path / "tok"), "--sample", "The cat"])
    assert r.exit_code == 0 and "kind        phone" in r.output and "D @2 | k a t" in r.output


def test_phone_lstm_teacher_into_char_student(tmp_path):
    """kdcache tokenizer train --kind phone -> train-lm -> build --teacher lstm_lm --name
    phone_lm into the toy cache (next to its character teacher) -> kdtrain hierarchical."""
    import torch

    from kdcache.cache_format import open_cache
    from kdcache.data.text import normalize_text
    from kdcache.student.recipe import RunInputs, read_metrics, train
    from kdcache.student.toy import make_toy_corpus, toy_texts
    from kdcache.teachers.build import build_cache
    from kdcache.teachers.lstm_lm import train_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy = make_toy_corpus(tmp_path / "toy", num_utts=32, seed=0)
        lm_text = [normalize_text(s) for s in toy_texts(200, seed=7)]
        phone = Tokenizer.build_phone(lm_text)
        phone.save(tmp_path / "tok-phone")
        train_lm(lm_text, str(tmp_path / "tok-phone"), str(tmp_path / "lm"), layers=1, hidden=32,
                 epochs=2, batch_tokens=1024, progress=False)  # fmt: skip
        build_cache(teacher="lstm_lm", model=str(tmp_path / "lm"), data=str(toy.manifest),
                    out=str(toy.cache), name="phone_lm", k=4, progress=False)  # fmt: skip
        cache = open_cache(str(toy.cache))
        assert set(cache.teachers) == {"lm", "phone_lm"}
        rec = cache.teachers["phone_lm"]
        assert rec.tokenizer_hash == phone.content_hash() and rec.vocab_size == phone.vocab_size
        u = cache.get(toy.utt_ids[0], "phone_lm")
        assert list(u.token_ids) == phone.encode(u.text)

        res = train(RunInputs(
            out=tmp_path / "run", data=toy.manifest, features=toy.features,
            tokenizer=toy.tokenizer, cache=toy.cache, recipe="hierarchical",
            overrides=["model.d_model=48", "model.num_heads=2", "model.num_layers=2",
                       "model.decoder_layers=1", "model.decoder_heads=2", "model.ff_mult=2",
                       "model.conv_kernel=7", "data.max_frames=1000", "optim.lr=3e-3",
                       "optim.warmup_steps=8", "train.log_every=1", "train.ckpt_every=100",
                       "train.progress=false", "train.max_steps=20"],
        ))  # fmt: skip
        assert sum(res.losses[-5:]) < 0.9 * sum(res.losses[:5])
        aux = [float(r["aux_phone_lm"]) for r in read_metrics(tmp_path / "run")]
        assert sum(aux[-5:]) < sum(aux[:5])
    finally:
        torch.set_num_threads(threads)
