"""Object storage for real: ``kdcache build / inspect / verify`` and ``kdtrain run --cache
s3://...`` against an S3-compatible server (moto's server mode, a real HTTP server on
localhost) through s3fs -- nothing of fsspec is mocked. Concurrent ranks, a killed build that is
resumed, and two writers racing to create one cache without a lock (object stores have none).

Configuration is what a user would set: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_DEFAULT_REGION and FSSPEC_S3_ENDPOINT_URL (fsspec reads FSSPEC_<PROTOCOL>_<KWARG> when it is
imported; in this process the same value goes into fsspec.config.conf).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_build_cache import assert_same, finish, spawn, targets
from tiny_models import SENTENCES, write_manifest

pytest.importorskip("s3fs", reason="s3fs not installed (pip install -e '.[s3]')")
pytest.importorskip("moto.server", reason="moto[server] not installed (pip install -e '.[s3]')")

pytestmark = pytest.mark.usefixtures("one_thread")  # exact CPU comparisons within this process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on a free localhost port for this module (moto, threaded, in-memory)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket; returns (its s3:// URL, an s3fs filesystem on the server, the env that
    subprocesses need). Credentials and endpoint are set the way a user sets them."""
    import fsspec
    import s3fs

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": s3_endpoint,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # fsspec read FSSPEC_* when it was imported; give this process the same setting.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    bucket = f"kdc-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    child_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return f"s3://{bucket}", fs, child_env


