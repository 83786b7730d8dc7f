"""Kaldi-compatible log-mel filterbank features, a chunked feature store and global CMVN stats.

Features: 80-dim log-mel fbank from kaldi-native-fbank with Kaldi's defaults (25 ms Povey window,
10 ms shift, pre-emphasis 0.97, DC removal, snip_edges) except ``dither=0`` so features are
deterministic. Kaldi works on 16-bit sample values, so float samples in [-1, 1] are scaled by
32768 first: the numbers equal ``compute-fbank-feats --dither=0`` on the same WAV.

Feature store (spec in docs/data.md; readable with plain zarr + pyarrow)::

    NAME/                         e.g. feats/train.fbank/
      zarr.json                   zarr v3 group; attributes["kdcache_features"] = STORE_ATTRS
      feats/                      zarr v3 array [total_frames, num_mel_bins] float16,
                                  chunks [CHUNK_FRAMES, num_mel_bins], blosc-zstd + crc32c
      index.parquet               utt_id (string), offset (int64), num_frames (int32)

All utterances lie on one flat frame axis in index order; an utterance is
``feats[offset : offset + num_frames]``. The store is written into a temporary sibling directory
and renamed into place at the end, so a killed run never leaves a half-written store at NAME.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from kdcache.cache_format.storage import fsync_tree
from kdcache.data.manifest import Utterance

__all__ = [
    "FeatureError",
    "FeatureStore",
    "OnTheFlyFeatures",
    "compute_fbank",
    "num_frames_for",
    "open_features",
    "repack_features",
    "write_features",
]

# --- the store's spec -------------------------------------------------------------------------
STORE_FORMAT = "kdcache-features"
STORE_VERSION = 1
STORE_ATTR = "kdcache_features"
FEATS_ARRAY = "feats"
INDEX_FILE = "index.parquet"
STORE_DTYPE = np.dtype("float16")
# 16384 frames = 164 s of audio, 2.6 MB of float16 before compression. Measured on the demo
# train set (docs/data.md): a zarr read costs ~2-3 ms whether the chunk holds 4096 or 16384
# frames, so larger chunks only help (sequential reads 0.24 vs 0.59 ms per utterance).
CHUNK_FRAMES = 16384

# --- fbank options (Kaldi defaults, dither off) -----------------------------------------------
SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


class FeatureError(RuntimeError):
    """A feature store that cannot be written or read; the message names the store."""


def _fbank_options(sample_rate: int, num_mel_bins: int):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = num_mel_bins
    return opts


def num_frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames Kaldi makes from ``num_samples`` (snip_edges): ``1 + (n - win) // shift``, 0 if short."""
    win = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def compute_fbank(
    samples: np.ndarray, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS
) -> np.ndarray:
    """Kaldi-compatible log-mel filterbank of one utterance.

    Args:
        samples: float ``[num_samples]`` mono waveform in [-1, 1].
        sample_rate: Rate of ``samples`` in Hz.
        num_mel_bins: Number of mel bands.

    Returns:
        float32 ``[num_frames_for(num_samples), num_mel_bins]``; ``[0, num_mel_bins]`` for audio
        shorter than one 25 ms window.
    """
    import kaldi_native_fbank as knf

    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"compute_fbank expects mono samples [T], got shape {x.shape}")
    fb = knf.OnlineFbank(_fbank_options(sample_rate, num_mel_bins))
    fb.accept_waveform(float(sample_rate), x * 32768.0)
    fb.input_finished()
    n = fb.num_frames_ready
    out = np.empty((n, num_mel_bins), dtype=np.float32)
    for i in range(n):
        out[i] = fb.get_frame(i)
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _features_of(utt: Utterance, sample_rate: int, num_mel_bins: int) -> np.ndarray:
    from kdcache.data.audio import load_audio

    return compute_fbank(load_audio(utt, sample_rate), sample_rate, num_mel_bins)


