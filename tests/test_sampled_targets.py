"""Sampled sparse targets (``kdcache build --targets sampled``): the estimator is unbiased, the
cache holds it in the ordinary arrays, builds are reproducible, and losses refuse what they
cannot do with it (docs/losses.md, "Sampled targets")."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from tiny_models import SENTENCES, write_manifest

from kdcache import losses
from kdcache.cache_format import open_cache, spec, verify_cache
from kdcache.cache_format.validate import parse_record
from kdcache.teachers.topk import sampled_targets

# ------------------------------------------------------------------------- the estimator


def _multinomial_outcomes(v: int, n: int):
    """Every count vector of n draws over v ids, with its multinomial probability's
    coefficient n! / prod(c!)."""
    for combo in itertools.combinations_with_replacement(range(v), n):
        c = np.bincount(combo, minlength=v)
        coef = math.factorial(n) / np.prod([math.factorial(int(x)) for x in c])
        yield c, coef


def _stored_form(c: np.ndarray, n: int):
    """A count vector as the cache stores it: distinct ids by count, then id; -inf fillers."""
    v = len(c)
    width = min(n, v)
    order = sorted(range(v), key=lambda i: (-c[i], i))[:width]
    ids = torch.tensor(order)
    with np.errstate(divide="ignore"):
        lp = torch.tensor(np.log(c[order] / n))
    return ids, lp


def test_sampled_ce_and_gradient_expectation_exact_enumeration():
    """E over all multinomial outcomes of the sampled CE (and of its gradient w.r.t. the
    student logits) equals the dense H(p, q) (and softmax(z) - p) to float64 rounding."""
    torch.manual_seed(0)
    v, n = 5, 4
    p = torch.softmax(torch.randn(v, dtype=torch.float64) * 1.5, -1)
    z = torch.randn(v, dtype=torch.float64, requires_grad=True)
    dense = -(p * torch.log_softmax(z, -1)).sum()
    (g_dense,) = torch.autograd.grad(dense, z)
    e_loss, e_grad, total = 0.0, torch.zeros(v, dtype=torch.float64), 0.0
    for c, coef in _multinomial_outcomes(v, n):
        prob = coef * float(torch.prod(p ** torch.tensor(c)))
        ids, lp = _stored_form(c, n)
        zz = z.detach().clone().requires_grad_(True)
        loss = losses.sparse_kd_ce(
            zz.view(1, 1, v), ids.view(1, 1, -1), lp.view(1, 1, -1),
            torch.full((1, 1), -math.inf, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
            target_kind="sampled",
        )  # fmt: skip
        (g,) = torch.autograd.grad(loss, zz)
        e_loss += prob * loss.item()
        e_grad += prob * g
        total += prob
    assert total == pytest.approx(1.0, abs=1e-12)
    assert e_loss == pytest.approx(dense.item(), abs=1e-12)
    torch.testing.assert_close(e_grad, g_dense, atol=1e-12, rtol=0)
    # The top-k + rest-bin target at the same width is not this: on a peaked p its lumped CE
    # differs from H(p, q) (it is exact on its K + 1 buckets only).
    lp_k, ids_k = torch.topk(torch.log(p), 2)
    rest = torch.logsumexp(torch.log(p).scatter(0, ids_k, -math.inf), 0)
    topk_ce = losses.sparse_kd_ce(
        z.detach().view(1, 1, v), ids_k.view(1, 1, -1), lp_k.view(1, 1, -1), rest.view(1, 1),
        torch.ones(1, 1, dtype=torch.bool),
    )  # fmt: skip
    assert abs(topk_ce.item() - dense.item()) > 1e-3


def test_sampled_targets_draws_are_unbiased_over_many_seeds():
    """sampled_targets (the build's sampler) over 40 000 rows of one distribution: the mean
    sampled CE and gradient match the dense values within 5 standard errors, and the mean of
    count / N is p."""
    gen = torch.Generator().manual_seed(1)
    v, n, rows = 50, 8, 40_000
    logits = torch.randn(v, generator=gen) * 2
    p = torch.softmax(logits.double(), -1)
    uni = torch.from_numpy(np.random.default_rng(2).random((rows, n)))
    ids, lp, tail = sampled_targets(logits.expand(rows, v), min(n, v), uni)
    assert torch.isneginf(tail).all()
    assert ids.shape == (rows, n)
    counts = torch.zeros(rows, v, dtype=torch.float64).scatter_add_(1, ids, lp.double().exp())
    assert torch.allclose(counts.sum(1), torch.ones(rows, dtype=torch.float64), atol=1e-6)
    se = (p * (1 - p) / n / rows).sqrt()
    assert ((counts.mean(0) - p).abs() <= 5 * se + 1e-9).all()

    z = torch.randn(v, generator=gen, dtype=torch.float64)
    zz = z.expand(rows, v).clone().requires_grad_(True)
    per = losses.sparse_kd_ce(
        zz.unsqueeze(0), ids.unsqueeze(0), lp.unsqueeze(0), tail.unsqueeze(0),
        torch.ones(1, rows, dtype=torch.bool), target_kind="sampled", reduction="none",
    )[0]  # fmt: skip
    (g,) = torch.autograd.grad(per.sum(), zz)
    dense = -(p * torch.log_softmax(z, -1)).sum()
    assert abs((per.mean() - dense).item()) <= 5 * per.std().item() / math.sqrt(rows)
    g_dense = torch.softmax(z, -1) - p
    g_se = g.std(0) / math.sqrt(rows)
    assert ((g.mean(0) - g_dense).abs() <= 5 * g_se + 1e-9).all()


def test_sampled_targets_are_deterministic_and_ordered():
    logits = torch.randn(7, 30)
    uni = torch.from_numpy(np.random.default_rng(0).random((7, 12)))
    a = sampled_targets(logits, 12, uni)
    b = sampled_targets(logits.clone(), 12, uni.clone())
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    ids, lp, _ = a
    counts = torch.round(lp.double().exp() * 12)
    assert (counts.sum(1) == 12).all()
    assert (counts[:, :-1] >= counts[:, 1:]).all()  # most frequent first
    for r in range(7):  # distinct ids, fillers are the smallest undrawn ids
        assert len(set(ids[r].tolist())) == 12
        drawn = set(ids[r][counts[r] > 0].tolist())
        fill = ids[r][counts[r] == 0].tolist()
        assert fill == sorted(i for i in range(30) if i not in drawn)[: len(fill)]
    # N > V: the width is V, every id present
    ids, lp, _ = sampled_targets(logits[:, :5], 5, uni)
    assert ids.shape == (7, 5)


def test_sampled_kl_differs_from_ce_by_the_sample_entropy_only():
    torch.manual_seed(3)
    z = torch.randn(2, 3, 11, dtype=torch.float64)
    ids, lp, tail = sampled_targets(
        torch.randn(6, 11), 6, torch.from_numpy(np.random.default_rng(5).random((6, 6)))
    )
    args = (ids.view(2, 3, 6), lp.double().view(2, 3, 6), tail.double().view(2, 3),
            torch.ones(2, 3, dtype=torch.bool))  # fmt: skip
    zc, zk = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ce = losses.sparse_kd_ce(zc, *args, target_kind="sampled", reduction="sum")
    kl = losses.sparse_kd_kl(zk, *args, target_kind="sampled", reduction="sum")
    pe = lp.double().exp()
    h = -torch.where(pe > 0, pe * lp.double(), torch.zeros_like(pe)).sum()
    assert (ce - kl).item() == pytest.approx(h.item(), abs=1e-6)  # float32 log(c / N)
    (gc,) = torch.autograd.grad(ce, zc)
    (gk,) = torch.autograd.grad(kl, zk)
    torch.testing.assert_close(gc, gk)
    # the tail switch does not apply: renormalize gives the same
    same = losses.sparse_kd_ce(z, *args, target_kind="sampled", tail="renormalize", reduction="sum")
    assert same.item() == pytest.approx(ce.item(), abs=1e-12)


# ------------------------------------------------------------------------- refusals


def _batch(v=9, width=4):
    ids, lp, tail = sampled_targets(
        torch.randn(2, v), width, torch.from_numpy(np.random.default_rng(0).random((2, width)))
    )
    return (torch.randn(1, 2, v), torch.zeros(1, 2, dtype=torch.long), ids.view(1, 2, width),
            lp.view(1, 2, width), tail.view(1, 2), torch.ones(1, 2, dtype=torch.bool))  # fmt: skip


def test_losses_refuse_what_sampled_targets_cannot_do():
    logits, y, ids, lp, tail, mask = _batch()
    with pytest.raises(ValueError, match=r"Essence KD \(paper 003\).*--targets topk"):
        losses.essence_kd_loss(logits, y, ids, lp, tail, mask, alpha=0.5, target_kind="sampled")
    with pytest.raises(ValueError, match=r"drawn at T=1 and cannot be re-tempered to T=5"):
        losses.lst_loss(logits, y, ids, lp, tail, mask, temperature=5.0, build_temperature=1.0,
                        target_kind="sampled")  # fmt: skip
    with pytest.raises(ValueError, match="dropping drawn ids biases"):
        losses.sparse_kd_ce(logits, ids, lp, tail, mask, k=2, target_kind="sampled")
    with pytest.raises(ValueError, match="dropping drawn ids biases"):
        losses.interaed_kd_loss([logits], y, ids, lp, tail, mask, k=2, target_kind="sampled",
                                build_temperature=3.0)  # fmt: skip
    with pytest.raises(ValueError, match="unknown target_kind"):
        losses.sparse_kd_ce(logits, ids, lp, tail, mask, target_kind="dense")
    # what they can do: equal temperatures, all entries
    for loss in (
        losses.lst_loss(logits, y, ids, lp, tail, mask, temperature=1.0, build_temperature=1.0,
                        target_kind="sampled"),
        losses.multitask_kd_loss(logits, logits, y, ids, lp, tail, mask, lam=0.5,
                                 build_temperature=1.0, target_kind="sampled"),
        losses.interaed_kd_loss([logits, logits], y, ids, lp, tail, mask, k=None,
                                temperature=1.0, build_temperature=1.0, target_kind="sampled"),
    ):  # fmt: skip
        assert torch.isfinite(loss)


def test_lst_with_sampled_targets_is_the_interpolated_ce():
    """lst_loss on sampled targets = CE with target (1 - w) onehot + w count / N."""
    logits, y, ids, lp, tail, mask = _batch(v=9, width=4)
    w = 0.3
    got = losses.lst_loss(logits, y, ids, lp, tail, mask, weight=w, target_kind="sampled",
                          temperature=1.0)  # fmt: skip
    dense = torch.zeros(1, 2, 9).scatter_add_(-1, ids, lp.exp())
    target = (1 - w) * torch.nn.functional.one_hot(y, 9).float() + w * dense
    ref = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert float(got) == pytest.approx(float(ref), abs=1e-5)


def test_recipe_check_refuses_essence_and_retempering_naming_cache_and_teacher():
    from kdcache.student.config import ConfigError, RunConfig
    from kdcache.student.objectives import check_sampled_targets

    rec = spec.TeacherRecord(
        name="lm", kind="lstm_lm", model_id="", model_hash="", tokenizer_id="",
        tokenizer_hash="", vocab_size=40, k=16, temperature=1.0, targets="sampled",
        samples=16, sample_seed=0,
    )  # fmt: skip
    where = {"lm": "/data/s.kdc"}
    cfg = RunConfig(recipe="essence")
    with pytest.raises(ConfigError, match=r"cache /data/s.kdc, teacher 'lm'.*Essence KD"):
        check_sampled_targets(cfg, {"lm": rec}, where)
    with pytest.raises(ConfigError, match=r"/data/s.kdc, teacher 'lm'.*T=1.*wants T=5"):
        check_sampled_targets(RunConfig(recipe="lst"), {"lm": rec}, where)
    check_sampled_targets(RunConfig(recipe="multitask"), {"lm": rec}, where)  # T = 1 both


# ------------------------------------------------------------------------- record and format


def test_record_fields_old_records_read_as_topk():
    base = dict(name="t", kind="lstm_lm", model_id="", model_hash="", tokenizer_id="",
                tokenizer_hash="", vocab_size=40, k=8)  # fmt: skip
    topk = spec.TeacherRecord(**base)
    assert topk.targets == "topk" and "targets" not in topk.to_dict()  # keys as before
    rec, probs = parse_record(topk.to_dict())
    assert not probs and rec.targets == "topk"
    s = spec.TeacherRecord(**base, targets="sampled", samples=8, sample_seed=7)
    d = s.to_dict()
    assert (d["targets"], d["samples"], d["sample_seed"]) == ("sampled", 8, 7)
    assert parse_record(d)[0] == s
    assert spec.record_differences(topk, s) == ["targets", "samples", "sample_seed"]
    with pytest.raises(ValueError, match="k = min"):
        spec.TeacherRecord(**{**base, "k": 4}, targets="sampled", samples=8)
    with pytest.raises(ValueError, match="counts do not survive"):
        spec.TeacherRecord(**{**base, "k": 40}, targets="sampled", samples=1000)
    _, probs = parse_record({**d, "samples": "8"})
    assert probs and "samples" in probs[0]
    schema = json.loads(
        open(os.path.join(os.path.dirname(__file__), "..", "docs", "format.schema.json")).read()
    )
    props = schema["$defs"]["teacher"]["properties"]
    assert {"targets", "samples", "sample_seed"} <= set(props)


# ------------------------------------------------------------------------- a real build


@pytest.fixture(scope="module")
def lstm_dir(tmp_path_factory):
    from kdcache.data.tokenizer import Tokenizer
    from kdcache.teachers.lstm_lm import train_lm

    d = tmp_path_factory.mktemp("lstm")
    texts = SENTENCES * 4
    Tokenizer.build_char(texts).save(d / "tok")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_lm(texts, str(d / "tok"), str(d / "lm"), layers=1, hidden=24, epochs=1,
                 batch_tokens=1024, progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return d / "lm"


def _build(lstm_dir, m, out, **kw):
    from kdcache.teachers.build import build_cache

    return build_cache(teacher="lstm_lm", model=str(lstm_dir), data=str(m), out=str(out),
                       targets="sampled", samples=12, progress=False, device="cpu",
                       **kw)  # fmt: skip


def _plain_arrays(path, teacher="lstm_lm"):
    """utt id -> (ids, log-probs, tail) with plain zarr + pyarrow + json (docs/format.md)."""
    import pyarrow.parquet as pq
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}
    for name in sorted(os.listdir(path / "commits" / teacher)):
        shard = name[: -len(".json")]
        g = root[f"teachers/{teacher}/shards/{shard}"]
        ids, lp, tail = g["topk_ids"][:], g["topk_logprobs"][:], g["tail_logmass"][:]
        for row in pq.read_table(path / "index" / teacher / f"{shard}.parquet").to_pylist():
            sl = slice(row["offset"], row["offset"] + row["length"])
            out[row["utt_id"]] = (ids[sl], lp[sl], tail[sl])
    return root[f"teachers/{teacher}"].attrs["kdcache_teacher"], out


def test_build_sampled_lstm_verify_plain_reader_and_reproducible(tmp_path, lstm_dir):
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES + [""])
    a = tmp_path / "a.kdc"
    s = _build(lstm_dir, m, a, sample_seed=5)
    assert s.utterances_done == len(SENTENCES) + 1
    assert verify_cache(str(a)) == []
    record, plain = _plain_arrays(a)
    assert (record["targets"], record["samples"], record["sample_seed"]) == ("sampled", 12, 5)
    assert record["k"] == min(12, record["vocab_size"])
    c = open_cache(str(a))
    for utt, (ids, lp, tail) in plain.items():
        assert ids.dtype == np.uint16 and lp.dtype == np.float16
        assert np.isneginf(tail).all()
        counts = spec.sampled_counts(lp, 12)
        assert (counts.sum(1) == 12).all()
        u = c.get(utt, "lstm_lm")
        np.testing.assert_array_equal(u.topk_ids, ids)
        with np.errstate(divide="ignore"):  # the reader returns the exact log(count / N)
            np.testing.assert_array_equal(u.topk_logprobs, np.log(counts / 12).astype(np.float32))
    # Reproducible: a second build, and one split over two ranks, store the same arrays.
    b = tmp_path / "b.kdc"
    _build(lstm_dir, m, b, sample_seed=5)
    r = tmp_path / "r.kdc"
    for rank in (0, 1):
        _build(lstm_dir, m, r, sample_seed=5, rank=rank, world_size=2)
    for other in (b, r):
        _, plain2 = _plain_arrays(other)
        assert plain2.keys() == plain.keys()
        for utt in plain:
            for x, y in zip(plain[utt], plain2[utt], strict=True):
                np.testing.assert_array_equal(x, y)
    # Another seed draws other tokens.
    d = tmp_path / "d.kdc"
    _build(lstm_dir, m, d, sample_seed=6)
    _, plain3 = _plain_arrays(d)
    assert any(not np.array_equal(plain[u][1], plain3[u][1]) for u in plain)


def test_sampled_counts_follow_the_teacher(tmp_path, lstm_dir):
    """The drawn frequencies of a long build match the teacher's probabilities: pooled over
    positions, mean count / N at the teacher's top-1 id is its mean top-1 probability."""
    from kdcache.teachers.lstm_lm import load_model

    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES * 6)
    out = tmp_path / "s.kdc"
    from kdcache.teachers.build import build_cache

    build_cache(teacher="lstm_lm", model=str(lstm_dir), data=str(m), out=str(out),
                targets="sampled", samples=64, progress=False, device="cpu")  # fmt: skip
    model, cfg, _ = load_model(lstm_dir)
    c = open_cache(str(out))
    from kdcache.data.tokenizer import Tokenizer

    tok = Tokenizer.load(str(lstm_dir / "tokenizer"))
    est, ref = [], []
    for i, text in enumerate(SENTENCES * 6):
        u = c.get(f"u{i:03d}", "lstm_lm")
        ids = tok.encode(text)
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([[cfg.bos_id, *ids]]))[0][0, : len(ids)], -1)
        top = p.argmax(-1).numpy()
        q = np.exp(u.topk_logprobs)
        est += [q[t][u.topk_ids[t] == top[t]].sum() for t in range(len(ids))]
        ref += p.max(-1).values.tolist()
    est, ref = np.array(est), np.array(ref)
    se = np.sqrt((ref * (1 - ref) / 64).sum()) / len(ref)
    assert abs(est.mean() - ref.mean()) < 5 * se


