"""The acoustic-ensemble teacher (paper 003) and frame-level essence KD on the CTC head.

Members are tiny kdtrain students trained a few steps on the toy corpus. Checked: the three
combination rules against a dense numpy reference; the stored top-k against that reference; a
member with another subsampling refused by name; a build resumed over a partial cache equals a
fresh one; `kdcache verify` passes it; the essence recipe trains a student from it, and refuses
speed perturbation, another subsampling and a frame-count mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache_format import open_cache
from kdcache.data.features import open_features
from kdcache.data.manifest import load_manifest, write_jsonl
from kdcache.student.config import ConfigError
from kdcache.student.recipe import RunInputs, read_metrics, train
from kdcache.teachers.base import BuildError
from kdcache.teachers.ensemble import EnsembleTeacher, build_ensemble_cache, load_member

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.decoder_layers=1",
    "model.decoder_heads=2", "model.ff_mult=2", "model.conv_kernel=7", "data.max_frames=1500",
    "optim.lr=3e-3", "optim.warmup_steps=5", "train.ckpt_every=10", "train.progress=false",
    "train.log_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("ens"), num_utts=16, seed=5)


def _member(toy, out, seed, steps=12, extra=()):
    train(
        RunInputs(
            out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
            recipe="none", overrides=[*TINY, *extra, f"train.seed={seed}", f"train.max_steps={steps}"],
        )
    )  # fmt: skip
    return str(out)


@pytest.fixture(scope="module")
def members(toy, tmp_path_factory):
    d = tmp_path_factory.mktemp("members")
    return [_member(toy, d / f"m{s}", s) for s in (1, 2)]


def _member_log_probs(run_dir, feats, lens):
    m = load_member(run_dir)
    with torch.inference_mode():
        out = m.model(feats, lens)
    return out.ctc_logits.float().log_softmax(-1).numpy(), out.enc_lens.numpy()


def _reference(log_probs: np.ndarray, weights: np.ndarray, combine: str) -> np.ndarray:
    """Dense float64 combination: log_probs [M, T, V] -> [T, V]."""
    w = weights / weights.sum()
    lp = log_probs.astype(np.float64)
    if combine == "mean":
        return np.log(np.einsum("m,mtv->tv", w, np.exp(lp)))
    z = np.einsum("m,mtv->tv", w, lp)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _batch(toy, n=3):
    store = open_features(toy.features)
    ids = toy.utt_ids[:n]
    feats = [
        (np.asarray(store[u], np.float32) - store.mean) / np.maximum(store.std, 1e-5) for u in ids
    ]
    lens = torch.tensor([f.shape[0] for f in feats])
    x = torch.zeros(n, int(lens.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.from_numpy(f.astype(np.float32))
    return ids, x, lens


@pytest.mark.parametrize(
    "combine,weights",
    [("mean", None), ("mean", [1.0, 3.0]), ("product", None), ("product", [2.0, 1.0])],
)
def test_combination_matches_dense_reference(toy, members, combine, weights):
    _, x, lens = _batch(toy)
    t = EnsembleTeacher.load(members, k=4, combine=combine, weights=weights)
    got, enc_lens, _ = t.log_probs(x, lens)
    per = [_member_log_probs(m, x, lens) for m in members]
    w = np.asarray(weights or [1.0, 1.0])
    for b in range(x.shape[0]):
        n = int(enc_lens[b])
        assert n == per[0][1][b]
        ref = _reference(np.stack([p[0][b, :n] for p in per]), w, combine)
        np.testing.assert_allclose(got[b, :n].numpy(), ref, atol=2e-5)
        np.testing.assert_allclose(np.exp(got[b, :n].numpy()).sum(-1), 1.0, atol=1e-5)
    # the members differ (different seeds), so the rules are not trivially equal
    assert not np.allclose(per[0][0], per[1][0], atol=1e-3)


def test_build_stores_the_combined_top_k(toy, members, tmp_path):
    out = tmp_path / "ens.kdc"
    s = build_ensemble_cache(
        models=members, data=str(toy.manifest), features=str(toy.features), out=str(out), k=5,
        hidden=True, progress=False,
    )  # fmt: skip
    assert s.utterances_done == len(toy.utt_ids)
    cache = open_cache(str(out))
    rec = cache.teachers["ensemble"]
    assert rec.units == "frames" and rec.kind == "ensemble" and rec.frame_shift_ms == 40.0
    assert rec.options["subsampling"] == 4 and len(rec.options["members"]) == 2
    ids, x, lens = _batch(toy)
    per = [_member_log_probs(m, x, lens) for m in members]
    for b, u in enumerate(ids):
        got = cache.get(u, "ensemble")
        n = int(per[0][1][b])
        assert got.num_positions == n and got.token_ids is None
        ref = _reference(np.stack([p[0][b, :n] for p in per]), np.ones(2), "mean")
        order = np.argsort(-ref, axis=-1)
        top = np.take_along_axis(ref, order[:, :5], -1)
        # float16 storage (keepbits 7): relative error <= 2^-8 of each log-prob
        assert np.all(np.abs(got.topk_logprobs - top) <= 1e-3 + 2**-7 * np.abs(top))
        # ids equal wherever the reference has no near-tie between neighbours
        gaps = np.diff(np.take_along_axis(ref, order[:, :6], -1), axis=-1)
        clear = np.abs(gaps) > 1e-3
        sure = np.cumprod(clear, axis=-1).astype(bool)[:, :5]
        assert sure.mean() > 0.5
        np.testing.assert_array_equal(got.topk_ids[sure], order[:, :5][sure])
        tail = np.log1p(-np.exp(top).sum(-1).clip(max=1 - 1e-7))
        assert np.all(np.abs(got.tail_logmass - tail) <= 1e-3 + 2**-7 * np.abs(tail))
        assert got.hidden[1].shape == (n, 32)
    # the CLI's verify passes it
    from kdcache.cli import app

    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output


def test_resumed_build_equals_fresh(toy, members, tmp_path):
    utts = load_manifest(toy.manifest)
    part = write_jsonl(utts[:6], tmp_path / "part.jsonl")
    a, b = tmp_path / "a.kdc", tmp_path / "b.kdc"
    kw = dict(models=members, features=str(toy.features), k=4, progress=False)
    build_ensemble_cache(data=str(part), out=str(a), **kw)
    s = build_ensemble_cache(data=str(toy.manifest), out=str(a), **kw)
    assert s.utterances_resumed == 6 and s.utterances_done == len(utts) - 6
    build_ensemble_cache(data=str(toy.manifest), out=str(b), **kw)
    ca, cb = open_cache(str(a)), open_cache(str(b))
    for u in toy.utt_ids:
        x, y = ca.get(u, "ensemble"), cb.get(u, "ensemble")
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


def test_members_must_agree(toy, members, tmp_path):
    other = _member(toy, tmp_path / "sub2", 3, steps=2, extra=["model.subsampling=2"])
    with pytest.raises(BuildError, match=r"member '.*sub2' differs .* subsampling"):
        EnsembleTeacher.load([members[0], other], k=4)
    with pytest.raises(BuildError, match=r"3 weight\(s\) for 2 member"):
        EnsembleTeacher.load(members, k=4, weights=[1.0, 1.0, 1.0])
    with pytest.raises(BuildError, match="not a kdtrain run"):
        EnsembleTeacher.load([str(tmp_path)], k=4)
    with pytest.raises(BuildError, match="--top-k"):
        EnsembleTeacher.load(members, k=10_000)


def test_cli_build_and_errors(toy, members, tmp_path):
    from kdcache.cli import app

    r = CliRunner()
    out = tmp_path / "cli.kdc"
    args = ["build", "--teacher", "ensemble", "--model", members[0], "--model", members[1],
            "--data", str(toy.manifest), "--out", str(out), "--top-k", "4", "--no-progress"]  # fmt: skip
    res = r.invoke(app, args)
    assert res.exit_code == 2 and "needs --features" in res.output
    res = r.invoke(app, [*args, "--features", str(toy.features), "--combine", "product"])
    assert res.exit_code == 0, res.output
    assert open_cache(str(out)).teachers["ensemble"].options["combine"] == "product"
    res = r.invoke(app, ["build", "--teacher", "lstm_lm", "--model", "a", "--model", "b",
                         "--data", str(toy.manifest), "--out", str(tmp_path / "x.kdc")])  # fmt: skip
    assert res.exit_code == 2 and "takes one --model" in res.output


@pytest.fixture(scope="module")
def frame_cache(toy, members, tmp_path_factory):
    out = tmp_path_factory.mktemp("fc") / "ens.kdc"
    build_ensemble_cache(
        models=members, data=str(toy.manifest), features=str(toy.features), out=str(out), k=4,
        progress=False,
    )  # fmt: skip
    return out


def _student(toy, cache, out, extra=(), steps=20):
    return train(
        RunInputs(
            out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
            cache=cache, recipe="essence", overrides=[*TINY, *extra, f"train.max_steps={steps}"],
        )
    )  # fmt: skip


def test_essence_student_from_frame_targets(toy, frame_cache, tmp_path):
    res = _student(toy, frame_cache, tmp_path / "st")
    assert res.step == 20
    rows = read_metrics(tmp_path / "st")
    assert "frame_kd" in rows[0] and "att" in rows[0]
    kd = [float(r["frame_kd"]) for r in rows]
    assert all(np.isfinite(kd)) and all(v > 0 for v in kd)
    assert np.mean(kd[-5:]) < np.mean(kd[:5])  # the CTC head moves toward the ensemble
    with pytest.raises(ConfigError, match="speed_perturb"):
        _student(toy, frame_cache, tmp_path / "sp", ["data.speed_perturb=[0.9,1.0,1.1]"])
    with pytest.raises(ConfigError, match="model.subsampling=2"):
        _student(toy, frame_cache, tmp_path / "s2", ["model.subsampling=2"])
    with pytest.raises(ConfigError, match="frame-level targets; recipe lst"):
        train(
            RunInputs(
                out=tmp_path / "lst", data=toy.manifest, features=toy.features,
                tokenizer=toy.tokenizer, cache=frame_cache, recipe="lst",
                overrides=[*TINY, "train.max_steps=2"],
            )
        )  # fmt: skip


def test_frame_count_mismatch_names_the_utterance(toy, frame_cache, tmp_path):
    """Frame targets that do not line up with the student's encoder (here: each utterance
    copied from the ensemble cache minus its last 2 frames) are refused, naming the utterance."""
    from dataclasses import replace

    from kdcache.cache_format import CacheWriter
    from kdcache.torch import TargetMismatchError

    src = open_cache(str(frame_cache))
    rec = replace(src.teachers["ensemble"], options={})  # no subsampling recorded
    out = tmp_path / "short.kdc"
    with CacheWriter(out, rec, fsync=False) as w:
        for u in toy.utt_ids:
            t = src.get(u, "ensemble")
            w.add(replace(t, topk_ids=t.topk_ids[:-2], topk_logprobs=t.topk_logprobs[:-2],
                          tail_logmass=t.tail_logmass[:-2]))  # fmt: skip
    with pytest.raises(TargetMismatchError, match=r"utterance 'toy5-\d+': teacher 'ensemble' has"):
        _student(toy, out, tmp_path / "mm", steps=2)


def test_eval_an_ensemble(toy, members, tmp_path):
    """kdtrain eval with several --run: CTC greedy on the combined posteriors, equal to a greedy
    decode of the dense reference combination."""
    import json

    from kdcache.cli import train_app
    from kdcache.data.tokenizer import Tokenizer

    r = CliRunner()
    base = ["eval", "--run", members[0], "--run", members[1], "--data", str(toy.manifest),
            "--features", str(toy.features), "--device", "cpu"]  # fmt: skip
    res = r.invoke(train_app, [*base, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    got = {json.loads(line)["utt_id"]: json.loads(line)["hyp"]
           for line in (tmp_path / "ev" / "hyp.jsonl").read_text().splitlines()}  # fmt: skip
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert len(results["ensemble"]["members"]) == 2 and results["utterances"] == len(toy.utt_ids)
    tok = Tokenizer.load(toy.tokenizer)
    ids, x, lens = _batch(toy)
    per = [_member_log_probs(m, x, lens) for m in members]
    for b, u in enumerate(ids):
        n = int(per[0][1][b])
        ref = _reference(np.stack([p[0][b, :n] for p in per]), np.ones(2), "mean")
        best = [int(i) for i in torch.unique_consecutive(torch.from_numpy(ref.argmax(-1)))]
        want = tok.decode([i for i in best if i != tok.blank_id])
        assert got[u] == " ".join(want.split())
    assert any(got[u] for u in ids), "members this young may emit nothing; the check needs output"
    res = r.invoke(train_app, [*base, "--decode", "attention_beam"])
    assert res.exit_code == 2 and "ensemble with --decode ctc_greedy" in res.output


def test_inspect_shows_frame_statistics(toy, frame_cache):
    """kdcache inspect: frame shift, positions per second, entropy and the blank-dominated
    fraction, the last recomputed here from the stored arrays."""
    import json

    from kdcache.cli import app
    from kdcache.data.tokenizer import Tokenizer

    res = CliRunner().invoke(app, ["inspect", str(frame_cache), "--json"])
    assert res.exit_code == 0, res.output
    fr = json.loads(res.output)["teachers"][0]["frames"]
    assert fr["frame_shift_ms"] == 40.0 and fr["positions_per_second"] == 25.0
    cache = open_cache(str(frame_cache))
    blank = Tokenizer.load(toy.tokenizer).blank_id
    assert cache.teachers["ensemble"].options["blank_id"] == blank
    n = dom = 0
    ent = []
    for u in cache.utt_ids("ensemble"):
        t = cache.get(u, "ensemble")
        p = np.exp(t.topk_logprobs.astype(np.float64))
        dom += int(((t.topk_ids[:, 0] == blank) & (p[:, 0] > 0.5)).sum())
        n += t.num_positions
        pt = np.exp(t.tail_logmass.astype(np.float64))
        ent += list(-(p * np.log(p)).sum(1) - np.where(pt > 0, pt * np.log(pt), 0))
    assert fr["sampled_frames"] == n
    assert fr["blank_dominated"] == pytest.approx(dom / n)
    assert fr["mean_entropy_nats"] == pytest.approx(np.mean(ent), rel=1e-6)
    text = CliRunner().invoke(app, ["inspect", str(frame_cache)]).output
    assert "one position every 40 ms (25 per second)" in text and "blank-dominated" in text


def test_resume_against_changed_features_is_refused(toy, members, tmp_path):
    """The same utterances with other features (here: rounded to 3 mantissa bits) must not be
    mixed into a cache built from the original ones."""
    from kdcache.data.features import write_features

    utts = load_manifest(toy.manifest)
    other = tmp_path / "other.fbank"
    write_features(utts, other, progress=False, keepbits=3)
    out = tmp_path / "mixed.kdc"
    kw = dict(models=members, data=str(toy.manifest), out=str(out), k=4, progress=False)
    build_ensemble_cache(features=str(toy.features), **kw)
    with pytest.raises(BuildError, match="other features"):
        build_ensemble_cache(features=str(other), **kw)


KILL_AFTER = """
import os, signal, sys
from kdcache.cache_format import writer
from kdcache.teachers.ensemble import build_ensemble_cache

