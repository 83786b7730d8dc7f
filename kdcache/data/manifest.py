"""Utterance manifests: one list of :class:`Utterance` from a Kaldi/ESPnet data directory, a lhotse
cut manifest or a plain JSONL file, and writers for all three.

Every reader resolves a relative audio path against the directory that holds the manifest, keeps
the order of the file, rejects duplicate utterance ids, and raises :class:`ManifestError` naming
``file:line`` for a malformed line. A Kaldi ``wav.scp`` entry that is a pipe command (``sox a.flac
-t wav - |``) is kept verbatim as ``audio``; :func:`kdcache.data.audio.read_audio` runs it.

The formats are specified in docs/data.md.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ManifestError",
    "Utterance",
    "load_manifest",
    "read_jsonl",
    "read_kaldi_dir",
    "read_lhotse_cuts",
    "write_jsonl",
    "write_kaldi_dir",
    "write_lhotse_cuts",
]


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class Utterance:
    """One utterance: a span of a recording and its transcript.

    Attributes:
        id: Unique utterance id; every cache, feature store and index is keyed by it.
        audio: Audio file path (absolute once loaded), a Kaldi pipe command ending in ``|``, or
            None for text-only data (LM text).
        text: Raw transcript as written in the manifest (callers apply ``normalize_text``), or None.
        start: Offset of the utterance into ``audio`` in seconds.
        duration: Length in seconds; None means "to the end of the recording".
        speaker: Speaker id, or None when unknown.
    """

    id: str
    audio: str | None
    text: str | None
    start: float = 0.0
    duration: float | None = None
    speaker: str | None = None

    @property
    def is_pipe(self) -> bool:
        """True when ``audio`` is a shell command whose stdout is a WAV file (Kaldi ``... |``)."""
        return self.audio is not None and self.audio.rstrip().endswith("|")


# ---------------------------------------------------------------------------------------------
# Reading


def load_manifest(path: str | os.PathLike) -> list[Utterance]:
    """Load utterances from any supported manifest.

    Args:
        path: A Kaldi/ESPnet data directory (``wav.scp`` + ``text``, optional ``segments`` and
            ``utt2spk``), or a ``.jsonl``/``.jsonl.gz`` file holding either plain records
            (``id``, ``audio``, ``text``, optional ``start``/``duration``/``speaker``) or lhotse
            cuts (records with ``recording`` and ``supervisions``), detected per file.

    Returns:
        The utterances in file order.

    Raises:
        ManifestError: unknown format, malformed line (message names ``file:line``), duplicate id.
        FileNotFoundError: ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"manifest not found: {p}")
    if p.is_dir():
        return read_kaldi_dir(p)
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        first = _first_record(p)
        if first is not None and ("recording" in first or "supervisions" in first):
            return read_lhotse_cuts(p)
        return read_jsonl(p)
    raise ManifestError(
        f"{p}: unknown manifest format (expected a Kaldi data directory or a .jsonl/.jsonl.gz file)"
    )


def read_jsonl(path: str | os.PathLike) -> list[Utterance]:
    """Read a plain JSONL manifest (one JSON object per line; blank lines are skipped)."""
    p = Path(path)
    base = p.parent.resolve()
    utts: list[Utterance] = []
    wheres: list[str] = []
    for lineno, rec in _iter_json_lines(p):
        where = f"{p}:{lineno}"
        wheres.append(where)
        if "id" not in rec:
            raise ManifestError(f"{where}: record has no 'id'")
        audio = rec.get("audio")
        if audio is not None and not isinstance(audio, str):
            raise ManifestError(f"{where}: 'audio' must be a string or null")
        utts.append(
            _make_utt(
                where,
                id=rec["id"],
                audio=_resolve(audio, base),
                text=rec.get("text"),
                start=rec.get("start", 0.0),
                duration=rec.get("duration"),
                speaker=rec.get("speaker"),
            )
        )
    _check_unique(utts, p, wheres)
    return utts


