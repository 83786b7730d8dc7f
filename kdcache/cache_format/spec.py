"""The kdcache on-disk format, version 1: every name, dtype and schema in one place.

The writer, the reader, ``verify`` and ``inspect`` all import from here, so format knowledge is
never split between them. docs/format.md describes the same thing for people and for independent
readers (plain zarr + pyarrow); keep the two in step.

Layout of a cache directory ``NAME.kdc/``::

    zarr.json                               root group; attributes["kdcache"] = root record
    teachers/<teacher>/zarr.json            group; attributes["kdcache_teacher"] = TeacherRecord
    teachers/<teacher>/shards/<shard>/      one group per writer shard (append-only)
        topk_ids          [N, k]  uint16 | uint32
        topk_logprobs     [N, k]  float16, sorted descending along k, mantissa rounded to
                                  record.logprob_keepbits bits (round_mantissa)
        tail_logmass      [N]     float32, log P(outside the top k), rounded to TAIL_KEEPBITS
        hidden/<layer>    [N, D]  float16 | int8, or [N, M] uint8 PQ codes (pq codec)
        hidden_scale/<layer> [N]  float32 (int8 codec only: value = int8 * scale)
        pq_codebooks/<layer> [M, 256, D/M] float32 (pq codec only; pq.decode)
    index/<teacher>/<shard>.parquet         one row per utterance in that shard (INDEX_SCHEMA)
    commits/<teacher>/<shard>.json          commit marker (COMMIT_KEYS); a shard exists for
                                            readers only once this file exists

N is the shard's flat position axis: the utterances of a shard concatenated in the order of its
index, like an Arrow list array. ``offset``/``length`` in the index point into it.

Shard names are ``r<rank>-<seq>`` (shard_name); codecs per array come from array_codecs().
Byte-level access (local directory or fsspec URL) is storage.py; the checks that a stored record,
marker, index or array is what this module says are validate.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Byte-level access lives in storage.py; Storage and is_url stay importable from here (the crash
# test hooks spec.Storage.write_atomic; teachers/build.py and benches used spec.is_url).
from kdcache.cache_format.storage import Storage, is_url  # noqa: F401

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CACHE_SUFFIX = ".kdc"

# Attribute keys.
ROOT_ATTR = "kdcache"
TEACHER_ATTR = "kdcache_teacher"

# Directory, file and array names.
LOCK_FILE = ".kdcache.lock"  # at the root, held by writers while they create groups; not data
TEACHERS_DIR = "teachers"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
COMMITS_DIR = "commits"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TAIL_LOGMASS = "tail_logmass"
HIDDEN_DIR = "hidden"
HIDDEN_SCALE_DIR = "hidden_scale"
PQ_CODEBOOK_DIR = "pq_codebooks"
TOPK_STREAMS = (TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGMASS)

# Chunking: positions per chunk along the flat axis. ~16k positions keeps a top-16 chunk near
# 0.5 MB before compression, large enough that a chunk read amortises its latency.
DEFAULT_CHUNK_POSITIONS = 16384
# "sqrt" teachers without hidden states: LZMA finds more repeated top-k rows in longer chunks
# (ids 20.38 -> 19.80 B/position from 16384 to 65536 positions on real SmolLM2 top-16); a chunk
# of 65536 top-16 rows is 2-4 MiB decoded. Builders use this default (default_chunk_positions).
SQRT_CHUNK_POSITIONS = 1 << 16
# A writer commits a shard and starts a new one after this many positions, bounding the work a
# killed build loses.
DEFAULT_SHARD_POSITIONS = 1 << 20

TEACHER_KINDS = ("masked_lm", "causal_lm", "lstm_lm", "ensemble", "aligned_lm")
# What the top-k streams hold (TeacherRecord.targets): "topk", the k most likely ids with their
# log-probs and the tail bin; "sampled", the distinct ids of `samples` draws from the teacher with
# log(count / samples) in the log-prob slots and tail -inf (docs/format.md, docs/losses.md).
TARGET_MODES = ("topk", "sampled")
# Record fields written only for sampled targets: a top-k record keeps exactly the keys it had
# before they existed, so older readers (which refuse unknown keys) still read top-k caches, and
# a record without them reads as top-k.
SAMPLED_RECORD_FIELDS = ("targets", "samples", "sample_seed")
# Likewise written only for hidden_codec "pq".
PQ_RECORD_FIELDS = ("pq_subspaces",)
# Fields of logprob_rounding "sqrt" records only (written only then).
SQRT_RECORD_FIELDS = ("logprob_levels", "tail_coding")
UNITS = ("tokens", "frames")
HIDDEN_CODECS = ("float16", "int8", "pq")
TOPK_LOGPROB_DTYPE = np.dtype("float16")
TAIL_LOGMASS_DTYPE = np.dtype("float32")
HIDDEN_SCALE_DTYPE = np.dtype("float32")
# Mantissa bits kept in topk_logprobs by default (of float16's 10). Chosen with bench/cache_io.py
# on SmolLM2-135M top-16 targets (docs/performance/cache_io.md): 7 bits keep the mean KL of the
# top-16 + tail distribution to its unrounded value near 6e-6 nats (mean |d logp| 0.006) and bring
# top-16 + tail to ~39 bytes/position, under the 40-byte target.
DEFAULT_LOGPROB_KEEPBITS = 7
# Layout and rounding of new top-k records (docs/format.md, "Top-k layouts"); records stored
# without these fields are "rank" + "fixed".
DEFAULT_TOPK_LAYOUT = "rank"
DEFAULT_LOGPROB_ROUNDING = "fixed"
# tail_logmass is float32 (range down to log 1e-38) rounded to 10 mantissa bits (float16
# precision): it then compresses from 3.5 to 1.8 bytes/position.
TAIL_KEEPBITS = 10

# Teacher and shard names become path components.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Parquet index columns (one row per utterance per shard). token_ids are the teacher's input
# token ids (empty for frame units); input_hash is content_hash() of the text or features the
# targets were computed from, so stale targets are detected.
INDEX_COLUMNS = ("utt_id", "offset", "length", "input_hash", "text", "token_ids")


@dataclass(frozen=True)
class CommitMarker:
    """The commit marker of one shard, ``commits/<teacher>/<shard>.json``; a shard exists for
    readers only once it exists. Fields in the order they are written.

    Attributes:
        format_version: FORMAT_VERSION of the writer.
        teacher, shard: The names its path carries.
        utterances: Rows of the shard's index part.
        positions: N, the length of every array of the shard.
        index_sha256: sha256 (hex) of the bytes of ``index/<teacher>/<shard>.parquet``.
        committed_at: ISO 8601 UTC time of the commit.
        rank: Writer rank (optional for readers).
        arrays: Array name -> shape, as written (optional for readers; checked when present).
    """

    format_version: int
    teacher: str
    shard: str
    utterances: int
    positions: int
    index_sha256: str
    committed_at: str
    rank: int | None = None
    arrays: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommitMarker:
        """From a marker's JSON object (validate.parse_marker checks it first); keys this
        version does not know are ignored."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# Keys every commit marker has (the fields of CommitMarker without a default).
