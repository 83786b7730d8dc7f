"""The reader's direct chunk reads (local caches in the format's codecs, decoded without zarr)
and the batch slicing of ``stream`` return exactly what zarr's own decoding and ``get`` return,
and word damaged or missing chunks the same way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, make_record, make_utts

from kdcache.cache_format import CacheError, open_cache
from kdcache.cache_format.reader import _TeacherData

RECORDS = {
    "int8": dict(hidden=(1,), hidden_codec="int8"),
    "float16": dict(hidden=(2,), hidden_codec="float16"),
    "idsort": dict(topk_layout="idsort"),
}


def _fields(u):
    out = [u.topk_ids, u.topk_logprobs, u.tail_logmass]
    out += [u.hidden[k] for k in sorted(u.hidden)]
    return out


@pytest.fixture(params=sorted(RECORDS))
def cache_path(request, tmp_path):
    rec = make_record("a", vocab_size=700, k=8, keepbits=7, chunk_positions=32,
                      **RECORDS[request.param])  # fmt: skip
    utts = make_utts(rec, 25, max_len=20, seed=4)
    path = tmp_path / "c.kdc"
    build_cache(path, [(rec, utts)], shard_positions=120, fsync=False)
    return path


def test_direct_reads_equal_zarr_decoding(cache_path, monkeypatch):
    direct = open_cache(cache_path)
    streamed = {x["a"].utt_id: x["a"] for x in direct.stream(prefetch=0)}
    plans = direct._data["a"].plans
    assert plans and all(p is not None for p in plans.values())  # the direct path was taken
    monkeypatch.setattr(_TeacherData, "_plan", lambda self, *a: None)
    via_zarr = open_cache(cache_path)
    assert list(streamed) == [x["a"].utt_id for x in via_zarr.stream(prefetch=0)]
    for uid, s in streamed.items():
        g = via_zarr.get(uid, "a")
        for x, y in zip(_fields(s), _fields(g), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        assert (s.text, s.input_hash) == (g.text, g.input_hash)
        np.testing.assert_array_equal(s.token_ids, g.token_ids)
        for h in s.hidden.values():
            assert h.flags.writeable or h.base is not None


def _chunk_file(path, name="topk_logprobs"):
    files = sorted((path / "teachers" / "a" / "shards").glob(f"*/{name}/c/0/0"))
    assert files
    return files[0]


@pytest.mark.parametrize("name", ["topk_logprobs", "topk_ids"])
@pytest.mark.parametrize("how", ["flip", "truncate", "missing"])
def test_direct_reads_word_damage_like_zarr(cache_path, name, how):
    f = _chunk_file(cache_path, name)
    if how == "missing":
        f.unlink()
        match = "chunk 0 is missing"
    else:
        b = bytearray(f.read_bytes())
        if how == "flip":
            b[len(b) // 2] ^= 0x01
        else:
            b = b[:10]
        f.write_bytes(bytes(b))
        match = "chunk 0 is damaged or unreadable"
    cache = open_cache(cache_path)
    with pytest.raises(CacheError, match=match):
        list(cache.stream(prefetch=0))


@pytest.mark.parametrize("shape", [(4096 * 16,), (4096, 16), (100, 3)])
def test_float16_widening_matches_numpy_bit_for_bit(shape):
    """spec.to_float32 (through torch when torch is imported and the array is large) gives
    numpy's float16 -> float32 values bit for bit: every non-NaN float16 pattern (zeros of both
    signs, subnormals, infinities), in C order; NaN stays NaN (log-probs never hold NaN: the
    writer and verify refuse it)."""
    import torch  # noqa: F401 - the fast path is taken only when torch is imported

    from kdcache.cache_format import spec

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = np.resize(bits, int(np.prod(shape))).reshape(shape).view(np.float16)
    got, want = spec.to_float32(x), x.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    strided = x[::2] if x.ndim == 1 else x[:, ::2]  # a non-contiguous view takes the same path
    np.testing.assert_array_equal(spec.to_float32(strided), strided.astype(np.float32))
    ro = x.copy()
    ro.flags.writeable = False  # numpy's cast, no torch warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(spec.to_float32(ro)[~nan], want[~nan])
