"""open_cache -> KDCache: random access and streaming reads of committed shards (docs/format.md).

Reads go chunk by chunk: a whole chunk of every needed array is read and decoded at once, then
utterances are sliced out of it as views. Decoded chunks sit in a small LRU cache, so an utterance
that spans a chunk boundary, or a second teacher written in the same utterance order, costs no
second decode.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kdcache.cache_format import spec, validate
from kdcache.cache_format.spec import (
    CacheError,
    CommitMarker,
    ShardIndex,
    TeacherRecord,
    UttTargets,
)
from kdcache.cache_format.storage import open_storage
from kdcache.cache_format.validate import (  # noqa: F401 - check_marker, record_from_attrs: API
    MAX_CHUNK_BYTES,
    check_marker,
    one_line,
    record_from_attrs,
)

__all__ = [
    "open_cache",
    "CacheReader",
    "KDCache",
    "ShardIndex",
    "check_marker",
    "record_from_attrs",
]


@runtime_checkable
class CacheReader(Protocol):
    """What the student's data pipeline reads from a cache: a :class:`KDCache`, or several read
    as one (:class:`kdcache.cache_format.multi.MultiCache`).

    ``supports_stream`` says whether ``stream`` works (whole-chunk reads); a reader without it is
    read with ``get``, one utterance at a time.
    """

    path: str
    supports_stream: bool
    teachers: dict[str, TeacherRecord]  # name -> record
    shards: dict[str, list[ShardIndex]]  # name -> committed shards

    def utt_ids(self, teacher: str) -> list[str]: ...

    def get(self, utt_id: str, teacher: str, *, hidden: bool = True) -> UttTargets: ...

    def chunk_groups(self, teacher: str, **kwargs: Any) -> list[tuple[int, int]]: ...

    def stream(self, **kwargs: Any) -> Iterator[dict[str, UttTargets]]: ...


class _LRU:
    """Decoded chunks, least recently used evicted first, bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.d: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            v = self.d.get(key)
            if v is not None:
                self.d.move_to_end(key)
            return v

    def put(self, key, value):
        if value.nbytes > self.max_bytes:
            return
        with self.lock:
            old = self.d.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self.d[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, v = self.d.popitem(last=False)
                self.bytes -= v.nbytes


class _ChunkPlan:
    """What _read_chunk_sync needs to know about one array: where its chunks are, and its
    codecs (bytes little-endian -> blosc or zstd -> crc32c, the only chains the format writes)."""

    __slots__ = ("rel", "meta", "dtype", "chunk_shape", "shape", "decode", "blosc")

    def __init__(self, rel, meta, dtype, chunk_shape, shape, decode, blosc):
        self.rel, self.meta, self.dtype = rel, meta, dtype
        self.chunk_shape, self.shape, self.decode, self.blosc = chunk_shape, shape, decode, blosc


def _chunk_plan(a, rel: str) -> _ChunkPlan | None:
    """A _ChunkPlan for zarr array ``a`` at ``rel``, or None unless its codecs are exactly
    bytes(little) + (blosc | zstd) + crc32c with a regular chunk grid (then zarr reads it)."""
    chain = spec.plain_chain(a)
    if chain is None:
        return None
    import numcodecs
    from zarr.codecs import BloscCodec

    codec, dtype, chunk_shape = chain
    blosc = isinstance(codec, BloscCodec)
    decode = numcodecs.Blosc().decode if blosc else numcodecs.Zstd().decode
    return _ChunkPlan(rel, a.metadata, dtype, chunk_shape, tuple(a.shape), decode, blosc)


def _read_chunk_sync(storage, plan: _ChunkPlan, c: int) -> tuple[Any, bool]:
    """Chunk c of an array read and decoded on the calling thread, as zarr would: the bytes
    of the chunk file, the crc32c of all but its last 4 bytes checked against them, then blosc
    or zstd, then the little-endian values of one whole chunk, cut to the array's length.

    Returns (array, True); (None, False) when the chunk file is missing; (exception, True)
    when it is damaged (the caller words both, like zarr's errors).
    """
    import google_crc32c

    rows = plan.chunk_shape[0]
    key = plan.meta.encode_chunk_key((c,) + (0,) * (len(plan.chunk_shape) - 1))
    try:
        data = storage.read_bytes(f"{plan.rel}/{key}")
    except FileNotFoundError:
        return None, False
    except OSError as e:
        return e, True
    try:
        if len(data) < 4:
            raise ValueError(f"chunk file of {len(data)} bytes has no checksum")
        inner = np.frombuffer(data, np.uint8)[:-4]
        if google_crc32c.value(inner) != int.from_bytes(data[-4:], "little"):
            raise ValueError("Stored and computed checksum do not match")
        want = plan.dtype.itemsize * int(np.prod(plan.chunk_shape))
        if plan.blosc:
            # Blosc1 header (16 bytes): the decoded size is the uint32 at bytes 4..8; checked
            # before decoding (blosc itself refuses an output buffer that is too small).
            got = int.from_bytes(data[4:8], "little") if len(inner) >= 16 else -1
            if got != want:
                raise ValueError(f"blosc header claims {got} bytes, expected {want}")
            # Decoded straight into a fresh (writable) array: no copy of the chunk.
            x = plan.decode(inner, out=np.empty(plan.chunk_shape, plan.dtype))
        else:
            raw = plan.decode(inner)
            if len(raw) != want:
                raise ValueError(f"decodes to {len(raw)} bytes, expected {want}")
            x = np.frombuffer(raw, dtype=plan.dtype).reshape(plan.chunk_shape)
        n = max(0, min(rows, plan.shape[0] - c * rows))
        x = x[:n]
        return (x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))), True
    except Exception as e:  # noqa: BLE001 - handed to the caller, which names the chunk
        return e, True