def cli(env, *args, timeout=180):
    """``kdcache ARGS`` in a fresh process: only the environment configures S3 there."""
    return subprocess.run(
        [sys.executable, "-m", "kdcache.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_build_inspect_verify_on_s3(s3, tmp_path, tiny_bert):
    from typer.testing import CliRunner

    from kdcache.cli import app

    url, fs, env = s3
    m = write_manifest(tmp_path / "m.jsonl")
    args = ["--teacher", "bert", "--model", str(tiny_bert), "--data", str(m), "--top-k", "4"]
    args += ["--hidden-layers", "-1", "--mlm-mode", "unmasked", "--no-progress", "--device", "cpu"]
    r = CliRunner().invoke(app, ["build", *args, "--out", str(tmp_path / "c.kdc")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["build", *args, "--out", f"{url}/c.kdc"])
    assert r.exit_code == 0, r.output
    assert f"utterances {len(SENTENCES)} built" in r.output
    # The cache is in the bucket (not in a local directory named like the URL) ...
    assert fs.exists(f"{url}/c.kdc/zarr.json") and not Path("s3:").exists()
    # ... and holds the same targets as the same build written to a local directory.
    assert_same(targets(tmp_path / "c.kdc", "bert"), targets(f"{url}/c.kdc", "bert"))

    # inspect and verify in fresh processes, configured by the environment alone.
    r = cli(env, "inspect", f"{url}/c.kdc", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    (bert,) = [t for t in summary["teachers"] if t["name"] == "bert"]
    assert bert["utterances"] == len(SENTENCES) and summary["bytes_on_disk"] > 0, summary
    r = cli(env, "verify", f"{url}/c.kdc", "--no-progress")
    assert r.returncode == 0 and "intact" in r.stdout, r.stdout + r.stderr
    # verify reads the objects themselves: one flipped byte in one chunk is found.
    chunk = sorted(p for p in fs.find(f"{url}/c.kdc") if "/topk_logprobs/c/" in p)[0]
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    r = cli(env, "verify", f"{url}/c.kdc", "--no-progress")
    assert r.returncode == 1, r.stdout + r.stderr
    assert chunk.split("/c.kdc/", 1)[1].rsplit("/c/", 1)[0] in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_s3_errors_are_one_line(s3, tmp_path):
    url, fs, env = s3
    r = cli(env, "inspect", f"{url}/none.kdc")
    assert r.returncode == 2 and "none.kdc" in r.stderr and "not a cache" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # Nothing listens on port 9; one attempt (botocore would otherwise retry for ~10 s).
    bad = {**env, "FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    r = cli(bad, "verify", f"{url}/none.kdc", "--no-progress", timeout=120)
    assert r.returncode == 1 and "none.kdc" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_concurrent_ranks_on_s3(s3, tmp_path, tiny_llama):
    url, fs, _ = s3
    m = write_manifest(tmp_path / "m.jsonl")
    common = dict(
        teacher="causal_lm",
        model=str(tiny_llama),
        data=str(m),
        k=5,
        hidden_layers=(-1,),
        progress=False,
        device="cpu",
    )
    from kdcache.teachers.build import build_cache

    build_cache(out=str(tmp_path / "one.kdc"), **common)
    procs = [spawn(dict(common, out=f"{url}/two.kdc", rank=r, world_size=2)) for r in range(2)]
    assert [finish(p) for p in procs] == [0, 0]
    commits = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{url}/two.kdc/commits/causal_lm"))
    assert [c[:6] for c in commits] == ["r00000", "r00001"]
    assert_same(
        targets(tmp_path / "one.kdc", "causal_lm"),
        targets(f"{url}/two.kdc", "causal_lm"),
        atol=1e-3,
    )


@pytest.mark.slow  # 11-17 s on the shared 2-core machine
def test_killed_build_resumes_on_s3(s3, tmp_path, tiny_bert):
    from kdcache.cache_format import open_cache, verify_cache
    from kdcache.teachers.build import build_cache

    url, fs, _ = s3
    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES * 3)
    common = dict(
        teacher="bert",
        model=str(tiny_bert),
        data=str(m),
        k=4,
        hidden_layers=(-1,),
        progress=False,
        device="cpu",
        shard_positions=20,
    )
    build_cache(out=str(tmp_path / "ref.kdc"), **common)
    out = f"{url}/c.kdc"
    # SIGKILL while adding the 12th utterance: its shard has chunks in the bucket, no marker.
    assert finish(spawn(dict(common, out=out), kill_after=12)) == -signal.SIGKILL
    partial = open_cache(out).utt_ids("bert")
    assert 0 < len(partial) < 11
    shards = lambda: {p.rsplit("/", 1)[1] for p in fs.ls(f"{out}/teachers/bert/shards")}  # noqa: E731
    committed = {p.rsplit("/", 1)[1][: -len(".json")] for p in fs.ls(f"{out}/commits/bert")}
    leftover = shards() - committed - {"zarr.json"}
    assert leftover, "the killed build should leave an uncommitted shard behind"
    s = build_cache(out=out, **common)
    assert s.utterances_resumed == len(partial)
    assert s.utterances_done == len(SENTENCES) * 3 - len(partial)
    assert_same(targets(tmp_path / "ref.kdc", "bert"), targets(out, "bert"), atol=1e-3)
    assert verify_cache(out) == []
    # The leftover shard's objects were deleted and its name reused by the resumed build (same
    # rank, next sequence number after the last committed one): no orphan objects remain.
    left = shards() - {"zarr.json"}
    assert left == {p.rsplit("/", 1)[1][: -len(".json")] for p in fs.ls(f"{out}/commits/bert")}


def _writer_child(url: str, kill_marker: int) -> None:
    """Write 16 synthetic utterances in shards of ~25 positions; SIGKILL just before the
    kill_marker-th commit marker is PUT (that shard's chunks and index are in the bucket)."""
    from fixtures.make_cache_fixtures import make_record, make_utts

    from kdcache.cache_format import CacheWriter
    from kdcache.cache_format.storage import Storage

    orig, n = Storage.write_atomic, [0]

    def write_atomic(self, rel, data, **kw):
        if rel.startswith("commits/"):
            n[0] += 1
            if n[0] == kill_marker:
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, rel, data, **kw)

    Storage.write_atomic = write_atomic
    rec = make_record(vocab_size=300, k=6, hidden=(1,), hidden_codec="int8", chunk_positions=8)
    with CacheWriter(url, rec, rank=0, shard_positions=25) as w:
        for u in make_utts(rec, 16, max_len=12):
            if u.utt_id not in w.committed_utt_ids:
                w.add(u)


def _all_targets(path: str) -> dict:
    from kdcache.cache_format import open_cache

    c = open_cache(path)
    out = {}
    for uid in c.utt_ids("lm"):
        u = c.get(uid, "lm")
        out[uid] = [u.topk_ids, u.topk_logprobs, u.tail_logmass, u.hidden[1], u.token_ids]
    return out


@pytest.mark.slow  # 11-17 s on the shared 2-core machine
def test_killed_before_commit_marker_resumes_on_s3(s3, tmp_path):
    """Killed between the index PUT and the marker PUT: the shard does not count; a resume
    deletes it and writes it again; the result equals an uninterrupted build."""
    import multiprocessing as mp

    from kdcache.cache_format import verify_cache

    url, fs, _ = s3
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_writer_child, args=(f"{url}/ref.kdc", 0))
    p.start()
    assert finish(p) == 0
    p = ctx.Process(target=_writer_child, args=(f"{url}/c.kdc", 2))
    p.start()
    assert finish(p) == -signal.SIGKILL
    # The second shard's index is there, its marker is not: readers see only the first shard.
    index = {x.rsplit("/", 1)[1] for x in fs.ls(f"{url}/c.kdc/index/lm")}
    assert index == {"r00000-000000.parquet", "r00000-000001.parquet"}
    first = _all_targets(f"{url}/c.kdc")
    assert 0 < len(first) < 16
    p = ctx.Process(target=_writer_child, args=(f"{url}/c.kdc", 0))
    p.start()
    assert finish(p) == 0
    ref, got = _all_targets(f"{url}/ref.kdc"), _all_targets(f"{url}/c.kdc")
    assert sorted(ref) == sorted(got) and len(got) == 16
    for uid in ref:
        for a, b in zip(ref[uid], got[uid], strict=True):
            np.testing.assert_array_equal(a, b)
    assert verify_cache(f"{url}/c.kdc") == []


def test_creation_race_without_lock(s3, monkeypatch):
    """Two writers create one cache on S3 at once (no lock there): the loser looks after the
    winner has written the root group and its first subgroups -- between the loser's "is there
    a zarr.json?" and its listing of the root. It must join the cache, not refuse it as "not
    empty and not a kdcache cache"."""
    from fixtures.make_cache_fixtures import make_record, make_utts

    from kdcache.cache_format import CacheWriter, open_cache
    from kdcache.cache_format.storage import FsspecStorage

    url, _, _ = s3
    path = f"{url}/race.kdc"
    rec = make_record(k=3)
    orig, state = FsspecStorage.listdir, {"raced": False}

    def listdir(self, rel):
        if rel == "" and not state["raced"]:
            state["raced"] = True
            # The other rank runs its whole creation here, then this rank's listing goes on.
            with CacheWriter(path, rec, rank=1) as w1:
                for u in make_utts(rec, 4, seed=1, prefix="b"):
                    w1.add(u)
        return orig(self, rel)

    monkeypatch.setattr(FsspecStorage, "listdir", listdir)
    with CacheWriter(path, rec, rank=0) as w0:
        assert state["raced"]
        for u in make_utts(rec, 4, seed=0, prefix="a"):
            w0.add(u)
    assert len(open_cache(path).utt_ids(rec.name)) == 8


def test_kdtrain_reads_s3_cache(s3, tmp_path):
    """kdtrain run --cache s3://... trains exactly as from the same cache on disk, records the
    URL in run.json, and --resume reads it from there."""
    from test_train_recipes import TINY
    from typer.testing import CliRunner

    from kdcache.cli import train_app
    from kdcache.student.recipe import read_metrics
    from kdcache.student.toy import make_toy_corpus

    url, fs, _ = s3
    toy = make_toy_corpus(tmp_path / "toy", num_utts=12, seed=0)
    fs.put(str(toy.cache), f"{url}/toy.kdc", recursive=True)
    runner = CliRunner()

    def run(cache, out, steps):
        res = runner.invoke(train_app, [
            "run", "--cache", cache, "--data", str(toy.manifest), "--features",
            str(toy.features), "--tokenizer", str(toy.tokenizer), "--recipe", "lst",
            "--out", str(out), *TINY, f"train.max_steps={steps}",
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        return [float(r["loss"]) for r in read_metrics(out)]

    local = run(str(toy.cache), tmp_path / "local", 4)
    remote = run(f"{url}/toy.kdc", tmp_path / "remote", 2)
    assert json.loads((tmp_path / "remote" / "run.json").read_text())["cache"] == f"{url}/toy.kdc"
    res = runner.invoke(train_app, ["run", "--out", str(tmp_path / "remote"), "--resume",
                                    "train.max_steps=4"])  # fmt: skip
    assert res.exit_code == 0, res.output
    remote = [float(r["loss"]) for r in read_metrics(tmp_path / "remote")]
    assert remote == local
