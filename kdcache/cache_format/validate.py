"""Checks that what is stored is what spec.py says: root record, teacher record, commit marker,
index part, array metadata, decoded chunk.

Every check returns a list of problems (one line each, naming no file: the caller knows where it
read from). The reader raises CacheError with the first one; ``verify`` reports them all. Parsers
return ``(value, problems)``; value is None when the problems leave nothing usable.

JSON types of records and markers are checked against the dataclasses themselves
(TeacherRecord, CommitMarker): a field added there is checked here with no second table.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import math
import re
import types
import typing
from typing import Any

import numpy as np

from kdcache.cache_format import spec
from kdcache.cache_format.spec import CommitMarker, ShardIndex, TeacherRecord
from kdcache.cache_format.storage import Storage

__all__ = [
    "MAX_CHUNK_BYTES",
    "array_problems",
    "check_marker",
    "chunk_problems",
    "field_problems",
    "one_line",
    "orphan_commits",
    "parse_index",
    "parse_marker",
    "parse_record",
    "record_from_attrs",
    "root_problems",
    "sqrt_code_problems",
]

# Largest decoded chunk (chunk_positions x one position of the widest array) a record may ask
# for: a damaged or hostile record must not make a reader allocate without bound.
MAX_CHUNK_BYTES = 1 << 31


def one_line(e: BaseException | str) -> str:
    """An exception message on one line, at most 300 characters."""
    s = " ".join(str(e).split())
    return s if len(s) <= 300 else s[:297] + "..."


def _error(e: BaseException) -> str:
    """A caught exception as a problem: our own ValueErrors as they are, others with their type."""
    return one_line(e) if type(e) is ValueError else f"{type(e).__name__}: {one_line(e)}"


# ------------------------------------------------------------------------- JSON field types


def _json_ok(v: Any, hint: Any) -> bool:
    """Whether a JSON value has the type a dataclass field declares (no coercion: 1.0 is not an
    int, true is not an int, a float field takes any JSON number)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_json_ok(v, a) for a in args)
    if hint is type(None):
        return v is None
    if isinstance(v, bool):
        return hint is bool
    if hint in (int, str, bool):
        return isinstance(v, hint)
    if hint is float:
        return isinstance(v, (int, float))
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(v, list) and all(_json_ok(x, args[0] if args else Any) for x in v)
    if origin is dict or hint is dict:
        return isinstance(v, dict) and all(
            _json_ok(x, args[1] if args else Any) for x in v.values()
        )
    return False