class _TeacherData:
    """Arrays of one teacher: opens shard arrays lazily, decodes whole chunks through an LRU."""

    def __init__(self, cache: KDCache, record: TeacherRecord, lru_bytes: int):
        self.cache = cache
        self.record = record
        self.C = record.chunk_positions
        self.arrays: dict[tuple[str, str], Any] = {}
        self.lru = _LRU(lru_bytes)
        self._names: dict[bool, list[str]] = {}
        self.lock = threading.Lock()
        self.markers: dict[str, CommitMarker] = {}  # shard -> its validated commit marker
        self.codebooks: dict[tuple[str, str], np.ndarray] = {}  # (shard, layer) -> pq codebooks
        self.plans: dict[tuple[str, str], _ChunkPlan | None] = {}  # (shard, array) -> _plan

    def _open(self, path: str):
        """The Zarr array at ``path`` in the cache, and its full name for messages."""
        import zarr

        where = self.cache._storage.full(path)
        try:
            return zarr.open_array(self.cache._zstore, path=path, mode="r"), where
        except Exception as e:
            raise CacheError(
                f"{where}: cannot open array ({type(e).__name__}: {one_line(e)})"
            ) from None

    def codebook(self, shard: str, layer: str) -> np.ndarray:
        """float32 [M, 256, D / M] PQ codebooks of one layer of one shard (checked, cached)."""
        key = (shard, layer)
        cb = self.codebooks.get(key)
        if cb is not None:
            return cb
        path = f"{spec.shard_path(self.record.name, shard)}/{spec.PQ_CODEBOOK_DIR}/{layer}"
        a, where = self._open(path)
        probs = validate.codebook_problems(self.record, layer, a)
        if probs:
            raise CacheError(f"{where}: {probs[0]}")
        try:
            if not self.cache._storage.exists(f"{path}/c/0/0/0"):
                raise CacheError(f"{where}: chunk 0 is missing (the cache is damaged)")
            cb = np.ascontiguousarray(a[...], dtype=np.float32)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(
                f"{where}: chunk 0 is damaged or unreadable ({type(e).__name__}: {one_line(e)})"
            ) from None
        probs = validate.codebook_value_problems(cb)
        if probs:
            raise CacheError(f"{where}: {probs[0]} (the cache is damaged)")
        with self.lock:
            self.codebooks[key] = cb
        return cb

    def array(self, shard: str, name: str):
        key = (shard, name)
        a = self.arrays.get(key)
        if a is None:
            a, where = self._open(f"{spec.shard_path(self.record.name, shard)}/{name}")
            probs = validate.array_problems(self.record, self.markers[shard], name, a)
            if probs:
                raise CacheError(f"{where}: {probs[0]}")
            with self.lock:
                self.arrays[key] = a
        return a

    def chunk(self, shard: str, name: str, c: int) -> np.ndarray:
        """Decoded chunk c of one array: ids int64, top-k log-probs and tails float32, hidden as
        stored (float16, or int8 + float32 scales), or float32 decoded from PQ codes."""
        return self.chunks(shard, [name], c)[name]

    def chunks(self, shard: str, names: Sequence[str], c: int) -> dict[str, np.ndarray]:
        """Decoded chunk c of several arrays; the missing ones are read and decoded concurrently."""
        out, todo = {}, []
        for name in names:
            v = self.lru.get((shard, name, c))
            if v is None:
                todo.append(name)
            else:
                out[name] = v
        if not todo:
            return out
        # "idsort" layout: ids and log-probs decode together (rank order comes from sorting the
        # log-probs), so one of them is never read without the other.
        pair = (spec.TOPK_IDS, spec.TOPK_LOGPROBS)
        joint = self.record.topk_layout != "rank" and any(n in todo for n in pair)
        if joint:
            todo += [n for n in pair if n not in todo]
        # A residual-coded "sqrt" tail is decoded with the top-k codes of the same chunk.
        residual = self.record.tail_coding == "residual" and spec.TAIL_LOGMASS in todo
        if residual and spec.TOPK_LOGPROBS not in todo:
            todo.append(spec.TOPK_LOGPROBS)
        from zarr.core.sync import sync

        arrays = [self.array(shard, name) for name in todo]

        base = spec.shard_path(self.record.name, shard)
        store = self.cache._zstore

        async def read_all():
            import asyncio

            sel = [slice(c * self.C, min((c + 1) * self.C, a.shape[0])) for a in arrays]
            # zarr reads a missing chunk as fill values without complaint: check the keys too.
            keys = [
                f"{base}/{n}/c/{c}" + "/0" * (a.ndim - 1) for n, a in zip(todo, arrays, strict=True)
            ]
            return await asyncio.gather(
                *(a.async_array.getitem(s) for a, s in zip(arrays, sel, strict=True)),
                *(store.exists(k) for k in keys),
                return_exceptions=True,
            )

        plans = [self._plan(shard, n, a) for n, a in zip(todo, arrays, strict=True)]
        if all(p is not None for p in plans):
            # Local cache in the format's own codecs: read and decode on this thread (no trip to
            # zarr's event loop and its executor threads, each a wait for a core when the machine
            # is busy; the same numcodecs decoders and crc32c check as zarr's).
            raws, present = [], []
            for plan in plans:
                raw, ok = _read_chunk_sync(self.cache._storage, plan, c)
                raws.append(raw)
                present.append(ok)
        else:
            results = sync(read_all())
            raws, present = results[: len(todo)], results[len(todo) :]
        decoded: dict[str, np.ndarray] = {}
        for name, raw, ok in zip(todo, raws, present, strict=True):
            path = self.cache._storage.full(f"{base}/{name}")
            if isinstance(raw, BaseException):
                raise CacheError(
                    f"{path}: chunk {c} is damaged or unreadable "
                    f"({type(raw).__name__}: {one_line(raw)})"
                ) from None
            if ok is not True:
                raise CacheError(f"{path}: chunk {c} is missing (the cache is damaged)")
            raw = np.asarray(raw)
            want = min(self.C, self.markers[shard].positions - c * self.C)
            probs = validate.chunk_problems(self.record, name, raw, want)
            if probs:
                raise CacheError(f"{path}: chunk {c} {probs[0]} (the cache is damaged)")
            if residual and name in (spec.TOPK_LOGPROBS, spec.TAIL_LOGMASS):
                decoded[name] = raw  # decoded below: the tail needs the top-k codes
                continue
            if joint and name in pair:
                decoded[name] = raw  # decoded below, once both are checked
                continue
            if name == spec.TOPK_IDS:
                v = raw.astype(np.int64)
            elif name == spec.TOPK_LOGPROBS and self.record.targets == "sampled":
                v = spec.sampled_logprobs(raw, self.record.samples)  # exact log(count / N)
            elif name in (spec.TOPK_LOGPROBS, spec.TAIL_LOGMASS):
                v = spec.decode_logprobs(self.record, name, raw)  # float32
            elif self.record.hidden_codec == "pq" and name.startswith(spec.HIDDEN_DIR + "/"):
                from kdcache.cache_format.pq import decode

                v = decode(raw, self.codebook(shard, name.split("/", 1)[1]))  # float32 [n, D]
            else:
                v = raw  # hidden float16 stays float16: half the memory, no conversion pass
            self.lru.put((shard, name, c), v)
            out[name] = v
        if residual:
            codes = spec.sqrt_undelta(decoded[spec.TOPK_LOGPROBS])  # once for both arrays
            tail = spec.decode_tail_codes(self.record, decoded[spec.TAIL_LOGMASS], codes)
            probs = validate.sqrt_code_problems(self.record, tail)
            if probs:
                path = self.cache._storage.full(f"{base}/{spec.TAIL_LOGMASS}")
                raise CacheError(f"{path}: chunk {c} {probs[0]} (the cache is damaged)")
            for name, x in ((spec.TOPK_LOGPROBS, codes), (spec.TAIL_LOGMASS, tail)):
                v = spec.sqrt_logprobs(x, self.record.logprob_levels)
                self.lru.put((shard, name, c), v)
                out[name] = v
        if joint:
            ids, lp = spec.decode_topk(
                self.record, decoded[spec.TOPK_IDS], decoded[spec.TOPK_LOGPROBS]
            )
            for name, v in zip(pair, (ids, spec.to_float32(lp)), strict=True):
                self.lru.put((shard, name, c), v)
                out[name] = v
        return out

    def _plan(self, shard: str, name: str, a) -> _ChunkPlan | None:
        """How to read chunks of array ``a`` without zarr (see _read_chunk_sync), or None when
        the store is not local or the array's codecs are not exactly the format's."""
        key = (shard, name)
        if key in self.plans:
            return self.plans[key]
        plan = None
        if self.cache._storage.local:
            plan = _chunk_plan(a, f"{spec.shard_path(self.record.name, shard)}/{name}")
        with self.lock:
            self.plans[key] = plan
        return plan

    def block(
        self, shard: str, names: Sequence[str], start: int, stop: int
    ) -> dict[str, np.ndarray]:
        """Positions [start, stop) of several arrays (views when inside one chunk)."""
        C = self.C
        if stop <= start:
            return {n: self._empty(n) for n in names}
        c0, c1 = start // C, (stop - 1) // C
        parts = [self.chunks(shard, names, c) for c in range(c0, c1 + 1)]
        out = {}
        for n in names:
            if c0 == c1:
                out[n] = parts[0][n][start - c0 * C : stop - c0 * C]
            else:  # copy only the rows needed, not whole chunks
                pieces = [p[n] for p in parts]
                pieces[-1] = pieces[-1][: stop - c1 * C]
                pieces[0] = pieces[0][start - c0 * C :]
                out[n] = np.concatenate(pieces)
        return out

    def names(self, hidden: bool) -> list[str]:
        """Array names read for this teacher (hidden ones only when ``hidden``)."""
        key = bool(hidden)
        got = self._names.get(key)
        if got is None:
            got = [
                n
                for n in spec.array_names(self.record)
                if hidden or not n.startswith((spec.HIDDEN_DIR, spec.HIDDEN_SCALE_DIR))
            ]
            self._names[key] = got
        return got

    def _empty(self, name: str) -> np.ndarray:
        row = spec.array_row_shape(self.record, name)
        dt = spec.array_dtype(self.record, name)
        if name == spec.TOPK_IDS:
            dt = np.dtype(np.int64)
        elif name in (spec.TOPK_LOGPROBS, spec.TAIL_LOGMASS):
            dt = np.dtype(np.float32)
        elif self.record.hidden_codec == "pq" and name.startswith(spec.HIDDEN_DIR + "/"):
            row, dt = (self.record.hidden_dims[name.split("/", 1)[1]],), np.dtype(np.float32)
        return np.zeros((0, *row), dtype=dt)

    def utt(self, si: ShardIndex, row: int, hidden: bool, view: dict | None = None) -> UttTargets:
        """Build one utterance's targets; ``view`` maps array name -> (base_pos, decoded block)."""
        rec = self.record
        a = int(si.offsets[row])
        b = a + int(si.lengths[row])
        names = self.names(hidden)
        covered = view is not None and all(
            n in view and view[n][0] <= a and b - view[n][0] <= len(view[n][1]) for n in names
        )
        if not covered:
            # Outside the caller's decoded chunk (or no view): all arrays at once, via the LRU.
            view = {n: (a, x) for n, x in self.block(si.name, names, a, b).items()}

        def get(name):
            base, block = view[name]
            return block[a - base : b - base]

        T = b - a
        if rec.k > 0:
            ids = get(spec.TOPK_IDS)
            lp = get(spec.TOPK_LOGPROBS)
            tail = get(spec.TAIL_LOGMASS)
        else:
            ids = np.zeros((T, 0), np.int64)
            lp = np.zeros((T, 0), np.float32)
            tail = np.zeros(T, np.float32)
        hid: dict[int, np.ndarray] = {}
        if hidden:
            for layer in rec.hidden_layers:
                x = get(f"{spec.HIDDEN_DIR}/{layer}")
                if rec.hidden_codec == "int8":
                    s = get(f"{spec.HIDDEN_SCALE_DIR}/{layer}")
                    x = x.astype(np.float32) * s[:, None]
                hid[layer] = x
        return UttTargets(
            utt_id=si.utt_ids[row],
            topk_ids=ids,
            topk_logprobs=lp,
            tail_logmass=tail,
            hidden=hid,
            token_ids=si.token_ids(row),
            text=si.text[row],
            input_hash=si.input_hash[row],
        )


