"""The cache in other trainers: kdcache.torch (CacheTargets, collate_targets), kdcache.losses as
one import, kdcache.lhotse on real lhotse objects, and examples/train_external.py end to end."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache_format import open_cache
from kdcache.data.manifest import load_manifest
from kdcache.data.text import normalize_text
from kdcache.data.tokenizer import Tokenizer
from kdcache.student.toy import HIDDEN_LAYER, make_toy_corpus, write_toy_cache
from kdcache.torch import (
    CacheTargets,
    MissingTargetsError,
    TargetMismatchError,
    collate_targets,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_corpus(
        tmp_path_factory.mktemp("ext"), num_utts=12, seed=3, teachers=("lm", "lm2")
    )


@pytest.fixture(scope="module")
def utts(toy):
    return {u.id: u for u in load_manifest(toy.manifest)}


def test_public_modules_import_alone():
    """`kdcache.losses` and `kdcache.torch` load without kdtrain and touch no logging."""
    code = (
        "import logging, sys\n"
        "before = list(logging.getLogger().handlers)\n"
        "from kdcache.losses import lst_loss, sparse_kd_kl, essence_kd_loss\n"
        "from kdcache.torch import CacheTargets, collate_targets, TeacherBatch\n"
        "bad = sorted(m for m in sys.modules if m.startswith('kdcache.student'))\n"
        "assert not bad, bad\n"
        "assert logging.getLogger().handlers == before\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_get_and_collate_match_the_reader(toy, utts):
    targets = CacheTargets(toy.cache, hidden=True)
    assert targets.teachers == ["lm", "lm2"]
    reader = open_cache(str(toy.cache))
    ids = toy.utt_ids[:4]
    tok = Tokenizer.load(toy.tokenizer)
    tokens = [tok.encode(normalize_text(utts[u].text)) for u in ids]
    length = max(len(t) for t in tokens) + 2  # the trainer's own padding may be longer
    batch = targets.batch(ids, texts=[utts[u].text for u in ids], tokens=tokens, length=length)
    assert set(batch) == {"lm", "lm2"}
    for name, tb in batch.items():
        k = reader.teachers[name].k
        assert tb.topk_ids.shape == (4, length, k)
        assert tb.temperature == reader.teachers[name].temperature
        for b, u in enumerate(ids):
            ref = reader.get(u, name)
            n = len(tokens[b])
            assert ref.topk_ids.shape[0] == n
            np.testing.assert_array_equal(tb.topk_ids[b, :n].numpy(), ref.topk_ids)
            np.testing.assert_array_equal(tb.topk_logprobs[b, :n].numpy(), ref.topk_logprobs)
            np.testing.assert_array_equal(tb.tail_logmass[b, :n].numpy(), ref.tail_logmass)
            np.testing.assert_allclose(
                tb.hidden[HIDDEN_LAYER][b, :n].numpy(), ref.hidden[HIDDEN_LAYER], rtol=1e-6
            )
            assert tb.mask[b, :n].all() and not tb.mask[b, n:].any()
            # padding: no -inf in log-probs, ids 0, tail -inf, hidden 0
            assert (tb.topk_logprobs[b, n:] == -math.log(k)).all()
            assert (tb.topk_ids[b, n:] == 0).all()
            assert torch.isinf(tb.tail_logmass[b, n:]).all()
            assert (tb.hidden[HIDDEN_LAYER][b, n:] == 0).all()


def test_collate_refuses_a_too_short_length(toy):
    targets = CacheTargets(toy.cache, teachers=["lm"])
    items = [targets.get(u) for u in toy.utt_ids[:3]]
    longest = max(it["lm"].topk_ids.shape[0] for it in items)
    assert targets.collate(items)["lm"].mask.shape[1] == longest
    with pytest.raises(TargetMismatchError, match="more than the batch length"):
        collate_targets(items, length=longest - 1)


def test_drift_is_caught_and_named(toy, utts):
    targets = CacheTargets(toy.cache, teachers=["lm"])
    u = toy.utt_ids[0]
    other = next(v for v in toy.utt_ids if normalize_text(utts[v].text) != utts[u].text)
    # same transcript up to normalisation: accepted
    targets.get(u, text=utts[u].text.upper() + "!")
    with pytest.raises(TargetMismatchError, match=rf"utterance '{u}'.*not the one teacher 'lm'"):
        targets.get(u, text=utts[other].text)
    tok = Tokenizer.load(toy.tokenizer)
    good = tok.encode(normalize_text(utts[u].text))
    with pytest.raises(TargetMismatchError, match=rf"utterance '{u}': teacher 'lm' token_ids"):
        targets.get(u, tokens=list(reversed(good)) + [good[0]])
    with pytest.raises(MissingTargetsError, match=r"'nope' has no targets from teacher 'lm' in"):
        targets.get("nope")
    with pytest.raises(KeyError, match="not in"):
        CacheTargets(toy.cache, teachers=["bert"])
    with pytest.raises(KeyError, match="stores layers"):
        CacheTargets(toy.cache, hidden={"lm": [0]})


def test_check_tokenizer(toy, tmp_path):
    targets = CacheTargets(toy.cache)
    targets.check_tokenizer(Tokenizer.load(toy.tokenizer))
    other = Tokenizer.build_char(["xyz abc"])
    with pytest.raises(TargetMismatchError, match="was built with tokenizer"):
        targets.check_tokenizer(other)


def test_works_in_dataloader_workers(toy):
    """Picklable: workers reopen the cache and give the same tensors as the main process."""
    targets = CacheTargets(toy.cache)
    _ = targets.get(toy.utt_ids[0])  # opened here; must not travel to the workers
    clone = pickle.loads(pickle.dumps(targets))
    assert clone._reader is None

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(toy.utt_ids)

        def __getitem__(self, i):
            return targets.get(toy.utt_ids[i])

    loader = torch.utils.data.DataLoader(
        DS(), batch_size=4, num_workers=2, collate_fn=targets.collate
    )
    got = list(loader)
    assert len(got) == 3
    ref = targets.batch(toy.utt_ids[4:8])
    for name in ("lm", "lm2"):
        torch.testing.assert_close(got[1][name].topk_logprobs, ref[name].topk_logprobs)
        torch.testing.assert_close(got[1][name].topk_ids, ref[name].topk_ids)


def test_utt_ids_and_contains(toy):
    targets = CacheTargets(toy.cache)
    assert sorted(targets.utt_ids()) == sorted(toy.utt_ids)
    assert toy.utt_ids[0] in targets and "nope" not in targets


# --- lhotse ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuts(toy, utts):
    lhotse = pytest.importorskip(
        "lhotse", reason="lhotse not installed (pip install kdcache[lhotse])"
    )
    recs, sups = [], []
    for u in toy.utt_ids:
        rec = lhotse.Recording.from_file(utts[u].audio, recording_id=u)
        recs.append(rec)
        sups.append(
            lhotse.SupervisionSegment(
                id=u, recording_id=u, start=0.0, duration=rec.duration, text=utts[u].text
            )
        )
    return lhotse.CutSet.from_manifests(
        recordings=lhotse.RecordingSet.from_recordings(recs),
        supervisions=lhotse.SupervisionSet.from_segments(sups),
    )


def _cut_key(cut):
    return cut.supervisions[0].id  # from_manifests gives cuts random ids; the utterance is the key


def test_lhotse_attach_save_load(toy, cuts, tmp_path):
    from lhotse import CutSet

    from kdcache.lhotse import attach_targets, load_targets

    kd = attach_targets(cuts, toy.cache, key=_cut_key)
    path = tmp_path / "cuts_kd.jsonl.gz"
    kd.to_file(path)
    back = CutSet.from_file(path)
    batch = list(back)[:5]
    got = load_targets(batch, length=40)
    ref = CacheTargets(toy.cache).batch([_cut_key(c) for c in batch], length=40)
    for name in ("lm", "lm2"):
        torch.testing.assert_close(got[name].topk_logprobs, ref[name].topk_logprobs)
        torch.testing.assert_close(got[name].mask, ref[name].mask)
    # a speed-perturbed copy is renamed by lhotse but keeps its targets
    sp = batch[0].perturb_speed(0.9)
    assert sp.id != batch[0].id
    torch.testing.assert_close(
        load_targets([sp])["lm"].topk_ids, load_targets([batch[0]])["lm"].topk_ids
    )


def test_lhotse_drift_is_caught(toy, cuts, utts, tmp_path):
    from dataclasses import replace

    from kdcache.lhotse import attach_targets, load_targets
    from kdcache.torch import TargetMismatchError

    # ids that do not exist in the cache: refused, or dropped on request
    with pytest.raises(MissingTargetsError, match="has no targets"):
        attach_targets(cuts, toy.cache)  # the cuts' own (random) ids are not the cache keys
    first = list(cuts)[:3]
    keep = attach_targets(
        first, toy.cache, key=lambda c: _cut_key(c) if c is not first[1] else "gone", missing="drop"
    )
    assert len(keep) == 2
    # ids that drift onto another utterance: the transcript hash catches it at attach time
    shifted = {c.id: _cut_key(o) for c, o in zip(first, first[1:] + first[:1], strict=True)}
    with pytest.raises(TargetMismatchError, match=rf"cut '{first[0].id}'"):
        attach_targets(first, toy.cache, key=lambda c: shifted[c.id])
    # a supervision edited after attaching: caught at load time
    kd = list(attach_targets(first, toy.cache, key=_cut_key))
    sup = replace(kd[0].supervisions[0], text="zzz")
    edited = replace(kd[0], supervisions=[sup])
    with pytest.raises(TargetMismatchError, match="is not the one teacher"):
        load_targets([edited])
    # the cache rebuilt from other text under the same ids: caught at load time
    tok = Tokenizer.load(toy.tokenizer)
    texts = {u: utts[u].text for u in toy.utt_ids}
    texts[_cut_key(first[0])] = "egg egg"
    rebuilt = write_toy_cache(tmp_path / "rebuilt.kdc", texts, tok, teachers=("lm", "lm2"))
    moved = kd[0].with_custom("kd", dict(kd[0].custom["kd"], cache=[str(rebuilt)]))
    with pytest.raises(TargetMismatchError, match="rebuilt from other text"):
        load_targets([moved])
    # no field at all
    with pytest.raises(KeyError, match="attach the cache first"):
        load_targets(first)


# --- the external trainer example -------------------------------------------------------------


@pytest.mark.slow
def test_external_trainer_example(toy, tmp_path):
    """examples/train_external.py (a plain PyTorch loop, not kdtrain) learns the toy corpus with
    LST from the cache: the loss falls, the KD term is live, greedy CTC output approaches the
    references."""
    out = tmp_path / "ext.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "train_external.py"),
            "--manifest",
            str(toy.manifest),
            "--features",
            str(toy.features),
            "--tokenizer",
            str(toy.tokenizer),
            "--cache",
            str(toy.cache),
            "--teacher",
            "lm",
            "--steps",
            "150",
            "--report",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    first, last = rep["loss"][:10], rep["loss"][-10:]
    assert np.mean(last) < 0.5 * np.mean(first)
    assert all(v > 0 for v in rep["kd"]), "the LST soft-label term must be non-zero"
    assert rep["cer"] < 0.5
