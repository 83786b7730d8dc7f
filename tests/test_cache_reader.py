"""Reader: rank split, shuffling, teacher choice, filters, and an independent plain zarr+pyarrow read."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.make_cache_fixtures import build_cache, expected, make_record, make_utts

from kdcache.cache_format import open_cache


@pytest.fixture(scope="module")
def two_teacher_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("rd") / "c.kdc"
    a = make_record("a", vocab_size=70000, k=5, chunk_positions=16)
    b = make_record(
        "b",
        kind="masked_lm",
        vocab_size=200,
        k=0,
        hidden=(2, 5),
        hidden_codec="int8",
        chunk_positions=8,
    )
    ua = make_utts(a, 60, max_len=20)
    ub = make_utts(b, 50, max_len=20, seed=4)  # the last 10 utterances only in teacher a
    build_cache(path, [(a, ua)], shard_positions=100, fsync=False)
    build_cache(path, [(b, ub)], shard_positions=150, fsync=False, rank=3)
    return path, (a, ua), (b, ub)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_rank_split_disjoint_and_complete(two_teacher_cache, world_size, shuffle):
    path, (a, ua), _ = two_teacher_cache
    cache = open_cache(path)
    seen = []
    for rank in range(world_size):
        seen.append(
            [
                x["a"].utt_id
                for x in cache.stream(
                    ["a"],
                    shuffle=shuffle,
                    seed=5,
                    shuffle_buffer=4,
                    rank=rank,
                    world_size=world_size,
                )
            ]
        )
    flat = [u for s in seen for u in s]
    assert len(flat) == len(set(flat))
    assert set(flat) == {u.utt_id for u in ua}


def test_shuffle_is_seeded(two_teacher_cache):
    cache = open_cache(two_teacher_cache[0])

    def order(seed):
        return [
            x["a"].utt_id for x in cache.stream(["a"], shuffle=True, seed=seed, shuffle_buffer=8)
        ]

    assert order(1) == order(1)
    assert order(1) != order(2)
    plain = [x["a"].utt_id for x in cache.stream(["a"])]
    assert plain == cache.utt_ids("a")


def test_two_teachers_filters_and_hidden(two_teacher_cache):
    path, (a, ua), (b, ub) = two_teacher_cache
    cache = open_cache(path)
    items = list(cache.stream(["b", "a"], hidden=False, prefetch=1))
    assert sorted(x["a"].utt_id for x in items) == sorted(u.utt_id for u in ub)
    assert all(x["b"].hidden == {} and x["b"].topk_ids.shape[1] == 0 for x in items)
    want = {u.utt_id: u for u in ua}
    for x in items:
        np.testing.assert_array_equal(x["a"].topk_ids, expected(a, want[x["a"].utt_id])["ids"])
    pick = {ua[3].utt_id, ua[55].utt_id}
    got = [x["a"].utt_id for x in cache.stream(utt_ids=pick)]
    assert got == [ua[3].utt_id]  # utt 55 has no teacher-b targets: intersection
    got = [x["a"].utt_id for x in cache.stream(["a"], utt_ids=pick)]
    assert sorted(got) == sorted(pick)
    assert set(cache[ua[55].utt_id]) == {"a"} and set(cache[ua[3].utt_id]) == {"a", "b"}
    assert ua[3].utt_id in cache and "nope" not in cache


def test_stream_early_stop_and_errors(two_teacher_cache):
    cache = open_cache(two_teacher_cache[0])
    it = cache.stream(prefetch=2)
    next(it)
    it.close()  # the prefetch thread stops
    with pytest.raises(KeyError, match="teacher 'zz'"):
        cache.stream(["zz"])
    with pytest.raises(ValueError, match="rank"):
        cache.stream(["a"], rank=2, world_size=2)


def test_independent_reader_follows_docs_format_md(two_teacher_cache):
    """Reconstruct one utterance with plain zarr + pyarrow + json, as docs/format.md describes."""
    import hashlib
    import json
    import os

    import pyarrow.parquet as pq
    import zarr

    path, (a, ua), (b, ub) = two_teacher_cache
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["kdcache"]["format_version"] == 1
    target = ua[7]
    # 1. Committed shards are the files commits/<teacher>/<shard>.json.
    for teacher, utts in (("a", ua), ("b", ub)):
        u = next(x for x in utts if x.utt_id == target.utt_id)
        record = root[f"teachers/{teacher}"].attrs["kdcache_teacher"]
        found = None
        for name in sorted(os.listdir(path / "commits" / teacher)):
            marker = json.loads((path / "commits" / teacher / name).read_text())
            shard = name[: -len(".json")]
            raw = (path / "index" / teacher / f"{shard}.parquet").read_bytes()
            assert hashlib.sha256(raw).hexdigest() == marker["index_sha256"]
            table = pq.read_table(path / "index" / teacher / f"{shard}.parquet").to_pylist()
            for row in table:
                if row["utt_id"] == target.utt_id:
                    found = (shard, row)
        shard, row = found
        g = root[f"teachers/{teacher}/shards/{shard}"]
        lo, hi = row["offset"], row["offset"] + row["length"]
        assert row["token_ids"] == list(u.token_ids)
        if record["k"] > 0:
            ids = g["topk_ids"][lo:hi]
            lp = g["topk_logprobs"][lo:hi]
            tail = g["tail_logmass"][lo:hi]
            assert ids.dtype == (np.uint32 if record["vocab_size"] > 65536 else np.uint16)
            np.testing.assert_array_equal(ids, u.topk_ids)
            np.testing.assert_allclose(
                np.exp(lp.astype(np.float64)).sum(1) + np.exp(tail), 1, atol=0.02
            )
        for layer in record["hidden_layers"]:
            x = g[f"hidden/{layer}"][lo:hi]
            if record["hidden_codec"] == "int8":
                x = x.astype(np.float32) * g[f"hidden_scale/{layer}"][lo:hi][:, None]
            np.testing.assert_allclose(x, u.hidden[layer], atol=np.abs(u.hidden[layer]).max() / 127)


def test_schema_json_in_step_with_spec(two_teacher_cache):
    """docs/format.schema.json lists the same fields the spec module writes."""
    import dataclasses
    import json
    import os
    import re

    from kdcache.cache_format import spec

    path = two_teacher_cache[0]
    here = os.path.dirname(os.path.abspath(__file__))
    schema = json.load(open(os.path.join(here, "..", "docs", "format.schema.json")))["$defs"]
    fields = [f.name for f in dataclasses.fields(spec.TeacherRecord)]
    assert set(fields) == set(schema["teacher"]["properties"])
    # the sampled-target fields are written only for sampled caches (absent = top-k)
    assert set(schema["teacher"]["required"]) == set(fields) - set(
        spec.SAMPLED_RECORD_FIELDS
    ) - set(spec.PQ_RECORD_FIELDS) - set(spec.LAYOUT_RECORD_FIELDS) - set(spec.SQRT_RECORD_FIELDS)
    assert schema["teacher"]["properties"]["targets"]["enum"] == list(spec.TARGET_MODES)
    assert schema["teacher"]["properties"]["kind"]["enum"] == list(spec.TEACHER_KINDS)
    assert set(schema["commit"]["required"]) == set(spec.COMMIT_KEYS)
    assert [c["name"] for c in schema["index_columns"]["const"]] == list(spec.INDEX_COLUMNS)
    marker = json.loads(next((path / "commits" / "a").iterdir()).read_text())
    assert set(marker) <= set(schema["commit"]["properties"])
    assert re.match(schema["shard"]["pattern"], marker["shard"])
    assert re.match(
        schema["commit"]["properties"]["index_sha256"]["pattern"], marker["index_sha256"]
    )
    root = json.loads((path / "zarr.json").read_text())["attributes"]["kdcache"]
    assert set(root) == set(schema["root"]["required"])


def test_several_caches_read_as_one(two_teacher_cache, tmp_path):
    """open_caches: one path -> the KDCache; several -> a MultiCache that answers for each
    teacher from the cache holding it. Both are CacheReaders; only the KDCache streams."""
    from kdcache.cache_format import CacheReader, KDCache, MultiCache, open_caches

    path, (a, ua), _ = two_teacher_cache
    c = make_record("c", vocab_size=300, k=3, chunk_positions=8)
    uc = make_utts(c, 12, max_len=10, seed=7)
    other = tmp_path / "other.kdc"
    build_cache(other, [(c, uc)], shard_positions=50, fsync=False)

    one = open_caches([str(path)])
    assert isinstance(one, KDCache) and isinstance(one, CacheReader) and one.supports_stream
    multi = open_caches([str(path), str(other)])
    assert isinstance(multi, MultiCache) and isinstance(multi, CacheReader)
    assert not multi.supports_stream
    assert sorted(multi.teachers) == ["a", "b", "c"]
    assert multi.utt_ids("c") == open_cache(str(other)).utt_ids("c")
    u = ua[0]
    np.testing.assert_array_equal(
        multi.get(u.utt_id, "a").topk_ids, one.get(u.utt_id, "a").topk_ids
    )
    assert multi.chunk_groups("a") == one.chunk_groups("a")
    with pytest.raises(KeyError, match="teacher 'z'"):
        multi.get(u.utt_id, "z")
    with pytest.raises(ValueError, match="data.reader=random"):
        multi.stream()
    with pytest.raises(ValueError, match="teacher 'a' is in two caches"):
        open_caches([str(path), str(path)])
