"""kdcache score: teacher perplexity on a manifest's transcripts, against direct model forwards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_models import SENTENCES, write_manifest
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.teachers.causal_lm import CausalLMTeacher
from kdcache.teachers.loading import resolve_model
from kdcache.teachers.masked_lm import MaskedLMTeacher
from kdcache.teachers.score import score_teacher
from kdcache.teachers.topk import label_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _expect(rows: list[tuple[torch.Tensor, list[int]]]) -> tuple[float, float, int]:
    """Mean -log p(token) and top-1 share over (log-softmax [n, V], tokens [n]) pairs."""
    nll, hit, n = 0.0, 0, 0
    for logp, toks in rows:
        idx = torch.arange(len(toks))
        lab = torch.tensor(toks, dtype=torch.long)
        lp = logp[idx, lab]
        nll -= float(lp.double().sum())
        hit += int((logp.argmax(-1) == lab).sum())
        n += len(toks)
    return nll / n, hit / n, n


def test_label_scores_is_log_softmax_at_the_label():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 11, generator=g) * 3
    lab = torch.tensor([0, 3, 10, 5, 5, 2, 9])
    ids, lp, best = label_scores(z, lab)
    ref = torch.log_softmax(z.double(), -1)
    assert ids[:, 0].tolist() == lab.tolist()
    np.testing.assert_allclose(lp[:, 0].numpy(), ref[torch.arange(7), lab].numpy(), atol=1e-5)
    np.testing.assert_allclose(best.numpy(), ref.max(-1).values.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="labels must be in 0..10"):
        label_scores(z, torch.tensor([11, 0, 0, 0, 0, 0, 0]))


def test_causal_lm_perplexity_matches_full_forward(tiny_llama, tmp_path):
    t = CausalLMTeacher(resolve_model(str(tiny_llama)), k=1)
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES + [""])
    s = score_teacher(teacher="causal_lm", model="tiny", data=str(m), progress=False, loaded=t)
    rows = []
    for text in SENTENCES:
        toks = t.encode(text)
        with torch.no_grad():
            logits = t.model(torch.tensor([[t.bos_id, *toks]])).logits[0, : len(toks)]
        rows.append((torch.log_softmax(logits.float(), -1), toks))
    nll, top1, n = _expect(rows)
    assert (s.utterances, s.positions, s.unscored) == (len(SENTENCES) + 1, n, 0)
    assert s.nll == pytest.approx(nll, abs=1e-4)
    assert s.top1 == pytest.approx(top1)
    assert s.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    chars = sum(len(x) for x in SENTENCES)  # already normalised
    assert s.characters == chars
    assert s.bits_per_char == pytest.approx(nll * n / math.log(2) / chars, rel=1e-4)
    # Batching must not change the figure: one utterance a batch.
    s1 = score_teacher(
        teacher="causal_lm", model="tiny", data=str(m), batch_tokens=1, progress=False, loaded=t
    )
    assert s1.nll == pytest.approx(s.nll, abs=1e-5) and s1.positions == s.positions


def test_causal_lm_without_bos_leaves_the_first_token_unscored(tiny_llama, tmp_path):
    t = CausalLMTeacher(resolve_model(str(tiny_llama)), k=1, bos_id=-1)
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:4])
    s = score_teacher(teacher="causal_lm", model="tiny", data=str(m), progress=False, loaded=t)
    rows = []
    for text in SENTENCES[:4]:
        toks = t.encode(text)
        with torch.no_grad():
            logits = t.model(torch.tensor([toks])).logits[0, : len(toks) - 1]
        rows.append((torch.log_softmax(logits.float(), -1), toks[1:]))
    nll, _, n = _expect(rows)
    assert s.unscored == 4 and s.positions == n
    assert s.nll == pytest.approx(nll, abs=1e-4)


def test_bert_pseudo_perplexity_masks_each_position(tiny_bert, tmp_path):
    t = MaskedLMTeacher(resolve_model(str(tiny_bert)), k=1)
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:3])
    s = score_teacher(teacher="bert", model="tiny", data=str(m), progress=False, loaded=t)
    rows = []
    for text in SENTENCES[:3]:
        toks = t.encode(text)
        out = []
        for p in range(len(toks)):
            x = [t.cls_id, *toks, t.sep_id]
            x[p + 1] = t.mask_id
            with torch.no_grad():
                out.append(torch.log_softmax(t.model(torch.tensor([x])).logits[0, p + 1], -1))
        rows.append((torch.stack(out), toks))
    nll, top1, n = _expect(rows)
    assert s.positions == n and s.nll == pytest.approx(nll, abs=1e-4)
    assert s.top1 == pytest.approx(top1)
    assert "pseudo-perplexity" in "\n".join(s.lines())


def test_cli_score_writes_json_and_names_bad_input(tiny_llama, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:3])
    r = CliRunner().invoke(
        app,
        ["score", "--teacher", "causal_lm", "--model", str(tiny_llama), "--data", str(m),
         "--no-progress", "--json", str(tmp_path / "s.json")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "s.json").read_text())
    assert got["positions"] > 0 and got["perplexity"] == pytest.approx(math.exp(got["nll"]))
    assert f"perplexity {got['perplexity']:.3f}" in r.output
    r = CliRunner().invoke(
        app, ["score", "--teacher", "causal_lm", "--model", str(tiny_llama), "--data",
              str(tmp_path / "none.jsonl"), "--no-progress"],
    )  # fmt: skip
    assert r.exit_code != 0 and "none.jsonl" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        app, ["score", "--teacher", "causal_lm", "--model", str(tiny_llama), "--data", str(m),
              "--mask-stride", "4"],
    )  # fmt: skip
    assert r.exit_code != 0 and "--mask-stride" in r.output
    r = CliRunner().invoke(
        app, ["score", "--teacher", "causal_lm", "--model", str(tiny_llama), "--data", str(m),
              "--threads", "0"],
    )  # fmt: skip
    assert r.exit_code != 0 and "--threads" in r.output and "Traceback" not in r.output


def test_lstm_lm_perplexity_matches_its_forward(tmp_path):
    from kdcache.data.tokenizer import Tokenizer
    from kdcache.teachers.lstm_lm import load_model, train_lm

    texts = SENTENCES * 2
    Tokenizer.build_char(texts).save(tmp_path / "tok")
    train_lm(texts, str(tmp_path / "tok"), str(tmp_path / "lm"), layers=1, hidden=16,
             epochs=1, batch_tokens=512, progress=False)  # fmt: skip
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:4])
    s = score_teacher(teacher="lstm_lm", model=str(tmp_path / "lm"), data=str(m), progress=False)
    model, cfg, tok = load_model(tmp_path / "lm")
    rows = []
    for text in SENTENCES[:4]:
        toks = tok.encode(text)
        with torch.no_grad():
            logits, _ = model(torch.tensor([[cfg.bos_id, *toks]]))
        rows.append((torch.log_softmax(logits[0, : len(toks)].float(), -1), toks))
    nll, top1, n = _expect(rows)
    assert s.units == "char" and s.positions == n and s.unscored == 0
    assert s.nll == pytest.approx(nll, abs=1e-4) and s.top1 == pytest.approx(top1)
