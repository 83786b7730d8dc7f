"""verify_cache and the reader on damaged caches; the inspect/verify CLI."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import typer
from fixtures.make_cache_fixtures import build_cache, make_record, make_utts
from typer.testing import CliRunner

from kdcache.cache_format import CacheError, open_cache, verify_cache
from kdcache.commands import cache as cache_cmd


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("vf") / "c.kdc"
    a = make_record("a", vocab_size=300, k=6, hidden=(1,), chunk_positions=16)
    build_cache(path, [(a, make_utts(a, 40, max_len=20))], shard_positions=150, fsync=False)
    return path


def _copy(src, tmp_path):
    dst = tmp_path / "c.kdc"
    shutil.copytree(src, dst)
    return dst


def _chunk(path, array="topk_logprobs", c=1):
    shard = sorted(os.listdir(path / "teachers/a/shards"))[0]
    if shard == "zarr.json":
        shard = sorted(os.listdir(path / "teachers/a/shards"))[1]
    rel = f"teachers/a/shards/{shard}/{array}"
    return rel, path / rel / "c" / str(c) / "0"


def test_intact(good_cache):
    assert verify_cache(good_cache) == []


def test_flipped_byte_is_named(good_cache, tmp_path):
    path = _copy(good_cache, tmp_path)
    rel, f = _chunk(path)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    probs = verify_cache(path)
    assert len(probs) == 1 and probs[0].where == f"{rel} chunk 1" and probs[0].severity == "error"
    cache = open_cache(path)
    with pytest.raises(CacheError, match=f"{rel}: chunk 1 "):
        list(cache.stream())


def test_missing_chunk_index_damage_and_duplicates(good_cache, tmp_path):
    path = _copy(good_cache, tmp_path)
    rel, f = _chunk(path, "tail_logmass", 0)
    (path / rel / "c" / "0").unlink()
    assert any(p.where == f"{rel} chunk 0" and "missing" in p.what for p in verify_cache(path))
    with pytest.raises(CacheError, match=f"{rel}: chunk 0 is missing"):
        list(open_cache(path).stream())
    path2 = _copy(good_cache, tmp_path / "x")
    idx = sorted((path2 / "index/a").iterdir())[0]
    idx.write_bytes(idx.read_bytes() + b"x")
    assert any("sha256" in p.what for p in verify_cache(path2))
    with pytest.raises(CacheError, match="sha256"):
        open_cache(path2)
    # The same shard committed twice under another name: duplicate utterance ids.
    path3 = _copy(good_cache, tmp_path / "y")
    shard = sorted(x.stem for x in (path3 / "index/a").iterdir())[0]
    dup = "r00009-000000"
    shutil.copytree(path3 / f"teachers/a/shards/{shard}", path3 / f"teachers/a/shards/{dup}")
    shutil.copy(path3 / f"index/a/{shard}.parquet", path3 / f"index/a/{dup}.parquet")
    m = json.loads((path3 / f"commits/a/{shard}.json").read_text())
    m["shard"] = dup
    (path3 / f"commits/a/{dup}.json").write_text(json.dumps(m))
    assert any("duplicate" in p.what for p in verify_cache(path3))
    with pytest.raises(CacheError, match="in two shards"):
        open_cache(path3)


def test_uncommitted_shard_is_info(good_cache, tmp_path):
    path = _copy(good_cache, tmp_path)
    shard = sorted(x.stem for x in (path / "commits/a").iterdir())[-1]
    (path / f"commits/a/{shard}.json").unlink()
    assert verify_cache(path) == []
    probs = verify_cache(path, include_info=True)
    assert probs and all(p.severity == "info" for p in probs)
    assert shard not in {s.name for s in open_cache(path).shards["a"]}


def _app():
    app = typer.Typer()
    app.command("inspect")(cache_cmd.inspect)
    app.command("verify")(cache_cmd.verify)
    return app


def test_cli_inspect_and_verify(good_cache, tmp_path):
    r = CliRunner()
    res = r.invoke(_app(), ["inspect", str(good_cache), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["format_version"] == 1 and s["utterances"] == 40 and s["bytes_on_disk"] > 0
    t = s["teachers"][0]
    assert {"name", "kind", "vocab_size", "k", "temperature", "bytes_per_position"} <= set(t)
    assert s["positions"] == t["positions"] > 0
    res = r.invoke(_app(), ["inspect", str(good_cache)])
    assert res.exit_code == 0 and "bytes" in res.stdout
    uid = open_cache(good_cache).utt_ids()[1]
    res = r.invoke(_app(), ["inspect", str(good_cache), "--utt", uid])
    assert res.exit_code == 0 and uid in res.stdout
    res = r.invoke(_app(), ["inspect", str(good_cache), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and (tmp_path / "p.png").stat().st_size > 1000
    res = r.invoke(_app(), ["inspect", str(good_cache), "--utt", "missing-utt"])
    assert res.exit_code == 2 and "missing-utt" in res.output and "Traceback" not in res.output
    res = r.invoke(_app(), ["verify", str(good_cache), "--no-progress"])
    assert res.exit_code == 0 and "intact" in res.stdout
    bad = _copy(good_cache, tmp_path)
    _, f = _chunk(bad, "topk_ids", 0)
    f.write_bytes(b"\0" + f.read_bytes()[1:])
    res = r.invoke(_app(), ["verify", str(bad), "--no-progress"])
    assert res.exit_code == 1 and "topk_ids chunk 0" in res.stdout
    res = r.invoke(_app(), ["verify", str(tmp_path / "nothing")])
    assert res.exit_code == 1


@pytest.mark.parametrize(
    "damage",
    ["root_json_truncated", "marker_garbage", "teacher_unknown_key", "marker_count", "index_gone"],
)
def test_hostile_files_give_one_line_errors(good_cache, tmp_path, damage):
    path = _copy(good_cache, tmp_path)
    marker = sorted((path / "commits/a").iterdir())[0]
    if damage == "root_json_truncated":
        (path / "zarr.json").write_text((path / "zarr.json").read_text()[:40])
    elif damage == "marker_garbage":
        marker.write_bytes(b"\x00not json")
    elif damage == "teacher_unknown_key":
        p = path / "teachers/a/zarr.json"
        meta = json.loads(p.read_text())
        meta["attributes"]["kdcache_teacher"]["surprise"] = 1
        p.write_text(json.dumps(meta))
    elif damage == "marker_count":
        m = json.loads(marker.read_text())
        m["positions"] += 1
        marker.write_text(json.dumps(m))
    elif damage == "index_gone":
        (path / "index/a" / (marker.stem + ".parquet")).unlink()
    assert [p for p in verify_cache(path) if p.severity == "error"]
    if damage != "marker_count":  # the reader trusts counts; verify checks them
        with pytest.raises(CacheError) as e:
            open_cache(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    res = CliRunner().invoke(_app(), ["verify", str(path), "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output


# ------------------------------------------------------------------ values: order and mass


def _rewrite(path, array, fn):
    """Rewrite one stored array of the first shard through zarr (valid chunks and checksums:
    only the values are wrong), as a buggy writer would have left them."""
    import zarr

    rel, _ = _chunk(path, array, 0)
    arr = zarr.open_array(str(path / rel), mode="r+")
    arr[:] = fn(arr[:])
    return rel


def test_ascending_logprobs_are_found(good_cache, tmp_path):
    path = _copy(good_cache, tmp_path)
    rel = _rewrite(path, "topk_logprobs", lambda x: x[:, ::-1].copy())
    probs = verify_cache(path)
    assert any(p.where.startswith(rel) and "not sorted descending" in p.what for p in probs), probs


def test_mass_of_two_is_found(good_cache, tmp_path):
    import numpy as np

    path = _copy(good_cache, tmp_path)
    # P(tail) ~ 1 on top of the top k (not exactly 0: zarr skips chunks equal to the fill value)
    _rewrite(path, "tail_logmass", lambda x: np.full_like(x, -1e-3))
    probs = verify_cache(path)
    assert probs and all("probability mass" in p.what for p in probs), probs
    assert "topk_logprobs+tail_logmass chunk 0" in probs[0].where


def test_positive_logprob_is_found(good_cache, tmp_path):
    path = _copy(good_cache, tmp_path)
    rel = _rewrite(path, "topk_logprobs", lambda x: x - x[:, :1] + 0.5)  # first column 0.5
    assert any(
        "log-probability > 0" in p.what for p in verify_cache(path) if p.where.startswith(rel)
    )


@pytest.mark.parametrize("keepbits", [2, 3, 4, 7])
def test_coarse_keepbits_caches_verify_clean(tmp_path, keepbits):
    """The writer checks the mass before rounding; verify's bound covers what rounding moves
    (at keepbits 3, 541 of 3,458 positions once broke a flat 0.02)."""
    rec = make_record("a", vocab_size=300, k=16, keepbits=keepbits, chunk_positions=64)
    build_cache(tmp_path / "c.kdc", [(rec, make_utts(rec, 60, max_len=60))], fsync=False)
    assert verify_cache(tmp_path / "c.kdc") == []


def test_mass_slack_bounds_the_rounding():
    """Exact distributions rounded to keepbits bits: their stored mass is within the slack."""
    import numpy as np

    from kdcache.cache_format.spec import round_mantissa
    from kdcache.cache_format.validate import mass_slack

    rng = np.random.default_rng(0)
    for keepbits in (1, 2, 3, 5, 7, 10):
        logits = rng.standard_normal((2000, 40)) * rng.uniform(0.1, 6, (2000, 1))
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # exact log-softmax, float64
        stored = round_mantissa(lp.astype(np.float16), keepbits)
        moved = np.abs(np.exp(stored.astype(np.float64)).sum(1) - np.exp(lp).sum(1))
        slack = mass_slack(stored, keepbits)
        # float16's own rounding is inside keepbits <= 10 (it is the keepbits = 10 case)
        assert np.all(moved <= slack), (keepbits, float((moved - slack).max()))
        eps = 2.0 ** -(keepbits + 1)
        # not vacuous: about entropy x eps (first order), and small at the usual keepbits
        assert np.median(slack) < 1.5 * eps / (1 - eps) * np.log(40) + 1e-5
        if keepbits >= 7:
            assert slack.max() < 0.03


def test_every_metadata_file_is_checked(good_cache, tmp_path):
    """A flipped bit in any zarr.json (groups the arrays never need included) is found."""
    src = sorted(p.relative_to(good_cache) for p in good_cache.rglob("zarr.json"))
    assert len(src) >= 8  # root, teachers/, teacher, shards/, shard groups, arrays, hidden/
    for i, rel in enumerate(src):
        path = tmp_path / f"c{i}.kdc"
        shutil.copytree(good_cache, path)
        f = path / rel
        b = bytearray(f.read_bytes())
        at = b.index(b'"node_type"') + 2  # a letter of the key: JSON stays JSON, meaning changes
        b[at] ^= 0x01
        f.write_bytes(bytes(b))
        probs = verify_cache(path)
        assert probs and any(str(rel.parent) in p.where or p.where == str(rel) for p in probs), (
            rel,
            probs,
        )
