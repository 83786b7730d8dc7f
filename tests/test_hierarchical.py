"""Hierarchical multi-teacher KD (paper 000, sec. 3.2) with teachers in different units.

The toy student speaks characters; teacher ``lm`` is in its units (an aux KD head on the main
decoder), teacher ``sub_lm`` in subwords (a BPE), distilled through its own aux decoder that is
teacher-forced on the teacher's token ids from the cache. End to end: the loss goes down, a
resumed run logs the uninterrupted run's losses, the aux decoders never reach the exported or
decoded model; the aux loss against a dense reference; the checks of other-units teachers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdcache.student.recipe import RunInputs, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact CPU reproducibility

TINY = [
    "model.d_model=48", "model.num_heads=2", "model.num_layers=2", "model.decoder_layers=1",
    "model.decoder_heads=2", "model.ff_mult=2", "model.conv_kernel=7", "data.max_frames=1000",
    "optim.lr=3e-3", "optim.warmup_steps=8", "train.log_every=1", "train.ckpt_every=10",
    "train.progress=false",
]  # fmt: skip
STEPS = 30
W = ["hierarchical.teachers=[lm,sub_lm]", "hierarchical.weights=[0.5,1.0]"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy corpus whose one cache holds ``lm`` (student's characters) and ``sub_lm`` (BPE)."""
    from kdcache.student.toy import add_toy_teacher, make_toy_corpus, toy_subword_tokenizer

    corpus = make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=32, seed=0)
    add_toy_teacher(corpus, "sub_lm", toy_subword_tokenizer())
    return corpus


def _run(toy, out: Path, steps: int, extra=(), resume=False, cache=None):
    if resume:
        return train(RunInputs(out=out, resume=True, overrides=[f"train.max_steps={steps}"]))
    return train(RunInputs(
        out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
        cache=cache or toy.cache, recipe="hierarchical",
        overrides=[*TINY, *extra, f"train.max_steps={steps}"],
    ))  # fmt: skip


def _losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [float(r[key]) for r in read_metrics(run_dir)]