COMMIT_KEYS = tuple(
    f.name
    for f in dataclasses.fields(CommitMarker)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def index_schema():
    """The pyarrow schema of an index part (imported lazily: pyarrow is heavy)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("utt_id", pa.string(), nullable=False),
            pa.field("offset", pa.int64(), nullable=False),
            pa.field("length", pa.int32(), nullable=False),
            pa.field("input_hash", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("token_ids", pa.list_(pa.int32())),
        ]
    )


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype("uint16") if vocab_size <= 1 << 16 else np.dtype("uint32")


def content_hash(data: str | bytes | np.ndarray) -> str:
    """Stable hex digest (sha256, first 16 bytes) of an utterance's input text or features."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' (max 128 chars)"
        )
    return name


@dataclass(frozen=True)
class TeacherRecord:
    """What a cache records about one teacher; stored as teacher group attributes.

    Attributes:
        name: Teacher name inside the cache (a path component), e.g. ``"bert"``.
        kind: One of TEACHER_KINDS.
        model_id: Hub id or local path the model was loaded from.
        model_hash: Content hash of the model weights.
        tokenizer_id: Hub id or path of the tokenizer ("" for frame units).
        tokenizer_hash: Content hash of the tokenizer (vocabulary and rules).
        vocab_size: Size of the teacher's output distribution.
        k: Number of stored top entries per position (min(k requested, vocab_size)); 0 for a
            hidden-state-only teacher (no top-k streams, e.g. a BERT without an MLM head).
        temperature: Temperature the log-probs were computed at.
        units: "tokens" or "frames".
        frame_shift_ms: Frame shift when units == "frames", else None.
        hidden_layers: Layer indices whose hidden states are stored (may be empty).
        hidden_dims: Feature size per stored layer, keyed by str(layer).
        hidden_codec: "float16", "int8" (int8 with a per-row float32 scale) or "pq" (uint8
            codes of ``pq_subspaces`` sub-vectors, decoded with the shard's pq_codebooks).
        logprob_keepbits: Mantissa bits kept in topk_logprobs (10 = plain float16; default
            DEFAULT_LOGPROB_KEEPBITS).
        chunk_positions: Chunk length along the flat position axis.
        options: Teacher-specific build options (e.g. masked-LM mode); JSON-serialisable.
        targets: "topk" (default) or "sampled" (TARGET_MODES). Sampled: each position's
            ``samples`` draws from the teacher at ``temperature``, stored as the distinct ids
            (most frequent first, then by id) with ``log(count / samples)``, ``-inf`` filler
            entries and tail ``-inf``; ``k = min(samples, vocab_size)``.
        samples: Draws per position (sampled only; 0 for top-k).
        sample_seed: Seed of the draws (sampled only): position p of utterance u uses the
            uniforms of :func:`sample_uniforms` (seed, u's id), so any rank or resumed build
            draws the same tokens from the same logits.
        pq_subspaces: Sub-vectors M per hidden vector (pq codec only; written only then). Every
            stored layer's D must be divisible by M.
        topk_layout: "rank" (default) or "idsort" (TOPK_LAYOUTS; docs/format.md).
        logprob_rounding: "fixed" (default), "weighted" or "sqrt" (LOGPROB_ROUNDINGS): "sqrt"
            stores integer codes ``round(sqrt(p) * logprob_levels)`` instead of float16
            log-probs, with LZMA-compressed top-k arrays (rank layout only).
        logprob_levels: Levels L of the "sqrt" grid (written only then; default
            DEFAULT_SQRT_LEVELS).
        tail_coding: How a "sqrt" record stores tail_logmass (TAIL_CODINGS; written only for
            "sqrt"): "residual" (default), the tail code minus its prediction from the top-k
            codes, or "code", the code itself (records from before "residual" existed).
    """

    name: str
    kind: str
    model_id: str
    model_hash: str
    tokenizer_id: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    temperature: float = 1.0
    units: str = "tokens"
    frame_shift_ms: float | None = None
    hidden_layers: tuple[int, ...] = ()
    hidden_dims: dict[str, int] = field(default_factory=dict)
    hidden_codec: str = "float16"
    logprob_keepbits: int = DEFAULT_LOGPROB_KEEPBITS
    chunk_positions: int = DEFAULT_CHUNK_POSITIONS
    options: dict[str, Any] = field(default_factory=dict)
    targets: str = "topk"
    samples: int = 0
    sample_seed: int = 0
    pq_subspaces: int = 0
    topk_layout: str | None = None
    logprob_rounding: str | None = None
    logprob_levels: int = 0
    tail_coding: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "teacher")
        # None: the current defaults (sampled targets: the legacy layout, which they need).
        for key, default in (
            ("topk_layout", DEFAULT_TOPK_LAYOUT),
            ("logprob_rounding", DEFAULT_LOGPROB_ROUNDING),
        ):
            if getattr(self, key) is None:
                value = LEGACY_LAYOUT[key] if self.targets == "sampled" else default
                object.__setattr__(self, key, value)
        if self.topk_layout not in TOPK_LAYOUTS:
            raise ValueError(
                f"teacher {self.name!r}: topk_layout {self.topk_layout!r} not in {TOPK_LAYOUTS}"
            )
        if self.logprob_rounding not in LOGPROB_ROUNDINGS:
            raise ValueError(
                f"teacher {self.name!r}: logprob_rounding {self.logprob_rounding!r} not in "
                f"{LOGPROB_ROUNDINGS}"
            )
        if self.targets == "sampled" and (
            self.topk_layout != "rank" or self.logprob_rounding != "fixed"
        ):
            raise ValueError(
                f"teacher {self.name!r}: sampled targets need topk_layout 'rank' and "
                "logprob_rounding 'fixed' (their counts are recovered from fixed keepbits)"
            )
        if self.logprob_rounding == "sqrt":
            if self.topk_layout != "rank":
                raise ValueError(
                    f"teacher {self.name!r}: logprob_rounding 'sqrt' needs topk_layout 'rank' "
                    "(its codes are stored as descending deltas in rank order)"
                )
            if self.logprob_levels == 0:
                object.__setattr__(self, "logprob_levels", DEFAULT_SQRT_LEVELS)
            if not 1 <= self.logprob_levels <= SQRT_MAX_LEVELS:
                raise ValueError(
                    f"teacher {self.name!r}: logprob_levels must be in 1..{SQRT_MAX_LEVELS}"
                )
            if self.tail_coding is None:
                object.__setattr__(self, "tail_coding", DEFAULT_TAIL_CODING)
            if self.tail_coding not in TAIL_CODINGS:
                raise ValueError(
                    f"teacher {self.name!r}: tail_coding {self.tail_coding!r} not in {TAIL_CODINGS}"
                )
        else:
            for key in SQRT_RECORD_FIELDS:
                if getattr(self, key):
                    raise ValueError(f"teacher {self.name!r}: {key} needs logprob_rounding 'sqrt'")
        if self.targets not in TARGET_MODES:
            raise ValueError(
                f"teacher {self.name!r}: targets {self.targets!r} not in {TARGET_MODES}"
            )
        if self.targets == "topk" and (self.samples or self.sample_seed):
            raise ValueError(f"teacher {self.name!r}: samples/sample_seed need targets 'sampled'")
        if self.targets == "sampled":
            if self.samples < 1:
                raise ValueError(f"teacher {self.name!r}: sampled targets need samples >= 1")
            if self.k != min(self.samples, self.vocab_size):
                raise ValueError(
                    f"teacher {self.name!r}: sampled targets store k = min(samples, vocab_size) "
                    f"= {min(self.samples, self.vocab_size)} entries, the record says k={self.k}"
                )
            if not 0 <= self.sample_seed < 1 << 63:
                raise ValueError(f"teacher {self.name!r}: sample_seed must be in 0..2^63-1")
            bad = sampled_count_problem(self.samples, self.logprob_keepbits)
            if bad:
                raise ValueError(f"teacher {self.name!r}: {bad}")
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher {self.name!r}: kind {self.kind!r} not in {TEACHER_KINDS}")
        if self.units not in UNITS:
            raise ValueError(f"teacher {self.name!r}: units {self.units!r} not in {UNITS}")
        if self.hidden_codec not in HIDDEN_CODECS:
            raise ValueError(
                f"teacher {self.name!r}: hidden_codec {self.hidden_codec!r} not in {HIDDEN_CODECS}"
            )
        if self.hidden_codec == "pq":
            for layer, dim in self.hidden_dims.items():
                why = _pq_problem(int(dim), self.pq_subspaces)
                if why:
                    raise ValueError(f"teacher {self.name!r}: layer {layer}: {why}")
        elif self.pq_subspaces:
            raise ValueError(f"teacher {self.name!r}: pq_subspaces needs hidden_codec 'pq'")
        if self.vocab_size < 1:
            raise ValueError(f"teacher {self.name!r}: vocab_size must be >= 1")
        if not 0 <= self.k <= self.vocab_size:
            raise ValueError(
                f"teacher {self.name!r}: k={self.k} must be in 0..vocab_size ({self.vocab_size})"
            )
        if self.k == 0 and not self.hidden_layers:
            raise ValueError(
                f"teacher {self.name!r}: k=0 stores nothing unless hidden_layers is set"
            )
        if not self.temperature > 0:
            raise ValueError(f"teacher {self.name!r}: temperature must be > 0")
        if not 1 <= self.logprob_keepbits <= 10:
            raise ValueError(f"teacher {self.name!r}: logprob_keepbits must be in 1..10")
        if self.chunk_positions < 1:
            raise ValueError(f"teacher {self.name!r}: chunk_positions must be >= 1")
        object.__setattr__(self, "hidden_layers", tuple(int(x) for x in self.hidden_layers))
        dims = {str(k): int(v) for k, v in self.hidden_dims.items()}
        if set(dims) != {str(x) for x in self.hidden_layers}:
            raise ValueError(
                f"teacher {self.name!r}: hidden_dims keys {sorted(dims)} must match "
                f"hidden_layers {list(self.hidden_layers)}"
            )
        object.__setattr__(self, "hidden_dims", dims)

    @property
    def id_dtype(self) -> np.dtype:
        return id_dtype(self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        if self.targets == "topk":  # the keys of a top-k record as before sampled targets
            for key in SAMPLED_RECORD_FIELDS:
                del d[key]
        if self.hidden_codec != "pq":  # likewise: pq_subspaces only in pq records
            del d["pq_subspaces"]
        for key in LAYOUT_RECORD_FIELDS:  # likewise: absent = the legacy layout
            if d[key] == LEGACY_LAYOUT[key]:
                del d[key]
        if self.logprob_rounding != "sqrt":  # likewise: logprob_levels only in sqrt records
            for key in SQRT_RECORD_FIELDS:
                del d[key]
        return d

    @property
    def sampled(self) -> bool:
        return self.targets == "sampled"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"teacher record has unknown keys {sorted(unknown)}")
        # A stored record without the layout fields was written in the legacy layout; a "sqrt"
        # record without tail_coding stored the tail's code.
        if d.get("logprob_rounding") == "sqrt":
            d = {"tail_coding": "code", **d}
        return cls(**{**LEGACY_LAYOUT, **d})


