"""CacheWriter: append one teacher's targets to a cache in per-rank shards (docs/format.md).

Usage::

    with CacheWriter(path, record, rank=0) as w:
        todo = [u for u in utts if u.id not in w.committed_utt_ids]   # resume
        for u in todo:
            w.add(UttTargets(...))

Leaving the ``with`` block normally commits the open shard; leaving it with an exception does
not (the open shard's files are removed; committed shards stay). A writer is not thread-safe:
call ``add`` from one thread.

How it is fast (docs/performance/cache_io.md): ``add`` validates an utterance with a few
whole-array numpy reductions and copies it (cast to the stored dtypes) into per-array chunk
buffers; ``add_many`` does the same checks once per batch of utterances (the same results and
errors); what is cheaper per chunk (mantissa rounding) is done once per chunk; a full chunk is
rounded, compressed and written on a small pool of encode threads (``encode_threads`` chunks in
flight at most; numcodecs releases the GIL while it compresses) while ``add`` goes on with the
next one; a commit fsyncs the shard's files on several threads. On a local cache whose arrays
have the format's codec chains the pool writes the chunk files itself (_DirectChunks: zarr's own
codec objects, the same bytes and keys as zarr, no trip to zarr's event loop per chunk) and each
array's shape is set once, at commit; otherwise (URLs, other codecs) every chunk goes through
zarr, all its arrays in one trip to zarr's event loop. The bytes written are those of encoding
each utterance alone, whatever the pool size or path: every chunk goes to its own key, and an
array's shape only ever grows.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import datetime as _dt
import hashlib
import io
import os
from contextlib import nullcontext
from typing import Any

import numpy as np

from kdcache.cache_format import spec, validate
from kdcache.cache_format.spec import CacheError, TeacherRecord, UttTargets
from kdcache.cache_format.storage import open_storage

__all__ = ["CacheWriter", "UttTargets", "encode_hidden_int8"]


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


def check_out_path(path: str | os.PathLike) -> None:
    """Refuse a local output path a cache cannot be written to, before anything is created:
    an existing file, or a non-empty directory that is not a kdcache cache (URLs: no check).

    Raises:
        CacheError: naming the path and what is there.
    """
    from kdcache.cache_format.storage import is_url

    p = str(path)
    if is_url(p):
        return
    if os.path.exists(p) and not os.path.isdir(p):
        raise CacheError(f"{p}: exists and is a file, not a cache directory; choose another --out")
    if os.path.isdir(p) and not os.path.exists(os.path.join(p, "zarr.json")):
        names = os.listdir(p)
        if spec.LOCK_FILE in names:
            # A kdcache writer made it and may be creating it right now (another rank): the
            # writer's check under that lock decides, once the creation is over.
            return
        if names:
            raise CacheError(
                f"{p}: exists, is not empty and is not a kdcache cache; choose another --out"
            )


def _order_state(lp: np.ndarray) -> tuple[bool, bool]:
    """Top-k log-probs [P, k]: (every row sorted descending, every entry <= 1e-3 and not NaN).
    Sorted rows with a first column <= 1e-3 have every entry <= 1e-3 and none NaN (a NaN fails
    its comparison): two tests cover three checks."""
    P, k = lp.shape
    if k > 1:
        ordered = np.count_nonzero(lp[:, :-1] >= lp[:, 1:]) == P * (k - 1)
        return bool(ordered), bool(ordered and lp[:, 0].max() <= 1e-3)
    return True, bool(lp.max() <= 1e-3)


def _rank_order(lp: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by descending log-prob, the ids permuted along (stable: ties keep order)."""
    order = np.argsort(-lp, axis=1, kind="stable")
    return np.take_along_axis(lp, order, axis=1), np.take_along_axis(ids, order, axis=1)


class _DirectChunks:
    """Writes one array's chunks without zarr, byte for byte as zarr writes them: the chunk's
    little-endian values (the shard's last, partial chunk padded to a whole chunk with the fill
    value 0), compressed by the very numcodecs codec object zarr's own codec uses, then the
    crc32c of those bytes (4 bytes, little-endian); written to a temp file next to the chunk key
    zarr would use and renamed over it. The array's zarr.json (its shape) is left to zarr: the
    writer resizes each array once, when the shard is complete (_commit)."""

    __slots__ = ("root", "meta", "encode", "chunk_shape", "dtype", "dirs")

    def __init__(self, root, meta, encode, chunk_shape, dtype):
        self.root, self.meta, self.encode = root, meta, encode
        self.chunk_shape, self.dtype, self.dirs = chunk_shape, dtype, set()

    def write(self, c: int, x: np.ndarray) -> None:
        import uuid

        import google_crc32c

        if x.shape[0] != self.chunk_shape[0]:  # the shard's last chunk: zarr pads it with 0
            full = np.zeros(self.chunk_shape, self.dtype)
            full[: x.shape[0]] = x
            x = full
        raw = np.ascontiguousarray(x, dtype=self.dtype).reshape(-1).view(np.uint8)
        enc = self.encode(raw)
        crc = np.uint32(google_crc32c.value(enc)).astype("<u4").tobytes()
        key = self.meta.encode_chunk_key((c,) + (0,) * (len(self.chunk_shape) - 1))
        path = os.path.join(self.root, *key.split("/"))
        d = os.path.dirname(path)
        if d not in self.dirs:
            os.makedirs(d, exist_ok=True)
            self.dirs.add(d)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # (zarr's LocalStore: the same temp + rename)
        try:
            with open(tmp, "wb") as f:
                f.write(enc)
                f.write(crc)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise


