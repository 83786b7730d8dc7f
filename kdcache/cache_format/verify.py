"""verify_cache: check every chunk checksum, index/array consistency and commit markers.

An empty list (or only ``info`` findings) means the cache is intact. Uncommitted shards are
``info``: readers never see them and the writer of that rank deletes them when it resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kdcache.cache_format import spec, validate
from kdcache.cache_format.spec import TeacherRecord
from kdcache.cache_format.storage import Storage, open_storage
from kdcache.cache_format.validate import one_line

__all__ = ["Problem", "verify_cache"]


@dataclass(frozen=True)
class Problem:
    """One finding.

    Attributes:
        where: Path relative to the cache root (with ``chunk N`` for a chunk).
        what: What is wrong, in one line.
        severity: "error" (the cache is damaged) or "info" (harmless, e.g. an uncommitted shard).
    """

    where: str
    what: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.what}"


# Missing chunk files listed one by one, at most this many per array (then a count).
MAX_LISTED_MISSING = 20


MASS = "<mass>"  # task name of the cross-array mass check
PLAIN_GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _plain_group_problems(st: Storage, rel: str) -> list[Problem]:
    """A structural group (teachers/, shards/, a shard, hidden/) holds exactly an empty zarr v3
    group's metadata; zarr itself never needs to parse it to read the arrays below, so without
    this check a damaged one would pass unnoticed."""
    meta = f"{rel}/zarr.json" if rel else "zarr.json"
    if not st.exists(meta):
        return [Problem(meta, "group metadata missing")]
    try:
        d = json.loads(st.read_bytes(meta))
    except Exception as e:  # noqa: BLE001 - a finding
        return [Problem(meta, f"group metadata is not JSON ({type(e).__name__}: {one_line(e)})")]
    if d != PLAIN_GROUP:
        return [
            Problem(meta, f"group metadata {json.dumps(d)[:120]} is not {json.dumps(PLAIN_GROUP)}")
        ]
    return []


def _open_array(zs, rel: str, problems: list[Problem]):
    """The Zarr array at ``rel``, or None with the problem recorded."""
    import zarr

    try:
        return zarr.open_array(zs, path=rel, mode="r")
    except Exception as e:
        problems.append(
            Problem(rel, f"array missing or unreadable ({type(e).__name__}: {one_line(e)})")
        )
        return None


def _check_shard(st: Storage, zs, rec: TeacherRecord, t, s, seen, problems, tasks) -> None:
    """Marker, index and array metadata of one committed shard; chunk reads go to ``tasks``."""
    cp = spec.commit_path(t, s)
    try:
        d = json.loads(st.read_bytes(cp))
    except Exception as e:
        problems.append(Problem(cp, f"bad commit marker ({type(e).__name__}: {one_line(e)})"))
        return
    marker, probs = validate.parse_marker(d, t, s)
    problems.extend(Problem(cp, f"bad commit marker ({p})") for p in probs)
    if marker is None:
        return
    ip = spec.index_path(t, s)
    try:
        data = st.read_bytes(ip)
    except OSError:
        problems.append(Problem(ip, "index of a committed shard is missing"))
        return
    si, probs = validate.parse_index(data, marker, t, s)
    problems.extend(Problem(ip, p) for p in probs)
    if si is None:
        return
    for u in dict.fromkeys(si.utt_ids):  # twice in this shard: parse_index said so
        if u not in seen:
            seen[u] = s
        elif seen[u] != s:
            problems.append(Problem(ip, f"utterance {u!r} also in shard {seen[u]} (duplicate)"))
    # Group metadata of the shard (and its hidden/ groups), then the arrays.
    problems.extend(_plain_group_problems(st, spec.shard_path(t, s)))
    names = spec.array_names(rec) + spec.pq_codebook_names(rec)
    for sub in sorted({n.split("/")[0] for n in names if "/" in n}):
        problems.extend(_plain_group_problems(st, f"{spec.shard_path(t, s)}/{sub}"))
    # PQ codebooks (one small chunk per layer): metadata, checksum and finite values.
    for name in spec.pq_codebook_names(rec):
        rel = f"{spec.shard_path(t, s)}/{name}"
        arr = _open_array(zs, rel, problems)
        if arr is None:
            continue
        probs = validate.codebook_problems(rec, name.split("/", 1)[1], arr)
        if probs:
            problems.extend(Problem(rel, p) for p in probs)
            continue
        if not st.exists(f"{rel}/c/0/0/0"):
            problems.append(Problem(f"{rel} chunk 0", "chunk file missing"))
            continue
        try:
            x = arr[...]
        except Exception as e:
            problems.append(
                Problem(
                    f"{rel} chunk 0",
                    f"checksum mismatch or undecodable ({type(e).__name__}: {one_line(e)})",
                )
            )
            continue
        problems.extend(Problem(f"{rel} chunk 0", p) for p in validate.codebook_value_problems(x))
    N, C = marker.positions, rec.chunk_positions
    opened: dict[str, tuple] = {}
    for name in spec.array_names(rec):
        rel = f"{spec.shard_path(t, s)}/{name}"
        arr = _open_array(zs, rel, problems)
        if arr is None:
            continue
        probs = validate.array_problems(rec, marker, name, arr)
        if probs:
            problems.extend(Problem(rel, p) for p in probs)
            continue
        row = spec.array_row_shape(rec, name)
        # Chunk files are c/<i>/0... (one chunk across the row): <i>/0... below c/.
        suffix = "/0" * len(row)
        n_chunks = -(-N // C)
        have = set()
        for key in st.files(f"{rel}/c"):
            parts = key.split("/")
            if len(parts) == 1 + len(row) and parts[0].isdigit() and key.endswith(suffix):
                i = int(parts[0])
                if i < n_chunks:
                    have.add(i)
        missing = n_chunks - len(have)
        listed = 0
        c = 0
        # Walk the expected chunks only as far as needed to list the first few missing ones: a
        # damaged shape may claim billions of chunks.
        while listed < min(missing, MAX_LISTED_MISSING) and c < n_chunks:
            if c not in have:
                problems.append(Problem(f"{rel} chunk {c}", "chunk file missing"))
                listed += 1
            c += 1
        if missing > listed:
            problems.append(
                Problem(rel, f"{missing} chunk files missing in all (of {n_chunks}; first listed)")
            )
        for c in sorted(have):
            tasks.append((rec, rel, name, arr, c))
        opened[name] = (arr, have)
    # The mass rule spans two arrays: one task per chunk present in both.
    if spec.TOPK_LOGPROBS in opened and spec.TAIL_LOGMASS in opened:
        (lp_arr, lp_have), (tail_arr, tail_have) = (
            opened[spec.TOPK_LOGPROBS], opened[spec.TAIL_LOGMASS]
        )  # fmt: skip
        rel = f"{spec.shard_path(t, s)}/{spec.TOPK_LOGPROBS}+{spec.TAIL_LOGMASS}"
        for c in sorted(lp_have & tail_have):
            tasks.append((rec, rel, MASS, (lp_arr, tail_arr), c))


def verify_cache(
    path: str | os.PathLike,
    *,
    workers: int = 4,
    progress: bool = False,
    storage_options: dict | None = None,
    on_chunk: Callable[[int], None] | None = None,
    include_info: bool = False,
) -> list[Problem]:
    """Check a cache end to end.

    Checks: root and teacher records; every commit marker (keys, counts, index sha256); every
    index part (offsets contiguous from 0, lengths sum to the marker's positions, token_ids one per
    position, no utterance twice in one teacher); every array (present, dtype, shape and chunking
    as the record says); every chunk (present, crc32c and decode, ids < vocab_size, no NaN,
    top-k log-probs <= 0 and sorted descending, and the mass rule on the stored values:
    ``|sum(exp(topk)) + exp(tail) - 1| <= 0.02 + rounding slack``, validate.mass_problems).
    Chunks are decoded by ``workers`` threads.

    Args:
        path: Cache directory or fsspec URL.
        workers: Decoding threads.
        progress: Show a tqdm progress bar over chunks (caches of 64 chunks or more).
        storage_options: fsspec options for URLs.
        on_chunk: Called with the number of chunks checked (for a caller's own progress).
        include_info: Also return "info" findings (uncommitted shards, temp files).

    Returns:
        Problems; an empty list (with include_info=False) means the cache is intact.
    """
    import zarr

    problems: list[Problem] = []
    st = open_storage(str(path), read_only=True, storage_options=storage_options)
    if not st.exists("zarr.json"):
        return [Problem(str(path), "not a cache: no zarr.json at the root")]
    try:
        zs = st.zarr_store()
        attrs = zarr.open_group(zs, mode="r").attrs.asdict().get(spec.ROOT_ATTR)
    except Exception as e:
        return [Problem("zarr.json", f"unreadable root group ({type(e).__name__}: {one_line(e)})")]
    probs = validate.root_problems(attrs)
    if probs:
        return [Problem("zarr.json", p) for p in probs]

    tasks: list[tuple[TeacherRecord, str, str, object, int]] = []  # (record, rel, name, array, c)
    if st.exists(f"{spec.TEACHERS_DIR}/zarr.json") or st.listdir(spec.TEACHERS_DIR):
        problems.extend(_plain_group_problems(st, spec.TEACHERS_DIR))
    with_record = set()
    for t in st.listdir(spec.TEACHERS_DIR):
        tp = spec.teacher_path(t)
        if t == "zarr.json":
            continue
        if st.exists(f"{tp}/zarr.json"):
            with_record.add(t)
        if not st.exists(f"{tp}/zarr.json"):
            problems.append(Problem(tp, "directory without zarr.json under teachers/", "info"))
            continue
        if not spec.NAME_RE.match(t):
            problems.append(Problem(tp, "not a valid teacher name (readers ignore it)"))
            continue
        try:
            d = zarr.open_group(zs, path=tp, mode="r").attrs.asdict().get(spec.TEACHER_ATTR)
        except Exception as e:
            problems.append(
                Problem(
                    f"{tp}/zarr.json", f"bad teacher record ({type(e).__name__}: {one_line(e)})"
                )
            )
            continue
        rec, probs = validate.parse_record(d, t)
        problems.extend(Problem(f"{tp}/zarr.json", f"bad teacher record ({p})") for p in probs)
        if rec is None:
            continue
        commit_files = st.listdir(f"{spec.COMMITS_DIR}/{t}")
        index_files = st.listdir(f"{spec.INDEX_DIR}/{t}")
        markers = {f[:-5] for f in commit_files if f.endswith(".json") and ".tmp-" not in f}
        shard_dirs = set(st.listdir(f"{tp}/{spec.SHARDS_DIR}")) - {"zarr.json"}
        for f in commit_files + index_files:
            if ".tmp-" in f:
                problems.append(
                    Problem(f"{t}/{f}", "temporary file left by an interrupted commit", "info")
                )
        for s in sorted(markers):
            if spec.parse_shard_name(s) is None:
                problems.append(
                    Problem(spec.commit_path(t, s), "not a shard name (readers ignore it)", "info")
                )
        markers = {s for s in markers if spec.parse_shard_name(s) is not None}
        if markers:  # committed shards live below shards/: its group metadata must be intact
            problems.extend(_plain_group_problems(st, f"{tp}/{spec.SHARDS_DIR}"))
        for s in sorted(shard_dirs - markers):
            problems.append(
                Problem(
                    spec.shard_path(t, s),
                    "uncommitted shard (invisible to readers; its rank's writer deletes it on resume)",
                    "info",
                )
            )
        for f in index_files:
            if f.endswith(".parquet") and f[:-8] not in markers:
                problems.append(
                    Problem(
                        spec.index_path(t, f[:-8]),
                        "index part without commit marker (uncommitted)",
                        "info",
                    )
                )
        seen: dict[str, str] = {}
        for s in sorted(markers):
            try:
                _check_shard(st, zs, rec, t, s, seen, problems, tasks)
            except Exception as e:  # noqa: BLE001 - a finding, never a crash
                problems.append(
                    Problem(
                        spec.shard_path(t, s),
                        f"unexpected damage ({type(e).__name__}: {one_line(e)})",
                    )
                )

    problems.extend(Problem(rel, what) for rel, what in validate.orphan_commits(st, with_record))

    def check(task) -> list[Problem]:
        rec, rel, name, arr, c = task
        C = rec.chunk_positions
        if name == MASS:
            try:
                lp, tail = (a[c * C : min((c + 1) * C, a.shape[0])] for a in arr)
            except Exception:  # noqa: BLE001 - the per-array tasks report the damaged chunk
                return []
            return [Problem(f"{rel} chunk {c}", p) for p in validate.mass_problems(rec, lp, tail)]
        try:
            x = arr[c * C : min((c + 1) * C, arr.shape[0])]
        except Exception as e:
            return [
                Problem(
                    f"{rel} chunk {c}",
                    f"checksum mismatch or undecodable ({type(e).__name__}: {one_line(e)})",
                )
            ]
        want = min(C, arr.shape[0] - c * C)
        probs = validate.chunk_problems(rec, name, x, want, nan=True)
        return [Problem(f"{rel} chunk {c}", p) for p in probs]

    bar = None
    if progress and len(tasks) >= 64:  # small caches verify in well under a second
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="chunk", desc="verify")
    done = 0
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for probs in ex.map(check, tasks):
            problems.extend(probs)
            done += 1
            if bar is not None:
                bar.update(1)
            if on_chunk is not None:
                on_chunk(done)
    if bar is not None:
        bar.close()
    if not include_info:
        problems = [p for p in problems if p.severity != "info"]
    return problems
