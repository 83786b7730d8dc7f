"""Damaged and hostile caches: the reader, verify and the CLI must fail cleanly, never crash.

Every case below edits one file of a copy of a small valid cache, then checks that

- opening it and reading every utterance (``get`` and ``stream``) raises CacheError with a
  one-line message naming the damaged file, or succeeds;
- ``verify_cache`` returns (never raises) at least one error naming that file;
- ``kdcache verify`` / ``kdcache inspect`` exit 1 with a one-line error, no traceback.

A hypothesis fuzzer then flips bytes of, truncates or removes random files: reads either return
exactly the original data or raise CacheError, and verify reports a problem whenever they do not
return the original data. test_cache_verify.py covers the simpler damage (a flipped chunk byte, a
missing chunk, an index with a trailing byte, duplicate shards, an unknown record key).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from fixtures.make_cache_fixtures import build_cache, make_record, make_utts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdcache.cache_format import CacheError, open_cache, verify_cache
from kdcache.commands import cache as cache_cmd

S0, S1 = "r00000-000000", "r00000-000001"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Teacher "a" (k=6, one float16 hidden layer): 3 shards of 8-position chunks, small so that
    a copy is cheap."""
    path = tmp_path_factory.mktemp("hostile") / "c.kdc"
    a = make_record("a", vocab_size=300, k=6, hidden=(1,), chunk_positions=8)
    build_cache(path, [(a, make_utts(a, 16, max_len=12))], shard_positions=40, fsync=False)
    assert verify_cache(path) == []
    assert [len(s.utt_ids) >= 4 for s in open_cache(path).shards["a"][:2]] == [True, True]
    return path


@pytest.fixture(scope="module")
def original(good):
    return read_all(good)


def read_all(path) -> dict:
    """Every utterance of every teacher, read with get() and with stream(), as plain arrays."""
    cache = open_cache(path)
    out = {}
    for t in cache.teachers:
        for u in cache.utt_ids(t):
            x = cache.get(u, t)
            out[(t, u)] = (
                x.topk_ids.tolist(),
                x.topk_logprobs.tobytes(),
                x.tail_logmass.tobytes(),
                {k: v.tobytes() for k, v in x.hidden.items()},
                None if x.token_ids is None else x.token_ids.tolist(),
                x.text,
                x.input_hash,
            )
    streamed = {(t, u.utt_id) for item in cache.stream(prefetch=0) for t, u in item.items()}
    common = set.intersection(*(set(cache.utt_ids(t)) for t in cache.teachers)) if out else set()
    assert streamed == {(t, u) for t in cache.teachers for u in common}
    return out


def copy(src, tmp_path) -> Path:
    dst = Path(tmp_path) / "c.kdc"
    shutil.copytree(src, dst)
    return dst


def load_json(p: Path):
    return json.loads(p.read_text())


def save_json(p: Path, obj) -> None:
    p.write_text(json.dumps(obj))


def edit_json(p: Path, fn) -> None:
    obj = load_json(p)
    fn(obj)
    save_json(p, obj)


def set_root(value):
    def fn(m):
        if value is _DELETE:
            del m["attributes"]["kdcache"]["format_version"]
        else:
            m["attributes"]["kdcache"]["format_version"] = value

    return fn


def set_record(**kw):
    def fn(m):
        rec = m["attributes"]["kdcache_teacher"]
        for k, v in kw.items():
            if v is _DELETE:
                del rec[k]
            else:
                rec[k] = v

    return fn


def set_marker(**kw):
    def fn(m):
        for k, v in kw.items():
            m[k] = v

    return fn


_DELETE = object()


def rewrite_index(path: Path, shard: str, fn, *, raw: bytes | None = None, fix_count=True):
    """Replace an index part (fn(table) -> table, or raw bytes) and re-sign it in its marker, as
    a hostile writer would: the sha256 check alone must not be what stops the reader."""
    ip = path / "index/a" / f"{shard}.parquet"
    if raw is None:
        table = fn(pq.read_table(ip))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        raw = buf.getvalue()
    ip.write_bytes(raw)
    mp = path / "commits/a" / f"{shard}.json"
    m = load_json(mp)
    m["index_sha256"] = hashlib.sha256(raw).hexdigest()
    if fix_count and fn is not None:
        m["utterances"] = pq.read_table(io.BytesIO(raw)).num_rows
    save_json(mp, m)