def read_lhotse_cuts(path: str | os.PathLike) -> list[Utterance]:
    """Read a lhotse cut manifest (``MonoCut`` records) without importing lhotse.

    The utterance spans the cut (``start``/``duration`` into the recording); the transcript is the
    supervisions' texts joined by a space, the speaker that of the first supervision. Recording
    sources of type ``file`` become paths, ``command`` becomes a pipe command; ``url`` and
    ``memory`` sources, ``MixedCut`` and ``PaddingCut`` are rejected with the line number.
    """
    p = Path(path)
    base = p.parent.resolve()
    utts: list[Utterance] = []
    wheres: list[str] = []
    for lineno, rec in _iter_json_lines(p):
        where = f"{p}:{lineno}"
        wheres.append(where)
        kind = rec.get("type", "MonoCut")
        if kind != "MonoCut":
            raise ManifestError(f"{where}: cut type {kind!r} is not supported (only MonoCut)")
        if "id" not in rec:
            raise ManifestError(f"{where}: cut has no 'id'")
        recording = rec.get("recording")
        audio = None
        if recording is not None:
            sources = recording.get("sources") if isinstance(recording, dict) else None
            if not sources:
                raise ManifestError(f"{where}: recording has no sources")
            src = sources[0]
            stype, source = src.get("type"), src.get("source")
            if not isinstance(source, str):
                raise ManifestError(f"{where}: recording source must be a string")
            if stype == "file":
                audio = _resolve(source, base)
            elif stype == "command":
                audio = source if source.rstrip().endswith("|") else source + " |"
            else:
                raise ManifestError(f"{where}: recording source type {stype!r} is not supported")
        sups = rec.get("supervisions") or []
        if not isinstance(sups, list):
            raise ManifestError(f"{where}: 'supervisions' must be a list")
        texts = [s.get("text") for s in sups if isinstance(s, dict) and s.get("text") is not None]
        text = " ".join(texts) if texts else None
        speaker = sups[0].get("speaker") if sups and isinstance(sups[0], dict) else None
        utts.append(
            _make_utt(
                where,
                id=rec["id"],
                audio=audio,
                text=text,
                start=rec.get("start", 0.0),
                duration=rec.get("duration"),
                speaker=speaker,
            )
        )
    _check_unique(utts, p, wheres)
    return utts


def read_kaldi_dir(path: str | os.PathLike) -> list[Utterance]:
    """Read a Kaldi/ESPnet data directory.

    Files: ``wav.scp`` (``<rec-id> <path>`` or ``<rec-id> <command> |``), ``text`` (``<utt-id>
    <transcript>``), optional ``segments`` (``<utt-id> <rec-id> <start> <end>``; ``end`` -1 means
    the end of the recording) and optional ``utt2spk``. Without ``segments`` utterance ids are
    recording ids. A directory with only ``text`` gives text-only utterances (``audio`` None).
    """
    d = Path(path)
    base = d.resolve()
    wav_scp, text_f, seg_f, spk_f = (d / n for n in ("wav.scp", "text", "segments", "utt2spk"))
    if not wav_scp.exists() and not text_f.exists():
        raise ManifestError(f"{d}: not a Kaldi data directory (no wav.scp and no text)")
    texts = dict(_kaldi_table(text_f, allow_empty_value=True)) if text_f.exists() else {}
    speakers = dict(_kaldi_table(spk_f)) if spk_f.exists() else {}

    utts: list[Utterance] = []
    wheres: list[str] = []
    if wav_scp.exists():
        recs: dict[str, str] = {}
        for lineno, key, value in _kaldi_lines(wav_scp):
            if key in recs:
                raise ManifestError(f"{wav_scp}:{lineno}: duplicate recording id {key!r}")
            recs[key] = value if value.rstrip().endswith("|") else _resolve(value, base)
        if seg_f.exists():
            for lineno, key, value in _kaldi_lines(seg_f):
                where = f"{seg_f}:{lineno}"
                wheres.append(where)
                fields = value.split()
                if len(fields) != 3:
                    raise ManifestError(f"{where}: expected '<utt-id> <rec-id> <start> <end>'")
                rec_id, s, e = fields
                if rec_id not in recs:
                    raise ManifestError(f"{where}: recording {rec_id!r} is not in {wav_scp.name}")
                try:
                    start, end = float(s), float(e)
                except ValueError:
                    raise ManifestError(f"{where}: start/end must be numbers") from None
                duration = None if end < 0 else end - start
                utts.append(
                    _make_utt(
                        where,
                        id=key,
                        audio=recs[rec_id],
                        text=texts.get(key),
                        start=start,
                        duration=duration,
                        speaker=speakers.get(key),
                    )
                )
        else:
            for key, audio in recs.items():
                utts.append(Utterance(key, audio, texts.get(key), speaker=speakers.get(key)))
    else:
        for key, text in texts.items():
            utts.append(Utterance(key, None, text, speaker=speakers.get(key)))
    _check_unique(utts, d, wheres if len(wheres) == len(utts) else None)
    known = {u.id for u in utts}
    for name, table in (("text", texts), ("utt2spk", speakers)):
        extra = [k for k in table if k not in known]
        if extra:
            raise ManifestError(
                f"{d / name}: {len(extra)} utterance id(s) not in wav.scp/segments, e.g. {extra[0]!r}"
            )
    return utts


