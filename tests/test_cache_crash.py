"""A writer killed with SIGKILL at random points, then resumed, gives exactly the targets of an
uninterrupted build."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
from fixtures.make_cache_fixtures import build_cache, make_record, make_utts

from kdcache.cache_format import CacheWriter, open_cache, verify_cache

TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from fixtures.make_cache_fixtures import make_record, make_utts
from kdcache.cache_format import CacheWriter, spec
import zarr.storage

path, kill_at = sys.argv[1], int(sys.argv[2])
events = [0]
def tick():
    events[0] += 1
    if events[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
orig_set = zarr.storage.LocalStore.set
async def set_(self, key, value, *a, **k):
    tick()                      # killed before this chunk/metadata write
    return await orig_set(self, key, value, *a, **k)
zarr.storage.LocalStore.set = set_
orig_atomic = spec.Storage.write_atomic
def atomic(self, rel, data, **k):
    tick()                      # killed before the index / the marker is written
    return orig_atomic(self, rel, data, **k)
spec.Storage.write_atomic = atomic
from kdcache.cache_format import writer as wmod
orig_chunk = wmod._DirectChunks.write
def chunk(self, c, x):
    tick()                      # killed before a chunk file the writer writes itself
    return orig_chunk(self, c, x)
wmod._DirectChunks.write = chunk
rec = make_record(**{rec_kw!r})
utts = make_utts(rec, {n}, max_len=12)
with CacheWriter(path, rec, rank=0, shard_positions={shard_positions}, fsync=False) as w:
    for u in utts:
        if u.utt_id not in w.committed_utt_ids:
            w.add(u)
print("completed", events[0])
"""

REC_KW = dict(vocab_size=300, k=6, hidden=(1,), hidden_codec="int8", chunk_positions=8)
N = 30
SHARD_POSITIONS = 25


def _targets(path):
    cache = open_cache(path)
    out = {}
    for uid in cache.utt_ids("lm"):
        u = cache.get(uid, "lm")
        out[uid] = (
            u.topk_ids.tobytes(),
            u.topk_logprobs.tobytes(),
            u.tail_logmass.tobytes(),
            u.hidden[1].tobytes(),
            u.token_ids.tobytes(),
            u.text,
            u.input_hash,
        )
    return out


def test_sigkill_then_resume(tmp_path):
    rec = make_record(**REC_KW)
    utts = make_utts(rec, N, max_len=12)
    ref = tmp_path / "ref.kdc"
    build_cache(ref, [(rec, utts)], shard_positions=SHARD_POSITIONS, fsync=False)
    want = _targets(ref)
    assert len(want) == N

    code = CHILD.format(tests=TESTS, rec_kw=REC_KW, n=N, shard_positions=SHARD_POSITIONS)
    rng = random.Random(1234)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for it in range(2):
        path = tmp_path / f"c{it}.kdc"
        killed = 0
        for _ in range(2):  # two crashes in a row, each resuming the previous one
            kill_at = rng.randint(1, 245)  # an uninterrupted build has ~249 write events
            p = subprocess.run(
                [sys.executable, "-c", code, str(path), str(kill_at)],
                capture_output=True,
                text=True,
                env=env,
            )
            assert p.returncode in (0, -signal.SIGKILL), p.stderr
            killed += p.returncode == -signal.SIGKILL
            if path.exists():
                errors = [q for q in verify_cache(path) if q.severity == "error"]
                assert errors == [], errors
        assert killed >= 1
        # Resume to completion in this process.
        with CacheWriter(path, rec, rank=0, shard_positions=SHARD_POSITIONS, fsync=False) as w:
            for u in utts:
                if u.utt_id not in w.committed_utt_ids:
                    w.add(u)
        got = _targets(path)
        assert got.keys() == want.keys()
        for uid in want:
            assert got[uid] == want[uid], uid
        assert (
            verify_cache(path, include_info=True) == []
        )  # this rank's leftovers were deleted on resume
        cache = open_cache(path)
        assert sum(len(s.utt_ids) for s in cache.shards["lm"]) == N
        assert np.all([s.marker["rank"] == 0 for s in cache.shards["lm"]])
