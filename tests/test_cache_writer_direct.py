"""The writer's direct chunk writes (CacheWriter.direct_writes): a local cache whose arrays have
the format's codec chains gets its chunk files encoded and written by the writer itself. The
files must be byte-identical to what zarr writes (CacheWriter.direct_writes = False), and an
independent plain zarr + pyarrow reader must read them."""

from __future__ import annotations

import dataclasses
import os

import pytest
from fixtures.make_cache_fixtures import make_record, make_utt, make_utts
from test_cache_writer_pool import _check_independent, _digest

from kdcache.cache_format import CacheWriter, verify_cache

RECORDS = {
    "default top-k": dict(vocab_size=700, k=8, keepbits=7),
    "hidden float16": dict(vocab_size=700, k=8, keepbits=7, hidden=(1, 3)),
    "hidden int8": dict(vocab_size=700, k=4, hidden=(2,), hidden_codec="int8"),
    "uint32 ids": dict(vocab_size=70000, k=5, keepbits=6),
    "k=1": dict(vocab_size=300, k=1),
    "k=0 hidden only": dict(vocab_size=300, k=0, hidden=(0,)),
    "hidden pq": dict(
        vocab_size=300, k=3, hidden=(1,), hidden_dim=8, hidden_codec="pq", pq_subspaces=4
    ),
    "idsort weighted": dict(
        vocab_size=3000, k=12, keepbits=7, topk_layout="idsort", logprob_rounding="weighted"
    ),
}


def _build(path, rec, utts, direct: bool, **kw) -> CacheWriter:
    with CacheWriter(path, rec, fsync=False, shard_positions=70, **kw) as w:
        w.direct_writes = direct
        for u in utts:
            w.add(u)
    return w


@pytest.mark.parametrize("what", list(RECORDS))
@pytest.mark.parametrize("threads", [1, 3])
def test_direct_writes_byte_identical_to_zarr(tmp_path, what, threads):
    if what == "hidden pq":
        pytest.importorskip("faiss")
    rec = make_record("a", chunk_positions=16, **RECORDS[what])
    # Short and long utterances: several chunks per flush (an utterance longer than a chunk),
    # partial last chunks, shards ending exactly on a chunk boundary or not.
    utts = make_utts(rec, 20, max_len=20, seed=4) + [make_utt(rec, "long", 41, 9)]
    utts += [make_utt(rec, "empty", 0, 1), make_utt(rec, "after", 3, 2)]
    ref, new = tmp_path / "zarr.kdc", tmp_path / "direct.kdc"
    _build(ref, rec, utts, direct=False, encode_threads=threads)
    w = _build(new, rec, utts, direct=True, encode_threads=threads)
    assert w.direct_writes
    got, want = _digest(new), _digest(ref)
    assert sorted(got) == sorted(want)  # the same files (no temp files left behind)
    assert got == want
    assert len(os.listdir(new / "commits" / "a")) >= 2
    if rec.k and rec.topk_layout == "rank":  # (idsort stores id gaps: kdcache decodes them)
        _check_independent(new, rec, utts)
    assert verify_cache(new, include_info=True) == []


def test_direct_writes_used_only_for_the_format_chains(tmp_path):
    """Local default caches write directly; sqrt rounding (LZMA, transpose) goes through zarr."""
    rec = make_record("a", vocab_size=700, k=8, keepbits=7, chunk_positions=16)
    u = make_utt(rec, "u", 5, 1)
    w = CacheWriter(tmp_path / "a.kdc", rec, fsync=False)
    w.add(u)
    assert w._direct is not None and set(w._direct) == set(w._names)
    w.abort()
    sq = dataclasses.replace(rec, logprob_rounding="sqrt")
    w = CacheWriter(tmp_path / "b.kdc", sq, fsync=False)
    w.add(u)
    assert w._direct is None
    w.close()
    off = CacheWriter(tmp_path / "c.kdc", rec, fsync=False)
    off.direct_writes = False
    off.add(u)
    assert off._direct is None
    off.close()


def test_direct_write_error_leaves_no_shard(tmp_path, monkeypatch):
    """A failing chunk file write is raised by add/close and the shard is dropped."""
    from kdcache.cache_format import writer as wmod

    rec = make_record("a", vocab_size=700, k=8, keepbits=7, chunk_positions=8)
    utts = make_utts(rec, 20, max_len=9, seed=1)
    orig, calls = wmod._DirectChunks.write, [0]

    def failing(self, c, x):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError("disk on fire")
        orig(self, c, x)

    monkeypatch.setattr(wmod._DirectChunks, "write", failing)
    path = tmp_path / "c.kdc"
    with pytest.raises(OSError, match="disk on fire"):
        with CacheWriter(path, rec, fsync=False, shard_positions=10**9, encode_threads=2) as w:
            for u in utts:
                w.add(u)
    assert not os.path.exists(path / "teachers" / "a" / "shards" / "r00000-000000")
    leftovers = [f for _, _, fs in os.walk(path) for f in fs if f.endswith(".partial")]
    assert leftovers == []
    assert [p for p in verify_cache(path) if p.severity == "error"] == []
    assert calls[0] >= 5
