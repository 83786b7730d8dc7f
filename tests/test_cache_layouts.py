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

# "sqrt" codes are stored as deltas in rank order: rank layout only.
LAYOUTS = [
    (lay, rnd)
    for lay in spec.TOPK_LAYOUTS
    for rnd in spec.LOGPROB_ROUNDINGS
    if not (lay == "idsort" and rnd == "sqrt")
]


def _by_id(ids, lp):
    o = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(np.asarray(ids, np.int64), o, 1), np.take_along_axis(lp, o, 1)


def _stored_lp(rec, lp):
    """What the reader returns for rank-order float64 log-probs the writer was given (clamp,
    float16, rounding; "sqrt": the codes' log-probs)."""
    r = spec.round_logprobs(rec, np.minimum(lp, 0).astype(np.float16))
    return spec.sqrt_logprobs(r, rec.logprob_levels) if rec.logprob_rounding == "sqrt" else r


def _stored_tail(rec, tail):
    r = spec.round_tail(rec, np.minimum(tail, 0).astype(np.float32))
    return spec.sqrt_logprobs(r, rec.logprob_levels) if rec.logprob_rounding == "sqrt" else r


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
        np.testing.assert_array_equal(got.tail_logmass, _stored_tail(rec, u.tail_logmass))
        if rec.topk_layout == "rank" and rec.logprob_rounding in ("fixed", "sqrt"):
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
    elif rec.logprob_rounding == "sqrt":  # deltas of non-increasing codes
        assert lp.dtype == np.uint16 and (spec.sqrt_undelta(lp) >= 0).all()
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


def test_sqrt_codes_round_trip_and_kl():
    """Codes >= 1 for every p > 0 (0 only for -inf), non-increasing along a rank-ordered row,
    deltas undone exactly, and the KL of the grid near 2 (k + 1) / (12 L^2) for dense rows."""
    rng = np.random.default_rng(0)
    L = spec.DEFAULT_SQRT_LEVELS
    p = rng.dirichlet(np.full(17, 0.3), size=4000)
    p = np.maximum(p, 1e-30)
    top = -np.sort(-p[:, :16], axis=1)
    lp, tail = np.log(top), np.log(p[:, 16])
    c = spec.sqrt_codes(lp, L)
    assert c.dtype == np.uint16 and (c >= 1).all() and (c <= L).all()
    assert (np.diff(c.astype(np.int64), axis=1) <= 0).all()
    assert spec.sqrt_codes(np.array([-np.inf, 0.0, -1e4]), L).tolist() == [0, L, 1]
    assert np.isneginf(spec.sqrt_logprobs(np.array([0]), L)).all()
    rec = make_record("a", vocab_size=300, k=16, logprob_rounding="sqrt")
    _, d = spec.encode_topk(rec, np.zeros((4000, 16), np.uint16), c)
    np.testing.assert_array_equal(spec.sqrt_undelta(d), c)
    q = np.exp(np.concatenate([spec.sqrt_logprobs(c, L), spec.sqrt_logprobs(
        spec.sqrt_codes(tail, L), L)[:, None]], axis=1).astype(np.float64))  # fmt: skip
    q /= q.sum(1, keepdims=True)
    pp = np.concatenate([top, p[:, 16:]], axis=1)
    kl = (pp * (np.log(pp) - np.log(q))).sum(1).mean()
    assert 0 < kl < 2 * 17 / (12 * L**2) * 1.5
    assert not validate_mass(rec, d, spec.encode_tail(rec, spec.sqrt_codes(tail, L), c))


def validate_mass(rec, d, tail_codes):
    from kdcache.cache_format.validate import mass_problems

    return mass_problems(rec, d, tail_codes)


def test_sqrt_record_fields():
    """logprob_levels and tail_coding only in sqrt records (defaults DEFAULT_SQRT_LEVELS,
    "residual"; a stored sqrt record without tail_coding reads as "code"); sqrt needs rank."""
    rec = make_record("a", vocab_size=300, k=6, logprob_rounding="sqrt")
    d = rec.to_dict()
    assert d["logprob_rounding"] == "sqrt" and d["logprob_levels"] == spec.DEFAULT_SQRT_LEVELS
    assert d["tail_coding"] == "residual"
    assert TeacherRecord.from_dict(d) == rec
    del d["tail_coding"]
    assert TeacherRecord.from_dict(d).tail_coding == "code"
    plain = make_record("b", vocab_size=300, k=6).to_dict()
    assert "logprob_levels" not in plain and "tail_coding" not in plain
    with pytest.raises(ValueError, match="tail_coding need"):
        make_record("a", vocab_size=300, k=6, tail_coding="code")
    with pytest.raises(ValueError, match="tail_coding 'x' not in"):
        make_record("a", vocab_size=300, k=6, logprob_rounding="sqrt", tail_coding="x")
    with pytest.raises(ValueError, match="needs topk_layout 'rank'"):
        make_record("a", vocab_size=300, k=6, logprob_rounding="sqrt", topk_layout="idsort")
    with pytest.raises(ValueError, match="logprob_levels needs"):
        make_record("a", vocab_size=300, k=6, logprob_levels=100)
    with pytest.raises(ValueError, match="logprob_levels must be"):
        make_record("a", vocab_size=300, k=6, logprob_rounding="sqrt", logprob_levels=70000)


