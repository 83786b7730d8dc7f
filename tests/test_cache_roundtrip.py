"""Write-then-read round trips of the cache format (hypothesis) and the exact encodings."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, expected, make_record, make_utt, make_utts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.cache_format import CacheWriter, UttTargets, open_cache, round_mantissa, verify_cache
from kdcache.cache_format.spec import CacheError, TeacherRecord, id_dtype
from kdcache.cache_format.writer import encode_hidden_int8

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))


def _check_equal(rec: TeacherRecord, got: UttTargets, u: UttTargets) -> None:
    T = u.num_positions
    assert got.utt_id == u.utt_id
    assert got.topk_ids.shape == (T, rec.k) and got.topk_logprobs.shape == (T, rec.k)
    assert got.tail_logmass.shape == (T,)
    exp = expected(rec, u)
    if rec.k:
        np.testing.assert_array_equal(got.topk_ids, exp["ids"])
        np.testing.assert_array_equal(got.topk_logprobs, exp["lp"])
        np.testing.assert_array_equal(got.tail_logmass, exp["tail"])
    else:
        np.testing.assert_array_equal(got.tail_logmass, np.zeros(T))
    assert set(got.hidden) == set(rec.hidden_layers)
    for layer, x in u.hidden.items():
        y = got.hidden[layer]
        assert y.shape == x.shape
        if rec.hidden_codec == "float16":
            assert y.dtype == np.float16
            np.testing.assert_array_equal(y, x.astype(np.float16))
        else:
            assert y.dtype == np.float32
            scale = np.abs(x).max(axis=1, keepdims=True) / 127 if T else 0
            assert np.all(np.abs(y - x) <= scale / 2 + 1e-6 + 1e-6 * np.abs(x))
    np.testing.assert_array_equal(got.token_ids, np.asarray(u.token_ids))
    assert got.text == u.text and got.input_hash == u.input_hash


teacher_st = st.fixed_dictionaries(
    {
        "vocab_size": st.sampled_from([1, 7, 300, 65536, 65537, 70000]),
        "kfrac": st.sampled_from([0.0, 0.01, 0.5, 1.0]),
        "hidden": st.sampled_from([(), (0,), (1, 3)]),
        "hidden_codec": st.sampled_from(["float16", "int8"]),
        "keepbits": st.sampled_from([10, 7, 3]),
        "chunk_positions": st.sampled_from([1, 5, 64]),
    }
)


def _record(name: str, p: dict) -> TeacherRecord:
    V = p["vocab_size"]
    k = min(V, max(1, int(round(p["kfrac"] * V)))) if p["kfrac"] > 0 else 0
    k = min(k, 40)  # keep the data small; k == V is covered by the small vocabularies
    if V <= 40 and p["kfrac"] == 1.0:
        k = V
    hidden = p["hidden"] if (p["hidden"] or k == 0) else ()
    if k == 0 and not hidden:
        hidden = (0,)
    return make_record(
        name,
        vocab_size=V,
        k=k,
        hidden=hidden,
        hidden_codec=p["hidden_codec"],
        keepbits=p["keepbits"],
        chunk_positions=p["chunk_positions"],
    )


@SETTINGS
@given(
    teachers=st.lists(teacher_st, min_size=1, max_size=2),
    lengths=st.lists(st.integers(0, 12), min_size=0, max_size=8),
    shard_positions=st.sampled_from([1, 10, 1000]),
    seed=st.integers(0, 1000),
)
def test_roundtrip(tmp_path_factory, teachers, lengths, shard_positions, seed):
    path = tmp_path_factory.mktemp("rt") / "c.kdc"
    recs, all_utts = [], []
    for i, p in enumerate(teachers):
        rec = _record(f"t{i}", p)
        utts = [make_utt(rec, f"u{j}", T, seed + 7 * j + i) for j, T in enumerate(lengths)]
        recs.append(rec)
        all_utts.append(utts)
    build_cache(
        path, list(zip(recs, all_utts, strict=True)), shard_positions=shard_positions, fsync=False
    )
    cache = open_cache(path)
    assert set(cache.teachers) == {r.name for r in recs}
    for rec, utts in zip(recs, all_utts, strict=True):
        assert cache.teachers[rec.name] == rec
        assert sorted(cache.utt_ids(rec.name)) == sorted(u.utt_id for u in utts)
        for u in utts:
            _check_equal(rec, cache.get(u.utt_id, rec.name), u)
    streamed = list(cache.stream(shuffle=True, seed=seed, shuffle_buffer=3, prefetch=seed % 3))
    assert sorted(x[recs[0].name].utt_id for x in streamed) == sorted(u.utt_id for u in all_utts[0])
    for item in streamed:
        for rec, utts in zip(recs, all_utts, strict=True):
            u = next(v for v in utts if v.utt_id == item[rec.name].utt_id)
            _check_equal(rec, item[rec.name], u)
    assert [p for p in verify_cache(path) if p.severity == "error"] == []


def test_id_dtype_switches_at_65536():
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32


@given(st.lists(st.floats(-65504, 0, width=16), min_size=1, max_size=50), st.integers(1, 10))
@settings(max_examples=60, deadline=None)
def test_round_mantissa_semantics(values, keepbits):
    x = np.array(values, np.float16)
    y = round_mantissa(x, keepbits)
    assert y.dtype == np.float16
    drop = 10 - keepbits
    bits = y.view(np.uint16)
    finite = np.isfinite(y)
    # Low mantissa bits are zero (except where rounding would overflow to inf and x is kept).
    overflow = np.isfinite(x) & (np.abs(x.astype(np.float64)) >= 2.0**15)
    assert np.all((bits[finite & ~overflow] & ((1 << drop) - 1)) == 0)
    # Round to nearest: error at most half a unit in the last kept place.
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    ok = np.isfinite(xf) & (np.abs(xf) >= 2.0**-14) & ~overflow  # normal numbers
    rel = np.abs(yf[ok] - xf[ok]) / np.abs(xf[ok])
    assert np.all(rel <= 2.0 ** -(keepbits + 1) * 1.0001 + 1e-7) or drop == 0
    assert np.array_equal(round_mantissa(x, 10).view(np.uint16), x.view(np.uint16))
    # Idempotent.
    assert np.array_equal(round_mantissa(y, keepbits).view(np.uint16), y.view(np.uint16))


def test_int8_quantisation_tolerance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 33)).astype(np.float32) * rng.uniform(0.01, 100, size=(50, 1))
    x[3] = 0
    q, s = encode_hidden_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s[3] == 0
    err = np.abs(q.astype(np.float32) * s[:, None] - x)
    assert np.all(err <= s[:, None] / 2 + 1e-6 * np.abs(x))


def test_unsorted_logprobs_are_sorted_with_ids(tmp_path):
    rec = make_record(vocab_size=50, k=5)
    u = make_utt(rec, "a", 4, 0)
    perm = np.array([3, 0, 4, 1, 2])
    shuffled = UttTargets(
        u.utt_id,
        u.topk_ids[:, perm],
        u.topk_logprobs[:, perm],
        u.tail_logmass,
        {},
        u.token_ids,
        u.text,
        u.input_hash,
    )
    with CacheWriter(tmp_path / "c.kdc", rec, fsync=False) as w:
        w.add(shuffled)
    got = open_cache(tmp_path / "c.kdc").get("a", rec.name)
    np.testing.assert_array_equal(got.topk_ids, u.topk_ids)
    np.testing.assert_array_equal(got.topk_logprobs, expected(rec, u)["lp"])


def test_second_teacher_leaves_first_untouched(tmp_path):
    path = tmp_path / "c.kdc"
    a = make_record("a")
    build_cache(path, [(a, make_utts(a, 10))], fsync=False)
    import os

    def snapshot(root):
        out = {}
        for d, _, fs in os.walk(root):
            for f in fs:
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = (os.path.getmtime(p), open(p, "rb").read())
        return out

    before = {
        k: v
        for k, v in snapshot(path).items()
        if "/a" in "/" + k or k.startswith(("teachers/a", "index/a", "commits/a"))
    }
    b = make_record("b", k=0, hidden=(1,))
    build_cache(path, [(b, make_utts(b, 5, seed=3))], fsync=False)
    after = snapshot(path)
    for k, v in before.items():
        assert after[k] == v, k
    cache = open_cache(path)
    assert set(cache.teachers) == {"a", "b"}
    assert len(cache["utt00001"]) == 2 and len(cache["utt00007"]) == 1


def test_fsspec_url(tmp_path):
    import fsspec

    rec = make_record(hidden=(2,), hidden_codec="int8")
    utts = make_utts(rec, 12)
    build_cache(tmp_path / "c.kdc", [(rec, utts)], fsync=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "c.kdc"), "/kdc_test/c.kdc", recursive=True)
    cache = open_cache("memory://kdc_test/c.kdc")
    for u in utts:
        _check_equal(rec, cache.get(u.utt_id, rec.name), u)
    assert len(list(cache.stream())) == 12
    assert verify_cache("memory://kdc_test/c.kdc") == []
    # Writing through a URL works too (object stores: one put per file, no rename).
    rec2 = make_record("t2", k=3)
    u2 = make_utts(rec2, 3)
    build_cache("memory://kdc_test/c.kdc", [(rec2, u2)])
    assert open_cache("memory://kdc_test/c.kdc").get(u2[0].utt_id, "t2").utt_id == u2[0].utt_id
    fs.rm("/kdc_test", recursive=True)


def test_unknown_format_version(tmp_path):
    import json

    rec = make_record()
    build_cache(tmp_path / "c.kdc", [(rec, make_utts(rec, 2))], fsync=False)
    p = tmp_path / "c.kdc" / "zarr.json"
    meta = json.loads(p.read_text())
    meta["attributes"]["kdcache"]["format_version"] = 99
    p.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format_version 99"):
        open_cache(tmp_path / "c.kdc")
    with pytest.raises(CacheError, match="format_version 99"):
        CacheWriter(tmp_path / "c.kdc", rec)


def test_not_a_cache(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("hi")
    with pytest.raises(CacheError, match="not a cache"):
        open_cache(tmp_path / "x")
    with pytest.raises(CacheError, match="not a kdcache cache"):
        CacheWriter(tmp_path / "x", make_record())
    # A directory another rank is creating right now (its lock file, no root zarr.json yet) passes
    # the early check; the check under the lock still refuses it if it never becomes a cache.
    from kdcache.cache_format import spec
    from kdcache.cache_format.writer import check_out_path

    (tmp_path / "x" / spec.LOCK_FILE).write_text("")
    check_out_path(tmp_path / "x")
    with pytest.raises(CacheError, match="not a kdcache cache"):
        CacheWriter(tmp_path / "x", make_record())
    with pytest.raises(KeyError, match="nope"):
        rec = make_record()
        build_cache(tmp_path / "c.kdc", [(rec, make_utts(rec, 1))], fsync=False)
        open_cache(tmp_path / "c.kdc").get("nope", rec.name)


@given(
    st.lists(
        st.floats(-1.0000000150474662e30, 0, width=32, allow_subnormal=False),
        min_size=1,
        max_size=50,
    ),
    st.integers(1, 23),
)
@settings(max_examples=40, deadline=None)
def test_round_mantissa_f32_semantics(values, keepbits):
    from kdcache.cache_format.spec import round_mantissa_f32

    x = np.array(values, np.float32)
    y = round_mantissa_f32(x, keepbits)
    assert y.dtype == np.float32
    drop = 23 - keepbits
    assert np.all((y.view(np.uint32) & np.uint32((1 << drop) - 1)) == 0)
    ok = np.abs(x) >= np.finfo(np.float32).tiny
    rel = np.abs(y[ok].astype(np.float64) - x[ok]) / np.abs(x[ok].astype(np.float64))
    assert np.all(rel <= 2.0 ** -(keepbits + 1) * 1.0001)