def _work(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    utt, sample_rate, num_mel_bins = args
    try:
        f = _features_of(utt, sample_rate, num_mel_bins)
    except Exception as e:  # name the utterance: a pool traceback alone does not
        raise FeatureError(f"utterance {utt.id!r} ({utt.audio}): {e}") from e
    f64 = f.astype(np.float64)
    return f.astype(STORE_DTYPE), f64.sum(axis=0), (f64 * f64).sum(axis=0)


def write_features(
    utts: Sequence[Utterance],
    out_path: str | os.PathLike,
    *,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = NUM_MEL_BINS,
    chunk_frames: int = CHUNK_FRAMES,
    keepbits: int | None = None,
) -> FeatureStore:
    """Compute fbank features of every utterance once and write them to a feature store.

    Args:
        utts: Utterances with audio; ids must be unique.
        out_path: The store directory to create (convention: ``feats/<split>.fbank``).
        workers: Processes computing features (1 computes in this process).
        progress: Show a tqdm progress bar on stderr.
        overwrite: Replace an existing store (atomically) instead of raising.
        sample_rate, num_mel_bins: Feature options, recorded in the store's attributes.
        chunk_frames: Frames per zarr chunk.
        keepbits: Keep this many of float16's 10 mantissa bits (round to nearest; None keeps
            all). 6 bits is a relative error <= 2^-7 (0.8%) on log-mel energies; the store
            shrinks to ~60% (docs/data.md). Stored values stay plain float16.

    Returns:
        The written store, opened.

    Raises:
        FeatureError: ``out_path`` exists (and not ``overwrite``), or an utterance fails (named).
    """
    utts = list(utts)
    seen: set[str] = set()
    for u in utts:
        if u.audio is None:
            raise FeatureError(f"utterance {u.id!r} has no audio")
        if u.id in seen:
            raise FeatureError(f"duplicate utterance id {u.id!r}")
        seen.add(u.id)
    import kaldi_native_fbank as knf

    results = _map([(u, sample_rate, num_mel_bins) for u in utts], workers)
    attrs = {
        "feature": "fbank",
        "num_mel_bins": num_mel_bins,
        "sample_rate": sample_rate,
        "frame_length_ms": FRAME_LENGTH_MS,
        "frame_shift_ms": FRAME_SHIFT_MS,
        "dither": 0.0,
        "snip_edges": True,
        "extractor": f"kaldi-native-fbank {getattr(knf, '__version__', '')}".strip(),
    }
    return _write_store(
        ((u.id, *r) for u, r in zip(utts, results, strict=True)), len(utts), out_path, attrs,
        progress=progress, overwrite=overwrite, chunk_frames=chunk_frames, keepbits=keepbits,
    )  # fmt: skip


def repack_features(
    src: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    keepbits: int | None = 6,
    chunk_frames: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> FeatureStore:
    """Rewrite a feature store with fewer mantissa bits (smaller on disk and in transfer).

    The utterances, their order, the CMVN statistics and the recorded feature options are kept;
    only the stored values are rounded (``keepbits``, as in :func:`write_features`) and the
    compressor changes. ``keepbits=None`` copies the values exactly.
    """
    store = open_features(src, in_memory=False)
    attrs = {k: v for k, v in store.attrs.items() if k not in _WRITER_KEYS}
    mean, std = store.mean.astype(np.float64), store.std.astype(np.float64)

    def items():
        for u in store.utt_ids:
            yield u, store[u].astype(STORE_DTYPE), None, None

    return _write_store(
        items(), len(store), out_path, attrs, progress=progress, overwrite=overwrite,
        chunk_frames=chunk_frames or int(store.attrs.get("chunk_frames", CHUNK_FRAMES)),
        keepbits=keepbits, stats=(mean, std),
    )  # fmt: skip


# Attributes that _write_store sets itself (repack_features does not copy them).
_WRITER_KEYS = frozenset(
    {"format", "format_version", "dtype", "chunk_frames", "num_utts", "num_frames", "mean",
     "std", "keepbits", "created"}
)  # fmt: skip


def _write_store(
    items: Iterable[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]],
    total_utts: int,
    out_path: str | os.PathLike,
    attrs: dict,
    *,
    progress: bool,
    overwrite: bool,
    chunk_frames: int,
    keepbits: int | None,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> FeatureStore:
    """Write ``(utt_id, float16 feats, sum, sum of squares)`` items to a store at ``out_path``.

    CMVN statistics come from the sums (computed before rounding) unless ``stats`` gives them.
    The store is built in a temporary sibling and renamed into place at the end.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

    from kdcache.cache_format.spec import round_mantissa

    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FeatureError(f"{out}: already exists (pass overwrite=True / --overwrite to replace)")
    if keepbits is not None and not 1 <= keepbits <= 10:
        raise FeatureError(f"keepbits must be in 1..10 (float16 mantissa bits), got {keepbits}")
    num_mel_bins = int(attrs["num_mel_bins"])
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # Rounded values leave runs of zero bits: bit-shuffling and a stronger zstd level find them.
    blosc = (
        BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)
        if keepbits is None
        else BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle", typesize=2)
    )

    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arr = root.create_array(
            FEATS_ARRAY,
            shape=(0, num_mel_bins),
            chunks=(chunk_frames, num_mel_bins),
            dtype=STORE_DTYPE,
            serializer=BytesCodec(endian="little"),
            compressors=[blosc, Crc32cCodec()],
            fill_value=0,
            dimension_names=("frame", "mel"),
        )
        ids, offsets, lengths = [], [], []
        total = 0
        written = 0  # frames already in the array; always a multiple of chunk_frames until the end
        pending: list[np.ndarray] = []
        pending_frames = 0
        s1 = np.zeros(num_mel_bins, np.float64)
        s2 = np.zeros(num_mel_bins, np.float64)

        def flush(final: bool) -> None:
            nonlocal written, pending, pending_frames
            if not pending_frames:
                return
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            n = len(block) if final else (len(block) // chunk_frames) * chunk_frames
            if n == 0:
                return
            arr.resize((written + n, num_mel_bins))
            arr[written : written + n] = block[:n]
            written += n
            rest = block[n:]
            pending, pending_frames = ([rest], len(rest)) if len(rest) else ([], 0)

        if progress:
            from tqdm import tqdm

            items = tqdm(items, total=total_utts, desc=f"fbank {out.name}", unit="utt")
        for utt_id, feats, a, b in items:
            ids.append(utt_id)
            offsets.append(total)
            lengths.append(len(feats))
            total += len(feats)
            if stats is None:
                s1 += a
                s2 += b
            if keepbits is not None:
                feats = round_mantissa(feats, keepbits)
            if len(feats):
                pending.append(feats)
                pending_frames += len(feats)
            if pending_frames >= chunk_frames:
                flush(final=False)
        flush(final=True)

        if stats is None:
            count = max(total, 1)
            mean = s1 / count
            std = np.sqrt(np.maximum(s2 / count - mean * mean, 1e-10))
        else:
            mean, std = stats
        index = pa.table(
            {
                "utt_id": pa.array(ids, pa.string()),
                "offset": pa.array(offsets, pa.int64()),
                "num_frames": pa.array(lengths, pa.int32()),
            }
        )
        pq.write_table(index, tmp / INDEX_FILE)
        root.attrs[STORE_ATTR] = {
            "format": STORE_FORMAT,
            "format_version": STORE_VERSION,
            **attrs,
            "dtype": STORE_DTYPE.name,
            "chunk_frames": chunk_frames,
            "num_utts": len(ids),
            "num_frames": total,
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            **({"keepbits": keepbits} if keepbits is not None else {}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        fsync_tree(str(tmp))
        if out.exists():  # overwrite: move the old one aside, then swap
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_features(out)


def _map(jobs: list, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        return map(_work, jobs)
    return _pool_map(jobs, workers)


def _pool_map(jobs: list, workers: int):
    import multiprocessing as mp

    # spawn: the parent may hold torch/zarr threads; a forked child must not inherit their locks.
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        chunksize = max(1, min(32, len(jobs) // (workers * 8)))
        # Submit a window at a time: Executor.map creates every future up front, which for
        # millions of utterances costs memory for nothing.
        window = max(4096, workers * chunksize * 16)
        for i in range(0, len(jobs), window):
            yield from ex.map(_work, jobs[i : i + window], chunksize=chunksize)
    finally:
        # On an error or Ctrl-C, do not wait for the queued rest of the job.
        ex.shutdown(wait=True, cancel_futures=True)


def _remove_stale_tmp(out: Path) -> None:
    """Remove temporary directories of killed runs (their process no longer exists)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# Reading


class FeatureStore:
    """Read access to a feature store written by :func:`write_features`.

    ``store[utt_id]`` returns float32 ``[T, num_mel_bins]``. Reads go through a small LRU cache of
    decoded chunks, so reading utterances in index order (or with :meth:`read_many`) decodes each
    chunk once. :meth:`load` reads the whole store into RAM (float16, half the size of float32);
    after that every read is a slice.

    Thread-safe for reading; in DataLoader worker processes each process has its own cache.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        in_memory: bool | str = "auto",
        cache_chunks: int = 8,
        max_memory_bytes: int = 1 << 30,
    ):
        import pyarrow.parquet as pq
        import zarr

        self._init_args = (str(path), in_memory, cache_chunks, max_memory_bytes)
        self.path = Path(path)
        try:
            root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            attrs = dict(root.attrs).get(STORE_ATTR)
            if not attrs or attrs.get("format") != STORE_FORMAT:
                raise FeatureError(
                    f"{self.path}: not a kdcache feature store (no '{STORE_ATTR}' attributes)"
                )
            if attrs.get("format_version") != STORE_VERSION:
                raise FeatureError(
                    f"{self.path}: feature store version {attrs.get('format_version')} "
                    f"is not supported (this kdcache reads {STORE_VERSION})"
                )
            self._arr = root[FEATS_ARRAY]
            table = pq.read_table(self.path / INDEX_FILE)
        except FeatureError:
            raise
        except Exception as e:
            raise FeatureError(
                f"{self.path}: cannot open feature store ({type(e).__name__}: {e})"
            ) from e
        self.attrs: dict = attrs
        self.num_mel_bins: int = int(attrs["num_mel_bins"])
        self.sample_rate: int = int(attrs["sample_rate"])
        self.frame_shift: float = float(attrs["frame_shift_ms"]) / 1000.0
        self.mean = np.asarray(attrs["mean"], dtype=np.float32)
        self.std = np.asarray(attrs["std"], dtype=np.float32)
        ids = table.column("utt_id").to_pylist()
        offs = table.column("offset").to_numpy()
        lens = table.column("num_frames").to_numpy()
        self.utt_ids: list[str] = ids
        self._where: dict[str, tuple[int, int]] = {
            u: (int(o), int(n)) for u, o, n in zip(ids, offs, lens, strict=True)
        }
        self.total_frames = int(self._arr.shape[0])
        self._chunk = int(self._arr.chunks[0])
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._lock = threading.Lock()
        self._data: np.ndarray | None = None
        nbytes = self.total_frames * self.num_mel_bins * STORE_DTYPE.itemsize
        if in_memory is True or (in_memory == "auto" and nbytes <= max_memory_bytes):
            self.load()

    # --- the mapping interface -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.utt_ids)

    def __iter__(self):
        return iter(self.utt_ids)

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._where

    def num_frames(self, utt_id: str) -> int:
        return self._locate(utt_id)[1]

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    def __getitem__(self, utt_id: str) -> np.ndarray:
        off, n = self._locate(utt_id)
        return self._read_span(off, n)

    def read_many(self, utt_ids: Iterable[str]) -> list[np.ndarray]:
        """Features of several utterances (in the order given), reading each chunk once."""
        utt_ids = list(utt_ids)
        spans = [self._locate(u) for u in utt_ids]
        if self._data is not None:
            return [self._data[o : o + n].astype(np.float32) for o, n in spans]
        # Decode each needed chunk once (through the LRU cache), in offset order.
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        out: list[np.ndarray | None] = [None] * len(spans)
        for k in order:
            out[k] = self._read_span(*spans[k])
        return out  # type: ignore[return-value]

    def load(self) -> FeatureStore:
        """Read the whole store into RAM (float16); later reads are slices."""
        if self._data is None:
            self._data = (
                np.asarray(self._arr[:])
                if self.total_frames
                else np.zeros((0, self.num_mel_bins), STORE_DTYPE)
            )
            self._cache.clear()
        return self

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        """Apply the store's global CMVN: ``(feats - mean) / std``."""
        return (feats - self.mean) / self.std

    def __getstate__(self) -> dict:
        # DataLoader workers started with spawn get a pickled store: send how to reopen it (a
        # path), not the zarr handles, the lock or the in-memory copy.
        path, in_memory, cache_chunks, max_bytes = self._init_args
        return {"args": (path, True if self.in_memory else in_memory, cache_chunks, max_bytes)}

    def __setstate__(self, state: dict) -> None:
        path, in_memory, cache_chunks, max_bytes = state["args"]
        self.__init__(
            path, in_memory=in_memory, cache_chunks=cache_chunks, max_memory_bytes=max_bytes
        )

    # --- internals -------------------------------------------------------------------------
    def _locate(self, utt_id: str) -> tuple[int, int]:
        try:
            return self._where[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in feature store {self.path}") from None

    def _read_span(self, off: int, n: int) -> np.ndarray:
        if self._data is not None:
            return self._data[off : off + n].astype(np.float32)
        if n == 0:
            return np.zeros((0, self.num_mel_bins), np.float32)
        c0, c1 = off // self._chunk, (off + n - 1) // self._chunk
        parts = []
        for c in range(c0, c1 + 1):
            chunk = self._get_chunk(c)
            lo = max(off, c * self._chunk) - c * self._chunk
            hi = min(off + n, (c + 1) * self._chunk) - c * self._chunk
            parts.append(chunk[lo:hi])
        x = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return x.astype(np.float32)

    def _get_chunk(self, c: int) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                return hit
        data = np.asarray(
            self._arr[c * self._chunk : min((c + 1) * self._chunk, self.total_frames)]
        )
        with self._lock:
            self._cache[c] = data
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return data

    def __repr__(self) -> str:
        hours = self.total_frames * self.frame_shift / 3600
        return (
            f"FeatureStore({str(self.path)!r}, utts={len(self)}, frames={self.total_frames}, "
            f"hours={hours:.2f}, in_memory={self.in_memory})"
        )


def open_features(path: str | os.PathLike, *, in_memory: bool | str = "auto") -> FeatureStore:
    """Open a feature store.

    Args:
        path: Store directory written by :func:`write_features`.
        in_memory: True loads the whole store into RAM, False never does, "auto" (default) loads
            it when its float16 data fits in 1 GiB (a demo-size train set is ~0.1 GiB).

    Raises:
        FeatureError: not a feature store, or an unsupported version.
    """
    return FeatureStore(path, in_memory=in_memory)


class OnTheFlyFeatures:
    """The :class:`FeatureStore` interface, computing features from audio on each read.

    For small sets and quick experiments: nothing is written. ``num_frames`` comes from the
    utterance duration (or the audio header), without decoding audio. ``mean``/``std`` are
    computed on first use over every utterance (pass ``stats=(mean, std)`` to skip that, e.g. the
    train store's stats when this serves a dev set).
    """

    def __init__(
        self,
        utts: Iterable[Utterance],
        *,
        sample_rate: int = SAMPLE_RATE,
        num_mel_bins: int = NUM_MEL_BINS,
        stats: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self._utts = {}
        for u in utts:
            if u.audio is None:
                raise FeatureError(f"utterance {u.id!r} has no audio")
            if u.id in self._utts:
                raise FeatureError(f"duplicate utterance id {u.id!r}")
            self._utts[u.id] = u
        self.utt_ids: list[str] = list(self._utts)
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.frame_shift = FRAME_SHIFT_MS / 1000.0
        self._stats = (
            None
            if stats is None
            else (np.asarray(stats[0], np.float32), np.asarray(stats[1], np.float32))
        )
        self._nframes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.utt_ids)

    def __iter__(self):
        return iter(self.utt_ids)

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._utts

    def _utt(self, utt_id: str) -> Utterance:
        try:
            return self._utts[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in this on-the-fly feature set") from None

    def __getitem__(self, utt_id: str) -> np.ndarray:
        f = _features_of(self._utt(utt_id), self.sample_rate, self.num_mel_bins)
        self._nframes[utt_id] = len(f)
        return f

    def read_many(self, utt_ids: Iterable[str]) -> list[np.ndarray]:
        return [self[u] for u in utt_ids]

    def num_frames(self, utt_id: str) -> int:
        if utt_id in self._nframes:
            return self._nframes[utt_id]
        u = self._utt(utt_id)
        if u.duration is not None:
            n = int(round(u.duration * self.sample_rate))
        else:
            from kdcache.data.audio import audio_info

            info = audio_info(u.audio)
            n = int(round((info.duration - u.start) * self.sample_rate))
        self._nframes[utt_id] = num_frames_for(n, self.sample_rate)
        return self._nframes[utt_id]

    def _compute_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._stats is None:
            s1 = np.zeros(self.num_mel_bins)
            s2 = np.zeros(self.num_mel_bins)
            n = 0
            for u in self.utt_ids:
                f = self[u].astype(np.float64)
                s1 += f.sum(0)
                s2 += (f * f).sum(0)
                n += len(f)
            mean = s1 / max(n, 1)
            std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 1e-10))
            self._stats = (mean.astype(np.float32), std.astype(np.float32))
        return self._stats

    @property
    def mean(self) -> np.ndarray:
        return self._compute_stats()[0]

    @property
    def std(self) -> np.ndarray:
        return self._compute_stats()[1]

    def normalize(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.mean) / self.std
