"""Writer behaviour: validation leaves the cache untouched, resume, records, concurrent ranks."""

from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, make_record, make_utt, make_utts

from kdcache.cache_format import CacheWriter, UttTargets, open_cache, verify_cache


def tree_digest(root) -> dict[str, str]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _replace(u: UttTargets, **kw) -> UttTargets:
    d = dict(u.__dict__)
    d.update(kw)
    return UttTargets(**d)


def bad_inputs(rec, good: UttTargets):
    T = good.num_positions
    lp = good.topk_logprobs.copy()
    lp_nan = lp.copy()
    lp_nan[1, 2] = np.nan
    lp_inf = lp.copy()
    lp_inf[0, 0] = np.inf
    ids_big = good.topk_ids.copy()
    ids_big[2, 1] = rec.vocab_size
    ids_dup = good.topk_ids.copy()
    ids_dup[0, 1] = ids_dup[0, 0]
    return {
        "duplicate id": (_replace(good, utt_id="utt00000"), "duplicate"),
        "wrong k": (_replace(good, topk_ids=good.topk_ids[:, :3]), r"shape \[T, 4\]"),
        "T mismatch": (
            _replace(good, tail_logmass=good.tail_logmass[:-1]),
            "tail_logmass must have shape",
        ),
        "logprob shape": (_replace(good, topk_logprobs=lp[:-1]), "topk_logprobs must have shape"),
        "nan": (_replace(good, topk_logprobs=lp_nan), "NaN"),
        "+inf": (_replace(good, topk_logprobs=lp_inf), r"\+inf"),
        "id >= vocab": (_replace(good, topk_ids=ids_big), "vocab_size"),
        "repeated id in row": (_replace(good, topk_ids=ids_dup), "repeat"),
        "positive logprob": (_replace(good, topk_logprobs=lp + 5), "<= 0"),
        "mass": (_replace(good, tail_logmass=np.zeros(T)), "mass"),
        "hidden shape": (_replace(good, hidden={1: np.zeros((T, 2))}), r"hidden\[1\]"),
        "hidden layers": (_replace(good, hidden={}), "hidden layers"),
        "hidden nan": (
            _replace(good, hidden={1: np.full((T, rec.hidden_dims["1"]), np.nan)}),
            "NaN",
        ),
        "token ids": (_replace(good, token_ids=np.arange(T + 1)), "token_ids"),
        "no hash": (_replace(good, input_hash=""), "input_hash"),
    }


def test_bad_input_leaves_cache_byte_identical(tmp_path):
    path = tmp_path / "c.kdc"
    rec = make_record(vocab_size=100, k=4, hidden=(1,), chunk_positions=8)
    utts = make_utts(rec, 6, max_len=10)
    build_cache(path, [(rec, utts)], fsync=False)
    before = tree_digest(path)
    good = make_utt(rec, "new", 5, 1)
    for what, (u, msg) in bad_inputs(rec, good).items():
        with CacheWriter(path, rec, fsync=False) as w:
            with pytest.raises(ValueError, match=msg):
                w.add(u)
            if what != "duplicate id":
                assert repr(u.utt_id) in str(pytest.raises(ValueError, w.add, u).value), what
        assert tree_digest(path) == before, what
    # The same writer still takes good utterances after a rejected one.
    with CacheWriter(path, rec, fsync=False) as w:
        with pytest.raises(ValueError):
            w.add(bad_inputs(rec, good)["nan"][0])
        w.add(good)
        with pytest.raises(ValueError, match="already added"):
            w.add(good)
    assert open_cache(path).get("new", rec.name).num_positions == 5


def test_exception_in_block_does_not_commit(tmp_path):
    path = tmp_path / "c.kdc"
    rec = make_record()
    utts = make_utts(rec, 10)
    with pytest.raises(RuntimeError):
        with CacheWriter(path, rec, fsync=False, shard_positions=10**9) as w:
            for u in utts:
                w.add(u)
            raise RuntimeError("boom")
    cache = open_cache(path)
    assert cache.utt_ids() == []
    assert [p for p in verify_cache(path) if p.severity == "error"] == []