def _describe(hint: Any, plural: bool = False) -> str:
    """A field type in JSON words, for messages ("list of integers")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    s = "s" if plural else ""
    if origin in (tuple, list) and args:
        return f"list{s} of {_describe(args[0], True)}"
    if origin is dict and args and args[1] is not Any:
        return f"object{s} of {_describe(args[1], True)}"
    names = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object"}
    if hint is type(None):
        return "null"
    return names.get(origin or hint, getattr(hint, "__name__", str(hint))) + s


def _json_kind(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(v), "null" if v is None else "list" if isinstance(v, list) else type(v).__name__
    )


@functools.cache
def _fields(cls) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved type, required) of a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def field_problems(d: dict[str, Any], cls) -> list[str]:
    """Missing required keys and wrongly typed values of a JSON object meant for dataclass cls."""
    missing = [name for name, _, required in _fields(cls) if required and name not in d]
    probs = [f"missing keys {missing}"] if missing else []
    for name, hint, _ in _fields(cls):
        if name in d and not _json_ok(d[name], hint):
            probs.append(
                f"field {name!r} has the wrong type ({_json_kind(d[name])}, expected "
                f"{_describe(hint)})"
            )
    return probs


# ------------------------------------------------------------------------- records


def root_problems(attrs: Any) -> list[str]:
    """The root ``kdcache`` attribute: present, an object, a supported format_version (the one
    check writer, reader and verify share)."""
    if not isinstance(attrs, dict):
        return [f"a zarr group but not a kdcache cache (no '{spec.ROOT_ATTR}' attribute)"]
    ver = attrs.get("format_version")
    if not _json_ok(ver, int) or ver not in spec.SUPPORTED_FORMAT_VERSIONS:
        return [
            f"format_version {ver!r} is not supported by this kdcache "
            f"(supported: {list(spec.SUPPORTED_FORMAT_VERSIONS)}); upgrade kdcache"
        ]
    return []


def parse_record(d: Any, name: str | None = None) -> tuple[TeacherRecord | None, list[str]]:
    """A TeacherRecord from stored attributes, refusing wrong JSON types (not coercing them) and
    sizes a reader could not allocate; ``name``: the teacher directory it must be named after."""
    if not isinstance(d, dict):
        return None, [f"'{spec.TEACHER_ATTR}' attribute is {_json_kind(d)}, not an object"]
    probs = field_problems(d, TeacherRecord)
    if probs:
        return None, probs
    if not all(v >= 0 for v in d.get("hidden_dims", {}).values()):
        probs.append("hidden_dims values must be non-negative integers")
    try:
        finite = math.isfinite(d.get("temperature", 1.0))
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        probs.append("temperature must be finite")
    if probs:
        return None, probs
    try:
        rec = TeacherRecord.from_dict(d)
    except Exception as e:  # noqa: BLE001 - __post_init__'s own checks
        return None, [_error(e)]
    if name is not None and rec.name != name:
        probs.append(f"record name {rec.name!r} differs from its directory name")
    if rec.vocab_size > 1 << 32:
        probs.append(f"vocab_size {rec.vocab_size} does not fit uint32 ids")
    widest = max([rec.k * 8] + [v * 4 for v in rec.hidden_dims.values()])  # int8 -> float32
    if rec.chunk_positions * max(widest, 8) > MAX_CHUNK_BYTES:
        probs.append(
            f"chunk_positions {rec.chunk_positions} x {widest} bytes per position exceeds "
            f"{MAX_CHUNK_BYTES} bytes per decoded chunk"
        )
    return (None if probs else rec), probs


def record_from_attrs(d: Any) -> TeacherRecord:
    """parse_record that raises ValueError with the first problem."""
    rec, probs = parse_record(d)
    if probs:
        raise ValueError(probs[0])
    return rec


def parse_marker(d: Any, teacher: str, shard: str) -> tuple[CommitMarker | None, list[str]]:
    """The commit marker read from ``commits/<teacher>/<shard>.json`` (parsed JSON)."""
    if not isinstance(d, dict):
        return None, [f"not a JSON object ({_json_kind(d)})"]
    probs = field_problems(d, CommitMarker)
    if probs:
        return None, probs
    m = CommitMarker.from_dict(d)
    if m.teacher != teacher or m.shard != shard:
        probs.append(
            f"names teacher {m.teacher!r} shard {m.shard!r}, but its path says "
            f"teacher {teacher!r} shard {shard!r}"
        )
    if m.format_version not in spec.SUPPORTED_FORMAT_VERSIONS:
        probs.append(f"format_version {m.format_version!r} not supported")
    for key in ("utterances", "positions"):
        if getattr(m, key) < 0:
            probs.append(f"{key} {getattr(m, key)!r} is not a non-negative integer")
    if not re.fullmatch(r"[0-9a-f]{64}", m.index_sha256):
        probs.append(f"index_sha256 {m.index_sha256[:80]!r} is not a hex sha256")
    return (None if probs else m), probs


def check_marker(marker: Any, teacher: str, shard: str) -> dict[str, Any]:
    """parse_marker that raises ValueError with the first problem; returns the marker."""
    _, probs = parse_marker(marker, teacher, shard)
    if probs:
        raise ValueError(probs[0])
    return marker


def orphan_commits(storage: Storage, with_record: set[str]) -> list[tuple[str, str]]:
    """(where, problem) for each teacher not in with_record whose ``commits/<teacher>/`` holds
    commit markers: committed shards whose teacher record is gone (the writer creates the record
    before it commits anything, so this is damage, not a teacher to drop silently)."""
    return [
        (
            f"{spec.teacher_path(t)}/zarr.json",
            f"teacher record missing, but {spec.COMMITS_DIR}/{t}/ holds committed shards",
        )
        for t in storage.listdir(spec.COMMITS_DIR)
        if t not in with_record
        and spec.NAME_RE.match(t)
        and any(
            f.endswith(".json") and spec.parse_shard_name(f[:-5]) is not None
            for f in storage.listdir(f"{spec.COMMITS_DIR}/{t}")
        )
    ]


# ------------------------------------------------------------------------- index


def _index_schema_problem(table) -> str | None:
    """Why an index table's columns do not have the format's types (None when they do)."""
    import pyarrow as pa

    def string(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    want = {
        "utt_id": string,
        "offset": pa.types.is_integer,
        "length": pa.types.is_integer,
        "input_hash": string,
        "text": lambda t: string(t) or pa.types.is_null(t),
        "token_ids": lambda t: (
            pa.types.is_null(t)
            or (
                (pa.types.is_list(t) or pa.types.is_large_list(t))
                and pa.types.is_integer(t.value_type)
            )
        ),
    }
    missing = [c for c in spec.INDEX_COLUMNS if c not in table.column_names]
    if missing:
        return f"index lacks columns {missing}"
    for c, ok in want.items():
        t = table.schema.field(c).type
        if not ok(t):
            return f"index column {c!r} has type {t}, expected {spec.index_schema().field(c).type}"
    for c in ("utt_id", "offset", "length", "input_hash"):
        if table.column(c).null_count:
            return f"index column {c!r} has nulls"
    return None


def _read_index(data: bytes, marker: CommitMarker, teacher: str, shard: str) -> ShardIndex:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    why = _index_schema_problem(table)
    if why is not None:
        raise _SchemaProblem(why)
    tok = table.column("token_ids").cast(pa.list_(pa.int32())).combine_chunks()
    if isinstance(tok, pa.ChunkedArray):  # empty table
        tok = pa.array([], type=pa.list_(pa.int32()))
    if len(table):
        offs = np.asarray(tok.offsets, dtype=np.int64)
        vals = np.asarray(tok.values.to_numpy(zero_copy_only=False), dtype=np.int32)
        valid = ~np.asarray(tok.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    else:
        offs, vals, valid = np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, bool)
    return ShardIndex(
        teacher=teacher,
        name=shard,
        marker=marker.to_dict(),
        utt_ids=table.column("utt_id").to_pylist(),
        offsets=table.column("offset").to_numpy().astype(np.int64),
        lengths=table.column("length").to_numpy().astype(np.int64),
        input_hash=table.column("input_hash").to_pylist(),
        text=[t if t is not None else "" for t in table.column("text").to_pylist()],
        token_values=vals,
        token_offsets=offs,
        token_valid=valid,
    )


class _SchemaProblem(Exception):
    pass


def parse_index(
    data: bytes, marker: CommitMarker, teacher: str, shard: str
) -> tuple[ShardIndex | None, list[str]]:
    """An index part's bytes, checked against its commit marker.

    The sha256 must match, the parquet must have the format's columns, and the index must
    describe the shard's position axis exactly: rows = the marker's utterances, lengths >= 0,
    offsets contiguous from 0, lengths summing to its positions, token_ids one per position, no
    utterance twice. The ShardIndex is None when the bytes are unusable (sha256, parquet, schema);
    with only consistency problems it is returned along with them.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != marker.index_sha256:
        return None, [
            f"sha256 {digest[:16]}... does not match the commit marker "
            f"({marker.index_sha256[:16]}...); the index is damaged"
        ]
    try:
        si = _read_index(data, marker, teacher, shard)
    except _SchemaProblem as e:
        return None, [str(e)]
    except Exception as e:  # noqa: BLE001 - any damage of the parquet bytes
        return None, [f"cannot read the parquet index ({type(e).__name__}: {one_line(e)})"]
    probs = []
    utt_ids, offsets, lengths = si.utt_ids, si.offsets, si.lengths
    n, N = len(utt_ids), marker.positions
    if n != marker.utterances:
        probs.append(f"{n} rows but the commit marker says {marker.utterances}")
    total = 0
    if n:
        if (lengths < 0).any():
            r = int(np.argmax(lengths < 0))
            probs.append(f"utterance {utt_ids[r]!r} has negative length")
        ends = np.cumsum(lengths)
        bad = np.nonzero(offsets != ends - lengths)[0]
        if len(bad):
            r = int(bad[0])
            probs.append(
                f"offsets not contiguous from 0 (row {r}, utterance {utt_ids[r]!r}: "
                f"offset {int(offsets[r])}, expected {int(ends[r] - lengths[r])})"
            )
        total = int(ends[-1])
    if total != N:
        probs.append(f"lengths sum to {total} but the commit marker says {N} positions")
    tok_len = np.diff(si.token_offsets)
    bad = np.nonzero(si.token_valid & (tok_len != lengths))[0]
    if len(bad):
        r = int(bad[0])
        probs.append(
            f"utterance {utt_ids[r]!r} has {int(tok_len[r])} token_ids for "
            f"{int(lengths[r])} positions"
        )
    if len(set(utt_ids)) != n:
        for u, times in collections.Counter(utt_ids).items():
            if times > 1:
                twice = "twice" if times == 2 else f"{times} times"
                probs.append(f"utterance {u!r} appears {twice} in this shard (duplicate)")
    return si, probs


