"""CacheWriter: append one teacher's targets to a cache in per-rank shards (docs/format.md).

Usage::

    with CacheWriter(path, record, rank=0) as w:
        todo = [u for u in utts if u.id not in w.committed_utt_ids]   # resume
        for u in todo:
            w.add(UttTargets(...))

Leaving the ``with`` block normally commits the open shard; leaving it with an exception does
not (the open shard's files are removed; committed shards stay). A writer is not thread-safe:
call ``add`` from one thread.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from kdcache.cache_format import spec
from kdcache.cache_format.spec import CacheError, TeacherRecord, UttTargets

__all__ = ["CacheWriter", "UttTargets", "encode_hidden_int8"]

# Tolerance of the probability-mass check: sum(exp(topk)) + exp(tail) must be within this of 1.
MASS_TOLERANCE = 0.02
LOCK_FILE = ".kdcache.lock"


def encode_hidden_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantisation: x ~= q * scale, scale = max|x| / 127.

    Args:
        x: [T, D] float.

    Returns:
        q: [T, D] int8 in -127..127; scale: [T] float32 (0 for an all-zero row).
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _builder() -> str:
    try:
        from importlib.metadata import version

        return f"kdcache {version('kdcache')}"
    except Exception:
        return "kdcache"


class _Lock:
    """Exclusive lock (flock) on a file inside a local cache root; no-op for URLs."""

    def __init__(self, storage: spec.Storage):
        self.storage = storage
        self.fd: int | None = None

    def __enter__(self):
        if self.storage.local:
            import fcntl

            os.makedirs(self.storage.root, exist_ok=True)
            self.fd = os.open(
                os.path.join(self.storage.root, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644
            )
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class CacheWriter:
    """Writes one teacher's targets into a cache, creating the cache or adding the teacher.

    Opening a writer for a teacher that already exists resumes it when the stored record equals
    ``record`` (apart from spec.HARMLESS_RECORD_FIELDS): ``committed_utt_ids`` then holds every
    utterance committed by any rank, and this rank's uncommitted shards (left by a killed run) are
    deleted. Other ranks' shards are never touched, so ranks can write one teacher concurrently.

    Args:
        path: Cache directory (``NAME.kdc``) or fsspec URL.
        record: The teacher's record.
        rank: Writer rank; shard names carry it. Two live writers must not share a rank.
        shard_positions: Commit the open shard once it holds at least this many positions
            (utterances are never split across shards).
        fsync: fsync chunk files, the index and the marker before a commit (local paths).
        check_mass: Check sum(exp(topk_logprobs)) + exp(tail_logmass) ~= 1 per position.
        builder: Free text recorded in the root attributes when the cache is created.
        storage_options: fsspec options for URLs.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        record: TeacherRecord,
        rank: int = 0,
        *,
        shard_positions: int = spec.DEFAULT_SHARD_POSITIONS,
        fsync: bool = True,
        check_mass: bool = True,
        builder: str | None = None,
        storage_options: dict | None = None,
    ):
        if not isinstance(record, TeacherRecord):
            raise TypeError(f"record must be a TeacherRecord, got {type(record).__name__}")
        if not 0 <= int(rank) < 100000:
            raise ValueError(f"rank must be in 0..99999, got {rank}")
        if shard_positions < 1:
            raise ValueError(f"shard_positions must be >= 1, got {shard_positions}")
        self.path = str(path)
        self.record = record
        self.rank = int(rank)
        self.shard_positions = int(shard_positions)
        self.fsync = fsync
        self.check_mass = check_mass
        self._storage = spec.Storage(self.path, read_only=False, storage_options=storage_options)
        self._zstore = self._storage.zarr_store()
        self._closed = False
        self._committed: set[str] = set()
        self._session: set[str] = set()
        self._committed_shards: list[str] = []
        self._open(builder or _builder())
        self._scan()
        self._reset_shard()

    # ---------------------------------------------------------------- opening / resume
    def _open(self, builder: str) -> None:
        st, rec, t = self._storage, self.record, self.record.name
        # Create-or-validate each group. Local caches hold an flock meanwhile; on URLs (no lock)
        # a rank that loses the creation race finds the group made by the winner and validates it.
        with _Lock(st):
            if not st.exists("zarr.json"):
                others = [x for x in st.listdir("") if x != LOCK_FILE]
                if others:
                    raise CacheError(
                        f"{self.path}: exists, is not empty and is not a kdcache cache"
                    )
                root = {
                    "format_version": spec.FORMAT_VERSION,
                    "created": _now(),
                    "builder": builder,
                }
                self._create_group("", {spec.ROOT_ATTR: root})
            attrs = self._open_group("").attrs.asdict()
            if spec.ROOT_ATTR not in attrs:
                raise CacheError(
                    f"{self.path}: a zarr group but not a kdcache cache (no '{spec.ROOT_ATTR}' attribute)"
                )
            ver = attrs[spec.ROOT_ATTR].get("format_version")
            if ver not in spec.SUPPORTED_FORMAT_VERSIONS:
                raise CacheError(
                    f"{self.path}: format_version {ver!r} is not supported by this kdcache "
                    f"(supported: {list(spec.SUPPORTED_FORMAT_VERSIONS)})"
                )
            if not st.exists(f"{spec.TEACHERS_DIR}/zarr.json"):
                self._create_group(spec.TEACHERS_DIR, None)
            tp = spec.teacher_path(t)
            if not st.exists(f"{tp}/zarr.json"):
                self._create_group(tp, {spec.TEACHER_ATTR: rec.to_dict()})
            if not st.exists(f"{tp}/{spec.SHARDS_DIR}/zarr.json"):
                self._create_group(f"{tp}/{spec.SHARDS_DIR}", None)
            stored_d = self._open_group(tp).attrs.asdict().get(spec.TEACHER_ATTR)
            if stored_d is None:
                raise CacheError(f"{self.path}: {tp} has no '{spec.TEACHER_ATTR}' attribute")
            stored = TeacherRecord.from_dict(stored_d)
            diff = spec.record_differences(stored, rec)
            if diff:
                details = "; ".join(
                    f"{k}: cache has {stored.to_dict()[k]!r}, writer has {rec.to_dict()[k]!r}"
                    for k in diff
                )
                raise ValueError(
                    f"{self.path}: teacher {t!r} already exists with a different record ({details}); "
                    f"use another teacher name or another cache"
                )

    def _create_group(self, path: str, attributes: dict | None) -> None:
        import zarr

        try:
            zarr.create_group(self._zstore, path=path or None, attributes=attributes)
        except Exception:
            if not self._storage.exists(f"{path}/zarr.json" if path else "zarr.json"):
                raise  # a real failure, not a lost race

    def _scan(self) -> None:
        """Committed shards (any rank) -> committed utterance ids; drop this rank's leftovers."""
        import pyarrow.parquet as pq

        st, t = self._storage, self.record.name
        max_seq = -1
        for fname in st.listdir(f"{spec.COMMITS_DIR}/{t}"):
            if not fname.endswith(".json"):
                continue
            shard = fname[: -len(".json")]
            parsed = spec.parse_shard_name(shard)
            if parsed is None:
                continue
            table = pq.read_table(
                io.BytesIO(st.read_bytes(spec.index_path(t, shard))), columns=["utt_id"]
            )
            self._committed.update(table.column("utt_id").to_pylist())
            self._committed_shards.append(shard)
            if parsed[0] == self.rank:
                max_seq = max(max_seq, parsed[1])
        committed = set(self._committed_shards)
        # This rank's uncommitted shards: left by a killed run; delete (index first, then data).
        for shard in st.listdir(f"{spec.teacher_path(t)}/{spec.SHARDS_DIR}"):
            parsed = spec.parse_shard_name(shard)
            if parsed and parsed[0] == self.rank and shard not in committed:
                st.remove(spec.index_path(t, shard))
                st.remove(spec.shard_path(t, shard))
        for d in (f"{spec.INDEX_DIR}/{t}", f"{spec.COMMITS_DIR}/{t}"):
            for fname in st.listdir(d):
                base = fname.split(".", 1)[0]
                parsed = spec.parse_shard_name(base)
                if parsed and parsed[0] == self.rank and base not in committed:
                    st.remove(f"{d}/{fname}")
        self._next_seq = max_seq + 1

    def _open_group(self, path: str):
        # A concurrent creator may be mid-write (URLs have no lock): retry briefly.
        import time

        import zarr

        for attempt in range(20):
            try:
                return zarr.open_group(self._zstore, path=path, mode="r")
            except Exception:
                if attempt == 19:
                    raise
                time.sleep(0.05)

    @property
    def committed_utt_ids(self) -> set[str]:
        """Utterance ids committed before this writer opened, plus those it committed (read-only)."""
        return self._committed

    @property
    def committed_shards(self) -> list[str]:
        """Committed shards of this teacher (all ranks at open, plus this session's)."""
        return list(self._committed_shards)

    # ---------------------------------------------------------------- validation
    def _validate(self, u: UttTargets) -> dict[str, Any]:
        """Check one utterance and return its encoded arrays; raises ValueError naming it."""
        rec = self.record
        if not isinstance(u, UttTargets):
            raise TypeError(f"add() takes UttTargets, got {type(u).__name__}")
        uid = u.utt_id
        if not isinstance(uid, str) or not uid:
            raise ValueError(f"utterance id must be a non-empty str, got {uid!r}")

        def bad(msg: str) -> ValueError:
            return ValueError(f"utterance {uid!r} (teacher {rec.name!r}): {msg}")

        if uid in self._committed:
            raise bad("already committed in this cache (duplicate utterance id)")
        if uid in self._session:
            raise bad("already added in this session (duplicate utterance id)")
        if not isinstance(u.text, str):
            raise bad(f"text must be a str, got {type(u.text).__name__}")
        if not isinstance(u.input_hash, str) or not u.input_hash:
            raise bad("input_hash must be a non-empty str (spec.content_hash of the input)")

        k = rec.k
        ids = np.asarray(u.topk_ids)
        if ids.ndim != 2 or ids.shape[1] != k:
            raise bad(f"topk_ids must have shape [T, {k}], got {list(ids.shape)}")
        T = ids.shape[0]
        out: dict[str, Any] = {"T": T}
        if k > 0:
            if not (np.issubdtype(ids.dtype, np.integer) or (T == 0)):
                raise bad(f"topk_ids must be integers, got dtype {ids.dtype}")
            # float64 input stays float64 (one rounding to float16, not two); others -> float32.
            lp = np.asarray(u.topk_logprobs)
            lp = lp if lp.dtype == np.float64 else lp.astype(np.float32)
            if lp.shape != (T, k):
                raise bad(
                    f"topk_logprobs must have shape [{T}, {k}] like topk_ids, got {list(lp.shape)}"
                )
            tail = np.asarray(u.tail_logmass)
            tail = tail if tail.dtype == np.float64 else tail.astype(np.float32)
            if tail.shape != (T,):
                raise bad(f"tail_logmass must have shape [{T}], got {list(tail.shape)}")
            if T:
                # One cheap test per condition on the fast path; the message is worked out only
                # when a test fails. (NaN fails every comparison, so "<= 1e-3" also catches it.)
                hi = int(ids.max())
                lo = int(ids.min()) if ids.dtype.kind == "i" else 0
                if lo < 0 or hi >= rec.vocab_size:
                    raise bad(
                        f"topk_ids must be in 0..{rec.vocab_size - 1} (vocab_size), got range {lo}..{hi}"
                    )
                if k > 1:
                    srt = np.sort(ids, axis=1)
                    same = srt[:, 1:] == srt[:, :-1]
                    if same.any():
                        row = int(np.nonzero(same.any(axis=1))[0][0])
                        raise bad(f"topk_ids repeat an id within position {row}")
                for what, x in (("topk_logprobs", lp), ("tail_logmass", tail)):
                    if not (x <= 1e-3).all():
                        if np.isnan(x).any() or (x == np.inf).any():
                            raise bad(f"{what} contain NaN or +inf")
                        raise bad(f"{what} must be <= 0 (log-probabilities), max is {x.max():.4g}")
                if k > 1 and not (lp[:, :-1] >= lp[:, 1:]).all():
                    # Not sorted: sort descending and permute the ids along (stable).
                    order = np.argsort(-lp, axis=1, kind="stable")
                    lp = np.take_along_axis(lp, order, axis=1)
                    ids = np.take_along_axis(ids, order, axis=1)
                if self.check_mass:
                    with np.errstate(under="ignore"):
                        err = np.abs(np.exp(lp).sum(axis=1) + np.exp(tail) - 1.0)
                    if not (err <= MASS_TOLERANCE).all():
                        worst = int(np.argmax(err))
                        mass = float(
                            np.exp(lp[worst].astype(np.float64)).sum() + np.exp(float(tail[worst]))
                        )
                        raise bad(
                            f"probability mass at position {worst} is {mass:.4f}, not 1: topk_logprobs "
                            "must be log-softmax outputs and tail_logmass = log(1 - sum(exp(topk_logprobs)))"
                        )
            out[spec.TOPK_IDS] = ids.astype(rec.id_dtype).reshape(T, k)
            out[spec.TOPK_LOGPROBS] = spec.round_mantissa(
                np.minimum(lp, 0.0).astype(np.float16), rec.logprob_keepbits
            ).reshape(T, k)
            out[spec.TAIL_LOGMASS] = spec.round_mantissa_f32(
                np.minimum(tail, 0.0).astype(spec.TAIL_LOGMASS_DTYPE), spec.TAIL_KEEPBITS
            ).reshape(T)

        hidden = u.hidden or {}
        want = {int(x) for x in rec.hidden_layers}
        got = {int(x) for x in hidden}
        if got != want:
            raise bad(
                f"hidden layers {sorted(got)} do not match the record's hidden_layers {sorted(want)}"
            )
        for layer_key, x in hidden.items():
            layer = int(layer_key)
            D = rec.hidden_dims[str(layer)]
            x = np.asarray(x)
            if x.shape != (T, D):
                raise bad(f"hidden[{layer}] must have shape [{T}, {D}], got {list(x.shape)}")
            if T and not np.isfinite(x).all():
                raise bad(f"hidden[{layer}] contains NaN or inf")
            if rec.hidden_codec == "float16":
                if T and np.abs(x).max() > 65504:
                    raise bad(
                        f"hidden[{layer}] exceeds the float16 range (|x| > 65504); use hidden_codec='int8'"
                    )
                out[f"{spec.HIDDEN_DIR}/{layer}"] = x.astype(np.float16)
            else:
                q, scale = encode_hidden_int8(x)
                out[f"{spec.HIDDEN_DIR}/{layer}"] = q
                out[f"{spec.HIDDEN_SCALE_DIR}/{layer}"] = scale

        tok = u.token_ids
        if tok is not None:
            tok = np.asarray(tok)
            if tok.ndim != 1 or tok.shape[0] != T:
                raise bad(
                    f"token_ids must have shape [{T}] (one per position), got {list(tok.shape)}"
                )
            if T and not np.issubdtype(tok.dtype, np.integer):
                raise bad(f"token_ids must be integers, got dtype {tok.dtype}")
            if T and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
                raise bad("token_ids must be in 0..2**31-1")
            tok = tok.astype(np.int32)
        out["token_ids"] = tok
        return out

    # ---------------------------------------------------------------- adding
    def add(self, u: UttTargets) -> None:
        """Validate one utterance and buffer it; nothing is written when validation fails.

        Raises:
            ValueError: naming the utterance (bad shape, NaN/+inf, id out of range, duplicate id).
        """
        if self._closed:
            raise RuntimeError("CacheWriter is closed")
        enc = self._validate(u)
        T = enc.pop("T")
        if self._shard is None:
            self._start_shard()
        for name in self._names:
            self._buf[name].append(enc[name])
        self._rows["utt_id"].append(u.utt_id)
        self._rows["offset"].append(self._written + self._buf_n)
        self._rows["length"].append(T)
        self._rows["input_hash"].append(u.input_hash)
        self._rows["text"].append(u.text)
        tok = enc["token_ids"]
        self._rows["token_ids"].append(None if tok is None else tok.tolist())
        self._session.add(u.utt_id)
        self._buf_n += T
        if self._buf_n >= self.record.chunk_positions:
            self._flush(final=False)
        if self._written + self._buf_n >= self.shard_positions:
            self._commit()

    def _reset_shard(self) -> None:
        self._shard: str | None = None
        self._arrays: dict[str, Any] = {}
        self._names = spec.array_names(self.record)
        self._buf: dict[str, list[np.ndarray]] = {n: [] for n in self._names}
        self._buf_n = 0
        self._written = 0
        self._rows: dict[str, list] = {c: [] for c in spec.INDEX_COLUMNS}

    def _start_shard(self) -> None:
        import zarr

        rec = self.record
        shard = spec.shard_name(self.rank, self._next_seq)
        self._next_seq += 1
        sp = spec.shard_path(rec.name, shard)
        zarr.create_group(self._zstore, path=sp, overwrite=True)
        if rec.hidden_layers:
            zarr.create_group(self._zstore, path=f"{sp}/{spec.HIDDEN_DIR}")
            if rec.hidden_codec == "int8":
                zarr.create_group(self._zstore, path=f"{sp}/{spec.HIDDEN_SCALE_DIR}")
        C = rec.chunk_positions
        for name in self._names:
            row = spec.array_row_shape(rec, name)
            self._arrays[name] = zarr.create_array(
                self._zstore,
                name=f"{sp}/{name}",
                shape=(0, *row),
                chunks=(C, *row) if row else (C,),
                dtype=spec.array_dtype(rec, name),
                fill_value=0,
                config={"write_empty_chunks": True},
                dimension_names=[
                    "position",
                    "k" if name in (spec.TOPK_IDS, spec.TOPK_LOGPROBS) else "feature",
                ][: 1 + len(row)],
                **spec.array_codecs(name),
            )
        self._shard = shard

    def _flush(self, final: bool) -> None:
        """Write whole chunks (and, when final, the last partial chunk) of the buffer."""
        C = self.record.chunk_positions
        n = self._buf_n if final else (self._buf_n // C) * C
        if n == 0:
            return
        a, b = self._written, self._written + n
        for name in self._names:
            parts = self._buf[name]
            data = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr = self._arrays[name]
            arr.resize((b, *arr.shape[1:]))
            arr[a:b] = data[:n]
            rest = data[n:]
            self._buf[name] = [rest] if len(rest) else []
        self._written = b
        self._buf_n -= n

    def _commit(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._shard is None:
            return
        rec, st, shard = self.record, self._storage, self._shard
        self._flush(final=True)
        table = pa.table({c: self._rows[c] for c in spec.INDEX_COLUMNS}, schema=spec.index_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        st.write_atomic(spec.index_path(rec.name, shard), data, fsync=self.fsync)
        if self.fsync:
            st.fsync_tree(spec.shard_path(rec.name, shard))
        marker = {
            "format_version": spec.FORMAT_VERSION,
            "teacher": rec.name,
            "shard": shard,
            "utterances": len(self._rows["utt_id"]),
            "positions": self._written,
            "index_sha256": hashlib.sha256(data).hexdigest(),
            "committed_at": _now(),
            "rank": self.rank,
            "arrays": {name: list(self._arrays[name].shape) for name in self._names},
        }
        st.write_atomic(
            spec.commit_path(rec.name, shard),
            json.dumps(marker, indent=1).encode(),
            fsync=self.fsync,
        )
        self._committed.update(self._rows["utt_id"])
        self._committed_shards.append(shard)
        self._reset_shard()

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Commit the open shard (if it holds any utterance) and close the writer."""
        if self._closed:
            return
        try:
            self._commit()
        finally:
            self._closed = True

    def abort(self) -> None:
        """Close without committing the open shard; its files are removed (committed ones stay)."""
        if self._closed:
            return
        self._closed = True
        if self._shard is not None:
            try:
                self._storage.remove(spec.index_path(self.record.name, self._shard))
                self._storage.remove(spec.shard_path(self.record.name, self._shard))
            except OSError:
                pass  # resume deletes it anyway
        self._session.difference_update(self._rows["utt_id"])
        self._reset_shard()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