def _pq_problem(dim: int, m: int) -> str | None:
    from kdcache.cache_format.pq import check_subspaces

    return check_subspaces(dim, m)


# Mantissa bits and the unsigned integer types (same width, and twice as wide for the carry) of
# the float dtypes round_mantissa handles.
_FLOAT_BITS = {
    np.dtype(np.float16): (10, np.uint16, np.uint32),
    np.dtype(np.float32): (23, np.uint32, np.uint64),
}


def round_mantissa(x: np.ndarray, keepbits: int, dtype: Any = np.float16) -> np.ndarray:
    """Round float16 (or float32) values to ``keepbits`` mantissa bits (of 10, or of 23): round
    to nearest on the magnitude bits, ties away from zero.

    Zeroed low bits compress far better; the result is still a plain float of that dtype, so
    readers need no decoder. keepbits >= 10 (23) returns the input unchanged. Values that would
    round up to infinity (the carry reaches the exponent) are kept as they were.
    """
    dtype = np.dtype(dtype)
    mbits, uint, wide = _FLOAT_BITS[dtype]
    x = np.asarray(x, dtype=dtype)
    if keepbits >= mbits:
        return x
    drop = mbits - keepbits
    bits = x.view(uint).astype(wide)
    finite = np.isfinite(x)
    half = wide(1 << (drop - 1))
    mask = wide((np.iinfo(uint).max >> drop) << drop)
    rounded = ((bits + half) & mask).astype(uint)
    out = np.where(finite, rounded, bits.astype(uint)).view(dtype)
    return np.where(np.isfinite(out) | ~finite, out, x)