def set_column(name, values, type_=None):
    def fn(t):
        i = t.column_names.index(name)
        return t.set_column(i, name, pa.array(values(t), type=type_))

    return fn


def array_meta(path: Path, shard: str, name: str) -> Path:
    return path / f"teachers/a/shards/{shard}/{name}/zarr.json"


def chunk(path: Path, shard: str, name: str, c: int) -> Path:
    p = path / f"teachers/a/shards/{shard}/{name}/c/{c}"
    return p / "0" if p.is_dir() else p


def set_shape(shape=None, chunks=None, dtype=None, sep=None):
    def fn(m):
        if shape is not None:
            m["shape"] = shape(m["shape"])
        if chunks is not None:
            cfg = m["chunk_grid"]["configuration"]
            cfg["chunk_shape"] = chunks(cfg["chunk_shape"])
        if dtype is not None:
            m["data_type"] = dtype
        if sep is not None:
            m["chunk_key_encoding"]["configuration"]["separator"] = sep

    return fn


def zstd_bomb(claimed: int) -> bytes:
    """A valid-checksum topk_ids chunk whose zstd frame header claims ``claimed`` bytes."""
    import crc32c

    # zstd frame: magic, frame header descriptor (FCS 8 bytes, single segment), content size,
    # then one raw last block of 4 bytes.
    frame = (
        b"\x28\xb5\x2f\xfd"
        + bytes([0b11100000])
        + claimed.to_bytes(8, "little")
        + bytes([(4 << 3) | 1, 0, 0])
        + b"abcd"
    )
    return frame + crc32c.crc32c(frame).to_bytes(4, "little")