@pytest.mark.parametrize("tail_coding", spec.TAIL_CODINGS)
def test_independent_reader_decodes_sqrt_from_docs(tmp_path, tail_coding):
    """docs/format.md "Top-k layouts", logprob_rounding "sqrt": plain zarr (+ numcodecs' LZMA
    and Shuffle, which zarr-python decodes by itself) + numpy, no kdcache reader; the tail as a
    residual of its prediction from the top-k codes, or (older records) the code itself."""
    import pyarrow.parquet as pq
    import zarr

    rec = make_record("a", vocab_size=3000, k=10, chunk_positions=16, logprob_rounding="sqrt",
                      logprob_levels=300, tail_coding=tail_coding)  # fmt: skip
    utts = make_utts(rec, 12, max_len=15, seed=3)
    path = tmp_path / "c.kdc"
    build_cache(path, [(rec, utts)], fsync=False)
    root = zarr.open_group(str(path), mode="r")
    record = root["teachers/a"].attrs["kdcache_teacher"]
    assert record["logprob_rounding"] == "sqrt" and "topk_layout" not in record
    L = record["logprob_levels"]
    assert L == 300
    shard = sorted(os.listdir(path / "commits" / "a"))[0][: -len(".json")]
    meta = json.loads((path / f"teachers/a/shards/{shard}/topk_logprobs/zarr.json").read_text())
    shuffle = ["numcodecs.shuffle"] if record.get("tail_coding") == "residual" else []
    assert [c["name"] for c in meta["codecs"]] == [
        "transpose", "bytes", *shuffle, "numcodecs.lzma", "crc32c"
    ]  # fmt: skip
    assert meta["data_type"] == "uint16"
    rows = pq.read_table(path / "index" / "a" / f"{shard}.parquet").to_pylist()
    g = root[f"teachers/a/shards/{shard}"]
    for row, u in zip(rows, utts, strict=True):
        sl = slice(row["offset"], row["offset"] + row["length"])
        ids, d, t = g["topk_ids"][sl], g["topk_logprobs"][sl], g["tail_logmass"][sl]
        c = np.concatenate([d[:, :1], d[:, :1] - np.cumsum(d[:, 1:], axis=1)], axis=1)
        if record.get("tail_coding") == "residual":
            c = c.astype(np.int64)
            pred = np.rint(np.sqrt(np.maximum(L * L - (c * c).sum(axis=1), 0)))
            z = t.astype(np.int64)
            t = (pred.astype(np.int64) + np.where(z % 2, -(z // 2) - 1, z // 2)) % 65536
        with np.errstate(divide="ignore"):
            lp = 2 * np.log(c / L)
            tail = 2 * np.log(t / L)
        np.testing.assert_array_equal(ids, u.topk_ids)
        np.testing.assert_allclose(lp, _stored_lp(rec, u.topk_logprobs), rtol=1e-6)
        np.testing.assert_allclose(tail, _stored_tail(rec, u.tail_logmass), rtol=1e-6)
        # sqrt(p) moves by at most half a step (plus the float16 cast); code 1 holds every
        # p < (1.5 / L)^2
        u0 = np.exp(np.minimum(u.topk_logprobs, 0) / 2)
        err = np.abs(np.exp(lp / 2) - u0)
        assert (err[c > 1] <= 0.5 / L + 1e-3 * u0[c > 1]).all()
        assert (u0[c == 1] < 1.5 / L).all()
    cache = open_cache(path)  # and the kdcache reader agrees, for either tail coding
    for u in utts:
        got = cache.get(u.utt_id, "a")
        np.testing.assert_array_equal(got.tail_logmass, _stored_tail(rec, u.tail_logmass))
    assert verify_cache(path) == []


def test_verify_catches_bad_sqrt_codes(tmp_path):
    """Well-formed chunks (valid crc32c) whose codes leave 0..L, or whose mass is off."""
    import zarr

    rec = make_record("a", vocab_size=3000, k=8, chunk_positions=16, logprob_rounding="sqrt")
    path = tmp_path / "c.kdc"
    build_cache(path, [(rec, make_utts(rec, 12, max_len=15, seed=4))], fsync=False)
    assert verify_cache(path) == []
    rel, _ = _shard_array(path, "topk_logprobs")
    a = zarr.open_array(str(path / rel), mode="r+")
    x = a[:16]
    x[2, 3] = x[2, 0] + 5  # the codes after column 3 go below 0
    a[:16] = x
    probs = verify_cache(path)
    assert any("sqrt code outside" in p.what and p.where.startswith(rel) for p in probs), probs
    with pytest.raises(CacheError, match="sqrt code outside"):
        list(open_cache(path).stream())
    path2 = tmp_path / "d.kdc"
    build_cache(path2, [(rec, make_utts(rec, 12, max_len=15, seed=4))], fsync=False)
    rel, _ = _shard_array(path2, "tail_logmass")
    t = zarr.open_array(str(path2 / rel), mode="r+")
    lp_codes = spec.sqrt_undelta(zarr.open_array(str(path2 / _shard_array(path2, "topk_logprobs")[0]))[:16])  # fmt: skip
    y = t[:16]
    L = rec.logprob_levels
    y[5] = spec.encode_tail(rec, np.array([L], np.uint16), lp_codes[5:6])[0]  # tail 1 on top
    t[:16] = y
    probs = verify_cache(path2)
    assert any("probability mass" in p.what for p in probs), probs
    # a residual that decodes to a code above L (every stored uint16 is a valid residual)
    pred = spec.sqrt_tail_prediction(lp_codes[5:6], L)[0]
    y[5] = 2 * (L + 1 - pred)  # zigzag of code - prediction = L + 1 - pred >= 0
    t[:16] = y
    probs = verify_cache(path2)
    assert any("tail_logmass: sqrt code outside" in p.what for p in probs), probs
    with pytest.raises(CacheError, match="sqrt code outside"):
        list(open_cache(path2).stream())


@pytest.mark.parametrize("levels", [7, spec.DEFAULT_SQRT_LEVELS, 40000, spec.SQRT_MAX_LEVELS])
def test_sqrt_tail_residual_round_trip(levels):
    """encode_tail / decode_tail_codes are inverse for every code 0..L against any top-k codes
    (residuals of either sign beyond int16 wrap exactly), and small where the top-k codes fix the
    tail (the point of the coding)."""
    rng = np.random.default_rng(levels)
    rec = make_record("a", vocab_size=300, k=4, logprob_rounding="sqrt", logprob_levels=levels)
    n = 5000
    codes = -np.sort(-rng.integers(0, levels + 1, size=(n, 4)), axis=1)
    tail = rng.integers(0, levels + 1, size=n).astype(np.uint16)
    tail[:4] = [0, levels, 0, levels]
    codes[:2] = 0
    codes[2:4] = levels  # prediction 0: residuals 0 and +L; rows 0, 1: prediction L
    stored = spec.encode_tail(rec, tail, codes)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(spec.decode_tail_codes(rec, stored, codes), tail)
    p = rng.dirichlet(np.ones(5), size=n)  # a consistent row: the residual is a few steps
    lp = np.log(-np.sort(-p[:, :4], axis=1))
    c, ct = spec.sqrt_codes(lp, levels), spec.sqrt_codes(np.log(p[:, 4]), levels)
    r = spec.encode_tail(rec, ct, c)
    np.testing.assert_array_equal(spec.decode_tail_codes(rec, r, c), ct)
    if levels >= 100:
        assert np.median(r) <= 8
    code = dataclasses.replace(rec, tail_coding="code")
    np.testing.assert_array_equal(spec.encode_tail(code, tail, codes), tail)


def test_inspect_shows_how_the_topk_is_stored(layout_cache):
    """inspect's JSON carries the layout and rounding (and L, tail_coding for sqrt only); the
    table's targets cell names what is not the default layout."""
    from kdcache.cache_format.inspect import format_summary, summarize

    path, rec, _ = layout_cache
    s = summarize(open_cache(path))
    t = s["teachers"][0]
    assert (t["topk_layout"], t["logprob_rounding"]) == (rec.topk_layout, rec.logprob_rounding)
    assert ("tail_coding" in t) == (rec.logprob_rounding == "sqrt")
    table = format_summary(s)
    for word, shown in (
        ("idsort", rec.topk_layout == "idsort"),
        ("weighted", rec.logprob_rounding == "weighted"),
        (f"sqrt L={rec.logprob_levels}", rec.logprob_rounding == "sqrt"),
    ):
        assert (word in table) == shown, (word, table)
    assert "top-k + tail" in table