def round_mantissa_f32(x: np.ndarray, keepbits: int) -> np.ndarray:
    """round_mantissa for float32 (used for tail_logmass with TAIL_KEEPBITS)."""
    return round_mantissa(x, keepbits, np.float32)


# --------------------------------------------------------------------------------------------
# Weighted rounding (TeacherRecord.logprob_rounding == "weighted", docs/format.md)

# KL(p || stored) ~ 1/2 sum_j p_j dl_j^2 for small errors dl_j of the log-probs l_j: the same KL
# allows a larger error where p_j = e^l_j is small. Fixed keepbits give every value the relative
# error 2^-(keepbits+1), i.e. an absolute error growing only like |l|. "Weighted" rounding drops
# one more mantissa bit per 2 ln 2 of |l|, so the absolute step grows like e^(|l|/2) = 1/sqrt(p)
# (every entry then adds about the same KL, the cheapest allocation), and keeps the absolute
# step from shrinking with |l| near l = 0.
# Bits kept for a value x (float16 log-prob or float32 tail):
#     kb(x) = clip(keepbits + E(x) - floor(|x| / (2 ln 2)), WEIGHTED_MIN_KEEPBITS, mantissa bits)
# with E(x) the unbiased binary exponent of x as stored (floor(log2|x|); subnormals count as the
# smallest normal exponent). keepbits is the record's logprob_keepbits: the bits kept at
# |x| in [1, 1.386). The result is a plain float of the same dtype: readers need no decoder.
WEIGHTED_MIN_KEEPBITS = 2
TWO_LN2 = 1.3862943611198906  # 2 ln 2, the |x| step per bit fewer
LOGPROB_ROUNDINGS = ("fixed", "weighted", "sqrt")
_EXP_BITS = {np.dtype(np.float16): (10, 0x1F, 15), np.dtype(np.float32): (23, 0xFF, 127)}


def weighted_keepbits(x: np.ndarray, keepbits: int, dtype: Any = np.float16) -> np.ndarray:
    """kb(x) of weighted rounding (int64, same shape); x as stored (float16 or float32)."""
    dtype = np.dtype(dtype)
    mbits, emask, bias = _EXP_BITS[dtype]
    x = np.asarray(x, dtype=dtype)
    bits = x.view(_FLOAT_BITS[dtype][1]).astype(np.int64)
    e = np.maximum((bits >> mbits) & emask, 1) - bias
    a = np.abs(x.astype(np.float64))
    f = np.floor(np.where(np.isfinite(a), a, 0.0) / TWO_LN2).astype(np.int64)
    return np.clip(keepbits + e - f, WEIGHTED_MIN_KEEPBITS, mbits)


def round_weighted(x: np.ndarray, keepbits: int, dtype: Any = np.float16) -> np.ndarray:
    """Weighted rounding: each value rounded (to nearest, ties away from zero, on the bit pattern
    as round_mantissa) to weighted_keepbits(x) mantissa bits; non-finite values, and values that
    would round to infinity, unchanged. Works on float16 and float32."""
    dtype = np.dtype(dtype)
    mbits, uint, wide = _FLOAT_BITS[dtype]
    x = np.asarray(x, dtype=dtype)
    drop = (mbits - weighted_keepbits(x, keepbits, dtype)).astype(wide)
    bits = x.view(uint).astype(wide)
    one = wide(1)
    half = np.where(drop > 0, one << np.maximum(drop, one) - one, wide(0)).astype(wide)
    mask = (wide(np.iinfo(uint).max) >> drop) << drop
    rounded = ((bits + half) & mask).astype(uint).view(dtype)
    finite = np.isfinite(x)
    return np.where(finite & np.isfinite(rounded), rounded, x)


# --------------------------------------------------------------------------------------------
# Square-root codes (TeacherRecord.logprob_rounding == "sqrt", docs/format.md)
#
# KL(p || q) ~ sum_j (q_j - p_j)^2 / (2 p_j) = 2 sum_j (sqrt(q_j) - sqrt(p_j))^2: on the
# sqrt(p) axis every error costs the same KL wherever it is, so a uniform grid there (step 1/L)
# is the KL-optimal scalar quantiser (each of the k + 1 values adds ~ 2 (1/L)^2 / 12 of KL; the
# measured mean on real SmolLM2 top-16 is ~9e-6 nats at L = 544). Code c = round(sqrt(p) L) in
# 0..L, with c >= 1 for every p > 0 (a code 0 would make KL(p || q) infinite) and c = 0 only for
# p = 0 (log-prob -inf). Decoded log-prob: 2 ln(c / L). Small codes are frequent, and the codes of
# a rank-ordered row are non-increasing: stored as descending deltas, entropy-coded with LZMA.
DEFAULT_SQRT_LEVELS = 544
SQRT_MAX_LEVELS = 65535  # codes are uint16
SQRT_CODE_DTYPE = np.dtype("uint16")


