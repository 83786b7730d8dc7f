"""verify_cache: check every chunk checksum, index/array consistency and commit markers.

An empty list (or only ``info`` findings) means the cache is intact. Uncommitted shards are
``info``: readers never see them and the writer of that rank deletes them when it resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kdcache.cache_format import spec
from kdcache.cache_format.spec import TeacherRecord

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


def _chunk_files(storage: spec.Storage, rel: str) -> set[str] | None:
    """Chunk keys ('c/0/0', ...) present under one array directory."""
    base = storage.full(f"{rel}/c")
    out = set()
    if storage.local:
        if not os.path.isdir(base):
            return out
        for dirpath, _, files in os.walk(base):
            for f in files:
                r = os.path.relpath(os.path.join(dirpath, f), storage.full(rel))
                out.add(r.replace(os.sep, "/"))
        return out
    if not storage.fs.exists(base):
        return out
    prefix = storage.full(rel).rstrip("/") + "/"
    for p in storage.fs.find(base):
        out.add(p[len(prefix) :] if p.startswith(prefix) else p.split(rel + "/", 1)[-1])
    return out


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
    as the record says); every chunk (present, crc32c and decode, ids < vocab_size, no NaN).
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
    import pyarrow.parquet as pq
    import zarr

    problems: list[Problem] = []
    st = spec.Storage(str(path), read_only=True, storage_options=storage_options)
    zs = st.zarr_store()
    if not st.exists("zarr.json"):
        return [Problem(str(path), "not a cache: no zarr.json at the root")]
    try:
        attrs = zarr.open_group(zs, mode="r").attrs.asdict().get(spec.ROOT_ATTR)
    except Exception as e:
        return [Problem("zarr.json", f"unreadable root group ({e})")]
    if not isinstance(attrs, dict):
        return [Problem("zarr.json", f"no '{spec.ROOT_ATTR}' root attribute: not a kdcache cache")]
    ver = attrs.get("format_version")
    if ver not in spec.SUPPORTED_FORMAT_VERSIONS:
        return [
            Problem(
                "zarr.json",
                f"format_version {ver!r} not supported (supported: {list(spec.SUPPORTED_FORMAT_VERSIONS)})",
            )
        ]

    tasks: list[
        tuple[TeacherRecord, str, object, int]
    ] = []  # (record, array rel path, array, chunk)
    for t in st.listdir(spec.TEACHERS_DIR):
        tp = spec.teacher_path(t)
        if not st.exists(f"{tp}/zarr.json"):
            if t != "zarr.json":
                problems.append(Problem(tp, "directory without zarr.json under teachers/", "info"))
            continue
        try:
            rec = TeacherRecord.from_dict(
                zarr.open_group(zs, path=tp, mode="r").attrs.asdict()[spec.TEACHER_ATTR]
            )
        except Exception as e:
            problems.append(Problem(f"{tp}/zarr.json", f"bad teacher record ({e})"))
            continue
        if rec.name != t:
            problems.append(
                Problem(
                    f"{tp}/zarr.json", f"record name {rec.name!r} differs from the directory name"
                )
            )
        markers = {f[:-5] for f in st.listdir(f"{spec.COMMITS_DIR}/{t}") if f.endswith(".json")}
        shard_dirs = set(st.listdir(f"{tp}/{spec.SHARDS_DIR}")) - {"zarr.json"}
        for f in st.listdir(f"{spec.COMMITS_DIR}/{t}") + st.listdir(f"{spec.INDEX_DIR}/{t}"):
            if ".tmp-" in f:
                problems.append(
                    Problem(f"{t}/{f}", "temporary file left by an interrupted commit", "info")
                )
        for s in sorted(shard_dirs - markers):
            problems.append(
                Problem(
                    spec.shard_path(t, s),
                    "uncommitted shard (invisible to readers; its rank's writer deletes it on resume)",
                    "info",
                )
            )
        for f in st.listdir(f"{spec.INDEX_DIR}/{t}"):
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
            cp = spec.commit_path(t, s)
            try:
                marker = json.loads(st.read_bytes(cp))
                missing = [k for k in spec.COMMIT_KEYS if k not in marker]
                if missing:
                    raise ValueError(f"missing keys {missing}")
            except Exception as e:
                problems.append(Problem(cp, f"unreadable commit marker ({e})"))
                continue
            if marker["teacher"] != t or marker["shard"] != s:
                problems.append(
                    Problem(
                        cp, f"marker names teacher {marker['teacher']!r} shard {marker['shard']!r}"
                    )
                )
            if marker["format_version"] not in spec.SUPPORTED_FORMAT_VERSIONS:
                problems.append(
                    Problem(cp, f"format_version {marker['format_version']!r} not supported")
                )
            ip = spec.index_path(t, s)
            try:
                data = st.read_bytes(ip)
            except OSError:
                problems.append(Problem(ip, "index of a committed shard is missing"))
                continue
            if hashlib.sha256(data).hexdigest() != marker["index_sha256"]:
                problems.append(
                    Problem(ip, "sha256 does not match the commit marker (index damaged)")
                )
                continue
            try:
                table = pq.read_table(io.BytesIO(data))
                utts = table.column("utt_id").to_pylist()
                offsets = table.column("offset").to_numpy().astype(np.int64)
                lengths = table.column("length").to_numpy().astype(np.int64)
                tok_lens = [
                    None if x is None else len(x) for x in table.column("token_ids").to_pylist()
                ]
            except Exception as e:
                problems.append(Problem(ip, f"unreadable index ({e})"))
                continue
            N = int(marker["positions"])
            if len(utts) != marker["utterances"]:
                problems.append(
                    Problem(
                        ip,
                        f"{len(utts)} rows but the marker says {marker['utterances']} utterances",
                    )
                )
            if len(utts):
                expect = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                if (lengths < 0).any():
                    problems.append(Problem(ip, "negative length"))
                bad = np.nonzero(offsets != expect)[0]
                if len(bad):
                    problems.append(
                        Problem(
                            ip,
                            f"offsets not contiguous from 0 (first at row {int(bad[0])}, utterance {utts[bad[0]]!r})",
                        )
                    )
            if int(lengths.sum()) != N:
                problems.append(
                    Problem(
                        ip, f"lengths sum to {int(lengths.sum())} but the marker says {N} positions"
                    )
                )
            for u, n, tl in zip(utts, lengths, tok_lens, strict=True):
                if tl is not None and tl != n:
                    problems.append(
                        Problem(ip, f"utterance {u!r}: {tl} token_ids for {int(n)} positions")
                    )
                    break
            for u in utts:
                if u in seen:
                    problems.append(
                        Problem(ip, f"utterance {u!r} also in shard {seen[u]} (duplicate)")
                    )
                else:
                    seen[u] = s
            # Arrays.
            C = rec.chunk_positions
            for name in spec.array_names(rec):
                rel = f"{spec.shard_path(t, s)}/{name}"
                try:
                    arr = zarr.open_array(zs, path=rel, mode="r")
                except Exception as e:
                    problems.append(Problem(rel, f"array missing or unreadable ({e})"))
                    continue
                row = spec.array_row_shape(rec, name)
                want = marker.get("arrays", {}).get(name)
                if want is not None and list(arr.shape) != list(want):
                    problems.append(
                        Problem(
                            rel, f"shape {list(arr.shape)} differs from the commit marker's {want}"
                        )
                    )
                    continue
                if tuple(arr.shape) != (N, *row):
                    problems.append(Problem(rel, f"shape {list(arr.shape)}, expected {[N, *row]}"))
                    continue
                if np.dtype(arr.dtype) != spec.array_dtype(rec, name):
                    problems.append(
                        Problem(rel, f"dtype {arr.dtype}, expected {spec.array_dtype(rec, name)}")
                    )
                    continue
                if tuple(arr.chunks)[0] != C:
                    problems.append(Problem(rel, f"chunk length {arr.chunks[0]}, record says {C}"))
                    continue
                present = _chunk_files(st, rel)
                suffix = "/0" * len(row)
                for c in range(-(-N // C)):
                    if f"c/{c}{suffix}" not in present:
                        problems.append(Problem(f"{rel} chunk {c}", "chunk file missing"))
                    else:
                        tasks.append((rec, rel, arr, c))

    def check(task) -> Problem | None:
        rec, rel, arr, c = task
        C = rec.chunk_positions
        try:
            x = arr[c * C : min((c + 1) * C, arr.shape[0])]
        except Exception as e:
            return Problem(
                f"{rel} chunk {c}", f"checksum mismatch or undecodable ({type(e).__name__}: {e})"
            )
        name = rel.rsplit("/", 1)[-1]
        if name == spec.TOPK_IDS and x.size and int(x.max()) >= rec.vocab_size:
            return Problem(f"{rel} chunk {c}", f"id {int(x.max())} >= vocab_size {rec.vocab_size}")
        if x.dtype.kind == "f" and np.isnan(x).any():
            return Problem(f"{rel} chunk {c}", "contains NaN")
        return None

    bar = None
    if progress and len(tasks) >= 64:  # small caches verify in well under a second
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), unit="chunk", desc="verify")
    done = 0
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for p in ex.map(check, tasks):
            if p is not None:
                problems.append(p)
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
