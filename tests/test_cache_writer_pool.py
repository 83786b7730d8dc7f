"""The writer's encode pool (CacheWriter(encode_threads=N)): chunks written concurrently and out
of order give the same bytes as one at a time, an independent plain zarr + pyarrow reader reads
them, and a failed or killed write leaves a cache that resumes to the same targets."""

from __future__ import annotations

import collections
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, expected, make_record, make_utts

from kdcache.cache_format import CacheWriter, open_cache, verify_cache
from kdcache.threads import auto_encode_threads

TESTS = os.path.dirname(os.path.abspath(__file__))


def _rec(**kw):
    kw = {"vocab_size": 700, "k": 8, "keepbits": 7, "chunk_positions": 16, **kw}
    return make_record("a", **kw)


def _digest(path) -> dict[str, str]:
    """md5 of every file but the two holding timestamps (root zarr.json, commit markers)."""
    out = {}
    for dp, _, fs in os.walk(path):
        for f in fs:
            rel = os.path.relpath(os.path.join(dp, f), path)
            if rel == "zarr.json" or rel.startswith("commits") or f == ".kdcache.lock":
                continue
            with open(os.path.join(dp, f), "rb") as fh:
                out[rel] = hashlib.md5(fh.read()).hexdigest()
    return out


def _independent(path, name="a"):
    """utt_id -> (ids, lp float32, tail) read with plain zarr + pyarrow, no kdcache code."""
    import pyarrow.parquet as pq
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {}
    for fname in sorted(os.listdir(path / "commits" / name)):
        shard = fname[: -len(".json")]
        rows = pq.read_table(path / "index" / name / f"{shard}.parquet").to_pylist()
        g = root[f"teachers/{name}/shards/{shard}"]
        ids, lp, tail = g["topk_ids"][...], g["topk_logprobs"][...], g["tail_logmass"][...]
        for row in rows:
            sl = slice(row["offset"], row["offset"] + row["length"])
            out[row["utt_id"]] = (ids[sl].astype(np.int64), lp[sl].astype(np.float32), tail[sl])
    return out


def _check_independent(path, rec, utts):
    got = _independent(path)
    assert set(got) == {u.utt_id for u in utts}
    for u in utts:
        want = expected(rec, u)
        ids, lp, tail = got[u.utt_id]
        np.testing.assert_array_equal(ids, want["ids"])
        np.testing.assert_array_equal(lp, want["lp"])
        np.testing.assert_array_equal(tail, want["tail"])


def test_pool_round_trip_and_bytes(tmp_path):
    """Many chunks, several shards: the same files byte for byte whatever the pool size, read
    back by the independent reader and by kdcache."""
    rec = _rec(hidden=(1,), hidden_codec="int8")
    utts = make_utts(rec, 24, max_len=20, seed=7)
    ref = tmp_path / "ref.kdc"
    build_cache(ref, [(rec, utts)], shard_positions=100, fsync=False, encode_threads=1)
    assert len(os.listdir(ref / "commits" / "a")) >= 2
    for threads in (2, 4):
        path = tmp_path / f"c{threads}.kdc"
        build_cache(path, [(rec, utts)], shard_positions=100, fsync=False, encode_threads=threads)
        assert _digest(path) == _digest(ref), threads
        _check_independent(path, rec, utts)
        assert [p for p in verify_cache(path) if p.severity == "error"] == []
        cache = open_cache(path)
        for u in utts:
            np.testing.assert_array_equal(cache.get(u.utt_id, "a").topk_ids, u.topk_ids)


def test_pool_out_of_order_writes(tmp_path, monkeypatch):
    """Chunks that finish out of order (each even chunk waits until the odd one after it is
    written) still land at their own positions, and the arrays end at the shard's length."""
    rec = _rec(chunk_positions=8)
    utts = make_utts(rec, 25, max_len=9, seed=3)
    orig = CacheWriter._write_chunk
    order = []
    lock = threading.Lock()
    written = collections.defaultdict(threading.Event)

    def slow(self, a, b, data):
        c = a // self.record.chunk_positions
        if c % 2 == 0:  # (the shard's last chunk is written alone: give up waiting for it)
            written[c + 1].wait(timeout=3)
        orig(self, a, b, data)
        with lock:
            order.append(a)
        written[c].set()

    monkeypatch.setattr(CacheWriter, "_write_chunk", slow)
    path = tmp_path / "c.kdc"
    build_cache(path, [(rec, utts)], fsync=False, encode_threads=2)
    assert order != sorted(order)  # the pool really did reorder them
    _check_independent(path, rec, utts)
    monkeypatch.setattr(CacheWriter, "_write_chunk", orig)
    ref = tmp_path / "ref.kdc"
    build_cache(ref, [(rec, utts)], fsync=False, encode_threads=1)
    assert _digest(path) == _digest(ref)