def sqrt_codes(x: np.ndarray, levels: int) -> np.ndarray:
    """Log-probs (any float dtype, <= 0) -> uint16 codes ``clip(rint(exp(x / 2) * L), 1, L)``,
    0 for -inf."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(under="ignore"):
        c = np.clip(np.rint(np.exp(x / 2) * levels), 1, levels)
    return np.where(np.isneginf(x), 0, c).astype(SQRT_CODE_DTYPE)


def sqrt_logprobs(c: np.ndarray, levels: int) -> np.ndarray:
    """Codes -> float32 log-probs ``2 ln(c / L)`` (-inf for 0)."""
    c = np.asarray(c, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return (2 * np.log(c / levels)).astype(np.float32)


def sqrt_undelta(d: np.ndarray) -> np.ndarray:
    """Stored topk_logprobs of the sqrt rounding [P, k] (d[:, 0] = c_0, d[:, j] = c_(j-1) - c_j)
    -> the codes c [P, k] (int64; a negative code means damaged data)."""
    c = np.empty(d.shape, dtype=np.int64)
    if d.shape[1]:
        c[:, 0] = d[:, 0]
        c[:, 1:] = d[:, :1].astype(np.int64) - np.cumsum(d[:, 1:], axis=1, dtype=np.int64)
    return c


# How a "sqrt" record stores the tail (TeacherRecord.tail_coding). The top-k codes nearly fix the
# tail: p_tail = 1 - sum_j (c_j / L)^2, so its code is predicted as
# rint(sqrt(max(L^2 - sum_j c_j^2, 0))) -- integer arithmetic up to one correctly rounded float64
# sqrt of an integer < 2^53, whose value is never a tie for rint, so every reader gets the same
# prediction -- and "residual" stores the zigzag of (code - prediction) wrapped to 16 bits:
# 1.15 -> 0.32 B/position on the real SmolLM2 top-16 (docs/performance/cache_io.md).
TAIL_CODINGS = ("residual", "code")
DEFAULT_TAIL_CODING = "residual"


def sqrt_tail_prediction(codes: np.ndarray, levels: int) -> np.ndarray:
    """Top-k codes [P, k] (rank order, int) -> the predicted tail code [P] (int64)."""
    c = np.asarray(codes, dtype=np.int64)
    rest = np.maximum(levels * levels - (c * c).sum(axis=1), 0)
    return np.rint(np.sqrt(rest.astype(np.float64))).astype(np.int64)


def encode_tail(record: TeacherRecord, tail_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Tail codes [P] and the top-k codes [P, k] of the same positions -> tail_logmass as stored
    (record.tail_coding "residual": zigzag(wrap16(code - prediction)), uint16)."""
    if record.tail_coding != "residual":
        return tail_codes
    r = tail_codes.astype(np.int64) - sqrt_tail_prediction(codes, record.logprob_levels)
    r = (r + 0x8000) % 0x10000 - 0x8000  # wrap to int16: exact, since codes are 16-bit
    return np.where(r >= 0, 2 * r, -2 * r - 1).astype(SQRT_CODE_DTYPE)


def decode_tail_codes(record: TeacherRecord, stored: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Stored tail_logmass [P] of a "sqrt" record and its top-k codes [P, k] (sqrt_undelta) ->
    the tail codes [P] (int64; outside 0..L means damaged data)."""
    z = stored.astype(np.int64)
    if record.tail_coding != "residual":
        return z
    r = np.where(z & 1, -(z >> 1) - 1, z >> 1)
    return (sqrt_tail_prediction(codes, record.logprob_levels) + r) % 0x10000


# Below this many values numpy's float16 -> float32 cast is as fast as a detour through torch.
_WIDEN_VIA_TORCH_MIN = 4096


def to_float32(x: np.ndarray) -> np.ndarray:
    """``x.astype(float32)``, the same values bit for bit (every float16 is exact in float32).
    numpy casts float16 element by element (~28 ns/value: 457 us for a 16384 x 16 chunk, a fifth
    of the streaming time); torch's cast is vectorised (~42 us). Used only when torch is
    already imported (training is), so reading a cache never pays torch's import."""
    if x.dtype == np.float16 and x.size >= _WIDEN_VIA_TORCH_MIN:
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "from_numpy"):
            x = np.ascontiguousarray(x)
            if x.flags.writeable:  # torch warns about (and cannot share) read-only buffers
                return torch.from_numpy(x).float().numpy()
    return x.astype(np.float32)


def decode_logprobs(record: TeacherRecord, name: str, raw: np.ndarray) -> np.ndarray:
    """Stored topk_logprobs [P, k] or tail_logmass [P] (rank layout, not sampled) -> float32
    log-probs as the reader returns them. (A "sqrt" tail with tail_coding "residual" is decoded
    with the top-k codes of the same positions instead: decode_tail_codes.)"""
    if record.logprob_rounding != "sqrt":
        return to_float32(raw)
    if name == TAIL_LOGMASS and record.tail_coding == "residual":
        raise ValueError("a residual-coded sqrt tail needs the top-k codes: decode_tail_codes")
    codes = sqrt_undelta(raw) if name == TOPK_LOGPROBS else raw
    return sqrt_logprobs(codes, record.logprob_levels)


def round_logprobs(record: TeacherRecord, lp: np.ndarray) -> np.ndarray:
    """Stored form of float16 top-k log-probs [P, k] under the record's rounding. Weighted
    rounding can swap two neighbours near a change of kb; a running minimum along k keeps
    each row descending (a value moved up to its predecessor's stored value). "sqrt": the codes
    in rank order (uint16, non-increasing along k; encode_topk stores their deltas)."""
    if record.logprob_rounding == "sqrt":
        return sqrt_codes(lp, record.logprob_levels)
    if record.logprob_rounding == "weighted":
        out = round_weighted(lp, record.logprob_keepbits)
        return np.minimum.accumulate(out, axis=1) if out.ndim == 2 and out.size else out
    return round_mantissa(lp, record.logprob_keepbits)


def round_tail(record: TeacherRecord, tail: np.ndarray) -> np.ndarray:
    """Stored form of float32 tail log-masses [P] under the record's rounding (fixed:
    TAIL_KEEPBITS; weighted: the weighted rule with the record's keepbits, as a log-prob)."""
    if record.logprob_rounding == "sqrt":
        return sqrt_codes(tail, record.logprob_levels)
    if record.logprob_rounding == "weighted":
        return round_weighted(tail, record.logprob_keepbits, np.float32)
    return round_mantissa_f32(tail, TAIL_KEEPBITS)


