"""Top-k layouts and log-prob roundings (TeacherRecord.topk_layout / logprob_rounding): round
trips, the independent reader of docs/format.md, verify on damaged chunks, and legacy caches."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, make_record, make_utts

from kdcache.cache_format import (
    CacheError,
    CacheWriter,
    TeacherRecord,
    open_cache,
    spec,
    verify_cache,
)

LAYOUTS = [(lay, rnd) for lay in spec.TOPK_LAYOUTS for rnd in spec.LOGPROB_ROUNDINGS]


def _by_id(ids, lp):
    o = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(np.asarray(ids, np.int64), o, 1), np.take_along_axis(lp, o, 1)


def _stored_lp(rec, lp):
    """What the writer stores for rank-order float64 log-probs (clamp, float16, rounding)."""
    return spec.round_logprobs(rec, np.minimum(lp, 0).astype(np.float16))


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
def layout_cache(request, tmp_path_factory):
    layout, rounding = request.param
    path = tmp_path_factory.mktemp("lay") / "c.kdc"
    rec = make_record(
        "a", vocab_size=3000, k=12, keepbits=7, chunk_positions=16, topk_layout=layout,
        logprob_rounding=rounding,
    )  # fmt: skip
    utts = make_utts(rec, 30, max_len=20)
    build_cache(path, [(rec, utts)], shard_positions=120, fsync=False)
    return path, rec, utts


def test_round_trip(layout_cache):
    """Ids exact (the same id set per position), every log-prob the stored rounding of its own
    id's input value, rows descending, tails as rounded, and verify clean."""
    path, rec, utts = layout_cache
    cache = open_cache(path)
    assert cache.teachers["a"] == rec
    for u in utts:
        got = cache.get(u.utt_id, "a")
        assert got.topk_ids.dtype == np.int64 and got.topk_logprobs.dtype == np.float32
        assert (np.diff(got.topk_logprobs, axis=1) <= 0).all()
        gi, gl = _by_id(got.topk_ids, got.topk_logprobs)
        want = _stored_lp(rec, u.topk_logprobs)
        wi, wl = _by_id(u.topk_ids, want.astype(np.float32))
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gl, wl)
        tail = spec.round_tail(rec, np.minimum(u.tail_logmass, 0).astype(np.float32))
        np.testing.assert_array_equal(got.tail_logmass, tail)
        if rec.topk_layout == "rank" and rec.logprob_rounding == "fixed":
            np.testing.assert_array_equal(got.topk_ids, u.topk_ids)  # rank order as given
    assert verify_cache(path) == []


def test_idsort_stores_ascending_id_gaps(layout_cache):
    """On disk, "idsort" keeps gaps of ascending ids, log-probs in that order; "rank" rank order."""
    import zarr

    path, rec, utts = layout_cache
    root = zarr.open_group(str(path), mode="r")
    shard = sorted(os.listdir(path / "commits" / "a"))[0][: -len(".json")]
    g = root[f"teachers/a/shards/{shard}"]
    ids, lp = g["topk_ids"][:], g["topk_logprobs"][:]
    if rec.topk_layout == "idsort":
        assert (ids[:, 1:] >= 1).all()
        assert not (np.diff(lp.astype(np.float32), axis=1) <= 0).all()  # not rank order
    else:
        assert (np.diff(lp.astype(np.float32), axis=1) <= 0).all()


def test_weighted_rounding_keeps_fewer_bits_where_p_is_small():
    """kb(x) per docs/format.md, and the stored error within |x| 2^-(kb+1)."""
    x = np.array([-0.01, -1.2, -3.0, -7.0, -12.0], np.float16)
    kb = spec.weighted_keepbits(x, 7)
    # E = floor(log2|x|): -7, 0, 1, 2, 3; floor(|x| / 2 ln 2): 0, 0, 2, 5, 8
    np.testing.assert_array_equal(
        kb, np.clip(7 + np.array([-7, 0, 1, 2, 3]) - [0, 0, 2, 5, 8], 2, 10)
    )
    r = spec.round_weighted(x, 7)
    err = np.abs(r.astype(np.float64) - x.astype(np.float64))
    assert (err <= np.abs(x.astype(np.float64)) * 2.0 ** -(kb + 1) + 1e-12).all()
    # fewer zeroed-out bits than fixed keepbits 7 leave: low mantissa bits are zero
    bits = r.view(np.uint16)
    assert all(int(b) & ((1 << (10 - int(k))) - 1) == 0 for b, k in zip(bits, kb, strict=True))


