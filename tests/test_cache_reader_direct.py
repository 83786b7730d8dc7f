"""The reader's direct chunk reads (local caches in the format's codecs, decoded without zarr)
and the batch slicing of ``stream`` return exactly what zarr's own decoding and ``get`` return,
and word damaged or missing chunks the same way."""

from __future__ import annotations

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