# --------------------------------------------------------------------------------------------
# Top-k layouts (TeacherRecord.topk_layout, docs/format.md)
#
# "rank": topk_ids / topk_logprobs in rank order (log-probs descending), ids as they are.
# "idsort": each position's entries sorted by id (ascending); topk_ids holds the gaps
#   g[:, 0] = id_0, g[:, j] = id_j - id_(j-1) (>= 1: ids are distinct), topk_logprobs the log-prob
#   of each id in that order. Rank order is recovered by sorting the log-probs descending (ties by
#   ascending id: decode_topk). Ids in ascending order are cheaper to store than in rank order (the
#   rank order, ~log2(k!) bits a position, is carried by the log-probs, which compress about as
#   well in either order).
TOPK_LAYOUTS = ("rank", "idsort")
# Fields written only when they differ from the legacy value ("rank", "fixed"): a legacy record
# keeps exactly its keys, so readers older than these fields still read legacy caches and refuse
# (unknown record keys) the teachers stored otherwise.
LAYOUT_RECORD_FIELDS = ("topk_layout", "logprob_rounding")
LEGACY_LAYOUT = {"topk_layout": "rank", "logprob_rounding": "fixed"}


def encode_topk(
    record: TeacherRecord, ids: np.ndarray, lp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-order ids [P, k] (stored dtype) and stored (rounded) log-probs [P, k] -> the arrays
    as stored under the record's layout ("sqrt" rounding: the codes' descending deltas)."""
    if record.logprob_rounding == "sqrt" and lp.ndim == 2 and lp.shape[1]:
        d = np.empty_like(lp)
        d[:, :1] = lp[:, :1]
        np.subtract(lp[:, :-1], lp[:, 1:], out=d[:, 1:])
        return ids, d
    if record.topk_layout == "rank" or ids.shape[1] == 0:
        return ids, lp
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, axis=1)
    gaps = np.empty_like(s)
    gaps[:, :1] = s[:, :1]
    np.subtract(s[:, 1:], s[:, :-1], out=gaps[:, 1:])
    return gaps, np.take_along_axis(lp, order, axis=1)


def decode_topk(
    record: TeacherRecord, ids: np.ndarray, lp: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Stored arrays [P, k] -> rank-order ids (int64) and log-probs (as stored, descending; ties
    by ascending id for "idsort")."""
    if record.topk_layout == "rank" or ids.shape[1] == 0:
        return ids.astype(np.int64), lp
    s = np.cumsum(ids, axis=1, dtype=np.int64)
    order = np.argsort(-lp, axis=1, kind="stable")
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(lp, order, axis=1)


# --------------------------------------------------------------------------------------------
# Sampled targets (TeacherRecord.targets == "sampled")


def sampled_counts(logprobs: np.ndarray, samples: int) -> np.ndarray:
    """Counts ``round(samples * exp(l))`` of stored sampled log-probs (int64; 0 for -inf
    fillers). Exact whenever sampled_count_problem(samples, keepbits) is None."""
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        c = np.rint(samples * np.exp(np.asarray(logprobs, dtype=np.float64)))
    return np.where(np.isfinite(c), c, 0).astype(np.int64)


def sampled_logprobs(logprobs: np.ndarray, samples: int) -> np.ndarray:
    """Stored (rounded float16) sampled log-probs -> the exact ``log(count / samples)`` in
    float32 (what the reader returns: the stored rounding would bias the estimator slightly)."""
    c = sampled_counts(logprobs, samples)
    with np.errstate(divide="ignore"):
        return np.log(c / samples).astype(np.float32)


def sampled_count_problem(samples: int, keepbits: int) -> str | None:
    """Why ``log(c / samples)`` stored as float16 with ``keepbits`` mantissa bits would not give
    back every count c in 1..samples (None when it does). Round-to-nearest moves log(c/N) by up
    to |log(c/N)| 2^-(keepbits+1), i.e. the count by about c log(N/c) 2^-(keepbits+1) <= N/e
    2^-(keepbits+1), which must stay below 1/2: N <= ~348 at 7 bits, ~2780 at 10."""
    if samples < 1:
        return f"samples {samples} must be >= 1"
    c = np.arange(1, samples + 1)
    with np.errstate(divide="ignore"):
        stored = round_mantissa(np.log(c / samples).astype(np.float16), keepbits)
    back = sampled_counts(stored, samples)
    bad = np.nonzero(back != c)[0]
    if len(bad):
        return (
            f"samples={samples} counts do not survive float16 log-probs at logprob_keepbits="
            f"{keepbits} (count {int(c[bad[0]])} reads back as {int(back[bad[0]])}): use "
            f"fewer samples or more keepbits (10 holds up to ~2780 samples)"
        )
    return None


def sample_uniforms(seed: int, utt_id: str, positions: int, samples: int) -> np.ndarray:
    """The ``[positions, samples]`` uniforms in [0, 1) of one utterance's sampled targets:
    Philox keyed by sha256(seed, utt_id), row p for position p. Depends on nothing else (not the
    rank, batch or order), so every build of the same utterance draws alike."""
    h = hashlib.sha256(f"{int(seed)}\0{utt_id}".encode()).digest()
    key = [int.from_bytes(h[i : i + 8], "little") for i in (0, 8)]
    rng = np.random.Generator(np.random.Philox(key=key))
    return rng.random((positions, samples))


# --------------------------------------------------------------------------------------------
# Additions (issue 2): errors, shard names, paths, codecs. Everything below is shared by writer,
# reader, verify and inspect.
# --------------------------------------------------------------------------------------------


class CacheError(Exception):
    """A cache cannot be opened or read: the message names the path, array, chunk or shard."""


# Shard names carry the writer rank so that concurrent ranks never touch each other's shards:
# ``r<rank:05d>-<seq:06d>``; seq counts up per rank across resumed runs.
SHARD_RE = re.compile(r"^r(\d{5})-(\d{6})$")


def default_chunk_positions(logprob_rounding: str | None, hidden_layers=()) -> int:
    """The builders' chunk length: SQRT_CHUNK_POSITIONS for a "sqrt" teacher that stores no
    hidden states (their chunks would be 75 MB at D = 576), else DEFAULT_CHUNK_POSITIONS."""
    if logprob_rounding == "sqrt" and not tuple(hidden_layers):
        return SQRT_CHUNK_POSITIONS
    return DEFAULT_CHUNK_POSITIONS


