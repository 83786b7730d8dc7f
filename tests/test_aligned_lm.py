"""Frame-level LM targets through a CTC forced alignment (paper 000's hybrid setting).

Checked: the Viterbi alignment against an exhaustive search over every CTC path of small random
examples (and a hand-made one); the aligned cache against the alignment recomputed here from the
aligner's own posteriors (token frames carry the LM's row of their token, blank frames a hard
blank, every token at least one frame, in order); verify passes it; LM caches in other units,
missing or inapplicable options are refused by name; the essence recipe trains from it with its
blank frames outside the distillation term.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache_format import open_cache
from kdcache.student.recipe import RunInputs, read_metrics, train
from kdcache.teachers.align import ctc_forced_align, min_frames
from kdcache.teachers.aligned_lm import blank_frame_mask, build_aligned_lm_cache
from kdcache.teachers.base import BuildError
from kdcache.teachers.ensemble import load_member

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.decoder_layers=1",
    "model.decoder_heads=2", "model.ff_mult=2", "model.conv_kernel=7", "data.max_frames=1500",
    "optim.lr=3e-3", "optim.warmup_steps=5", "train.ckpt_every=10", "train.progress=false",
    "train.log_every=1",
]  # fmt: skip


def _collapse(path, blank):
    out, prev = [], None
    for s in path:
        if s != blank and s != prev:
            out.append(s)
        prev = s
    return out


def _brute_force(lp, tokens, blank):
    """Best path score over every path in V^T that collapses to ``tokens``, and that path."""
    T, V = lp.shape
    best, arg = -np.inf, None
    for path in itertools.product(range(V), repeat=T):
        if _collapse(path, blank) == list(tokens):
            s = lp[np.arange(T), path].sum()
            if s > best:
                best, arg = s, path
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_viterbi_matches_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    T, V, blank = 6, 4, int(rng.integers(0, 2))
    labels = [v for v in range(V) if v != blank]
    L = int(rng.integers(1, 4))
    tokens = [int(x) for x in rng.choice(labels, L)]
    if seed % 3 == 0 and L >= 2:
        tokens[1] = tokens[0]  # a repeat needs a blank between
    lp = np.log(rng.dirichlet(np.ones(V), size=T))
    best, path = _brute_force(lp, tokens, blank)
    frame_token, score = ctc_forced_align(lp, tokens, blank)
    assert score == pytest.approx(best, abs=1e-9)
    # continuous random scores: the best path is unique, so the frames must match it
    want = []
    pos = -1
    prev = None
    for s in path:
        if s == blank:
            want.append(-1)
        else:
            if s != prev:
                pos += 1
            want.append(pos)
        prev = s
    np.testing.assert_array_equal(frame_token, want)


def test_hand_made_alignment_and_limits():
    # 5 frames, tokens "1 1": the middle frame must be blank, the peaks say where the 1s go
    p = np.full((5, 3), 0.05)
    p[[0, 1], 1] = 0.9  # frames 0-1 favour token 1
    p[2, 0] = 0.9  # frame 2 blank
    p[[3, 4], 1] = 0.9
    frame_token, _ = ctc_forced_align(np.log(p), [1, 1], blank=0)
    np.testing.assert_array_equal(frame_token, [0, 0, -1, 1, 1])
    assert min_frames([1, 1, 2]) == 4 and min_frames([1, 2, 3]) == 3
    assert ctc_forced_align(np.log(p[:2]), [1, 1], blank=0) is None  # needs 3 frames
    empty, _ = ctc_forced_align(np.log(p), [], blank=0)
    np.testing.assert_array_equal(empty, [-1] * 5)
    with pytest.raises(ValueError, match="blank"):
        ctc_forced_align(np.log(p), [1, 0], blank=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("alm"), num_utts=12, seed=7, k=4)


@pytest.fixture(scope="module")
def aligner(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligner") / "run"
    train(
        RunInputs(
            out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
            recipe="none", overrides=[*TINY, "train.seed=3", "train.max_steps=30"],
        )
    )  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def aligned(toy, aligner, tmp_path_factory):
    out = tmp_path_factory.mktemp("alc") / "aligned.kdc"
    s = build_aligned_lm_cache(
        model=aligner, lm_cache=str(toy.cache), data=str(toy.manifest),
        features=str(toy.features), out=str(out), progress=False,
    )  # fmt: skip
    assert s.utterances_done == len(toy.utt_ids)
    return out


def test_cache_follows_the_alignment(toy, aligner, aligned):
    from kdcache.data.features import open_features

    cache, lm = open_cache(str(aligned)), open_cache(str(toy.cache))
    rec = cache.teachers["aligned_lm"]
    assert rec.kind == "aligned_lm" and rec.units == "frames" and rec.k == 4
    assert rec.temperature == lm.teachers["lm"].temperature and rec.frame_shift_ms == 40.0
    assert rec.options["blank_frames"] == "masked" and rec.options["lm_teacher"] == "lm"
    m = load_member(aligner)
    store = open_features(toy.features)
    blank = int(m.model.cfg.blank_id)
    token_frames = 0
    for u in toy.utt_ids:
        f = (np.asarray(store[u], np.float32) - store.mean) / np.maximum(store.std, 1e-5)
        with torch.inference_mode():
            out = m.model(torch.from_numpy(f)[None], torch.tensor([len(f)]))
        lp = out.ctc_logits[0].float().log_softmax(-1).numpy()
        ref = lm.get(u, "lm")
        got = cache.get(u, "aligned_lm")
        assert got.num_positions == lp.shape[0] == int(out.enc_lens[0])
        frame_token, _ = ctc_forced_align(lp, ref.token_ids.tolist(), blank)
        at = frame_token >= 0
        # every token gets a frame, in order; its frames carry the LM's row for it
        assert sorted(set(frame_token[at].tolist())) == list(range(len(ref.token_ids)))
        assert np.all(np.diff(frame_token[at]) >= 0)
        np.testing.assert_array_equal(got.topk_ids[at], ref.topk_ids[frame_token[at]])
        np.testing.assert_array_equal(got.topk_logprobs[at], ref.topk_logprobs[frame_token[at]])
        np.testing.assert_array_equal(got.tail_logmass[at], ref.tail_logmass[frame_token[at]])
        # blank frames: the hard blank, which the student masks
        assert np.all(got.topk_ids[~at, 0] == blank) and np.all(got.topk_logprobs[~at, 0] == 0)
        assert np.all(np.isneginf(got.tail_logmass[~at]))
        mask = blank_frame_mask(torch.from_numpy(got.topk_ids), torch.from_numpy(got.topk_logprobs),
                                blank).numpy()  # fmt: skip
        np.testing.assert_array_equal(mask, ~at)
        token_frames += int(at.sum())
    assert token_frames > 0
    from kdcache.cli import app

    res = CliRunner().invoke(app, ["verify", str(aligned)])
    assert res.exit_code == 0, res.output


def test_refusals(toy, aligner, tmp_path):
    from kdcache.cli import app
    from kdcache.student.toy import add_toy_teacher, make_toy_corpus, toy_subword_tokenizer

    other = make_toy_corpus(tmp_path / "sub", num_utts=12, seed=7, k=4)
    add_toy_teacher(other, "bpe", toy_subword_tokenizer())
    kw = dict(model=aligner, data=str(toy.manifest), features=str(toy.features), progress=False)
    with pytest.raises(BuildError, match=r"holds teachers \['bpe', 'lm'\]: name one"):
        build_aligned_lm_cache(lm_cache=str(other.cache), out=str(tmp_path / "a.kdc"), **kw)
    with pytest.raises(BuildError, match="units of tokenizer .*hierarchical"):
        build_aligned_lm_cache(
            lm_cache=str(other.cache), lm_teacher="bpe", out=str(tmp_path / "b.kdc"), **kw
        )
    with pytest.raises(BuildError, match="--lm-cache .*nope.kdc"):
        build_aligned_lm_cache(
            lm_cache=str(tmp_path / "nope.kdc"), out=str(tmp_path / "c.kdc"), **kw
        )
    r = CliRunner()
    base = ["build", "--teacher", "aligned_lm", "--model", aligner, "--data", str(toy.manifest),
            "--out", str(tmp_path / "d.kdc"), "--features", str(toy.features), "--no-progress"]  # fmt: skip
    res = r.invoke(app, base)
    assert res.exit_code == 2 and "needs --lm-cache" in res.output
    res = r.invoke(app, [*base, "--lm-cache", str(toy.cache), "--top-k", "8"])
    assert res.exit_code == 2 and "--top-k does not apply" in res.output
    res = r.invoke(app, ["build", "--teacher", "lstm_lm", "--model", "m", "--data", "d",
                         "--out", "o.kdc", "--lm-cache", str(toy.cache)])  # fmt: skip
    assert res.exit_code == 2 and "--lm-cache is for --teacher aligned_lm" in res.output
    res = r.invoke(app, [*base, "--lm-cache", str(toy.cache)])
    assert res.exit_code == 0, res.output
    assert "frames carry LM targets" in res.output


def test_essence_student_masks_blank_frames(toy, aligned, tmp_path):
    """The essence recipe trains from the aligned cache; its frame term leaves the blank frames
    out: the same arrays labelled an ensemble (no masking) give another first-step loss."""
    from dataclasses import replace

    from kdcache.cache_format import CacheWriter

    def student(cache, out):
        train(
            RunInputs(
                out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
                cache=cache, recipe="essence", overrides=[*TINY, "train.max_steps=6"],
            )
        )  # fmt: skip
        return [float(r["frame_kd"]) for r in read_metrics(out)]

    kd = student(aligned, tmp_path / "st")
    assert len(kd) == 6 and all(np.isfinite(kd)) and all(v > 0 for v in kd)
    src = open_cache(str(aligned))
    rec = replace(src.teachers["aligned_lm"], kind="ensemble")
    plain = tmp_path / "as_ensemble.kdc"
    with CacheWriter(plain, rec, fsync=False) as w:
        for u in toy.utt_ids:
            w.add(src.get(u, "aligned_lm"))
    kd_plain = student(plain, tmp_path / "st2")
    assert kd_plain[0] != pytest.approx(kd[0], rel=1e-3)