def test_cli_build_sampled_and_inspect(tmp_path, lstm_dir):
    from typer.testing import CliRunner

    from kdcache.cli import app

    m = write_manifest(tmp_path / "m.jsonl")
    out = tmp_path / "c.kdc"
    r = CliRunner().invoke(app, [
        "build", "--teacher", "lstm_lm", "--model", str(lstm_dir), "--data", str(m), "--out",
        str(out), "--targets", "sampled", "--samples", "8", "--sample-seed", "3", "--no-progress",
        "--device", "cpu",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "sampled N=8 seed=3" in r.output
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "sampled N=8 seed=3" in r.output
    r = CliRunner().invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [
        "build", "--teacher", "lstm_lm", "--model", str(lstm_dir), "--data", str(m), "--out",
        str(tmp_path / "x.kdc"), "--targets", "sampled", "--samples", "1000", "--no-progress",
    ])  # fmt: skip
    assert r.exit_code != 0 and "--logprob-keepbits" in r.output


def test_writer_and_verify_refuse_damaged_sampled_targets(tmp_path):
    import zarr

    from kdcache.cache_format import CacheWriter, UttTargets

    rec = spec.TeacherRecord(name="t", kind="lstm_lm", model_id="", model_hash="",
                             tokenizer_id="", tokenizer_hash="", vocab_size=20, k=4,
                             targets="sampled", samples=4)  # fmt: skip
    ids = np.array([[3, 0, 1, 2]])
    with np.errstate(divide="ignore"):
        good = np.log(np.array([[2, 1, 1, 0]]) / 4)
    path = tmp_path / "c.kdc"
    h = spec.content_hash("a")
    with CacheWriter(str(path), rec, fsync=False) as w:
        with pytest.raises(ValueError, match="tail_logmass -inf"):
            w.add(UttTargets("a", ids, good, np.array([-30.0]), input_hash=h))
        with np.errstate(divide="ignore"):
            bad = np.log(np.array([[1.5, 1.5, 1, 0]]) / 4)  # mass 1, not counts
        with pytest.raises(ValueError, match="not log\\(count / 4\\)"):
            w.add(UttTargets("a", ids, bad, np.array([-np.inf]), input_hash=h))
        w.add(UttTargets("a", ids, good, np.array([-np.inf]), input_hash=h))
    assert verify_cache(str(path)) == []
    shard = os.listdir(path / "commits" / "t")[0][: -len(".json")]
    arr = zarr.open_array(str(path / "teachers" / "t" / "shards" / shard / "topk_logprobs"),
                          mode="r+")  # fmt: skip
    arr[0, 0] = np.float16(np.log(3 / 4))  # counts 3 + 1 + 1 = 5 != 4
    probs = verify_cache(str(path))
    assert len(probs) == 1 and "add up to 5" in probs[0].what
