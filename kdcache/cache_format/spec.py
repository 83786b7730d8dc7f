"""The kdcache on-disk format, version 1: every name, dtype and schema in one place.

The writer, the reader, ``verify`` and ``inspect`` all import from here, so format knowledge is
never split between them. docs/format.md describes the same thing for people and for independent
readers (plain zarr + pyarrow); keep the two in step.

Layout of a cache directory ``NAME.kdc/``::

    zarr.json                               root group; attributes["kdcache"] = root record
    teachers/<teacher>/zarr.json            group; attributes["kdcache_teacher"] = TeacherRecord
    teachers/<teacher>/shards/<shard>/      one group per writer shard (append-only)
        topk_ids          [N, k]  uint16 | uint32
        topk_logprobs     [N, k]  float16, sorted descending along k
        tail_logmass      [N]     float32, log P(outside the top k)
        hidden/<layer>    [N, D]  float16 | int8
        hidden_scale/<layer> [N]  float32 (int8 codec only: value = int8 * scale)
    index/<teacher>/<shard>.parquet         one row per utterance in that shard (INDEX_SCHEMA)
    commits/<teacher>/<shard>.json          commit marker (COMMIT_KEYS); a shard exists for
                                            readers only once this file exists

N is the shard's flat position axis: the utterances of a shard concatenated in the order of its
index, like an Arrow list array. ``offset``/``length`` in the index point into it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CACHE_SUFFIX = ".kdc"

# Attribute keys.
ROOT_ATTR = "kdcache"
TEACHER_ATTR = "kdcache_teacher"

# Directory and array names.
TEACHERS_DIR = "teachers"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
COMMITS_DIR = "commits"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TAIL_LOGMASS = "tail_logmass"
HIDDEN_DIR = "hidden"
HIDDEN_SCALE_DIR = "hidden_scale"
TOPK_STREAMS = (TOPK_IDS, TOPK_LOGPROBS, TAIL_LOGMASS)

# Chunking: positions per chunk along the flat axis. ~16k positions keeps a top-16 chunk near
# 0.5 MB before compression, large enough that a chunk read amortises its latency.
DEFAULT_CHUNK_POSITIONS = 16384
# A writer commits a shard and starts a new one after this many positions, bounding the work a
# killed build loses.
DEFAULT_SHARD_POSITIONS = 1 << 20

TEACHER_KINDS = ("masked_lm", "causal_lm", "lstm_lm", "ensemble")
UNITS = ("tokens", "frames")
HIDDEN_CODECS = ("float16", "int8")
TOPK_LOGPROB_DTYPE = np.dtype("float16")
TAIL_LOGMASS_DTYPE = np.dtype("float32")
HIDDEN_SCALE_DTYPE = np.dtype("float32")

# Teacher and shard names become path components.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Parquet index columns (one row per utterance per shard). token_ids are the teacher's input
# token ids (empty for frame units); input_hash is content_hash() of the text or features the
# targets were computed from, so stale targets are detected.
INDEX_COLUMNS = ("utt_id", "offset", "length", "input_hash", "text", "token_ids")

# Keys of a commit marker JSON object.
COMMIT_KEYS = (
    "format_version",
    "teacher",
    "shard",
    "utterances",
    "positions",
    "index_sha256",
    "committed_at",
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
        hidden_codec: "float16" or "int8" (int8 with a per-row float32 scale).
        logprob_keepbits: Mantissa bits kept in topk_logprobs (10 = plain float16).
        chunk_positions: Chunk length along the flat position axis.
        options: Teacher-specific build options (e.g. masked-LM mode); JSON-serialisable.
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
    logprob_keepbits: int = 10
    chunk_positions: int = DEFAULT_CHUNK_POSITIONS
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name, "teacher")
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher {self.name!r}: kind {self.kind!r} not in {TEACHER_KINDS}")
        if self.units not in UNITS:
            raise ValueError(f"teacher {self.name!r}: units {self.units!r} not in {UNITS}")
        if self.hidden_codec not in HIDDEN_CODECS:
            raise ValueError(
                f"teacher {self.name!r}: hidden_codec {self.hidden_codec!r} not in {HIDDEN_CODECS}"
            )
        if self.vocab_size < 1:
            raise ValueError(f"teacher {self.name!r}: vocab_size must be >= 1")
        if not 0 <= self.k <= self.vocab_size:
            raise ValueError(
                f"teacher {self.name!r}: k={self.k} must be in 0..vocab_size ({self.vocab_size})"
            )
        if self.k == 0 and not self.hidden_layers:
            raise ValueError(f"teacher {self.name!r}: k=0 stores nothing unless hidden_layers is set")
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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"teacher record has unknown keys {sorted(unknown)}")
        return cls(**d)


def round_mantissa(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float16 values to ``keepbits`` mantissa bits (round to nearest, ties away).

    Zeroed low bits compress far better; the result is still plain float16, so readers need no
    decoder. keepbits=10 returns the input unchanged.
    """
    x = np.asarray(x, dtype=np.float16)
    if keepbits >= 10:
        return x
    drop = 10 - keepbits
    bits = x.view(np.uint16).astype(np.uint32)
    finite = np.isfinite(x)
    half = np.uint32(1 << (drop - 1))
    mask = np.uint32((0xFFFF >> drop) << drop)
    rounded = ((bits + half) & mask).astype(np.uint16)
    out = np.where(finite, rounded, bits.astype(np.uint16)).view(np.float16)
    # Rounding up can carry into the exponent and overflow to inf; keep the original there.
    return np.where(np.isfinite(out) | ~finite, out, x)