def shard_name(rank: int, seq: int) -> str:
    return f"r{rank:05d}-{seq:06d}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, seq) of a shard name, or None when the name is not a shard name."""
    m = SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


# Relative paths (always '/'-separated, relative to the cache root).
def teacher_path(teacher: str) -> str:
    return f"{TEACHERS_DIR}/{teacher}"


def shard_path(teacher: str, shard: str) -> str:
    return f"{TEACHERS_DIR}/{teacher}/{SHARDS_DIR}/{shard}"


def index_path(teacher: str, shard: str) -> str:
    return f"{INDEX_DIR}/{teacher}/{shard}.parquet"


def commit_path(teacher: str, shard: str) -> str:
    return f"{COMMITS_DIR}/{teacher}/{shard}.json"


def array_names(record: TeacherRecord) -> list[str]:
    """Array paths inside a shard group, in a fixed order."""
    names = list(TOPK_STREAMS) if record.k > 0 else []
    for layer in record.hidden_layers:
        names.append(f"{HIDDEN_DIR}/{layer}")
        if record.hidden_codec == "int8":
            names.append(f"{HIDDEN_SCALE_DIR}/{layer}")
    return names


def buffer_dtype(record: TeacherRecord, name: str) -> np.dtype:
    """dtype of a writer's chunk buffer: the stored dtype, except the float16 log-probs and
    float32 tail that "sqrt" rounding turns into codes per chunk."""
    if record.logprob_rounding == "sqrt" and name == TOPK_LOGPROBS:
        return TOPK_LOGPROB_DTYPE
    if record.logprob_rounding == "sqrt" and name == TAIL_LOGMASS:
        return TAIL_LOGMASS_DTYPE
    return array_dtype(record, name)


def array_dtype(record: TeacherRecord, name: str) -> np.dtype:
    if name in (TOPK_LOGPROBS, TAIL_LOGMASS) and record.logprob_rounding == "sqrt":
        return SQRT_CODE_DTYPE
    if name == TOPK_IDS:
        return record.id_dtype
    if name == TOPK_LOGPROBS:
        return TOPK_LOGPROB_DTYPE
    if name == TAIL_LOGMASS:
        return TAIL_LOGMASS_DTYPE
    if name.startswith(HIDDEN_SCALE_DIR + "/"):
        return HIDDEN_SCALE_DTYPE
    if name.startswith(HIDDEN_DIR + "/"):
        return np.dtype(HIDDEN_STORED_DTYPES[record.hidden_codec])
    raise KeyError(name)


HIDDEN_STORED_DTYPES = {"float16": "float16", "int8": "int8", "pq": "uint8"}
PQ_CODEBOOK_DTYPE = np.dtype("float32")


def array_row_shape(record: TeacherRecord, name: str) -> tuple[int, ...]:
    """Shape of one position of an array (empty tuple for 1-d arrays)."""
    if name in (TOPK_IDS, TOPK_LOGPROBS):
        return (record.k,)
    if name.startswith(HIDDEN_DIR + "/"):
        if record.hidden_codec == "pq":
            return (record.pq_subspaces,)
        return (record.hidden_dims[name.split("/", 1)[1]],)
    return ()


def pq_codebook_names(record: TeacherRecord) -> list[str]:
    """Codebook arrays inside a shard group (pq codec only): ``pq_codebooks/<layer>``. They are
    not position arrays: shape pq_codebook_shape, one chunk."""
    if record.hidden_codec != "pq":
        return []
    return [f"{PQ_CODEBOOK_DIR}/{layer}" for layer in record.hidden_layers]