def _damage(path: Path, case: str) -> str:
    """Apply one damage; returns a string the error and verify's finding must contain."""
    a = path / "teachers/a/zarr.json"
    m0 = path / f"commits/a/{S0}.json"
    if case == "root_missing":
        (path / "zarr.json").unlink()
        return "zarr.json"
    if case == "root_not_json":
        (path / "zarr.json").write_bytes(b"\xff\xfe{{{ not json")
        return "zarr.json"
    if case == "root_no_attribute":
        edit_json(path / "zarr.json", lambda m: m["attributes"].clear())
        return "kdcache"
    if case.startswith("root_version_"):
        v = {"2": 2, "str": "1", "missing": _DELETE, "bool": True, "float": 1.5}[case[13:]]
        edit_json(path / "zarr.json", set_root(v))
        return "format_version"
    if case == "record_missing":
        a.unlink()
        return "teachers/a/zarr.json"
    if case == "record_not_object":
        edit_json(a, lambda m: m["attributes"].__setitem__("kdcache_teacher", [1, 2]))
        return "teachers/a/zarr.json"
    if case == "marker_not_object":
        save_json(m0, ["teacher", "shard"])
        return f"{S0}.json"
    if case == "marker_truncated":
        m0.write_bytes(m0.read_bytes()[:50])
        return f"{S0}.json"
    if case == "marker_for_missing_shard":
        m = load_json(m0)
        m["shard"] = "r00000-000077"
        save_json(path / "commits/a/r00000-000077.json", m)
        return "r00000-000077"
    if case.startswith("record_"):
        kw = {
            "record_vocab_str": {"vocab_size": "300"},
            "record_k_float": {"k": 6.0},
            "record_chunk_str": {"chunk_positions": "16"},
            "record_layers_str": {"hidden_layers": "1"},
            "record_dims_list": {"hidden_dims": [6]},
            "record_dims_str": {"hidden_dims": {"1": "6"}},
            "record_k_gt_vocab": {"k": 301},
            "record_vocab_bool": {"vocab_size": True, "k": 1},
            "record_name_other": {"name": "b"},
            "record_name_traversal": {"name": "../x"},
            "record_huge_chunks": {"chunk_positions": 1 << 40},
            "record_nan_temperature": {"temperature": float("nan")},
        }[case]
        edit_json(a, set_record(**kw))
        return "teachers/a/zarr.json"
    if case.startswith("marker_"):
        kw = {
            "marker_utterances": {"utterances": load_json(m0)["utterances"] + 1},
            "marker_positions_low": {"positions": load_json(m0)["positions"] - 1},
            "marker_positions_str": {"positions": "126"},
            "marker_positions_huge": {"positions": 10**15},
            "marker_sha_wrong": {"index_sha256": "0" * 64},
            "marker_sha_not_str": {"index_sha256": 7},
            "marker_shard_traversal": {"shard": "../x"},
            "marker_teacher_traversal": {"teacher": "../../etc"},
            "marker_arrays_wrong": {"arrays": {"topk_ids": [1, 2]}},
            "marker_arrays_list": {"arrays": [1]},
            "marker_version_str": {"format_version": "1"},
        }[case]
        edit_json(m0, set_marker(**kw))
        return f"{S0}"
    if case == "index_truncated":
        raw = (path / f"index/a/{S0}.parquet").read_bytes()
        rewrite_index(path, S0, None, raw=raw[: len(raw) // 2])
        return f"{S0}.parquet"
    if case == "index_not_parquet":
        rewrite_index(path, S0, None, raw=os.urandom(500))
        return f"{S0}.parquet"
    if case == "index_empty_file":
        rewrite_index(path, S0, None, raw=b"")
        return f"{S0}.parquet"
    if case == "index_missing_column":
        rewrite_index(path, S0, lambda t: t.drop_columns(["length"]))
        return f"{S0}.parquet"
    if case == "index_offset_as_string":
        rewrite_index(
            path, S0, set_column("offset", lambda t: [str(x) for x in t["offset"].to_pylist()])
        )
        return f"{S0}.parquet"
    if case == "index_utt_id_as_int":
        rewrite_index(path, S0, set_column("utt_id", lambda t: list(range(t.num_rows))))
        return f"{S0}.parquet"
    if case == "index_length_null":
        rewrite_index(
            path,
            S0,
            set_column("length", lambda t: [None] + t["length"].to_pylist()[1:], pa.int32()),
        )
        return f"{S0}.parquet"
    if case == "index_token_ids_strings":
        rewrite_index(
            path,
            S0,
            set_column(
                "token_ids", lambda t: [[str(v) for v in x] for x in t["token_ids"].to_pylist()]
            ),
        )
        return f"{S0}.parquet"
    if case == "index_token_ids_count":
        rewrite_index(
            path,
            S0,
            set_column(
                "token_ids",
                lambda t: [x + [1] for x in t["token_ids"].to_pylist()],
                pa.list_(pa.int32()),
            ),
        )
        return f"{S0}.parquet"
    if case == "index_offsets_overlap":

        def overlap(t):
            off = t["offset"].to_pylist()
            off[3] -= 2
            return set_column("offset", lambda _: off, pa.int64())(t)

        rewrite_index(path, S0, overlap)
        return f"{S0}.parquet"
    if case == "index_offset_out_of_bounds":
        # The last utterance is moved past the end of the arrays; lengths still sum to N.
        def oob(t):
            off = t["offset"].to_pylist()
            off[-1] = 10**12
            return set_column("offset", lambda _: off, pa.int64())(t)

        rewrite_index(path, S0, oob)
        return f"{S0}.parquet"
    if case == "index_negative_length":
        # Lengths still sum to N and offsets stay "contiguous" with the negative length.
        def neg(t):
            ln = t["length"].to_pylist()
            ln[0] += ln[1] + 5
            ln[1] = -5
            off = np.concatenate([[0], np.cumsum(ln)[:-1]]).tolist()
            t = set_column("length", lambda _: ln, pa.int32())(t)
            return set_column("offset", lambda _: off, pa.int64())(t)

        rewrite_index(path, S0, neg)
        return f"{S0}.parquet"
    if case == "index_dup_in_shard":
        rewrite_index(
            path, S0, set_column("utt_id", lambda t: [t["utt_id"][0].as_py()] * t.num_rows)
        )
        return f"{S0}.parquet"
    if case == "index_dup_across_shards":
        other = pq.read_table(path / f"index/a/{S1}.parquet")["utt_id"][0].as_py()

        def dup(t):
            ids = t["utt_id"].to_pylist()
            ids[0] = other
            return set_column("utt_id", lambda _: ids)(t)

        rewrite_index(path, S0, dup)
        return "utt"
    if case == "array_ids_dtype":
        edit_json(array_meta(path, S0, "topk_ids"), set_shape(dtype="int16"))
        return f"{S0}/topk_ids"
    if case == "array_ids_width":
        edit_json(
            array_meta(path, S0, "topk_ids"),
            set_shape(shape=lambda s: [s[0], 5], chunks=lambda c: [c[0], 5]),
        )
        return f"{S0}/topk_ids"
    if case == "array_hidden_dim":
        edit_json(
            array_meta(path, S0, "hidden/1"),
            set_shape(shape=lambda s: [s[0], 3], chunks=lambda c: [c[0], 3]),
        )
        return f"{S0}/hidden/1"
    if case == "array_short":
        edit_json(array_meta(path, S0, "tail_logmass"), set_shape(shape=lambda s: [s[0] // 3]))
        return f"{S0}/tail_logmass"
    if case == "array_long":
        edit_json(array_meta(path, S0, "tail_logmass"), set_shape(shape=lambda s: [10**14]))
        return f"{S0}/tail_logmass"
    if case == "array_chunking":
        edit_json(array_meta(path, S0, "tail_logmass"), set_shape(chunks=lambda c: [c[0] // 2]))
        return f"{S0}/tail_logmass"
    if case == "array_key_separator":
        edit_json(array_meta(path, S0, "topk_ids"), set_shape(sep="."))
        return f"{S0}/topk_ids"
    if case == "array_meta_garbage":
        array_meta(path, S0, "topk_logprobs").write_bytes(b"\x00" * 40)
        return f"{S0}/topk_logprobs"
    if case == "array_missing":
        shutil.rmtree(path / f"teachers/a/shards/{S1}/hidden")
        return f"{S1}/hidden/1"
    if case == "chunk_truncated":
        f = chunk(path, S0, "topk_ids", 2)
        f.write_bytes(f.read_bytes()[:-9])
        return f"{S0}/topk_ids"
    if case == "chunk_zero_length":
        chunk(path, S0, "hidden/1", 1).write_bytes(b"")
        return f"{S0}/hidden/1"
    if case == "chunk_random":
        chunk(path, S1, "tail_logmass", 0).write_bytes(os.urandom(84))
        return f"{S1}/tail_logmass"
    if case == "chunk_missing_last":
        n = len(os.listdir(path / f"teachers/a/shards/{S1}/hidden/1/c"))
        shutil.rmtree(path / f"teachers/a/shards/{S1}/hidden/1/c/{n - 1}")
        return f"{S1}/hidden/1"
    if case == "chunk_zstd_bomb":
        chunk(path, S0, "topk_ids", 0).write_bytes(zstd_bomb(1 << 44))
        return f"{S0}/topk_ids"
    if case == "chunk_ids_out_of_vocab":
        # A well-formed chunk (valid checksum) whose ids exceed vocab_size.
        import zarr

        arr = zarr.open_array(str(path), path=f"teachers/a/shards/{S0}/topk_ids", mode="r+")
        x = arr[0:16]
        x[3, 2] = 299 + 1000
        arr[0:16] = x
        return f"{S0}/topk_ids"
    raise AssertionError(case)


CASES = [
    "root_missing",
    "root_not_json",
    "root_no_attribute",
    "root_version_2",
    "root_version_str",
    "root_version_missing",
    "root_version_bool",
    "root_version_float",
    "record_vocab_str",
    "record_k_float",
    "record_chunk_str",
    "record_layers_str",
    "record_dims_list",
    "record_dims_str",
    "record_k_gt_vocab",
    "record_vocab_bool",
    "record_name_other",
    "record_name_traversal",
    "record_huge_chunks",
    "record_nan_temperature",
    "record_not_object",
    "record_missing",
    "marker_truncated",
    "marker_utterances",
    "marker_positions_low",
    "marker_positions_str",
    "marker_positions_huge",
    "marker_sha_wrong",
    "marker_sha_not_str",
    "marker_shard_traversal",
    "marker_teacher_traversal",
    "marker_arrays_wrong",
    "marker_arrays_list",
    "marker_version_str",
    "marker_not_object",
    "marker_for_missing_shard",
    "index_truncated",
    "index_not_parquet",
    "index_empty_file",
    "index_missing_column",
    "index_offset_as_string",
    "index_utt_id_as_int",
    "index_length_null",
    "index_token_ids_strings",
    "index_token_ids_count",
    "index_offsets_overlap",
    "index_offset_out_of_bounds",
    "index_negative_length",
    "index_dup_in_shard",
    "index_dup_across_shards",
    "array_ids_dtype",
    "array_ids_width",
    "array_hidden_dim",
    "array_short",
    "array_long",
    "array_chunking",
    "array_key_separator",
    "array_meta_garbage",
    "array_missing",
    "chunk_truncated",
    "chunk_zero_length",
    "chunk_random",
    "chunk_missing_last",
    "chunk_zstd_bomb",
    "chunk_ids_out_of_vocab",
]


def _app():
    app = typer.Typer()
    app.command("inspect")(cache_cmd.inspect)
    app.command("verify")(cache_cmd.verify)
    return app


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_is_refused_cleanly(good, tmp_path, case):
    path = copy(good, tmp_path)
    name = _damage(path, case)
    with pytest.raises(CacheError) as e:
        read_all(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 800, msg
    assert str(path) in msg or name in msg, msg
    assert name in msg, msg
    errors = [p for p in verify_cache(path) if p.severity == "error"]
    assert errors, "verify found nothing"
    assert any(name in f"{p.where}: {p.what}" for p in errors), errors
    r = CliRunner()
    first = pq.read_table(good / f"index/a/{S0}.parquet")["utt_id"][0].as_py()
    for cmd in (
        ["verify", str(path), "--no-progress"],
        ["inspect", str(path), "--json"],
        ["inspect", str(path), "--utt", first],
    ):
        res = r.invoke(_app(), cmd)
        assert "Traceback" not in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        if cmd[0] == "verify":
            assert res.exit_code == 1, res.output
        elif res.exit_code != 0:  # inspect may succeed where the damage is not read
            errs = [x for x in res.stderr.splitlines() if x.startswith("error:")]
            assert len(errs) == 1 and len(res.stderr.splitlines()) == 1, res.stderr


def test_unused_damage_is_harmless(good, original, tmp_path):
    """Files readers never use: uncommitted shards, stray files, a lock file, non-shard markers."""
    path = copy(good, tmp_path)
    (path / "commits/a/notashard.json").write_bytes(b"garbage")
    (path / "commits/a/r00000-000009.json.tmp-123").write_bytes(b"{")
    (path / "index/a/r00000-000009.parquet").write_bytes(b"garbage")
    (path / "teachers/junk").mkdir()
    (path / ".kdcache.lock").write_bytes(os.urandom(10))
    assert read_all(path) == original
    assert verify_cache(path) == []


def test_huge_claims_do_not_hang(good, tmp_path):
    """A consistent lie (marker, index and array all claim 10^15 positions) must not make the
    reader build a list of 10^15 / 16 chunk groups or verify walk them."""
    path = copy(good, tmp_path)
    N = 10**15
    # Lengths as int64 (int32 cannot hold the lie); they still sum to the claimed N.
    rewrite_index(
        path,
        S1,
        set_column(
            "length",
            lambda t: t["length"].to_pylist()[:-1] + [N - sum(t["length"].to_pylist()[:-1])],
            pa.int64(),
        ),
    )
    rewrite_index(
        path,
        S1,
        set_column(
            "token_ids",
            lambda t: t["token_ids"].to_pylist()[:-1] + [None],
            pa.list_(pa.int32()),
        ),
    )
    m = load_json(path / f"commits/a/{S1}.json")
    m["positions"] = N
    m["arrays"] = {k: [N, *v[1:]] for k, v in m["arrays"].items()}
    save_json(path / f"commits/a/{S1}.json", m)
    for name in ("topk_ids", "topk_logprobs", "tail_logmass", "hidden/1"):
        edit_json(array_meta(path, S1, name), set_shape(shape=lambda s: [N, *s[1:]]))
    cache = open_cache(path)
    assert len(cache.chunk_groups("a")) <= len(cache.utt_ids("a"))
    with pytest.raises(CacheError, match="chunk .* is missing"):
        read_all(path)
    probs = verify_cache(path)
    assert any("chunk files missing in all" in p.what for p in probs)
    # 20 listed per array, then a count; plus the mass rule on the last stored chunk, whose
    # claimed positions past the old end read as the fill value (log-prob 0: mass k + 1)
    assert len(probs) <= 4 * 21 + 1
    assert [p.what for p in probs if "missing" not in p.what][0].startswith("probability mass")


def test_chunk_groups_skip_chunks_without_utterance_starts(tmp_path):
    """Utterances longer than a chunk: groups exist only where an utterance starts, and the rank
    split still covers every utterance exactly once."""
    a = make_record("a", vocab_size=50, k=3, chunk_positions=4)
    utts = make_utts(a, 12, max_len=15, seed=3)
    build_cache(tmp_path / "c.kdc", [(a, utts)], fsync=False)
    cache = open_cache(tmp_path / "c.kdc")
    si = cache.shards["a"][0]
    groups = cache.chunk_groups("a")
    assert len(groups) < -(-si.positions // 4)
    assert {c for _, c in groups} == set((si.offsets // 4).clip(max=(si.positions - 1) // 4))
    seen = [x["a"].utt_id for r in range(3) for x in cache.stream(["a"], rank=r, world_size=3)]
    assert sorted(seen) == sorted(u.utt_id for u in utts)


# ------------------------------------------------------------------------------------ fuzzer

FUZZ_EXAMPLES = int(os.environ.get("KDCACHE_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def fuzz_cache(tmp_path_factory):
    """Teacher "a" as in ``good`` plus a hidden-only int8 teacher "b" (hidden_scale arrays, no
    top-k) over the same utterances; returns (path, files, data read from the intact cache)."""
    path = tmp_path_factory.mktemp("fuzz") / "c.kdc"
    a = make_record("a", vocab_size=300, k=6, hidden=(1,), chunk_positions=8)
    b = make_record("b", kind="masked_lm", vocab_size=50, k=0, hidden=(0, 2), hidden_codec="int8")
    build_cache(path, [(a, make_utts(a, 16, max_len=12))], shard_positions=40, fsync=False)
    build_cache(
        path, [(b, make_utts(b, 16, max_len=12, seed=2))], shard_positions=60, fsync=False, rank=1
    )
    assert verify_cache(path) == []
    files = sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name != ".kdcache.lock"
    )
    return path, files, read_all(path)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize="KDCACHE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.data(),
    st.sampled_from(["flip", "flip", "flip", "truncate", "truncate", "remove"]),
    st.floats(0, 1, exclude_max=True),
    st.integers(1, 255),
)
def test_fuzz_random_damage(fuzz_cache, data, op, where, xor):
    path, files, original = fuzz_cache
    rel = data.draw(st.sampled_from(files))
    f = path / rel
    before = f.read_bytes()
    b = bytearray(before)
    i = int(where * len(b)) if b else 0
    if op == "remove" and not rel.startswith("commits/"):  # no marker = uncommitted: legal
        f.unlink()
    else:
        if op == "flip" and b:
            b[i] ^= xor
        else:
            del b[i:]
        f.write_bytes(bytes(b))
    try:
        try:
            got = read_all(path)
        except CacheError as e:
            assert "\n" not in str(e)
            got = None
        problems = [p for p in verify_cache(path, workers=2) if p.severity == "error"]
    finally:
        f.write_bytes(before)  # the damaged file only: cheaper than a fresh copy per example
    if got != original:
        assert problems, f"{op} of {rel} at {i}: read {'failed' if got is None else 'differs'}"


def test_fuzz_covers_every_kind_of_file(fuzz_cache):
    """The fuzzer's file list includes chunks, array metadata, records, markers and indexes."""
    files = fuzz_cache[1]
    assert any(f.endswith(".parquet") for f in files)
    assert any(f.startswith("commits/") for f in files)
    assert any("/topk_ids/c/" in f for f in files) and any("/hidden_scale/" in f for f in files)
    assert "zarr.json" in files and "teachers/b/zarr.json" in files
    assert any(f.endswith("topk_ids/zarr.json") for f in files)