def _direct_chunks(storage, a, rel: str) -> _DirectChunks | None:
    """A _DirectChunks for zarr array ``a`` at ``rel``, or None (zarr writes its chunks) unless
    the store is local and the codecs are exactly the format's bytes(little) + (blosc | zstd) +
    crc32c, with fill value 0 and a regular chunk grid (docs/format.md; the sqrt layout's LZMA
    and transpose chains, for one, go through zarr)."""
    if not getattr(storage, "local", False):
        return None
    chain = spec.plain_chain(a)
    if chain is None:
        return None
    codec, dtype, chunk_shape = chain
    try:
        # zarr's codecs hold the numcodecs object they compress with (private attributes; when
        # a zarr release renames them, zarr writes the chunks again).
        enc = getattr(codec, "_blosc_codec", None) or getattr(codec, "_zstd_codec", None)
        if enc is None or np.asarray(a.metadata.fill_value).item() != 0:
            return None
    except Exception:  # noqa: BLE001 - anything unexpected: let zarr write it
        return None
    return _DirectChunks(storage.full(rel), a.metadata, enc.encode, chunk_shape, dtype)


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
        pq_train_positions: hidden_codec "pq": positions buffered (validated, not yet written)
            before the codebooks are trained on their hidden states; then they and everything
            after are encoded. A resumed writer reuses the codebooks of its rank's last
            committed shard instead (docs/format.md, "Product-quantised hidden states").
        pq_seed: Seed of the codebooks' k-means (sub-space m uses pq_seed + m).
        pq_iterations: k-means iterations per sub-space.
        encode_threads: Chunks rounded, compressed and written concurrently (threads of the
            writer's encode pool; each holds one chunk's buffers, so memory grows by one chunk
            per thread). None: :func:`kdcache.threads.auto_encode_threads`.

    Attributes:
        direct_writes: Local caches whose arrays have exactly the format's codec chains get
            their chunk files encoded and written by the writer itself (the same bytes as
            zarr's; no trip to zarr's event loop per chunk, one shape update per array and
            shard); False: every chunk through zarr (set before the first ``add``).
    """

    direct_writes = True

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
        pq_train_positions: int | None = None,
        pq_seed: int = 0,
        pq_iterations: int | None = None,
        encode_threads: int | None = None,
    ):
        from kdcache.cache_format import pq as _pq
        from kdcache.threads import auto_encode_threads

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
        self._storage = open_storage(self.path, read_only=False, storage_options=storage_options)
        self._zstore = self._storage.zarr_store()
        self._closed = False
        self._committed: set[str] = set()
        self._session: set[str] = set()
        self._committed_shards: list[str] = []
        if encode_threads is None:
            encode_threads = auto_encode_threads()
        if int(encode_threads) < 1:
            raise ValueError(f"encode_threads must be >= 1, got {encode_threads}")
        self.encode_threads = int(encode_threads)
        # Chunk writes in flight on the encode pool, oldest first: (Future, their buffers).
        self._pending: collections.deque = collections.deque()
        self._free: list[dict[str, np.ndarray]] = []  # chunk buffers no write holds any more
        self._pool = None  # the encode pool (made on the first non-final flush)
        self._grow_lock = None  # asyncio.Lock of the shape updates (made on zarr's event loop)
        # pq codec: layer -> float32 [M, 256, D/M] once trained or loaded; until then add()
        # keeps validated utterances in _pq_wait (positions counted in _pq_wait_n).
        self._pq = record.hidden_codec == "pq" and bool(record.hidden_layers)
        self.pq_codebooks: dict[int, np.ndarray] | None = None
        self._pq_wait: list[tuple[UttTargets, dict[str, Any]]] = []
        self._pq_wait_n = 0
        self.pq_train_positions = int(
            _pq.DEFAULT_PQ_TRAIN_POSITIONS if pq_train_positions is None else pq_train_positions
        )
        if self.pq_train_positions < 0:
            raise ValueError(f"pq_train_positions must be >= 0, got {pq_train_positions}")
        self.pq_seed = int(pq_seed)
        self.pq_iterations = int(pq_iterations or _pq.DEFAULT_PQ_ITERATIONS)
        self.pq_codebooks_reused_from: str | None = None
        self._open(builder or _builder())
        self._scan()
        self._reset_shard()

    # ---------------------------------------------------------------- opening / resume
    def _open(self, builder: str) -> None:
        st, rec, t = self._storage, self.record, self.record.name
        check_out_path(self.path)  # before the lock file is made in the user's directory
        # Create-or-validate each group. Local caches hold an flock meanwhile; on URLs (no lock)
        # a rank that loses the creation race finds the group made by the winner and validates it.
        with st.lock(spec.LOCK_FILE):
            if not st.exists("zarr.json"):
                others = [x for x in st.listdir("") if x != spec.LOCK_FILE]
                # Without a lock (URLs) another rank may have created the cache between the two
                # calls above: the root zarr.json is its first write, so look for it again.
                if others and not st.exists("zarr.json"):
                    raise CacheError(
                        f"{self.path}: exists, is not empty and is not a kdcache cache"
                    )
                if not others:
                    root = {
                        "format_version": spec.FORMAT_VERSION,
                        "created": _now(),
                        "builder": builder,
                    }
                    self._create_group("", {spec.ROOT_ATTR: root})
            probs = validate.root_problems(self._open_group("").attrs.asdict().get(spec.ROOT_ATTR))
            if probs:
                raise CacheError(f"{self.path}: {probs[0]}")
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
            if diff and set(diff) <= set(spec.LAYOUT_RECORD_FIELDS):
                # An existing teacher keeps the layout it was started with (e.g. a legacy cache
                # resumed by this version): the stored record decides how its shards are written.
                layout = {key: getattr(stored, key) for key in spec.LAYOUT_RECORD_FIELDS}
                self.record = rec = dataclasses.replace(rec, **layout)
                diff = []
            if diff:
                a, b = dataclasses.asdict(stored), dataclasses.asdict(rec)
                details = "; ".join(f"{k}: cache has {a[k]!r}, writer has {b[k]!r}" for k in diff)
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
        if self._pq:
            mine = [x for x in self._committed_shards if spec.parse_shard_name(x)[0] == self.rank]
            if mine:
                self._load_codebooks(max(mine))

    def _load_codebooks(self, shard: str) -> None:
        """Resume: reuse the codebooks of this rank's last committed shard (never retrain: the
        rank's committed and new shards then share one codebook set)."""
        import zarr

        rec, cbs = self.record, {}
        for layer in rec.hidden_layers:
            rel = f"{spec.shard_path(rec.name, shard)}/{spec.PQ_CODEBOOK_DIR}/{layer}"
            try:
                x = np.asarray(zarr.open_array(self._zstore, path=rel, mode="r")[...])
            except Exception as e:
                raise CacheError(
                    f"{self._storage.full(rel)}: cannot read the PQ codebooks to resume with "
                    f"({type(e).__name__}: {validate.one_line(e)}); run kdcache verify"
                ) from None
            want = spec.pq_codebook_shape(rec, layer)
            if x.shape != want or x.dtype != spec.PQ_CODEBOOK_DTYPE or not np.isfinite(x).all():
                raise CacheError(
                    f"{self._storage.full(rel)}: PQ codebooks are not finite float32 {list(want)}"
                )
            cbs[int(layer)] = x
        self.pq_codebooks = cbs
        self.pq_codebooks_reused_from = shard

    def _train_codebooks(self) -> None:
        """Train every layer's codebooks on the waiting utterances, then add those for real."""
        from kdcache.cache_format import pq as _pq

        rec, cbs = self.record, {}
        for layer in rec.hidden_layers:
            parts = [v["hidden"][int(layer)] for _, v in self._pq_wait]
            D = rec.hidden_dims[str(layer)]
            x = np.concatenate(parts) if parts else np.zeros((0, D), np.float32)
            cbs[int(layer)] = _pq.train_codebooks(
                x, rec.pq_subspaces, seed=self.pq_seed, iterations=self.pq_iterations
            )
        self.pq_codebooks = cbs
        wait, self._pq_wait, self._pq_wait_n = self._pq_wait, [], 0
        for u, v in wait:
            self._encode_pq(v)
            self._append(u, v)

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
        """Check one utterance; raises ValueError naming it.

        Returns the checked arrays, not yet encoded (encoding -- clamping to <= 0, float16 /
        float32 casts, mantissa rounding -- happens once per chunk in _flush, element-wise, so
        the bytes are those of encoding each utterance alone): ``T``; ``ids``, ``lp``, ``tail``
        (k > 0; ids permuted along with lp when lp was not sorted); ``hidden``: layer -> array
        (float16 codec: as given; int8 codec: (q, scale)); ``token_ids`` (int array or None).

        Every check is a few whole-array numpy reductions (no per-position Python work); the
        message is worked out only when a check fails.
        """
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
            if not (ids.dtype.kind in "iu" or T == 0):
                raise bad(f"topk_ids must be integers, got dtype {ids.dtype}")
            # float64 input stays float64 (one rounding to float16, not two); others -> float32.
            lp = np.asarray(u.topk_logprobs)
            if lp.dtype != np.float64 and lp.dtype != np.float32:
                lp = lp.astype(np.float32)
            if lp.shape != (T, k):
                raise bad(
                    f"topk_logprobs must have shape [{T}, {k}] like topk_ids, got {list(lp.shape)}"
                )
            tail = np.asarray(u.tail_logmass)
            if tail.dtype != np.float64 and tail.dtype != np.float32:
                tail = tail.astype(np.float32)
            if tail.shape != (T,):
                raise bad(f"tail_logmass must have shape [{T}], got {list(tail.shape)}")
            if T:
                # One cheap test per condition on the fast path; the message is worked out only
                # when a test fails. (NaN fails every comparison, so "<= 1e-3" also catches it.)
                hi = ids.max()
                lo = ids.min() if ids.dtype.kind == "i" else 0
                if lo < 0 or hi >= rec.vocab_size:
                    raise bad(
                        f"topk_ids must be in 0..{rec.vocab_size - 1} (vocab_size), got range "
                        f"{int(lo)}..{int(hi)}"
                    )
                if k > 1:
                    srt = np.sort(ids, axis=1)
                    same = srt[:, 1:] == srt[:, :-1]
                    if np.count_nonzero(same):  # (count_nonzero: no Python-level wrapper)
                        row = int(np.nonzero(same.any(axis=1))[0][0])
                        raise bad(f"topk_ids repeat an id within position {row}")
                ordered, lp_ok = _order_state(lp)
                if not lp_ok:
                    self._check_logprobs(bad, "topk_logprobs", lp)
                if not tail.max() <= 1e-3:
                    self._check_logprobs(bad, "tail_logmass", tail)
                if not ordered:
                    lp, ids = _rank_order(lp, ids)
                if self.check_mass:
                    with np.errstate(under="ignore"):
                        err = np.abs(np.add.reduce(np.exp(lp), axis=1) + np.exp(tail) - 1.0)
                    if np.count_nonzero(err <= validate.MASS_TOLERANCE) != T:
                        worst = int(np.argmax(err))
                        mass = float(
                            np.exp(lp[worst].astype(np.float64)).sum() + np.exp(float(tail[worst]))
                        )
                        raise bad(
                            f"probability mass at position {worst} is {mass:.4f}, not 1: topk_logprobs "
                            "must be log-softmax outputs and tail_logmass = log(1 - sum(exp(topk_logprobs)))"
                        )
                if rec.targets == "sampled":
                    self._check_sampled(bad, lp, tail)
            out["ids"], out["lp"], out["tail"] = ids, lp, tail

        hidden = u.hidden or {}
        if {int(x) for x in hidden} != self._want_layers:
            got = {int(x) for x in hidden}
            raise bad(
                f"hidden layers {sorted(got)} do not match the record's hidden_layers "
                f"{sorted(self._want_layers)}"
            )
        hid: dict[int, Any] = {}
        for layer_key, x in hidden.items():
            layer = int(layer_key)
            D = rec.hidden_dims[str(layer)]
            x = np.asarray(x)
            if x.shape != (T, D):
                raise bad(f"hidden[{layer}] must have shape [{T}, {D}], got {list(x.shape)}")
            if T and D:
                if x.dtype == np.float16:
                    # Bit test (float16 reductions are slow in numpy): finite iff the exponent
                    # bits are not all ones; a finite float16 is always within +-65504.
                    if np.bitwise_and(x.view(np.uint16), 0x7FFF).max() >= 0x7C00:
                        raise bad(f"hidden[{layer}] contains NaN or inf")
                else:
                    # max/min propagate NaN, so two reductions check finiteness and the range.
                    hi, lo = x.max(), x.min()
                    if not (np.isfinite(hi) and np.isfinite(lo)):
                        raise bad(f"hidden[{layer}] contains NaN or inf")
                    if rec.hidden_codec == "float16" and (hi > 65504 or lo < -65504):
                        raise bad(
                            f"hidden[{layer}] exceeds the float16 range (|x| > 65504); "
                            "use hidden_codec='int8'"
                        )
            if rec.hidden_codec == "float16":
                hid[layer] = x
            elif rec.hidden_codec == "int8":
                hid[layer] = encode_hidden_int8(x)
            else:  # pq: encoded by add() once the codebooks exist
                hid[layer] = np.asarray(x, dtype=np.float32)
        out["hidden"] = hid

        tok = u.token_ids
        if tok is not None:
            tok = np.asarray(tok)
            if tok.ndim != 1 or tok.shape[0] != T:
                raise bad(
                    f"token_ids must have shape [{T}] (one per position), got {list(tok.shape)}"
                )
            if T and tok.dtype.kind not in "iu":
                raise bad(f"token_ids must be integers, got dtype {tok.dtype}")
            if T and (tok.min() < 0 or tok.max() > np.iinfo(np.int32).max):
                raise bad("token_ids must be in 0..2**31-1")
        out["token_ids"] = tok
        return out

    @staticmethod
    def _check_logprobs(bad, what: str, x: np.ndarray) -> None:
        """Slow path of the log-prob checks: raise naming the problem, if there is one."""
        if not (x <= 1e-3).all():
            if np.isnan(x).any() or (x == np.inf).any():
                raise bad(f"{what} contain NaN or +inf")
            raise bad(f"{what} must be <= 0 (log-probabilities), max is {x.max():.4g}")

    # ---------------------------------------------------------------- adding
    def add(self, u: UttTargets) -> None:
        """Validate one utterance and buffer it; nothing is written when validation fails.

        Raises:
            ValueError: naming the utterance (bad shape, NaN/+inf, id out of range, duplicate id).
        """
        if self._closed:
            raise RuntimeError("CacheWriter is closed")
        v = self._validate(u)
        if self._pq and self.pq_codebooks is None:
            # Codebooks are trained on the first pq_train_positions positions: hold these.
            self._session.add(u.utt_id)
            self._pq_wait.append((u, v))
            self._pq_wait_n += v["T"]
            if self._pq_wait_n >= max(self.pq_train_positions, 1):
                self._train_codebooks()
            return
        if self._pq:
            self._encode_pq(v)
        self._append(u, v)

    def add_many(self, utts) -> None:
        """``for u in utts: self.add(u)``, with the checks done once per batch.

        The same result, errors and messages as that loop: the utterances before a bad one are
        added, the bad one raises naming it, the ones after it are not added. The top-k checks
        (id range, repeated ids, order, NaN/+inf, mass, token ids) run on the batch's
        concatenated arrays (a dozen numpy calls per batch instead of per utterance); a batch
        that fails any of them, or that the batch path does not cover (hidden states, sampled
        targets, mixed dtypes), is added one utterance at a time by ``add``, which raises the
        exact error. Batches of a few hundred utterances are plenty.
        """
        if self._closed:
            raise RuntimeError("CacheWriter is closed")
        utts = list(utts)
        if not utts:
            return
        v = self._validate_batch(utts)
        if v is None:
            for u in utts:
                self.add(u)
            return
        self._append_batch(utts, *v)

    def _validate_batch(self, utts: list) -> tuple | None:
        """The checks of _validate on a whole batch at once, or None when the batch path does not
        cover it or any check fails (then add() checks one utterance at a time and raises).

        Returns (T per utterance, ids, lp, tail, token_ids per utterance): the concatenated
        arrays of the utterances with T > 0, rows sorted by descending log-prob like _validate.
        Exactness: every check is row- or element-wise, so the batch passes iff each utterance
        would; the mass check uses a tolerance 1e-6 tighter than _validate's, so that a float
        rounding difference between the two (e.g. exp of a strided view) cannot let through a
        batch that _validate would refuse.
        """
        rec = self.record
        k = rec.k
        if k < 1 or rec.targets != "topk" or self._want_layers or self._pq:
            return None
        committed, session = self._committed, self._session
        seen: set[str] = set()
        Ts: list[int] = []
        ids_l, lp_l, tail_l, toks, tok_l = [], [], [], [], []
        f32, d32, d64 = np.float32, np.dtype(np.float32), np.dtype(np.float64)
        asarray, ndarray = np.asarray, np.ndarray
        # The batch's dtypes: those of its first non-empty utterance; any other -> add() per
        # utterance (concatenating mixed dtypes would convert values). Compared by identity
        # first (numpy's dtype singletons), by value when that fails.
        idt = ldt = tdt = kdt = None
        for u in utts:
            if type(u) is not UttTargets and not isinstance(u, UttTargets):
                return None
            uid = u.utt_id
            if type(uid) is not str or not uid or uid in committed or uid in session:
                return None
            if uid in seen or type(u.text) is not str or u.hidden:
                return None
            h = u.input_hash
            if type(h) is not str or not h:
                return None
            seen.add(uid)
            ids = u.topk_ids
            if type(ids) is not ndarray:
                ids = asarray(ids)
            sh = ids.shape
            if len(sh) != 2 or sh[1] != k:
                return None
            T = sh[0]
            lp = u.topk_logprobs
            if type(lp) is not ndarray:
                lp = asarray(lp)
            dt = lp.dtype
            if dt is not d32 and dt is not d64 and dt != d32 and dt != d64:
                lp = lp.astype(f32)
            tail = u.tail_logmass
            if type(tail) is not ndarray:
                tail = asarray(tail)
            dt = tail.dtype
            if dt is not d32 and dt is not d64 and dt != d32 and dt != d64:
                tail = tail.astype(f32)
            if lp.shape != (T, k) or tail.shape != (T,):
                return None
            tok = u.token_ids
            if tok is not None:
                tok = asarray(tok)
                if tok.ndim != 1 or tok.shape[0] != T:
                    return None
                if T:
                    if kdt is None:
                        kdt = tok.dtype
                        if kdt.kind not in "iu":
                            return None
                    elif tok.dtype is not kdt and tok.dtype != kdt:
                        return None
                    tok_l.append(tok)
            toks.append(tok)
            Ts.append(T)
            if T:
                if idt is None:
                    idt, ldt, tdt = ids.dtype, lp.dtype, tail.dtype
                    if idt.kind not in "iu":
                        return None
                elif (
                    (ids.dtype is not idt and ids.dtype != idt)
                    or (lp.dtype is not ldt and lp.dtype != ldt)
                    or (tail.dtype is not tdt and tail.dtype != tdt)
                ):
                    return None
                ids_l.append(ids)
                lp_l.append(lp)
                tail_l.append(tail)
        if not ids_l:
            return Ts, None, None, None, toks
        ids = np.concatenate(ids_l)
        lp = np.concatenate(lp_l)
        tail = np.concatenate(tail_l)
        P = len(ids)
        if ids.max() >= rec.vocab_size or (ids.dtype.kind == "i" and ids.min() < 0):
            return None
        if k > 1:
            srt = np.sort(ids, axis=1)
            if np.count_nonzero(srt[:, 1:] == srt[:, :-1]):
                return None
        ordered, lp_ok = _order_state(lp)
        if not lp_ok and not (lp <= 1e-3).all():
            return None  # NaN, +inf or > 0: add() words it
        if not tail.max() <= 1e-3:
            return None
        if not ordered:  # as _validate, row by row (a sorted row keeps its order)
            lp, ids = _rank_order(lp, ids)
        if self.check_mass:
            with np.errstate(under="ignore"):
                err = np.abs(np.add.reduce(np.exp(lp), axis=1) + np.exp(tail) - 1.0)
            if np.count_nonzero(err <= validate.MASS_TOLERANCE - 1e-6) != P:
                return None
        if tok_l:
            t = np.concatenate(tok_l) if len(tok_l) > 1 else tok_l[0]
            if t.min() < 0 or t.max() > np.iinfo(np.int32).max:
                return None
        return Ts, ids, lp, tail, toks

    def _append_batch(self, utts, Ts, ids, lp, tail, toks) -> None:
        """_append for a validated batch: the rows go into the chunk buffers in runs of
        utterances, each run ending where add() would flush a chunk or commit the shard (so the
        chunks and shards are those of adding one utterance at a time)."""
        C = self.record.chunk_positions
        rows = self._rows
        n = len(utts)
        ends = np.cumsum(Ts).tolist()  # end of each utterance in the batch's arrays
        i = 0
        while i < n:
            if self._shard is None:
                self._start_shard()
            start = ends[i - 1] if i else 0
            # The first utterance after which add() would flush (buffer >= C) or commit.
            limit = min(C - self._buf_n, self.shard_positions - self._written - self._buf_n)
            j = bisect.bisect_left(ends, start + limit, i)
            j = min(j, n - 1)
            stop = ends[j]
            a, b = self._buf_n, self._buf_n + stop - start
            if b > self._cap:
                self._grow(b)
            if b > a:
                buf = self._buf
                buf[spec.TOPK_IDS][a:b] = ids[start:stop]
                np.minimum(lp[start:stop], 0.0, out=buf[spec.TOPK_LOGPROBS][a:b])
                np.minimum(tail[start:stop], 0.0, out=buf[spec.TAIL_LOGMASS][a:b])
            base = self._written + a - start
            run = utts[i : j + 1]
            rows["utt_id"].extend([u.utt_id for u in run])
            rows["offset"].extend([base + (ends[m - 1] if m else 0) for m in range(i, j + 1)])
            rows["length"].extend(Ts[i : j + 1])
            rows["input_hash"].extend([u.input_hash for u in run])
            rows["text"].extend([u.text for u in run])
            rows["token_ids"].extend([None if t is None else t.tolist() for t in toks[i : j + 1]])
            self._session.update(u.utt_id for u in run)
            self._buf_n = b
            if b >= C:
                self._flush(final=False)
            if self._written + self._buf_n >= self.shard_positions:
                self._commit()
            i = j + 1

    def _encode_pq(self, v: dict[str, Any]) -> None:
        from kdcache.cache_format import pq as _pq

        v["hidden"] = {
            layer: _pq.encode(x, self.pq_codebooks[layer]) for layer, x in v["hidden"].items()
        }

    def _append(self, u: UttTargets, v: dict[str, Any]) -> None:
        """Buffer one validated (and encoded) utterance; write and commit as due."""
        T = v["T"]
        if self._shard is None:
            self._start_shard()
        # Copy into the chunk buffers (one copy per array, casting on the way); nothing before
        # this point touched them, so a rejected utterance leaves no trace.
        a, b = self._buf_n, self._buf_n + T
        if b > self._cap:
            self._grow(b)
        buf = self._buf
        if self.record.k > 0:
            buf[spec.TOPK_IDS][a:b] = v["ids"]  # in 0..vocab_size-1 (checked): exact cast
            # Clamp in the input's precision and cast once (float64 -> float16 directly).
            np.minimum(v["lp"], 0.0, out=buf[spec.TOPK_LOGPROBS][a:b])
            np.minimum(v["tail"], 0.0, out=buf[spec.TAIL_LOGMASS][a:b])
        for layer, x in v["hidden"].items():
            if self.record.hidden_codec != "int8":
                buf[f"{spec.HIDDEN_DIR}/{layer}"][a:b] = x  # == x.astype(float16); pq codes
            else:
                buf[f"{spec.HIDDEN_DIR}/{layer}"][a:b] = x[0]
                buf[f"{spec.HIDDEN_SCALE_DIR}/{layer}"][a:b] = x[1]
        rows = self._rows
        rows["utt_id"].append(u.utt_id)
        rows["offset"].append(self._written + a)
        rows["length"].append(T)
        rows["input_hash"].append(u.input_hash)
        rows["text"].append(u.text)
        tok = v["token_ids"]
        rows["token_ids"].append(None if tok is None else tok.tolist())
        self._session.add(u.utt_id)
        self._buf_n = b
        if b >= self.record.chunk_positions:
            self._flush(final=False)
        if self._written + self._buf_n >= self.shard_positions:
            self._commit()

    def _new_buffers(self, cap: int) -> dict[str, np.ndarray]:
        rec = self.record
        return {
            name: np.empty((cap, *spec.array_row_shape(rec, name)), spec.buffer_dtype(rec, name))
            for name in self._names
        }

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._cap)
        new = self._new_buffers(cap)
        for name, x in self._buf.items():
            new[name][: self._buf_n] = x[: self._buf_n]
        self._buf, self._cap = new, cap

    def _reset_shard(self) -> None:
        self._shard: str | None = None
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, _DirectChunks] | None = None  # name -> writer (direct writes)
        self._names = spec.array_names(self.record)
        self._want_layers = {int(x) for x in self.record.hidden_layers}
        # Chunk buffers, stored dtypes; encoding that is cheaper per chunk (mantissa rounding)
        # is done in _flush. Rows [0, _buf_n) hold buffered positions.
        self._cap = self.record.chunk_positions
        self._buf: dict[str, np.ndarray] = self._new_buffers(self._cap)
        self._buf_n = 0
        self._written = 0
        self._rows: dict[str, list] = {c: [] for c in spec.INDEX_COLUMNS}

    def _start_shard(self) -> None:
        import asyncio

        import zarr
        import zarr.api.asynchronous as za
        from zarr.core.sync import sync

        rec = self.record
        shard = spec.shard_name(self.rank, self._next_seq)
        self._next_seq += 1
        sp = spec.shard_path(rec.name, shard)
        zarr.create_group(self._zstore, path=sp, overwrite=True)
        C = rec.chunk_positions

        async def create_all():
            # Subgroups first (creating an array would otherwise race to make its parent).
            groups = [spec.HIDDEN_DIR] if rec.hidden_layers else []
            if rec.hidden_layers and rec.hidden_codec == "int8":
                groups.append(spec.HIDDEN_SCALE_DIR)
            if self._pq:
                groups.append(spec.PQ_CODEBOOK_DIR)
            await asyncio.gather(
                *(za.create_group(store=self._zstore, path=f"{sp}/{g}") for g in groups)
            )
            arrays = []
            for name in self._names:
                row = spec.array_row_shape(rec, name)
                arrays.append(
                    za.create_array(
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
                        **spec.array_codecs(name, rec),
                    )
                )
            got = await asyncio.gather(*arrays)
            # Each shard carries its writer's codebooks (the same for all of a rank's shards).
            for layer in rec.hidden_layers if self._pq else ():
                cb = self.pq_codebooks[int(layer)]
                name = f"{spec.PQ_CODEBOOK_DIR}/{layer}"
                a = await za.create_array(
                    self._zstore,
                    name=f"{sp}/{name}",
                    shape=cb.shape,
                    chunks=cb.shape,
                    dtype=spec.PQ_CODEBOOK_DTYPE,
                    fill_value=0,
                    config={"write_empty_chunks": True},
                    dimension_names=["subspace", "centroid", "feature"],
                    **spec.array_codecs(name),
                )
                await a.setitem(slice(None), cb)
            return got

        # The arrays' metadata files are written concurrently (one trip to zarr's event loop);
        # self._arrays holds zarr AsyncArrays.
        self._arrays = dict(zip(self._names, sync(create_all()), strict=True))
        self._shard = shard
        if self.direct_writes:
            direct = {
                n: _direct_chunks(self._storage, a, f"{sp}/{n}") for n, a in self._arrays.items()
            }
            if all(d is not None for d in direct.values()):
                self._direct = direct

    def _check_sampled(self, bad, lp: np.ndarray, tail: np.ndarray) -> None:
        """Sampled targets: tail -inf, log-probs log(count / samples) with counts adding up to
        samples at every position (what the record promises the losses)."""
        n = self.record.samples
        if not np.isneginf(tail).all():
            row = int(np.nonzero(~np.isneginf(tail))[0][0])
            raise bad(f"sampled targets need tail_logmass -inf, got {float(tail[row])} at {row}")
        with np.errstate(under="ignore", over="ignore", invalid="ignore"):
            x = n * np.exp(lp.astype(np.float64))
        c = np.rint(x)
        off = np.abs(x - c) > 1e-3 * np.maximum(c, 1)
        if off.any() or not (c.sum(axis=1) == n).all():
            row = int(np.nonzero(off.any(axis=1) | (c.sum(axis=1) != n))[0][0])
            raise bad(
                f"sampled targets at position {row} are not log(count / {n}) with counts adding "
                f"up to samples={n}"
            )

    def _encode_chunk(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-chunk part of the encoding (element-wise, so equal to encoding per utterance)."""
        rec = self.record
        if rec.k > 0:
            lp = spec.round_logprobs(rec, data[spec.TOPK_LOGPROBS])
            data[spec.TOPK_IDS], data[spec.TOPK_LOGPROBS] = spec.encode_topk(
                rec, data[spec.TOPK_IDS], lp
            )
            tail = spec.round_tail(rec, data[spec.TAIL_LOGMASS])
            if rec.logprob_rounding == "sqrt":
                tail = spec.encode_tail(rec, tail, lp)  # lp: the rank-order codes
            data[spec.TAIL_LOGMASS] = tail
        return data

    def _write_chunk(self, a: int, b: int, data: dict[str, np.ndarray]) -> None:
        """Encode and write positions [a, b) of every array (runs on an encode-pool thread).

        Several chunks may be written at once, in any order: each goes to its own chunk key, and
        the arrays' shapes only grow (to the largest end written so far, under one lock), so no
        write can shrink an array under another. A chunk here is whole unless it is the shard's
        last, which zarr writes after all the others have finished (_flush(final=True)); direct
        writes (self._direct) write it alongside them, and set the shapes in _commit.
        """
        import asyncio

        from zarr.core.sync import sync

        data = self._encode_chunk(data)
        if self._direct is not None:
            # Chunk files written here (the same bytes as zarr's); the shapes are set in _commit.
            C = self.record.chunk_positions
            for n in self._names:
                x = data[n]
                for lo in range(0, b - a, C):
                    self._direct[n].write((a + lo) // C, x[lo : lo + C])
            return

        async def write_all():
            if self._grow_lock is None:
                self._grow_lock = asyncio.Lock()  # (all of this runs on zarr's one event loop)
            async with self._grow_lock:
                grow = [
                    self._arrays[n].resize((b, *data[n].shape[1:]))
                    for n in self._names
                    if self._arrays[n].shape[0] < b
                ]
                await asyncio.gather(*grow)
            await asyncio.gather(
                *(self._arrays[n].setitem(slice(a, b), data[n]) for n in self._names)
            )

        # One trip to zarr's event loop for all arrays: their chunks compress concurrently.
        sync(write_all())

    def _set_shapes(self) -> None:
        """Direct writes: every chunk is written; grow each array to the shard's length (its
        zarr.json written by zarr, once; all arrays in one trip to zarr's event loop)."""
        import asyncio

        from zarr.core.sync import sync

        n = self._written

        async def grow_all():
            await asyncio.gather(
                *(a.resize((n, *a.shape[1:])) for a in self._arrays.values() if a.shape[0] < n)
            )

        sync(grow_all())

    def _reap(self, keep: int) -> None:
        """Wait for the oldest writes until at most ``keep`` are in flight, and collect those
        already done; their buffers become free. Re-raises a write error here, before anything
        else is written."""
        while self._pending and (len(self._pending) > keep or self._pending[0][0].done()):
            fut, bufs = self._pending.popleft()
            try:
                fut.result()
            finally:
                self._free.append(bufs)

    def _wait_pending(self) -> None:
        """Wait for every write in flight (the first error is re-raised after all finished)."""
        err = None
        while self._pending:
            try:
                self._reap(0)
            except BaseException as e:  # noqa: BLE001 - re-raised once nothing is in flight
                err = err or e
        if err is not None:
            raise err

    def _flush(self, final: bool) -> None:
        """Write whole chunks (and, when final, the last partial chunk) of the buffer.

        A non-final flush hands the chunk to the encode pool and returns: the next chunk is
        validated while this one compresses. ``encode_threads`` writes are in flight at most (a
        flush waits for the oldest when the pool is full); a final flush (and _commit, abort)
        waits for all of them.
        """
        C = self.record.chunk_positions
        n = self._buf_n if final else (self._buf_n // C) * C
        if n == 0:
            if final:
                self._wait_pending()
            return
        a, b = self._written, self._written + n
        # zarr: the last (partial) chunk lands after every whole one, written on this thread.
        # Direct writes: it goes to the pool like the others (every chunk has its own file, and
        # the shapes are set at commit), so it compresses while the pool finishes the rest.
        synchronous = final and self._direct is None
        if synchronous:
            self._wait_pending()
        else:
            self._reap(self.encode_threads - 1)  # room for this chunk's write
        # Hand the filled buffers to the write and go on in a free set (the buffers of a
        # finished write), moving the leftover positions there: no copy of the chunk itself.
        rest = self._buf_n - n
        old = self._buf
        data = {name: x[:n] for name, x in old.items()}
        spare = None
        while self._free and spare is None:
            got = self._free.pop()
            if len(got[self._names[0]]) >= self._cap and set(got) == set(self._names):
                spare = got
        if spare is None:
            spare = self._new_buffers(self._cap)
        if rest:
            for name, x in old.items():
                spare[name][:rest] = x[n : n + rest]
        self._buf = spare
        self._written = b
        self._buf_n = rest
        if synchronous:
            try:
                self._write_chunk(a, b, data)
            finally:
                self._free.append(old)
        else:
            self._pending.append((self._io().submit(self._write_chunk, a, b, data), old))
            if final:
                self._wait_pending()

    def _io(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(
                max_workers=self.encode_threads, thread_name_prefix="kdcache-encode"
            )
        return self._pool

    def _shutdown_io(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _commit(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._shard is None:
            return
        rec, st, shard = self.record, self._storage, self._shard
        self._flush(final=True)
        if self._direct is not None:
            self._set_shapes()
        table = pa.table({c: self._rows[c] for c in spec.INDEX_COLUMNS}, schema=spec.index_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        # fsync the shard's files and directories (on several threads) while the index is
        # written; all of it finishes before the marker is written.
        sync = st.fsyncing(spec.shard_path(rec.name, shard)) if self.fsync else nullcontext()
        with sync:
            st.write_atomic(spec.index_path(rec.name, shard), data, fsync=self.fsync)
        marker = spec.CommitMarker(
            format_version=spec.FORMAT_VERSION,
            teacher=rec.name,
            shard=shard,
            utterances=len(self._rows["utt_id"]),
            positions=self._written,
            index_sha256=hashlib.sha256(data).hexdigest(),
            committed_at=_now(),
            rank=self.rank,
            arrays={name: list(self._arrays[name].shape) for name in self._names},
        )
        st.write_atomic(spec.commit_path(rec.name, shard), marker.to_json(), fsync=self.fsync)
        self._committed.update(self._rows["utt_id"])
        self._committed_shards.append(shard)
        self._reset_shard()

    # ---------------------------------------------------------------- closing
    def close(self) -> None:
        """Commit the open shard (if it holds any utterance) and close the writer."""
        if self._closed:
            return
        try:
            if self._pq_wait:  # fewer positions than pq_train_positions in all: train on them
                self._train_codebooks()
            self._commit()
        finally:
            self._closed = True
            self._shutdown_io()

    def abort(self) -> None:
        """Close without committing the open shard; its files are removed (committed ones stay)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait_pending()  # a write in flight must not land after the files are removed
        except Exception:
            pass  # the shard is being dropped anyway
        self._shutdown_io()
        if self._shard is not None:
            try:
                self._storage.remove(spec.index_path(self.record.name, self._shard))
                self._storage.remove(spec.shard_path(self.record.name, self._shard))
            except OSError:
                pass  # resume deletes it anyway
        self._session.difference_update(self._rows["utt_id"])
        self._session.difference_update(u.utt_id for u, _ in self._pq_wait)
        self._pq_wait, self._pq_wait_n = [], 0
        self._reset_shard()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