def test_other_units_teacher_trains_resumes_and_is_not_exported(toy, tmp_path):
    from kdcache.student.config import load_config
    from kdcache.student.model import Student
    from kdcache.student.recipe import build_model, restore_model

    full, half = tmp_path / "full", tmp_path / "half"
    res = _run(toy, full, STEPS, W)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    aux = _losses(full, "aux_sub_lm")
    assert sum(aux[-5:]) < 0.85 * sum(aux[:5])  # the aux decoder learns the teacher's units
    rows = read_metrics(full)
    assert {"ctc", "att", "kd_lm", "aux_sub_lm"} <= set(rows[0])
    assert "kd_sub_lm" not in rows[0]

    cfg = load_config(full / "config.yaml")
    m = cfg.model
    assert m.aux_kd_heads == {"lm": m.vocab_size}  # same units: head on the main decoder
    assert list(m.aux_decoders) == ["sub_lm"] and m.aux_decoders["sub_lm"] == 24
    assert m.aux_decoder_layers == 1

    # resume mid-way between checkpoints: exactly the uninterrupted run's losses
    _run(toy, half, STEPS // 2 - 1, W)
    _run(toy, half, STEPS, resume=True)
    assert _losses(full) == _losses(half)

    # the trained aux decoder is in the checkpoint but not in the exported CTC model
    model = build_model(cfg)
    restore_model(model, full)
    assert any(k.startswith("aux_decoders.sub_lm.") for k in model.state_dict())
    ecfg, state = model.export_ctc()
    assert ecfg.aux_decoders == {} and not any(k.startswith("aux_decoders") for k in state)
    Student(ecfg).load_state_dict(state, strict=True)

    from kdcache.student.evaluate import evaluate_run

    res = evaluate_run(full, toy.manifest, toy.features, decode="attention_beam", beam=2)
    assert res["utterances"] == 32 and res["cer"] >= 0


def test_several_cache_paths(toy, tmp_path):
    """--cache repeated: each cache's teachers are read together; run.json keeps the list."""
    from kdcache.data.manifest import load_manifest
    from kdcache.student.toy import toy_subword_tokenizer, write_toy_cache

    texts = {u.id: u.text for u in load_manifest(toy.manifest)}
    other = write_toy_cache(tmp_path / "sub.kdc", texts, toy_subword_tokenizer(),
                            teachers=("sub2",), temperature=1.0)  # fmt: skip
    run = tmp_path / "run"
    extra = ["hierarchical.teachers=[lm,sub2]"]
    _run(toy, run, 6, extra, cache=[toy.cache, other])
    saved = json.loads((run / "run.json").read_text())
    assert saved["cache"] == [str(Path(toy.cache).resolve()), str(other.resolve())]
    assert "aux_sub2" in read_metrics(run)[0]
    res = _run(toy, run, 8, resume=True)
    assert res.step == 8

    from typer.testing import CliRunner

    from kdcache.cli import train_app

    r = CliRunner().invoke(train_app, [
        "run", "--cache", str(toy.cache), "--cache", str(other), "--data", str(toy.manifest),
        "--features", str(toy.features), "--tokenizer", str(toy.tokenizer), "--recipe",
        "hierarchical", "--out", str(tmp_path / "cli"), *TINY, *extra, "train.max_steps=2",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["cache"] == saved["cache"]

    from kdcache.student.config import ConfigError

    with pytest.raises(ConfigError, match="in two caches"):
        _run(toy, tmp_path / "dup", 2, cache=[toy.cache, toy.cache])
    with pytest.raises(ConfigError, match="several caches are for recipe hierarchical"):
        train(RunInputs(out=tmp_path / "lst", data=toy.manifest, features=toy.features,
                        tokenizer=toy.tokenizer, cache=[toy.cache, other], recipe="lst",
                        overrides=[*TINY, "train.max_steps=1"]))  # fmt: skip


def _student_cfg(**kw):
    from kdcache.student.model import StudentConfig

    return StudentConfig(vocab_size=11, input_dim=8, d_model=16, num_heads=2, num_layers=1,
                         conv_kernel=3, decoder_layers=1, decoder_heads=2, ff_mult=2,
                         dropout=0.0, **kw)  # fmt: skip


def test_export_and_decoding_identical_without_aux_decoders():
    from kdcache.student.decode import DecodeConfig, decode
    from kdcache.student.model import Student

    with_aux = _student_cfg(aux_decoders={"phones": 7, "chars": 5}, aux_kd_heads={"lm": 11})
    torch.manual_seed(0)
    a = Student(with_aux).eval()
    torch.manual_seed(0)
    b = Student(with_aux.without_aux_decoders()).eval()
    assert any(k.startswith("aux_decoders.phones.") for k in a.state_dict())
    assert a.aux_decoders["phones"].out.out_features == 9  # V_t + bos + eos
    ca, sa = a.export_ctc()
    cb, sb = b.export_ctc()
    assert ca == cb and sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    sd_b = b.state_dict()
    for k, v in sd_b.items():  # every parameter outside the aux decoders is the same
        torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=0)
    feats = torch.randn(2, 40, 8)
    lens = torch.tensor([40, 31])
    for method in ("ctc_greedy", "attention"):
        dc = DecodeConfig(method=method, beam_size=2, ctc_weight=0.3)
        assert decode(a, feats, lens, dc) == decode(b, feats, lens, dc)
    assert a(feats, lens).aux_dec_logits == {}  # inference never runs them


def _teacher(ids, v, k, rng):
    """Synthetic teacher targets for token ids: top-k of a random distribution + rest bin."""
    n = len(ids)
    z = rng.standard_normal((n, v)) * 2.0
    logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, order, axis=1)
    rest = np.ones_like(logp, dtype=bool)
    np.put_along_axis(rest, order, False, axis=1)
    tail = np.logaddexp.reduce(np.where(rest, logp, -np.inf), axis=1)
    return SimpleNamespace(topk_ids=order, topk_logprobs=top.astype(np.float32),
                           tail_logmass=tail.astype(np.float32), token_ids=np.asarray(ids),
                           hidden={}), logp  # fmt: skip


def test_aux_decoder_loss_matches_dense_reference():
    """loss_step's aux term against a dense computation: positions 0..L_t-1 of the aux decoder
    against the teacher's positions (KL with a rest bin + CE on the teacher's next token), and
    position L_t against eos (CE only). Student and teacher lengths differ on purpose."""
    from kdcache.student.config import RunConfig
    from kdcache.student.data import collate
    from kdcache.student.model import Student
    from kdcache.student.recipe import Context, loss_step

    v_t, k, lam = 6, 3, 0.3
    rng = np.random.default_rng(0)
    student_tokens = [np.array([4, 5, 6]), np.array([7, 8])]
    teacher_ids = [[1, 4, 2, 5, 0], [3, 3]]  # 5 and 2 teacher positions
    per_utt, dense = [], []
    for ids in teacher_ids:
        t, logp = _teacher(ids, v_t, k, rng)
        per_utt.append({"sub": t})
        dense.append(logp)
    feats = [rng.standard_normal((40, 8)).astype(np.float32),
             rng.standard_normal((33, 8)).astype(np.float32)]  # fmt: skip
    batch = collate(["a", "b"], feats, student_tokens, per_utt, pad_id=0,
                    temperatures={"sub": 1.0}, hidden_layers={}, own_units=["sub"])  # fmt: skip
    tb = batch.targets["sub"]
    assert tb.topk_ids.shape == (2, 5, k) and batch.tokens.shape == (2, 3)
    assert tb.token_ids.tolist() == [[1, 4, 2, 5, 0], [3, 3, 0, 0, 0]]
    assert tb.token_lens.tolist() == [5, 2]

    cfg = RunConfig(recipe="hierarchical")
    cfg.hierarchical.lam = lam
    torch.manual_seed(0)
    model = Student(_student_cfg(aux_decoders={"sub": v_t})).eval()
    _, terms = loss_step(model, batch, Context(cfg, ["sub"], {}, own_units=["sub"]))

    with torch.no_grad():
        out = model(batch.feats, batch.feat_lens, batch.tokens, batch.token_lens,
                    aux_tokens={"sub": (tb.token_ids, tb.token_lens)})  # fmt: skip
    logq = out.aux_dec_logits["sub"].log_softmax(-1).double()  # [B, 6, v_t + 2]
    eos = v_t + 1
    rows = []
    for b, ids in enumerate(teacher_ids):
        for i in range(len(ids) + 1):
            target = ids[i] if i < len(ids) else eos
            ce = -logq[b, i, target]
            kl = 0.0
            if i < len(ids):  # rest bin: mass outside the teacher's top k (incl. bos/eos)
                p = np.exp(dense[b][i])
                top = np.argsort(-dense[b][i], kind="stable")[:k]
                q = logq[b, i].exp()
                for j in top:
                    kl += p[j] * (math.log(p[j]) - float(logq[b, i, j]))
                p_rest = 1.0 - p[top].sum()
                q_rest = 1.0 - float(q[list(top)].sum())
                kl += p_rest * (math.log(p_rest) - math.log(q_rest))
            rows.append(lam * float(ce) + (1 - lam) * kl)
    assert terms["aux_sub"] == pytest.approx(sum(rows) / len(rows), rel=1e-4)
    # the decoder-side terms are computed too (no same-units teacher here)
    assert "kd_sub" not in terms and "att" in terms


def test_other_units_teacher_needs_token_ids(toy, tmp_path):
    """A teacher in other units is checked against itself: every training utterance needs its
    token_ids; a missing one is named in the error."""
    from kdcache.cache_format import (
        CacheWriter,
        TeacherRecord,
        UttTargets,
        content_hash,
        open_cache,
    )
    from kdcache.data.manifest import load_manifest
    from kdcache.data.text import normalize_text
    from kdcache.data.tokenizer import Tokenizer
    from kdcache.student.checks import CacheMismatchError, check_cache
    from kdcache.student.data import TargetMismatchError, check_alignment
    from kdcache.student.toy import teacher_targets, toy_subword_tokenizer

    sub = toy_subword_tokenizer()
    tok = Tokenizer.load(toy.tokenizer)
    utts = list(load_manifest(toy.manifest))[:4]
    path = tmp_path / "no_tok.kdc"
    rec = TeacherRecord(name="sub", kind="causal_lm", model_id="toy", model_hash="0" * 32,
                        tokenizer_id=sub.name, tokenizer_hash=sub.content_hash(),
                        vocab_size=sub.vocab_size, k=4, temperature=1.0)  # fmt: skip
    with CacheWriter(path, rec, fsync=False) as w:
        for i, u in enumerate(utts):
            text = normalize_text(u.text)
            ids = np.asarray(sub.encode(text))
            top, lp, tail = teacher_targets(ids, sub.vocab_size, 4, 1.0, [3, 4, 5])
            w.add(UttTargets(utt_id=u.id, topk_ids=top, topk_logprobs=lp, tail_logmass=tail,
                             token_ids=None if i == 2 else ids.astype(np.int32), text=text,
                             input_hash=content_hash(text)))  # fmt: skip
    tokens = {u.id: np.asarray(tok.encode(normalize_text(u.text))) for u in utts}
    ids = [u.id for u in utts]
    cache = open_cache(str(path))
    with pytest.raises(CacheMismatchError) as e:
        check_cache(cache, ["sub"], tok, ids, tokens, own_units=["sub"])
    msg = str(e.value)
    assert "no token_ids for 1 of 4 training utterances" in msg and repr(utts[2].id) in msg
    # the same teacher passes without that utterance
    ok = [u for j, u in enumerate(ids) if j != 2]
    assert check_cache(cache, ["sub"], tok, ok, tokens, own_units=["sub"]) == ok
    # ... and the per-batch check names it too
    with pytest.raises(TargetMismatchError, match="has no token_ids in the cache"):
        check_alignment(ids[2], tokens[ids[2]], {"sub": cache.get(ids[2], "sub")}, ["sub"])
    # as a same-units teacher it is refused by the strict checks (tokenizer hash)
    with pytest.raises(CacheMismatchError, match="tokenizer hash differs"):
        check_cache(cache, ["sub"], tok, ok, tokens)


def test_collate_same_units_unchanged():
    """Same-units teachers keep the student's positions and carry no token ids."""
    from kdcache.student.data import collate

    rng = np.random.default_rng(1)
    t1, _ = _teacher([4, 5], 11, 3, rng)
    t2, _ = _teacher([7], 11, 3, rng)
    b = collate(["a", "b"], [np.zeros((9, 8), np.float32)] * 2, [np.array([4, 5]), np.array([7])],
                [{"lm": t1}, {"lm": t2}], 0, {"lm": 1.0}, {})  # fmt: skip
    assert b.targets["lm"].token_ids is None and b.targets["lm"].topk_ids.shape == (2, 2, 3)
    assert b.targets["lm"].mask.tolist() == [[True, True], [True, False]]