n = 0
add = writer.CacheWriter.add
def add_then_die(self, item):
    global n
    add(self, item)
    n += 1
    if n == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
writer.CacheWriter.add = add_then_die
build_ensemble_cache(models=sys.argv[5:], data=sys.argv[1], features=sys.argv[2], out=sys.argv[3],
                     k=4, shard_positions=60, progress=False)
"""


def test_sigkill_mid_build_then_resume(toy, members, tmp_path):
    """An ensemble build killed (SIGKILL) after some shards have committed and while another is
    half-written resumes to exactly the targets of an uninterrupted build, and verifies."""
    import signal
    import subprocess
    import sys

    from kdcache.cache_format import verify_cache

    out, ref = tmp_path / "killed.kdc", tmp_path / "ref.kdc"
    p = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(toy.manifest), str(toy.features), str(out), "11",
         *members],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    before = open_cache(str(out)).utt_ids("ensemble")
    assert 0 < len(before) < 11  # some shards committed, the last one lost
    kw = dict(models=members, data=str(toy.manifest), features=str(toy.features), k=4,
              shard_positions=60, progress=False)  # fmt: skip
    s = build_ensemble_cache(out=str(out), **kw)
    assert s.utterances_resumed == len(before) and s.utterances_done == 16 - len(before)
    build_ensemble_cache(out=str(ref), **kw)
    a, b = open_cache(str(out)), open_cache(str(ref))
    assert sorted(a.utt_ids("ensemble")) == sorted(b.utt_ids("ensemble")) == sorted(toy.utt_ids)
    for u in toy.utt_ids:
        x, y = a.get(u, "ensemble"), b.get(u, "ensemble")
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
        np.testing.assert_array_equal(x.tail_logmass, y.tail_logmass)
    assert verify_cache(str(out), include_info=True) == []