# ------------------------------------------------------------------------- arrays and chunks


def array_problems(rec: TeacherRecord, marker: CommitMarker, name: str, arr) -> list[str]:
    """An opened zarr array's metadata must be what the record and the commit marker say: a
    damaged zarr.json must not make a reader return rows of the wrong width, type or count."""
    row = spec.array_row_shape(rec, name)
    N = marker.positions
    try:
        shape, chunks, dtype = tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)
        key = arr.metadata.encode_chunk_key((0,) * len(shape))
    except Exception as e:  # noqa: BLE001 - metadata zarr accepted but cannot use
        return [f"unusable array metadata ({type(e).__name__}: {one_line(e)})"]
    probs = []
    if shape != (N, *row):
        probs.append(f"shape {list(shape)}, but the record and commit marker say {[N, *row]}")
    elif name in marker.arrays and list(marker.arrays[name]) != list(shape):
        want = marker.arrays[name]
        probs.append(f"shape {list(shape)} differs from the commit marker's {want}")
    if dtype != spec.array_dtype(rec, name):
        probs.append(f"dtype {dtype}, expected {spec.array_dtype(rec, name)}")
    if key != "c" + "/0" * len(shape):
        probs.append(f"chunk key encoding gives {key!r}, expected the v3 default")
    if chunks != (rec.chunk_positions, *row):
        probs.append(
            f"chunks {list(chunks)}, expected {[rec.chunk_positions, *row]} "
            "(the record's chunk_positions)"
        )
    return probs