# ---------------------------------------------------------------------------------------------
# Writing


def write_jsonl(
    utts: Iterable[Utterance], path: str | os.PathLike, *, relative: bool = True
) -> Path:
    """Write a plain JSONL manifest (gzip when the name ends in ``.gz``).

    With ``relative`` (the default) audio paths under the manifest's directory are written
    relative to it, so the directory can be moved; other paths are written absolute. Fields equal
    to their default are omitted.
    """
    p = Path(path)
    base = p.parent.resolve()
    with _open_write(p) as f:
        for u in utts:
            audio = _relativize(u.audio, base) if relative else u.audio
            rec: dict = {"id": u.id, "audio": audio, "text": u.text}
            if u.start:
                rec["start"] = u.start
            if u.duration is not None:
                rec["duration"] = u.duration
            if u.speaker is not None:
                rec["speaker"] = u.speaker
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return p


def write_kaldi_dir(
    utts: Iterable[Utterance], path: str | os.PathLike, *, relative: bool = False
) -> Path:
    """Write a Kaldi data directory: ``wav.scp``, ``text``, ``utt2spk``, ``spk2utt`` and, when
    any utterance is a span of its recording, ``segments``.

    Audio paths are written as given (absolute once loaded): Kaldi and ESPnet tools resolve a
    relative path against the recipe's working directory, not the data directory. ``relative``
    writes paths under the data directory relative to it instead (kdcache reads those; the
    directory can then be moved).

    Lines are sorted by key (C locale), as Kaldi's ``validate_data_dir.sh`` wants. An utterance
    without a speaker is its own speaker (Kaldi requires utt2spk). Recording ids for ``segments``
    are the audio file stems, made unique.
    """
    utts = list(utts)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    base = d.resolve()
    for u in utts:
        for field in ("id", "speaker"):
            v = getattr(u, field)
            if v is not None and (not v or any(c.isspace() for c in v)):
                raise ManifestError(
                    f"utterance {u.id!r}: Kaldi {field} must be non-empty without spaces"
                )
        if u.text is not None and "\n" in u.text:
            raise ManifestError(f"utterance {u.id!r}: Kaldi text cannot contain a newline")
    with_audio = [u for u in utts if u.audio is not None]
    use_segments = any(u.start or u.duration is not None for u in with_audio)

    wav_lines: dict[str, str] = {}
    seg_lines: dict[str, str] = {}
    if use_segments:
        rec_of: dict[str, str] = {}
        for u in with_audio:
            if u.audio not in rec_of:
                stem = _rec_stem(u.audio)
                rec_id, n = stem, 1
                while rec_id in wav_lines:
                    n += 1
                    rec_id = f"{stem}-{n}"
                rec_of[u.audio] = rec_id
                wav_lines[rec_id] = _relativize(u.audio, base) if relative else u.audio
            end = -1 if u.duration is None else u.start + u.duration
            seg_lines[u.id] = f"{rec_of[u.audio]} {_fmt_time(u.start)} {_fmt_time(end)}"
    else:
        wav_lines = {u.id: _relativize(u.audio, base) if relative else u.audio for u in with_audio}

    _write_table(d / "wav.scp", wav_lines)
    if use_segments:
        _write_table(d / "segments", seg_lines)
    else:
        (d / "segments").unlink(missing_ok=True)
    _write_table(d / "text", {u.id: u.text for u in utts if u.text is not None})
    utt2spk = {u.id: u.speaker or u.id for u in utts}
    _write_table(d / "utt2spk", utt2spk)
    spk2utt: dict[str, list[str]] = {}
    for utt_id in sorted(utt2spk):
        spk2utt.setdefault(utt2spk[utt_id], []).append(utt_id)
    _write_table(d / "spk2utt", {s: " ".join(ids) for s, ids in spk2utt.items()})
    return d