def test_pool_write_error_aborts_and_resumes(tmp_path, monkeypatch):
    """A chunk write that fails on a pool thread is re-raised by add/close; the open shard is
    dropped, the committed ones stay, and a resumed writer completes the cache."""
    rec = _rec()
    utts = make_utts(rec, 35, max_len=12, seed=5)
    orig = CacheWriter._write_chunk
    calls = [0]

    def failing(self, a, b, data):
        calls[0] += 1
        if calls[0] == 7:
            raise OSError("disk on fire")
        orig(self, a, b, data)

    monkeypatch.setattr(CacheWriter, "_write_chunk", failing)
    path = tmp_path / "c.kdc"
    with pytest.raises(OSError, match="disk on fire"):
        build_cache(path, [(rec, utts)], shard_positions=50, fsync=False, encode_threads=3)
    monkeypatch.setattr(CacheWriter, "_write_chunk", orig)
    assert [p for p in verify_cache(path) if p.severity == "error"] == []
    done = set(open_cache(path).utt_ids("a"))
    assert 0 < len(done) < len(utts)
    with CacheWriter(path, rec, shard_positions=50, fsync=False, encode_threads=3) as w:
        assert w.committed_utt_ids == done
        for u in utts:
            if u.utt_id not in w.committed_utt_ids:
                w.add(u)
    _check_independent(path, rec, utts)
    assert verify_cache(path, include_info=True) == []


CHILD = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from fixtures.make_cache_fixtures import make_record, make_utts
from kdcache.cache_format import CacheWriter
import zarr.storage

path, kill_at = sys.argv[1], int(sys.argv[2])
events = [0]
orig_set = zarr.storage.LocalStore.set
async def set_(self, key, value, *a, **k):
    events[0] += 1
    if events[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)   # killed with several chunk writes in flight
    return await orig_set(self, key, value, *a, **k)
zarr.storage.LocalStore.set = set_
# Chunk files the writer writes itself (direct writes) count as store writes too.
from kdcache.cache_format import writer as wmod
orig_write = wmod._DirectChunks.write
def write_(self, c, x):
    events[0] += 1
    if events[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_write(self, c, x)
wmod._DirectChunks.write = write_
rec = make_record("a", **{rec_kw!r})
utts = make_utts(rec, {n}, max_len=12, seed=11)
with CacheWriter(path, rec, shard_positions={shard}, fsync=False, encode_threads=4) as w:
    for u in utts:
        if u.utt_id not in w.committed_utt_ids:
            w.add(u)
print("completed", events[0])
"""


def test_pool_sigkill_then_resume(tmp_path):
    """SIGKILL while the pool has chunks in flight, twice, then resume: same targets as an
    uninterrupted build, nothing of the killed shards left."""
    rec_kw = {"vocab_size": 700, "k": 8, "keepbits": 7, "chunk_positions": 8}
    rec = make_record("a", **rec_kw)
    n, shard = 30, 50
    utts = make_utts(rec, n, max_len=12, seed=11)
    code = CHILD.format(tests=TESTS, rec_kw=rec_kw, n=n, shard=shard)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    rng = random.Random(99)
    path = tmp_path / "c.kdc"
    killed = 0
    for _ in range(2):
        p = subprocess.run(
            [sys.executable, "-c", code, str(path), str(rng.randint(15, 90))],
            capture_output=True,
            text=True,
            env=env,
        )
        assert p.returncode in (0, -signal.SIGKILL), p.stderr
        killed += p.returncode == -signal.SIGKILL
        assert [q for q in verify_cache(path) if q.severity == "error"] == []
    assert killed >= 1
    with CacheWriter(path, rec, shard_positions=shard, fsync=False, encode_threads=4) as w:
        for u in utts:
            if u.utt_id not in w.committed_utt_ids:
                w.add(u)
    _check_independent(path, rec, utts)
    assert verify_cache(path, include_info=True) == []


def test_pool_memory_bounded(tmp_path, monkeypatch):
    """At most encode_threads chunk writes are in flight, and the writer keeps at most
    encode_threads + 2 sets of chunk buffers."""
    rec = _rec(chunk_positions=8)
    utts = make_utts(rec, 40, max_len=9, seed=2)
    orig = CacheWriter._write_chunk
    live, peak = [0], [0]
    lock = threading.Lock()

    def tracked(self, a, b, data):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.003)
        orig(self, a, b, data)
        with lock:
            live[0] -= 1

    monkeypatch.setattr(CacheWriter, "_write_chunk", tracked)
    with CacheWriter(tmp_path / "c.kdc", rec, fsync=False, encode_threads=3) as w:
        for u in utts:
            w.add(u)
            assert len(w._pending) <= 3
            assert len(w._pending) + len(w._free) <= 3 + 1
    assert 2 <= peak[0] <= 3


def test_encode_threads_argument(tmp_path, monkeypatch):
    rec = _rec()
    with pytest.raises(ValueError, match="encode_threads"):
        CacheWriter(tmp_path / "x.kdc", rec, encode_threads=0)
    monkeypatch.setenv("KDCACHE_ENCODE_THREADS", "3")
    assert auto_encode_threads() == 3
    monkeypatch.delenv("KDCACHE_ENCODE_THREADS")
    assert 2 <= auto_encode_threads() <= 4
    w = CacheWriter(tmp_path / "y.kdc", rec)
    assert w.encode_threads == auto_encode_threads()
    w.abort()
