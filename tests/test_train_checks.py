"""kdtrain refuses a cache that does not fit the student: tokenizer, vocabulary, token ids, coverage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from kdcache.data.text import normalize_text
from kdcache.student.checks import CacheMismatchError, check_cache
from kdcache.student.toy import WORDS, write_toy_cache


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=12, seed=2)


@pytest.fixture(scope="module")
def student(toy):
    from kdcache.data.manifest import load_manifest
    from kdcache.data.tokenizer import Tokenizer

    tok = Tokenizer.load(toy.tokenizer)
    texts = {u.id: u.text for u in load_manifest(toy.manifest)}
    tokens = {u: np.asarray(tok.encode(normalize_text(t))) for u, t in texts.items()}
    return tok, texts, tokens


def _open(path):
    from kdcache.cache_format import open_cache

    return open_cache(path)


def test_matching_cache_passes(toy, student):
    tok, texts, tokens = student
    assert check_cache(_open(toy.cache), ["lm"], tok, list(texts), tokens) == list(texts)


def test_tokenizer_hash_mismatch(toy, student, tmp_path):
    from kdcache.data.tokenizer import Tokenizer

    tok, texts, tokens = student
    other = Tokenizer.build_char([normalize_text(" ".join(WORDS)) + "xyz"])
    path = write_toy_cache(tmp_path / "other.kdc", texts, other)
    with pytest.raises(CacheMismatchError) as e:
        check_cache(_open(path), ["lm"], tok, list(texts), tokens)
    msg = str(e.value)
    assert "tokenizer hash differs" in msg
    assert other.content_hash() in msg and tok.content_hash() in msg


def test_vocab_size_mismatch(toy, student, tmp_path):
    from kdcache.data.tokenizer import Tokenizer

    tok, texts, tokens = student
    bigger = Tokenizer.build_char([normalize_text(" ".join(WORDS)) + "xyz"])
    # Same recorded hash, different vocabulary: the size check still catches it.
    path = write_toy_cache(tmp_path / "big.kdc", texts, bigger, tokenizer_hash=tok.content_hash(),
                           token_ids=tok.encode)  # fmt: skip
    with pytest.raises(
        CacheMismatchError,
        match=rf"vocabulary size differs: cache {bigger.vocab_size}, student tokenizer {tok.vocab_size}",
    ):
        check_cache(_open(path), ["lm"], tok, list(texts), tokens)


def test_token_ids_mismatch(toy, student, tmp_path):
    tok, texts, tokens = student
    path = write_toy_cache(tmp_path / "rev.kdc", texts, tok,
                           token_ids=lambda t: tok.encode(t)[::-1])  # fmt: skip
    with pytest.raises(
        CacheMismatchError, match=r"token_ids .* differ from the student's tokenisation"
    ):
        check_cache(_open(path), ["lm"], tok, list(texts), tokens)


def test_missing_utterances_named_and_counted(toy, student, tmp_path, caplog):
    tok, texts, tokens = student
    ids = list(texts)
    half = {u: texts[u] for u in ids[:5]}
    path = write_toy_cache(tmp_path / "half.kdc", half, tok)
    with pytest.raises(CacheMismatchError) as e:
        check_cache(_open(path), ["lm"], tok, ids, tokens)
    msg = str(e.value)
    assert f"lacks {len(ids) - 5} of {len(ids)} training utterances" in msg
    assert repr(ids[5]) in msg and "..." in msg and "--allow-missing" in msg
    with caplog.at_level(logging.WARNING):
        usable = check_cache(_open(path), ["lm"], tok, ids, tokens, allow_missing=True)
    assert usable == ids[:5]
    assert "skipping them" in caplog.text


def test_unknown_teacher(toy, student):
    tok, texts, tokens = student
    with pytest.raises(CacheMismatchError, match=r"teacher 'bert' is not in the cache"):
        check_cache(_open(toy.cache), ["bert"], tok, list(texts), tokens)


def test_train_refuses_before_any_step(toy, tmp_path):
    """The checks are wired into kdtrain run: the error comes before a run dir is written."""
    from kdcache.data.tokenizer import Tokenizer
    from kdcache.student.recipe import RunInputs, train

    other = Tokenizer.build_char(["zz " + normalize_text(" ".join(WORDS))])
    other_dir = other.save(tmp_path / "tok2")
    with pytest.raises(CacheMismatchError, match="tokenizer hash differs"):
        train(RunInputs(out=tmp_path / "run", data=toy.manifest, features=toy.features,
                        tokenizer=Path(other_dir), cache=toy.cache, recipe="lst"))  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists()