def codebook_problems(rec: TeacherRecord, layer: int | str, arr) -> list[str]:
    """An opened pq_codebooks/<layer> array's metadata: float32 [M, 256, D / M] in one chunk
    with the v3 default chunk key (pq codec)."""
    want = spec.pq_codebook_shape(rec, layer)
    try:
        shape, chunks, dtype = tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype)
        key = arr.metadata.encode_chunk_key((0, 0, 0))
    except Exception as e:  # noqa: BLE001 - metadata zarr accepted but cannot use
        return [f"unusable array metadata ({type(e).__name__}: {one_line(e)})"]
    probs = []
    if shape != want:
        probs.append(f"shape {list(shape)}, but the record says {list(want)} (pq_subspaces)")
    elif chunks != want:
        probs.append(f"chunks {list(chunks)}, expected one chunk {list(want)}")
    if dtype != spec.PQ_CODEBOOK_DTYPE:
        probs.append(f"dtype {dtype}, expected {spec.PQ_CODEBOOK_DTYPE}")
    if key != "c/0/0/0":
        probs.append(f"chunk key encoding gives {key!r}, expected the v3 default")
    return probs


def codebook_value_problems(x: np.ndarray) -> list[str]:
    """Decoded codebooks: finite values only (a NaN centroid would decode to NaN targets)."""
    return [] if np.isfinite(x).all() else ["PQ codebooks contain NaN or inf"]


def chunk_problems(
    rec: TeacherRecord, name: str, x: np.ndarray, expected: int, *, nan: bool = False
) -> list[str]:
    """A decoded chunk (as stored) of array ``name``: ``expected`` positions, ids < vocab_size,
    and with ``nan`` (verify; readers skip the extra pass) no NaN, and top-k log-probs <= 0 and
    sorted descending per position. Phrased to follow "chunk <c>"."""
    if len(x) != expected:
        return [f"has {len(x)} positions, expected {expected}"]
    probs = []
    idsort = rec.topk_layout == "idsort"
    if name == spec.TOPK_IDS and x.size and idsort and x.ndim == 2:
        # Gaps of ascending ids: the last running sum is the largest id; gaps after the first
        # are >= 1 (distinct ids).
        top = np.cumsum(x, axis=1, dtype=np.int64)[:, -1]
        if int(top.max()) >= rec.vocab_size:
            probs.append(f"holds id {int(top.max())} >= vocab_size {rec.vocab_size}")
        if x.shape[1] > 1 and not (x[:, 1:] >= 1).all():
            row = int(np.nonzero((x[:, 1:] < 1).any(axis=1))[0][0])
            probs.append(f"ids not strictly ascending (idsort layout) at position {row}")
    elif name == spec.TOPK_IDS and x.size and int(x.max()) >= rec.vocab_size:
        probs.append(f"holds id {int(x.max())} >= vocab_size {rec.vocab_size}")
    if rec.logprob_rounding == "sqrt" and name in (spec.TOPK_LOGPROBS, spec.TAIL_LOGMASS):
        # Codes (uint16): 0..L, and per row non-increasing along k (deltas >= 0 by their dtype;
        # the last code must not go below 0). A residual-coded tail is any uint16; its decoded
        # code is checked with the top-k codes (sqrt_mass_problems, the reader).
        if name == spec.TAIL_LOGMASS and rec.tail_coding == "residual":
            return probs
        c = spec.sqrt_undelta(x) if name == spec.TOPK_LOGPROBS and x.ndim == 2 else x
        return probs + sqrt_code_problems(rec, c)
    if nan and x.dtype.kind == "f" and np.isnan(x).any():
        probs.append("contains NaN")
    if nan and name in (spec.TOPK_LOGPROBS, spec.TAIL_LOGMASS) and x.size:
        pos = np.nonzero((x > 0).reshape(len(x), -1).any(axis=1))[0]
        if len(pos):
            probs.append(f"log-probability > 0 at position {int(pos[0])} of the chunk")
    if nan and name == spec.TOPK_LOGPROBS and x.ndim == 2 and x.shape[1] > 1 and not idsort:
        up = np.nonzero((x[:, 1:] > x[:, :-1]).any(axis=1))[0]
        if len(up):
            probs.append(
                f"top-k log-probs not sorted descending at position {int(up[0])} of the chunk"
            )
    return probs