def write_lhotse_cuts(
    utts: Iterable[Utterance],
    path: str | os.PathLike,
    *,
    sample_rate: int | None = None,
    relative: bool = False,
) -> Path:
    """Write a lhotse ``CutSet`` JSONL(.gz) manifest: one ``MonoCut`` per utterance with its
    ``Recording`` and one ``SupervisionSegment``, fields as lhotse writes them.

    Audio paths are written as given (absolute once loaded), because lhotse resolves a relative
    source against the working directory; ``relative`` writes paths under the manifest's
    directory relative to it (kdcache reads those; lhotse then needs
    ``CutSet.with_recording_path_prefix``).

    Recording length and rate are read from the audio header (:func:`kdcache.data.audio.audio_info`);
    pass ``sample_rate`` to skip probing the rate. Utterances without audio are rejected: a lhotse
    cut needs a recording.
    """
    from kdcache.data.audio import audio_info

    p = Path(path)
    base = p.parent.resolve()
    infos: dict[str, tuple[int, int, int]] = {}
    with _open_write(p) as f:
        for u in utts:
            if u.audio is None:
                raise ManifestError(f"utterance {u.id!r}: a lhotse cut needs audio")
            if u.audio not in infos:
                info = audio_info(u.audio)
                infos[u.audio] = (info.sample_rate, info.num_samples, info.num_channels)
            sr, num_samples, num_channels = infos[u.audio]
            if sample_rate is not None and sr != sample_rate:
                raise ManifestError(f"utterance {u.id!r}: audio is {sr} Hz, expected {sample_rate}")
            rec_dur = num_samples / sr
            dur = u.duration if u.duration is not None else rec_dur - u.start
            source = _relativize(u.audio, base) if relative else u.audio
            if u.is_pipe:
                src = {
                    "type": "command",
                    "channels": list(range(num_channels)),
                    "source": source.rstrip().rstrip("|").rstrip(),
                }
            else:
                src = {"type": "file", "channels": list(range(num_channels)), "source": source}
            sup = {
                "id": u.id,
                "recording_id": _rec_stem(u.audio),
                "start": 0.0,
                "duration": round(dur, 6),
                "channel": 0,
            }
            if u.text is not None:
                sup["text"] = u.text
            if u.speaker is not None:
                sup["speaker"] = u.speaker
            cut = {
                "id": u.id,
                "start": round(u.start, 6),
                "duration": round(dur, 6),
                "channel": 0,
                "supervisions": [sup],
                "recording": {
                    "id": _rec_stem(u.audio),
                    "sources": [src],
                    "sampling_rate": sr,
                    "num_samples": num_samples,
                    "duration": round(rec_dur, 6),
                    "channel_ids": list(range(num_channels)),
                },
                "type": "MonoCut",
            }
            f.write(json.dumps(cut, ensure_ascii=False) + "\n")
    return p


# ---------------------------------------------------------------------------------------------
# Helpers


def _make_utt(where: str, *, id, audio, text, start, duration, speaker) -> Utterance:
    if not isinstance(id, str) or not id:
        raise ManifestError(f"{where}: 'id' must be a non-empty string")
    if text is not None and not isinstance(text, str):
        raise ManifestError(f"{where}: 'text' must be a string or null")
    if speaker is not None and not isinstance(speaker, str):
        raise ManifestError(f"{where}: 'speaker' must be a string or null")
    try:
        start = float(start if start is not None else 0.0)
        duration = None if duration is None else float(duration)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: 'start'/'duration' must be numbers") from None
    if not math.isfinite(start) or start < 0:
        raise ManifestError(f"{where}: 'start' must be >= 0, got {start}")
    if duration is not None and (not math.isfinite(duration) or duration <= 0):
        raise ManifestError(f"{where}: 'duration' must be > 0, got {duration}")
    return Utterance(id, audio, text, start, duration, speaker)


def _check_unique(utts: list[Utterance], source: Path, wheres: list[str] | None = None) -> None:
    seen: dict[str, str] = {}
    for i, u in enumerate(utts):
        where = wheres[i] if wheres else str(source)
        if u.id in seen:
            raise ManifestError(f"{where}: duplicate utterance id {u.id!r} (first at {seen[u.id]})")
        seen[u.id] = where


def _resolve(audio: str | None, base: Path) -> str | None:
    if audio is None or audio.rstrip().endswith("|") or "://" in audio:
        return audio
    p = Path(audio).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _relativize(audio: str | None, base: Path) -> str | None:
    if audio is None or audio.rstrip().endswith("|") or "://" in audio:
        return audio
    p = Path(audio)
    if p.is_absolute():
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            return str(p)
    return audio