def pq_codebook_shape(record: TeacherRecord, layer: int | str) -> tuple[int, int, int]:
    """[M, 256, D / M] of one layer's codebooks."""
    m = record.pq_subspaces
    return (m, 256, record.hidden_dims[str(layer)] // m)


# Codecs. Only codecs from the Zarr v3 core spec (bytes, zstd, blosc, crc32c), so any v3 reader
# decodes a cache -- except the top-k arrays of a "sqrt" teacher, which use numcodecs' LZMA
# (zarr-python reads it: numcodecs is a zarr dependency). The choice per stream comes from
# bench/cache_io.py (docs/performance/cache_io.md).
ZSTD_LEVEL = 3
# Raw LZMA2 stream, preset 9, with 2-byte alignment hints (lp=1, pb=1: the arrays are uint16):
# 1.5% smaller than the .xz defaults on real ids; no container header, no check (crc32c follows).
# A 4 MiB dictionary (preset 9's is 64 MiB) holds a whole chunk (16384 x 64 uint32 ids) and gives
# the same bytes for chunks that fit, at ~40 MiB of encoder memory instead of ~670 MiB and ~40%
# less encode CPU; presets 6..9 give identical bytes here, presets 1..3 5-12% more.
LZMA_FILTERS = (  # 33 = lzma.FILTER_LZMA2
    {"id": 33, "preset": 9, "dict_size": 1 << 22, "lc": 3, "lp": 1, "pb": 1},
)
LZMA_FORMAT_RAW = 3  # lzma.FORMAT_RAW


# zarr warns whenever it builds a numcodecs codec (here: reading or writing a "sqrt" teacher's
# top-k arrays); docs/format.md documents the one non-core codec, so the warning is noise.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


def lzma_codec():
    """numcodecs' LZMA as a zarr v3 codec ("numcodecs.lzma"), configured as LZMA_FILTERS."""
    try:
        from zarr.codecs.numcodecs import LZMA
    except ImportError:  # zarr < 3.1
        from numcodecs.zarr3 import LZMA
    return LZMA(format=LZMA_FORMAT_RAW, filters=[dict(f) for f in LZMA_FILTERS])


def plain_chain(a) -> tuple[Any, np.dtype, tuple[int, ...]] | None:
    """For a zarr array whose codec chain is exactly the format's plain one (bytes little-endian
    -> blosc or zstd -> crc32c) on a regular chunk grid: (its zarr BloscCodec / ZstdCodec, the
    little-endian dtype, the chunk shape); else None. The reader's direct chunk reads and the
    writer's direct chunk writes handle these arrays themselves and leave others to zarr."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

        codecs = list(a.metadata.codecs)
        if len(codecs) != 3 or not isinstance(codecs[0], BytesCodec):
            return None
        if not isinstance(codecs[1], (BloscCodec, ZstdCodec)):
            return None
        if not isinstance(codecs[2], Crc32cCodec):
            return None
        dtype = np.dtype(a.dtype)
        endian = getattr(codecs[0].endian, "value", codecs[0].endian)
        if dtype.itemsize > 1 and endian != "little":
            return None
        chunk_shape = tuple(int(x) for x in a.chunks)
        if len(chunk_shape) != len(a.shape) or min(chunk_shape, default=1) < 1:
            return None
        return codecs[1], dtype.newbyteorder("<"), chunk_shape
    except Exception:  # noqa: BLE001 - anything unexpected: zarr handles the array
        return None


def shuffle_codec():
    """numcodecs' byte Shuffle for uint16 ("numcodecs.shuffle", elementsize 2): all low bytes,
    then all high bytes (the high bytes of "sqrt" code deltas and residual tails are nearly all
    zero)."""
    try:
        from zarr.codecs.numcodecs import Shuffle
    except ImportError:  # zarr < 3.1
        from numcodecs.zarr3 import Shuffle
    return Shuffle(elementsize=2)


def array_codecs(name: str, record: TeacherRecord | None = None) -> dict[str, Any]:
    """Keyword arguments for ``zarr.create_array`` (serializer + compressors [+ filters]) of one
    array.

    Every array ends in a crc32c codec: a damaged chunk fails to decode instead of reading as
    wrong numbers.
    """
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

    if record is not None and record.logprob_rounding == "sqrt" and name in TOPK_STREAMS:
        # Entropy coding (LZMA's range coder) instead of zstd/blosc: ids in rank order 24.2 ->
        # 20.4 B/position on real SmolLM2 top-16. The code deltas are stored column-major
        # (transpose codec, zarr core): one column's deltas have one distribution.
        out: dict[str, Any] = {
            "serializer": BytesCodec(endian="little"),
            "compressors": [lzma_codec(), Crc32cCodec()],
        }
        if name == TOPK_LOGPROBS and record.tail_coding == "residual":
            # Records with the residual tail also byte-shuffle the code deltas (9.93 -> 9.57)
            out["compressors"].insert(0, shuffle_codec())
        if name == TAIL_LOGMASS and record.tail_coding == "residual":
            # and store the residual tail byte-shuffled with zstd-19 (0.27 B/position; LZMA
            # 0.32, the tail's code itself 1.19).
            out["compressors"] = [shuffle_codec(), ZstdCodec(level=19), Crc32cCodec()]
        if name == TOPK_LOGPROBS:
            out["filters"] = [TransposeCodec(order=(1, 0))]
        return out
    if name.startswith(PQ_CODEBOOK_DIR + "/"):
        # float32 centroids, one chunk per layer; like hidden states they barely compress.
        comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    elif name in (TOPK_LOGPROBS, TAIL_LOGMASS) or name.startswith(HIDDEN_SCALE_DIR + "/"):
        # Byte shuffle groups the sign/exponent bytes of the floats; the zeroed low mantissa bits
        # (keepbits) then compress to almost nothing.
        comp = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    elif name.startswith(HIDDEN_DIR + "/"):
        # Hidden states barely compress (2-15%); lz4 decodes at >3M positions/s for D=576 where
        # zstd-5 takes 2.5x longer to decode and 9x longer to encode for 13% fewer bytes.
        comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    else:
        # Token ids: near-random 16-bit values; zstd-3 is within 7% of zstd-19 at 10x the speed.
        comp = ZstdCodec(level=ZSTD_LEVEL)
    return {"serializer": BytesCodec(endian="little"), "compressors": [comp, Crc32cCodec()]}


# Record fields that may differ between a writer's record and the stored one: where the model
# was loaded from is not part of its identity when the content hashes agree.
HARMLESS_RECORD_FIELDS = ("model_id", "tokenizer_id")


def record_differences(stored: TeacherRecord, new: TeacherRecord) -> list[str]:
    """Names of fields (other than HARMLESS_RECORD_FIELDS) whose values differ."""
    a, b = dataclasses.asdict(stored), dataclasses.asdict(new)
    return [k for k in a if k not in HARMLESS_RECORD_FIELDS and a[k] != b[k]]


@dataclass
class UttTargets:
    """One utterance's targets from one teacher (what the writer takes and the reader returns).

    Attributes:
        utt_id: Utterance id (the key; never the order).
        topk_ids: [T, k] integer ids, sorted by descending log-prob (reader: int64).
        topk_logprobs: [T, k] log-probs at the build temperature, descending along k
            (reader: float32 widened from the stored float16).
        tail_logmass: [T] log P(outside the top k); -inf when the top k hold everything
            (reader: float32; zeros, i.e. log 1, for a k == 0 teacher).
        hidden: layer -> [T, D_layer] (reader: float16 as stored for the float16 codec, float32
            dequantised for int8, float32 decoded for pq).
        token_ids: [T] teacher input token ids, or None for frame units (reader: int32 or None).
        text: Normalised transcript the targets were computed from.
        input_hash: content_hash() of the text or features.
    """

    utt_id: str
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    hidden: dict[int, np.ndarray] = field(default_factory=dict)
    token_ids: np.ndarray | None = None
    text: str = ""
    input_hash: str = ""

    @property
    def num_positions(self) -> int:
        return int(np.shape(self.topk_ids)[0])


@dataclass
class ShardIndex:
    """One committed shard of one teacher, as read: its marker and its index columns as arrays
    (validate.parse_index builds it from checked bytes)."""

    teacher: str
    name: str
    marker: dict[str, Any]  # the commit marker (CommitMarker.to_dict())
    utt_ids: list[str]
    offsets: np.ndarray  # [U] int64
    lengths: np.ndarray  # [U] int64
    input_hash: list[str]
    text: list[str]
    token_values: np.ndarray  # flat int32 values of the token_ids list column
    token_offsets: np.ndarray  # [U + 1] int64 into token_values
    token_valid: np.ndarray  # [U] bool: token_ids present (not null)

    @property
    def positions(self) -> int:
        return int(self.marker["positions"])

    def token_ids(self, row: int) -> np.ndarray | None:
        if not self.token_valid[row]:
            return None
        return self.token_values[self.token_offsets[row] : self.token_offsets[row + 1]]