def test_record_mismatch_and_resume(tmp_path):
    path = tmp_path / "c.kdc"
    rec = make_record(k=8)
    utts = make_utts(rec, 20)
    build_cache(path, [(rec, utts[:8])], fsync=False, shard_positions=30)
    with pytest.raises(
        ValueError,
        match=r"teacher 'lm' already exists with a different record \(k: cache has 8, writer has 4",
    ):
        CacheWriter(path, make_record(k=4))
    # model_id/tokenizer_id are where the model came from: harmless.
    moved = make_record(k=8).__class__(**{**rec.to_dict(), "model_id": "/elsewhere/lm"})
    with CacheWriter(path, moved, fsync=False) as w:
        assert w.committed_utt_ids == {u.utt_id for u in utts[:8]}
        for u in utts:
            if u.utt_id not in w.committed_utt_ids:
                w.add(u)
    cache = open_cache(path)
    assert sorted(cache.utt_ids("lm")) == sorted(u.utt_id for u in utts)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_concurrent_ranks(tmp_path, where):
    """Ranks create the cache and teacher at the same moment, then write disjoint shards.

    Local caches serialise group creation with flock; fsspec URLs have no lock, so a rank that
    loses the creation race must validate the winner's group instead of failing.
    """
    path = tmp_path / "c.kdc" if where == "local" else f"memory://kdc_conc_{tmp_path.name}/c.kdc"
    rec = make_record(chunk_positions=16)
    utts = make_utts(rec, 24, max_len=20)
    world = 3
    barrier = threading.Barrier(world)
    errors = []

    def run(rank):
        try:
            barrier.wait()
            with CacheWriter(path, rec, rank=rank, fsync=False, shard_positions=40) as w:
                for u in utts[rank::world]:
                    w.add(u)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache = open_cache(path)
    assert sorted(cache.utt_ids()) == sorted(u.utt_id for u in utts)
    ranks = {s.marker["rank"] for s in cache.shards["lm"]}
    assert ranks == set(range(world))
    assert verify_cache(path) == []
    if where == "memory":
        return
    # Resuming rank 1 deletes only rank 1's uncommitted shards.
    w1 = CacheWriter(path, rec, rank=1, fsync=False, shard_positions=10**9)
    w1.add(make_utt(rec, "extra1", 5, 1))
    w1._flush(final=True)  # data on disk, not committed (as if killed)
    w2 = CacheWriter(path, rec, rank=2, fsync=False)  # another rank resumes: must not delete it
    assert any(p.where.endswith(w1._shard) for p in verify_cache(path, include_info=True))
    w2.close()
    CacheWriter(path, rec, rank=1, fsync=False).close()  # rank 1 resumes: its leftover goes
    assert verify_cache(path, include_info=True) == []


def _unsorted_mixed(rec, utts):
    """Every other utterance float32 and with its top-k columns permuted (the writer sorts)."""
    rng = np.random.default_rng(7)
    out = []
    for j, u in enumerate(utts):
        if j % 2:
            perm = rng.permutation(rec.k)
            u = _replace(
                u,
                topk_ids=u.topk_ids[:, perm],
                topk_logprobs=u.topk_logprobs[:, perm].astype(np.float32),
                tail_logmass=u.tail_logmass.astype(np.float32),
            )
        out.append(u)
    return out


@pytest.mark.parametrize("codec", ["float16", "int8"])
def test_chunked_buffers_roundtrip(tmp_path, codec):
    """Many chunks (written on the I/O thread while later utterances are validated), an
    utterance longer than a chunk (buffer growth), unsorted and float32 inputs, rejected
    utterances in between: the cache holds exactly the good utterances, encoded as if alone."""
    from fixtures.make_cache_fixtures import expected

    path = tmp_path / "c.kdc"
    rec = make_record(
        vocab_size=300, k=5, hidden=(1,), hidden_codec=codec, chunk_positions=8, keepbits=6
    )
    utts = make_utts(rec, 40, max_len=13) + [make_utt(rec, "long", 37, 99)]
    sent = _unsorted_mixed(rec, utts)
    good = make_utt(rec, "x", 6, 5)
    bad = list(bad_inputs(rec, good).values())
    with CacheWriter(path, rec, fsync=False, shard_positions=100) as w:
        for j, u in enumerate(sent):
            w.add(u)
            if j % 4 == 0:
                b, _ = bad[(j // 4) % len(bad)]
                if b.utt_id != "utt00000":  # (the duplicate-id case names an added utterance)
                    with pytest.raises(ValueError):
                        w.add(_replace(b, utt_id=f"bad{j}"))
    cache = open_cache(path)
    assert sorted(cache.utt_ids()) == sorted(u.utt_id for u in utts)
    assert len(cache.shards["lm"]) > 1
    for u in utts:
        got, want = cache.get(u.utt_id, "lm"), expected(rec, u)
        np.testing.assert_array_equal(got.topk_ids, want["ids"])
        np.testing.assert_array_equal(got.topk_logprobs, want["lp"])
        np.testing.assert_array_equal(got.tail_logmass, want["tail"])
        np.testing.assert_array_equal(got.token_ids, np.asarray(u.token_ids, np.int32))
    assert verify_cache(path) == []


def test_abort_with_a_chunk_in_flight_leaves_no_files(tmp_path):
    path = tmp_path / "c.kdc"
    rec = make_record(chunk_positions=4)
    build_cache(path, [(rec, make_utts(rec, 3, prefix="a"))], fsync=False)
    before = tree_digest(path)
    with pytest.raises(RuntimeError):
        with CacheWriter(path, rec, fsync=False, shard_positions=10**9) as w:
            for u in make_utts(rec, 30, prefix="b", seed=3):
                w.add(u)
            raise RuntimeError("boom")
    assert tree_digest(path) == before


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 70000.0])
def test_hidden_nonfinite_or_out_of_range_rejected(tmp_path, dtype, value):
    rec = make_record(k=4, hidden=(1,))
    u = make_utt(rec, "u", 5, 1)
    h = u.hidden[1].astype(dtype)
    with np.errstate(over="ignore"):
        h[3, 2] = value  # 70000 becomes inf in float16
    with CacheWriter(tmp_path / "c.kdc", rec, fsync=False) as w:
        with pytest.raises(ValueError, match=r"hidden\[1\] (contains NaN or inf|exceeds)"):
            w.add(_replace(u, hidden={1: h}))
        w.add(_replace(u, hidden={1: u.hidden[1].astype(dtype)}))