# Tolerance of the stored mass rule (verify): the writer checks |sum(exp(topk)) + exp(tail) - 1|
# <= MASS_TOLERANCE on the values it is given, then rounds them; on the stored values verify
# allows MASS_TOLERANCE plus what the rounding can have moved each term (mass_slack).
MASS_TOLERANCE = 0.02


def weighted_slack_keepbits(stored: np.ndarray, keepbits: int, dtype=np.float16) -> np.ndarray:
    """Mantissa bits to assume for values stored with weighted rounding: kb of the stored value
    minus 1 (rounding can move a value across a power of two or a multiple of 2 ln 2, changing kb
    by one), and for rows (rank layout) the smaller of a value's and its predecessor's (the
    running minimum can give a value its predecessor's stored value)."""
    kb = spec.weighted_keepbits(stored, keepbits, dtype) - 1
    if kb.ndim == 2 and kb.shape[1] > 1:
        kb[:, 1:] = np.minimum(kb[:, 1:], kb[:, :-1])
    return np.maximum(kb, 1)


def mass_slack(stored: np.ndarray, keepbits) -> np.ndarray:
    """Per position: the most the mass sum(exp(l)) can have moved when the values ``stored``
    [P, k] were rounded to ``keepbits`` mantissa bits (round to nearest: relative error <=
    eps = 2^-(keepbits + 1), so the original l is within |l| eps / (1 - eps) of the stored one and
    |exp(l) - exp(l')| <= exp(l') expm1(|l'| eps / (1 - eps))); ``keepbits`` may be one per
    value (weighted rounding). Float16 subnormals (|l| < 2^-14) are rounded on a fixed grid, so
    the error bound is at least 2^-14 eps there; plus 1e-7 per term (their spacing, 6e-8)."""
    eps = 2.0 ** -(np.asarray(keepbits, dtype=np.float64) + 1)
    lp = stored.astype(np.float64).reshape(len(stored), -1)
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        d = np.maximum(np.abs(lp), 2.0**-14) * eps / (1 - eps)
        d = np.where(np.isfinite(lp), d, 0.0)
        term = np.where(np.isfinite(lp), np.exp(lp) * np.expm1(d), 0.0)
    return term.sum(axis=1) + 1e-7 * lp.shape[1]


def sampled_problems(rec: TeacherRecord, lp: np.ndarray, tail: np.ndarray) -> list[str]:
    """Sampled targets (rec.targets == "sampled") over one chunk: the tail is -inf, every finite
    stored log-prob is exactly the stored form of log(c / samples) for a count c >= 1, and the
    counts of a position add up to ``samples`` (no mass tolerance: counts are integers)."""
    n = rec.samples
    probs = []
    bad_tail = np.nonzero(~np.isneginf(tail))[0]
    if len(bad_tail):
        probs.append(
            f"tail_logmass {float(tail[bad_tail[0]])!r} at position {int(bad_tail[0])} of the "
            f"chunk; sampled targets have tail -inf ({len(bad_tail)} position(s))"
        )
    c = spec.sampled_counts(lp, n)
    with np.errstate(divide="ignore"):
        canon = spec.round_mantissa(
            np.log(np.maximum(c, 1) / n).astype(np.float16), rec.logprob_keepbits
        )
    finite = np.isfinite(lp)
    off = finite & ((c < 1) | (lp.astype(np.float16) != canon))
    totals = c.sum(axis=1)
    bad = np.nonzero(off.any(axis=1) | (totals != n))[0]
    if len(bad):
        i = int(bad[0])
        probs.append(
            f"sampled counts at position {i} of the chunk add up to {int(totals[i])}, or are "
            f"not of the form log(count / {n}); samples={n} ({len(bad)} position(s))"
        )
    return probs


