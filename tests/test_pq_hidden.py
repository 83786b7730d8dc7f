"""hidden_codec "pq": round trip, a built cache verified and read back by an independent plain
zarr + pyarrow reader following docs/format.md, damage found by verify, resume reusing the
stored codebooks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_models import write_manifest

from kdcache.cache_format import open_cache, pq, spec, verify_cache
from kdcache.cache_format.writer import CacheWriter

pytest.importorskip("faiss")


def test_round_trip_on_clustered_data():
    rng = np.random.default_rng(0)
    D, M = 32, 8
    centres = rng.standard_normal((40, D)).astype(np.float32)
    x = centres[rng.integers(0, 40, 5000)] + 0.01 * rng.standard_normal((5000, D)).astype(
        np.float32
    )
    cb = pq.train_codebooks(x[:4000], M, seed=1)
    assert cb.shape == (M, 256, D // M) and cb.dtype == np.float32
    np.testing.assert_array_equal(cb, pq.train_codebooks(x[:4000], M, seed=1))  # seeded
    codes = pq.encode(x[4000:], cb)
    assert codes.shape == (1000, M) and codes.dtype == np.uint8
    y = pq.decode(codes, cb)
    assert y.dtype == np.float32 and y.shape == (1000, D)
    # 40 clusters per sub-space, 256 centroids: the error is at most the noise level.
    assert ((y - x[4000:]) ** 2).sum() / (x[4000:] ** 2).sum() < 1e-3
    # A centroid encodes to itself.
    first = cb[:, 3].reshape(1, D)
    np.testing.assert_array_equal(pq.encode(first, cb), np.full((1, M), 3, np.uint8))
    with pytest.raises(ValueError, match="not divisible"):
        pq.train_codebooks(x, 5)


def _record(**kw):
    d = dict(
        name="t",
        kind="masked_lm",
        model_id="m",
        model_hash="h",
        tokenizer_id="",
        tokenizer_hash="",
        vocab_size=10,
        k=0,
        hidden_layers=(-1,),
        hidden_dims={"-1": 32},
        hidden_codec="pq",
        pq_subspaces=8,
        chunk_positions=64,
    )
    d.update(kw)
    return spec.TeacherRecord(**d)


def _utt(i, x):
    T = len(x)
    return spec.UttTargets(
        utt_id=f"u{i:03d}",
        topk_ids=np.zeros((T, 0), np.int64),
        topk_logprobs=np.zeros((T, 0), np.float32),
        tail_logmass=np.zeros(T, np.float32),
        hidden={-1: x},
        input_hash="h",
    )


def test_record_refuses_m_not_dividing_d():
    with pytest.raises(ValueError, match="not divisible by pq_subspaces 5"):
        _record(pq_subspaces=5)
    with pytest.raises(ValueError, match="pq_subspaces needs hidden_codec 'pq'"):
        _record(hidden_codec="float16")
    assert "pq_subspaces" not in _record(hidden_codec="float16", pq_subspaces=0).to_dict()


def test_resume_reuses_the_stored_codebooks(tmp_path):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 30)), 32)).astype(np.float32) for _ in range(60)]
    out = str(tmp_path / "c.kdc")
    with CacheWriter(out, _record(), pq_train_positions=300, pq_seed=0) as w:
        for i in range(30):
            w.add(_utt(i, xs[i]))
        first = {k: v.copy() for k, v in w.pq_codebooks.items()}
    # Another seed would train other codebooks: a resume must not train at all.
    with CacheWriter(out, _record(), pq_train_positions=300, pq_seed=7) as w:
        assert w.pq_codebooks_reused_from is not None
        np.testing.assert_array_equal(w.pq_codebooks[-1], first[-1])
        for i in range(30, 60):
            w.add(_utt(i, xs[i]))
        assert not w._pq_wait  # encoded at once, nothing held back for training
    c = open_cache(out)
    assert len(c.shards["t"]) == 2
    for si in c.shards["t"]:
        stored = c._data["t"].codebook(si.name, "-1")
        np.testing.assert_array_equal(stored, first[-1])
    for i in range(60):
        u = c.get(f"u{i:03d}", "t")
        np.testing.assert_array_equal(
            u.hidden[-1], pq.decode(pq.encode(xs[i], first[-1]), first[-1])
        )
    assert verify_cache(out) == []


def _independent_decode(path, teacher):
    """docs/format.md alone: plain zarr + pyarrow, codes looked up in the shard's codebooks."""
    import pyarrow.parquet as pqt
    import zarr

    root = zarr.open_group(str(path), mode="r")
    rec = root[f"teachers/{teacher}"].attrs["kdcache_teacher"]
    assert rec["hidden_codec"] == "pq"
    M = rec["pq_subspaces"]
    out = {}
    for name in sorted(os.listdir(path / "commits" / teacher)):
        shard = name[: -len(".json")]
        g = root[f"teachers/{teacher}/shards/{shard}"]
        for row in pqt.read_table(path / "index" / teacher / f"{shard}.parquet").to_pylist():
            lo, hi = row["offset"], row["offset"] + row["length"]
            hid = {}
            for layer in rec["hidden_layers"]:
                codes = g[f"hidden/{layer}"][lo:hi]  # uint8 [T, M]
                cb = g[f"pq_codebooks/{layer}"][...]  # float32 [M, 256, D / M]
                assert codes.dtype == np.uint8 and codes.shape[1] == M
                D = rec["hidden_dims"][str(layer)]
                assert cb.shape == (M, 256, D // M)
                # x[m*s:(m+1)*s] = cb[m, codes[m]]
                x = np.concatenate([cb[m][codes[:, m]] for m in range(M)], axis=1)
                hid[layer] = x.reshape(len(codes), D)
            out[row["utt_id"]] = hid
    return out


def test_bert_build_pq_verify_reader_and_damage(tmp_path, tiny_bert):
    from kdcache.teachers.build import BuildError, build_cache

    m = write_manifest(tmp_path / "m.jsonl")
    common = dict(
        teacher="bert",
        model=str(tiny_bert),
        data=str(m),
        k=4,
        hidden_layers=(-1,),
        hidden_codec="pq",
        pq_subspaces=8,
        pq_train_positions=256,
        progress=False,
    )
    with pytest.raises(BuildError, match="not divisible by pq_subspaces 5"):
        build_cache(out=str(tmp_path / "bad.kdc"), **{**common, "pq_subspaces": 5})
    out = tmp_path / "c.kdc"
    build_cache(out=str(out), shard_positions=40, **common)
    ref = tmp_path / "f16.kdc"
    build_cache(out=str(ref), shard_positions=40, **{**common, "hidden_codec": "float16"})
    assert verify_cache(str(out)) == []
    c, f = open_cache(str(out)), open_cache(str(ref))
    rec = c.teachers["bert"]
    assert rec.hidden_codec == "pq" and rec.pq_subspaces == 8
    assert len(c.shards["bert"]) > 1  # several shards, one codebook set (one rank)
    indep = _independent_decode(out, "bert")
    assert sorted(indep) == sorted(c.utt_ids("bert"))
    for u in c.utt_ids("bert"):
        x = c.get(u, "bert").hidden[2]
        assert x.dtype == np.float32
        np.testing.assert_array_equal(indep[u][2], x)
        # The tiny build has fewer positions than centroids: the codebooks hold them exactly
        # (up to the float16 the teacher's hidden states pass through).
        y = f.get(u, "bert").hidden[2].astype(np.float32)
        np.testing.assert_allclose(x, y, atol=2e-3 * np.abs(y).max() + 1e-3)
    # Damage: a code chunk, then a codebook chunk, each found by verify.
    shard = c.shards["bert"][0].name
    base = out / "teachers" / "bert" / "shards" / shard
    for rel in ("hidden/2/c/0/0", "pq_codebooks/2/c/0/0/0"):
        p = base / rel
        good = p.read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        p.write_bytes(bytes(bad))
        probs = verify_cache(str(out))
        assert any(rel.split("/c/")[0] in str(x) for x in probs), (rel, probs)
        p.write_bytes(good)
    assert verify_cache(str(out)) == []
    marker = json.loads(next((out / "commits" / "bert").iterdir()).read_text())
    assert marker["arrays"]["hidden/2"][1] == 8