def _rec_stem(audio: str) -> str:
    if audio.rstrip().endswith("|"):
        for tok in audio.split():
            if "/" in tok or "." in tok:
                return _rec_stem(tok)
        return "pipe"
    name = Path(audio).name
    for ext in (".wav", ".flac", ".mp3", ".ogg", ".sph", ".opus"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


_KALDI_SIBLINGS = ("wav.scp", "utt2spk", "segments", "spk2utt")
_ID = re.compile(r"^[A-Za-z0-9][\w\-.:/]*$")


def _id_like(token: str) -> bool:
    """An utterance id, not a word or a number: letters/digits joined by _ - . : /, with a digit
    and with something besides digits (``1089-134686-0000``, ``spk1_utt2``; not ``1984``)."""
    return bool(_ID.match(token)) and any(c.isdigit() for c in token) and not token.isdigit()


def is_kaldi_text(path: str | os.PathLike, lines: list[str] | None = None) -> bool:
    """Whether a text file is a Kaldi ``text`` table (``<utt-id> <transcript>`` a line) rather
    than plain sentences: it is named ``text`` next to a wav.scp/utt2spk/segments, or the first
    token of every non-empty line is a distinct utterance-id-like token (:func:`_id_like`)."""
    p = Path(path)
    if p.name == "text" and any((p.parent / n).exists() for n in _KALDI_SIBLINGS):
        return True
    if lines is None:
        lines = [line for _, line in _text_lines(p)]
    firsts = [line.split(maxsplit=1)[0] for line in lines if line.strip()]
    return len(firsts) >= 2 and len(set(firsts)) == len(firsts) and all(map(_id_like, firsts))


def read_text_lines(path: str | os.PathLike) -> tuple[list[str], bool]:
    """Non-empty lines of a text file (one sentence a line), and whether it was a Kaldi ``text``
    table whose utterance ids were stripped (:func:`is_kaldi_text`). Raises ManifestError naming
    the file and line for non-UTF-8 text."""
    p = Path(path)
    lines = [line.rstrip("\r\n") for _, line in _text_lines(p)]
    lines = [line for line in lines if line.strip()]
    if is_kaldi_text(p, lines):
        return [
            parts[1] for parts in (line.split(maxsplit=1) for line in lines) if len(parts) == 2
        ], True
    return lines, False


def _fmt_time(t: float) -> str:
    if t == -1:
        return "-1"
    return f"{t:.6f}".rstrip("0").rstrip(".") or "0"


def _open_read(p: Path) -> io.TextIOBase:
    if p.name.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8")
    return open(p, encoding="utf-8")


def _text_lines(p: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (gzip for ``.gz``); a line that is not
    UTF-8 raises ManifestError naming the file and the line."""
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(
                    f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


class _AtomicTextWriter(io.StringIO):
    """Collects text and writes it on close: to ``NAME.tmp``, then renamed to NAME. A ``.gz``
    name is gzip-compressed with mtime 0 and no file name, so equal content is equal bytes."""

    def __init__(self, path: Path):
        super().__init__()
        self._path = path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue().encode("utf-8")
            if self._path.name.endswith(".gz"):
                data = gzip.compress(data, compresslevel=6, mtime=0)
            tmp = self._path.with_name(self._path.name + f".tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, self._path)
        super().close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # leave no half-written manifest behind
            super().close()
            return None
        return super().__exit__(exc_type, exc, tb)


def _open_write(p: Path) -> io.TextIOBase:
    p.parent.mkdir(parents=True, exist_ok=True)
    return _AtomicTextWriter(p)


def _first_record(p: Path) -> dict | None:
    for _, rec in _iter_json_lines(p):
        return rec
    return None


def _iter_json_lines(p: Path) -> Iterator[tuple[int, dict]]:
    try:
        for lineno, line in _text_lines(p):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{p}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ManifestError(f"{p}:{lineno}: expected a JSON object")
            yield lineno, rec
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ManifestError(f"{p}: cannot read ({e})") from None


def _kaldi_lines(p: Path, allow_empty_value: bool = False) -> Iterator[tuple[int, str, str]]:
    for lineno, line in _text_lines(p):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 1 and not allow_empty_value:
            raise ManifestError(f"{p}:{lineno}: expected '<key> <value>', got {line!r}")
        yield lineno, parts[0], parts[1].strip() if len(parts) == 2 else ""


def _kaldi_table(p: Path, allow_empty_value: bool = False) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for lineno, key, value in _kaldi_lines(p, allow_empty_value):
        if key in seen:
            raise ManifestError(f"{p}:{lineno}: duplicate key {key!r}")
        seen[key] = value
    return list(seen.items())


def _write_table(p: Path, table: dict[str, str]) -> None:
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(table, key=lambda k: k.encode("utf-8")):
            f.write(f"{key} {table[key]}\n" if table[key] != "" else f"{key}\n")
    os.replace(tmp, p)