def sqrt_code_problems(rec: TeacherRecord, c: np.ndarray) -> list[str]:
    """Decoded "sqrt" codes [P, k] or [P] (int) outside 0..logprob_levels."""
    L = rec.logprob_levels
    if c.size and (int(c.max()) > L or int(c.min()) < 0):
        row = int(np.nonzero(((c > L) | (c < 0)).reshape(len(c), -1).any(axis=1))[0][0])
        return [f"sqrt code outside 0..{L} (logprob_levels) at position {row}"]
    return []


def sqrt_mass_problems(rec: TeacherRecord, lp: np.ndarray, tail: np.ndarray) -> list[str]:
    """The mass rule for "sqrt" codes: p = (c / L)^2 per term, and rounding sqrt(p) to the
    nearest of c / L (c >= 1 for p > 0) moves p by at most (1/L) sqrt(q) + 1/L^2 per term
    (q the stored value): |p - q| = |u - v| (u + v) with |u - v| <= 1/(2L) for c >= 2, and
    p < (1.5 / L)^2 when c = 1."""
    s = 1.0 / rec.logprob_levels
    codes = spec.sqrt_undelta(lp)
    tail = spec.decode_tail_codes(rec, tail, codes)
    probs = sqrt_code_problems(rec, tail)
    if probs:
        return [f"tail_logmass: {probs[0]}"]
    u = np.concatenate([codes, tail[:, None]], axis=1) * s
    q = u * u
    mass = q.sum(axis=1)
    tol = MASS_TOLERANCE + (s * u + np.where(u > 0, s * s, 0.0)).sum(axis=1)
    return _mass_report(mass, tol, f"sqrt codes at {rec.logprob_levels} levels")


def _mass_report(mass: np.ndarray, tol: np.ndarray, slack: str) -> list[str]:
    """The mass rule's message for the first position with |mass - 1| > tol (NaN fails too);
    ``slack`` says where the tolerance beyond MASS_TOLERANCE comes from."""
    bad = np.nonzero(~(np.abs(mass - 1.0) <= tol))[0]
    if not len(bad):
        return []
    i = int(bad[0])
    return [
        f"probability mass {mass[i]:.4f} at position {i} of the chunk (|mass - 1| must be <= "
        f"{tol[i]:.4f}: {MASS_TOLERANCE} + {slack}); {len(bad)} position(s) in this chunk"
    ]


def mass_problems(rec: TeacherRecord, lp: np.ndarray, tail: np.ndarray) -> list[str]:
    """The stored mass rule over one chunk of top-k log-probs [P, k] and tail log-masses [P]
    (for sampled targets, sampled_problems instead)."""
    if len(lp) != len(tail):
        return [f"topk_logprobs has {len(lp)} positions, tail_logmass {len(tail)}"]
    if not len(lp):
        return []
    if rec.targets == "sampled":
        return sampled_problems(rec, lp, tail)
    if rec.logprob_rounding == "sqrt":
        return sqrt_mass_problems(rec, lp, tail)
    lp64 = lp.astype(np.float64)
    t64 = tail.astype(np.float64)
    with np.errstate(under="ignore", over="ignore", invalid="ignore"):
        mass = np.exp(lp64).sum(axis=1) + np.exp(t64)
    if rec.logprob_rounding == "weighted":
        if rec.topk_layout == "idsort":  # rank order: what the running minimum saw
            lp = -np.sort(-lp, axis=1)
        kb_lp = weighted_slack_keepbits(lp, rec.logprob_keepbits)
        kb_tail = weighted_slack_keepbits(tail[:, None], rec.logprob_keepbits, np.float32)
    else:
        kb_lp, kb_tail = rec.logprob_keepbits, spec.TAIL_KEEPBITS
    tol = MASS_TOLERANCE + mass_slack(lp, kb_lp) + mass_slack(tail[:, None], kb_tail)
    return _mass_report(mass, tol, f"rounding to {rec.logprob_keepbits} bits")