def test_independent_reader_decodes_idsort_from_docs(tmp_path):
    """docs/format.md "Top-k layouts": plain zarr + numpy, no kdcache reader: cumulative sum of
    the id gaps, then a stable sort by descending log-prob."""
    import pyarrow.parquet as pq
    import zarr

    rec = make_record("a", vocab_size=3000, k=10, keepbits=7, chunk_positions=16,
                      topk_layout="idsort", logprob_rounding="weighted")  # fmt: skip
    utts = make_utts(rec, 12, max_len=15, seed=3)
    path = tmp_path / "c.kdc"
    build_cache(path, [(rec, utts)], fsync=False)
    root = zarr.open_group(str(path), mode="r")
    record = root["teachers/a"].attrs["kdcache_teacher"]
    assert record["topk_layout"] == "idsort" and record["logprob_rounding"] == "weighted"
    shard = sorted(os.listdir(path / "commits" / "a"))[0][: -len(".json")]
    rows = pq.read_table(path / "index" / "a" / f"{shard}.parquet").to_pylist()
    g = root[f"teachers/a/shards/{shard}"]
    for row, u in zip(rows, utts, strict=True):
        sl = slice(row["offset"], row["offset"] + row["length"])
        gaps, lp = g["topk_ids"][sl], g["topk_logprobs"][sl]
        ids = np.cumsum(gaps, axis=1, dtype=np.int64)
        order = np.argsort(-lp.astype(np.float32), axis=1, kind="stable")
        ids, lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)
        assert (np.diff(lp.astype(np.float32), axis=1) <= 0).all()
        gi, gl = _by_id(ids, lp)
        wi, wl = _by_id(u.topk_ids, _stored_lp(rec, u.topk_logprobs))
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gl, wl)


def _shard_array(path, name, c=0):
    shard = sorted(os.listdir(path / "commits" / "a"))[0][: -len(".json")]
    rel = f"teachers/a/shards/{shard}/{name}"
    return rel, path / rel / "c" / str(c) / "0"


def test_verify_catches_damaged_idsort_chunks(layout_cache, tmp_path):
    path0, rec, _ = layout_cache
    if rec.topk_layout != "idsort":
        pytest.skip("idsort only")
    path = tmp_path / "c.kdc"
    shutil.copytree(path0, path)
    for name in ("topk_ids", "topk_logprobs"):
        rel, f = _shard_array(path, name, 1)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x01
        f.write_bytes(bytes(b))
        probs = verify_cache(path)
        assert any(p.where == f"{rel} chunk 1" and p.severity == "error" for p in probs), probs
        with pytest.raises(CacheError, match=f"{rel}: chunk 1 "):
            list(open_cache(path).stream())
        shutil.rmtree(path)
        shutil.copytree(path0, path)
    # A well-formed chunk (valid crc32c) whose gaps say an id repeats: semantic check.
    import zarr

    rel, _ = _shard_array(path, "topk_ids")
    a = zarr.open_array(str(path / rel), mode="r+")
    x = a[:16]
    x[3, 2] = 0
    a[:16] = x
    probs = verify_cache(path)
    assert any("not strictly ascending" in p.what and p.where.startswith(rel) for p in probs)


def test_legacy_record_keys_and_old_caches(tmp_path):
    """A record without the layout fields is the legacy layout; legacy records are written with
    exactly their old keys; a writer resuming a legacy teacher keeps the teacher's layout."""
    legacy = make_record("a", vocab_size=300, k=6, keepbits=7, chunk_positions=16,
                         topk_layout="rank", logprob_rounding="fixed")  # fmt: skip
    assert not set(spec.LAYOUT_RECORD_FIELDS) & set(legacy.to_dict())
    assert TeacherRecord.from_dict(legacy.to_dict()) == legacy
    path = tmp_path / "c.kdc"
    utts = make_utts(legacy, 20, max_len=12, seed=5)
    build_cache(path, [(legacy, utts[:10])], fsync=False)
    stored = json.loads((path / "teachers/a/zarr.json").read_text())["attributes"]
    assert not set(spec.LAYOUT_RECORD_FIELDS) & set(stored["kdcache_teacher"])
    # Resume with a record asking for another layout: the stored (legacy) layout is kept.
    other = dataclasses.replace(legacy, topk_layout="idsort", logprob_rounding="weighted")
    with CacheWriter(path, other, fsync=False) as w:
        assert w.record == legacy
        for u in utts[10:]:
            w.add(u)
    cache = open_cache(path)
    for u in utts:
        np.testing.assert_array_equal(cache.get(u.utt_id, "a").topk_ids, u.topk_ids)
    assert verify_cache(path) == []
    with pytest.raises(ValueError, match="topk_layout"):
        dataclasses.replace(legacy, topk_layout="bogus")
    with pytest.raises(ValueError, match="sampled targets need topk_layout"):
        make_record("s", vocab_size=300, k=6, targets="sampled", samples=6,
                    topk_layout="idsort")  # fmt: skip