class KDCache:
    """A cache opened for reading. Only committed shards are visible.

    Attributes:
        path: The path or URL it was opened from.
        format_version: From the root attributes.
        root_attrs: The root ``kdcache`` record (format_version, created, builder).
        teachers: name -> TeacherRecord, sorted by name.
        shards: name -> committed ShardIndex list, sorted by shard name.
        supports_stream: True: ``stream`` reads whole chunks (see :class:`CacheReader`).
    """

    supports_stream = True

    def __init__(
        self, path: str, *, storage_options: dict | None = None, lru_bytes: int = 256 << 20
    ):
        import zarr

        self.path = str(path)
        self._storage = open_storage(self.path, read_only=True, storage_options=storage_options)
        if self._storage.local and not os.path.exists(self._storage.root):
            raise CacheError(f"{self.path}: no such cache (no such file or directory)")
        self._zstore = self._storage.zarr_store()
        try:
            root = zarr.open_group(self._zstore, mode="r")
            attrs = root.attrs.asdict().get(spec.ROOT_ATTR)
        except Exception as e:
            raise CacheError(
                f"{self._storage.full('zarr.json')}: not a cache (no readable zarr group there: "
                f"{type(e).__name__}: {one_line(e)})"
            ) from None
        probs = validate.root_problems(attrs)
        if probs:
            raise CacheError(f"{self.path}: {probs[0]}")
        self.format_version = int(attrs["format_version"])
        self.root_attrs = dict(attrs)
        self.teachers: dict[str, TeacherRecord] = {}
        self.shards: dict[str, list[ShardIndex]] = {}
        self._where: dict[str, dict[str, tuple[int, int]]] = {}
        self._data: dict[str, _TeacherData] = {}
        for name in self._storage.listdir(spec.TEACHERS_DIR):
            tp = spec.teacher_path(name)
            if not spec.NAME_RE.match(name) or not self._storage.exists(f"{tp}/zarr.json"):
                continue
            self.teachers[name] = rec = self._read_record(name)
            data = self._data[name] = _TeacherData(self, rec, lru_bytes)
            shards: list[ShardIndex] = []
            where: dict[str, tuple[int, int]] = {}
            for fname in self._storage.listdir(f"{spec.COMMITS_DIR}/{name}"):
                if not fname.endswith(".json") or spec.parse_shard_name(fname[:-5]) is None:
                    continue
                shard = fname[:-5]
                marker = self._read_marker(name, shard)
                si = self._read_index(name, shard, marker)
                data.markers[shard] = marker
                for row, u in enumerate(si.utt_ids):
                    if u in where:
                        other = shards[where[u][0]].name
                        raise CacheError(
                            f"{self.path}: utterance {u!r} of teacher {name!r} is in two shards "
                            f"({other} and {shard}); remove one (kdcache verify lists duplicates)"
                        )
                    where[u] = (len(shards), row)
                shards.append(si)
            self.shards[name] = shards
            self._where[name] = where
        # Committed shards of a teacher whose record is gone: refuse rather than silently drop
        # a teacher.
        for rel, what in validate.orphan_commits(self._storage, set(self.teachers)):
            raise CacheError(f"{self._storage.full(rel)}: {what}")

    def _read_record(self, name: str) -> TeacherRecord:
        import zarr

        tp = spec.teacher_path(name)
        where = self._storage.full(f"{tp}/zarr.json")
        try:
            d = zarr.open_group(self._zstore, path=tp, mode="r").attrs.asdict()
        except Exception as e:
            raise CacheError(
                f"{where}: bad teacher record ({type(e).__name__}: {one_line(e)})"
            ) from None
        rec, probs = validate.parse_record(d.get(spec.TEACHER_ATTR), name)
        if probs:
            raise CacheError(f"{where}: bad teacher record ({probs[0]})")
        return rec

    def _read_marker(self, teacher: str, shard: str) -> CommitMarker:
        rel = spec.commit_path(teacher, shard)
        where = self._storage.full(rel)
        try:
            d = json.loads(self._storage.read_bytes(rel))
        except Exception as e:
            raise CacheError(
                f"{where}: bad commit marker ({type(e).__name__}: {one_line(e)})"
            ) from None
        marker, probs = validate.parse_marker(d, teacher, shard)
        if probs:
            raise CacheError(f"{where}: bad commit marker ({probs[0]})")
        return marker

    def _read_index(self, teacher: str, shard: str, marker: CommitMarker) -> ShardIndex:
        rel = spec.index_path(teacher, shard)
        where = self._storage.full(rel)
        try:
            data = self._storage.read_bytes(rel)
        except OSError as e:
            raise CacheError(f"{where}: index of committed shard is missing ({e})") from None
        si, probs = validate.parse_index(data, marker, teacher, shard)
        if probs:
            raise CacheError(f"{where}: {probs[0]}")
        return si

    # ---------------------------------------------------------------- random access
    def utt_ids(self, teacher: str | None = None) -> list[str]:
        """Committed utterance ids of one teacher, or of all teachers (union), in storage order."""
        if teacher is not None:
            self._check_teacher(teacher)
            return [u for si in self.shards[teacher] for u in si.utt_ids]
        seen: dict[str, None] = {}
        for t in self.teachers:
            for si in self.shards[t]:
                seen.update(dict.fromkeys(si.utt_ids))
        return list(seen)

    def _check_teacher(self, teacher: str) -> None:
        if teacher not in self.teachers:
            raise KeyError(
                f"teacher {teacher!r} not in cache {self.path} (teachers: {sorted(self.teachers)})"
            )

    def num_positions(self, teacher: str) -> int:
        self._check_teacher(teacher)
        return sum(si.positions for si in self.shards[teacher])

    def get(self, utt_id: str, teacher: str, *, hidden: bool = True) -> UttTargets:
        """One utterance's targets from one teacher.

        Raises:
            KeyError: naming the utterance (or the teacher) when absent.
            CacheError: naming the array and chunk when a chunk is damaged.
        """
        self._check_teacher(teacher)
        w = self._where[teacher].get(utt_id)
        if w is None:
            raise KeyError(f"utterance {utt_id!r} not in teacher {teacher!r} of cache {self.path}")
        si = self.shards[teacher][w[0]]
        return self._data[teacher].utt(si, w[1], hidden)

    def __getitem__(self, utt_id: str) -> dict[str, UttTargets]:
        out = {t: self.get(utt_id, t) for t in self.teachers if utt_id in self._where[t]}
        if not out:
            raise KeyError(f"utterance {utt_id!r} not in cache {self.path}")
        return out

    def __contains__(self, utt_id: object) -> bool:
        return any(utt_id in w for w in self._where.values())

    def __len__(self) -> int:
        return len(self.utt_ids())

    def __repr__(self) -> str:
        return f"KDCache({self.path!r}, teachers={list(self.teachers)}, utterances={len(self)})"

    # ---------------------------------------------------------------- streaming
    def chunk_groups(
        self,
        teacher: str,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[tuple[int, int]]:
        """The (shard index, chunk index) groups one rank streams, in order.

        Every utterance belongs to the chunk holding its first position; chunks where no
        utterance starts form no group. The full list (sorted, then permuted with ``seed`` when
        shuffling) is cut into ``world_size`` contiguous slices; rank r takes slice r, so ranks
        are disjoint and together cover every utterance.
        """
        self._check_teacher(teacher)
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}"
            )
        C = self.teachers[teacher].chunk_positions
        groups = []
        for i, si in enumerate(self.shards[teacher]):
            # Only chunks where an utterance starts: at most one group per index row, however
            # many positions a (damaged) marker claims.
            n_chunks = max(1, -(-si.positions // C))
            starts = np.unique(np.minimum(si.offsets // C, n_chunks - 1))
            groups.extend((i, int(c)) for c in starts)
        if shuffle:
            random.Random(seed).shuffle(groups)
        n = len(groups)
        return groups[rank * n // world_size : (rank + 1) * n // world_size]

    def stream(
        self,
        teachers: Sequence[str] | None = None,
        hidden: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
        utt_ids: Sequence[str] | set[str] | None = None,
        prefetch: int = 2,
    ) -> Iterator[dict[str, UttTargets]]:
        """Iterate utterances as {teacher: UttTargets}, reading whole chunks.

        The first teacher leads: its chunks are the unit of reading, shuffling and the rank split
        (see chunk_groups). Other teachers' targets of the same utterances come through the LRU of
        decoded chunks (cheap when they were written in the same utterance order). Only utterances
        present in every requested teacher are yielded.

        Args:
            teachers: Teacher names (default: all, sorted by name).
            hidden: Read hidden-state streams too.
            shuffle: Shuffle the order of chunk groups (seeded) and, with shuffle_buffer > 0,
                utterances through a buffer of that many.
            seed: Shuffle seed; use the same seed on every rank, and a new one per epoch.
            shuffle_buffer: Size of the utterance shuffle buffer (0 = off).
            rank, world_size: This reader's share of the chunk groups.
            utt_ids: Only these utterances.
            prefetch: Decoded chunk groups queued ahead by the background thread (0 = no thread).
        """
        teachers = list(teachers) if teachers is not None else sorted(self.teachers)
        if not teachers:
            return iter(())
        for t in teachers:
            self._check_teacher(t)
        groups = self.chunk_groups(
            teachers[0], shuffle=shuffle, seed=seed, rank=rank, world_size=world_size
        )
        keep = set(utt_ids) if utt_ids is not None else None
        produce = self._group_producer(teachers, groups, hidden, keep)
        it = _prefetched(produce, prefetch) if prefetch > 0 else (x for g in produce for x in [g])
        items = (u for batch in it for u in batch)
        if shuffle and shuffle_buffer > 0:
            items = _shuffle_buffer(items, shuffle_buffer, random.Random(seed * 100003 + rank))
        return items

    def _group_producer(
        self, teachers, groups, hidden, keep
    ) -> Iterator[list[dict[str, UttTargets]]]:
        lead = teachers[0]
        data = self._data[lead]
        rec = self.teachers[lead]
        C = rec.chunk_positions
        names = data.names(hidden)
        # Utterances of each (shard, chunk): by first position (offsets are sorted, so a range of
        # rows); empty utterances at the very end of a shard belong to its last chunk.
        starts_cache: dict[int, np.ndarray] = {}
        for shard_i, c in groups:
            si = self.shards[lead][shard_i]
            if shard_i not in starts_cache:
                n_chunks = max(1, -(-si.positions // C))
                starts_cache[shard_i] = np.minimum(si.offsets // C, n_chunks - 1)
            starts = starts_cache[shard_i]
            rows = range(
                int(np.searchsorted(starts, c, "left")), int(np.searchsorted(starts, c, "right"))
            )
            if keep is not None:
                rows = [r for r in rows if si.utt_ids[r] in keep]
            if len(rows) == 0:
                continue
            # Chunk c for all arrays at once; an utterance running into chunk c+1 is assembled by
            # utt() from the LRU (chunk c+1 is then decoded once for this group and the next).
            view = {}
            if si.positions > c * C:
                view = {n: (c * C, x) for n, x in data.chunks(si.name, names, c).items()}
            if len(teachers) == 1 and view and rec.k > 0:
                # One teacher (the usual training stream): utterances are views of the decoded
                # chunk, built with the row bounds worked out for the whole group at once.
                yield self._fast_batch(data, si, rows, view, c * C, hidden)
                continue
            batch = []
            for r in rows:
                u = si.utt_ids[r]
                item = {lead: data.utt(si, int(r), hidden, view)}
                ok = True
                for t in teachers[1:]:
                    w = self._where[t].get(u)
                    if w is None:
                        ok = False
                        break
                    item[t] = self._data[t].utt(self.shards[t][w[0]], w[1], hidden)
                if ok:
                    batch.append(item)
            yield batch

    def _fast_batch(self, data, si, rows, view, base, hidden) -> list[dict[str, UttTargets]]:
        """{teacher: UttTargets} of ``rows`` of one shard (one teacher, k > 0), sliced from
        ``view`` (array name -> (base, decoded chunk)); an utterance running past the decoded
        chunk comes from data.utt (which reads the next chunk through the LRU). Same values as
        data.utt, without its per-utterance checks and dictionary lookups."""
        rec = data.record
        lead = rec.name
        ids_c = view[spec.TOPK_IDS][1]
        lp_c = view[spec.TOPK_LOGPROBS][1]
        tail_c = view[spec.TAIL_LOGMASS][1]
        n_view = min(len(ids_c), len(lp_c), len(tail_c))
        layers = []
        if hidden:
            for layer in rec.hidden_layers:
                x = view[f"{spec.HIDDEN_DIR}/{layer}"][1]
                sc = (
                    view[f"{spec.HIDDEN_SCALE_DIR}/{layer}"][1]
                    if rec.hidden_codec == "int8"
                    else None
                )
                n_view = min(n_view, len(x), len(sc) if sc is not None else len(x))
                layers.append((layer, x, sc))
        if isinstance(rows, range):
            r_idx = np.arange(rows.start, rows.stop)
        else:
            r_idx = np.asarray(rows, dtype=np.int64)
        starts = (si.offsets[r_idx] - base).tolist()
        ends = (si.offsets[r_idx] + si.lengths[r_idx] - base).tolist()
        utt_ids, texts, hashes = si.utt_ids, si.text, si.input_hash
        batch = []
        for j, r in enumerate(r_idx.tolist()):
            a, b = starts[j], ends[j]
            if b > n_view:
                batch.append({lead: data.utt(si, r, hidden, view)})
                continue
            hid = {}
            for layer, x, sc in layers:
                if sc is None:
                    hid[layer] = x[a:b]
                else:
                    hid[layer] = x[a:b].astype(np.float32) * sc[a:b, None]
            batch.append(
                {
                    lead: UttTargets(
                        utt_ids[r],
                        ids_c[a:b],
                        lp_c[a:b],
                        tail_c[a:b],
                        hid,
                        si.token_ids(r),
                        texts[r],
                        hashes[r],
                    )
                }
            )
        return batch


def _prefetched(gen: Iterator, depth: int) -> Iterator:
    """Run a generator in a background thread, ``depth`` items ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work():
        try:
            for x in gen:
                while not stop.is_set():
                    try:
                        q.put(("ok", x), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("ok", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("err", e))

    th = threading.Thread(target=work, name="kdcache-prefetch", daemon=True)
    th.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "err":
                raise x
            if x is done:
                return
            yield x
    finally:
        stop.set()
        # Unblock the worker if it waits on a full queue.
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass


def _shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


def open_cache(
    path: str | os.PathLike, *, storage_options: dict | None = None, lru_bytes: int = 256 << 20
) -> KDCache:
    """Open a cache (directory or fsspec URL) for reading.

    ``lru_bytes`` bounds the decoded chunks kept per teacher (reused by utterances that span a
    chunk boundary, by other teachers' lookups while streaming, and by repeated ``get``).

    Raises:
        CacheError: not a cache, unknown format_version, a bad teacher record or commit marker, a
            damaged or inconsistent index (sha256, schema, offsets, counts), or an utterance
            committed twice. Reads raise CacheError for damaged arrays and chunks. Any damaged
            or hostile input gives CacheError naming the file, never another exception
            (docs/format.md, "Hostile input").
    """
    return KDCache(str(path), storage_options=storage_options, lru_bytes=lru_bytes)
