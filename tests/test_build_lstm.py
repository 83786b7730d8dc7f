"""kdcache train-lm on a little text, then build --teacher lstm_lm against the model itself."""

from __future__ import annotations

import json

import numpy as np
import torch
from tiny_models import SENTENCES, write_manifest

from kdcache.cache_format import open_cache
from kdcache.data.tokenizer import Tokenizer
from kdcache.teachers.build import build_cache
from kdcache.teachers.lstm_lm import load_model, train_lm


def test_train_then_build(tmp_path):
    # One thread: a small LSTM runs step by step and extra threads only contend for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_then_build(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _train_then_build(tmp_path):
    texts = SENTENCES * 4
    tok = Tokenizer.build_char(texts)
    tok.save(tmp_path / "tok")
    r = train_lm(
        texts,
        str(tmp_path / "tok"),
        str(tmp_path / "lm"),
        layers=2,
        hidden=32,
        epochs=2,
        batch_tokens=1024,
        progress=False,
    )
    assert r.epochs >= 1 and len(r.valid_ppls) == r.epochs
    assert r.best_valid_ppl < tok.vocab_size  # learned something over a uniform guess
    meta = json.loads((tmp_path / "lm" / "lstm_lm.json").read_text())
    assert meta["config"]["layers"] == 2 and meta["training"]["best_epoch"] == r.best_epoch

    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:3] + [""])
    s = build_cache(
        teacher="lstm_lm",
        model=str(tmp_path / "lm"),
        data=str(m),
        out=str(tmp_path / "c.kdc"),
        k=5,
        hidden_layers=(-1,),
        progress=False,
    )
    assert s.utterances_done == 4 and s.utterances_empty == 1
    c = open_cache(str(tmp_path / "c.kdc"))
    rec = c.teachers["lstm_lm"]
    assert rec.kind == "lstm_lm" and rec.tokenizer_hash == tok.content_hash()
    assert rec.vocab_size == tok.vocab_size

    model, cfg, _ = load_model(tmp_path / "lm")
    for i, text in enumerate(SENTENCES[:3]):
        u = c.get(f"u{i:03d}", "lstm_lm")
        ids = tok.encode(text)
        assert list(u.token_ids) == ids
        with torch.no_grad():
            logits, states = model(torch.tensor([[cfg.bos_id, *ids]]), return_states=True)
        ref = torch.topk(torch.log_softmax(logits[0, : len(ids)], -1), 5)
        np.testing.assert_array_equal(u.topk_ids, ref.indices.numpy())
        # The cache keeps spec.DEFAULT_LOGPROB_KEEPBITS mantissa bits of each log-prob.
        np.testing.assert_allclose(u.topk_logprobs, ref.values.numpy(), rtol=2**-7, atol=1e-3)
        np.testing.assert_allclose(u.hidden[2], states[2][0, 1:].numpy(), atol=2e-3)

    # `kdcache inspect --utt` decodes the teacher's tokens with the recorded tokenizer.
    from kdcache.cache_format.inspect import utterance_view

    view = utterance_view(c, "u000", top=2)
    first_piece = tok.id_to_piece(tok.encode(SENTENCES[0])[0])
    row0 = next(line for line in view.splitlines() if line.split()[:1] == ["0"])
    assert repr(first_piece) in row0  # a piece, not a bare id
