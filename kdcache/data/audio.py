"""Audio reading: WAV natively (numpy, memory-mapped, only the requested span is read), anything
else and any resampling through the ``sox`` program, Kaldi pipe commands (``cmd |``) through the
shell.

Samples come back as float32 mono in [-1, 1]; several channels are averaged (as ``sox -c 1``
does). Resampling uses sox's default high-quality ``rate`` effect, which is deterministic.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AudioError",
    "AudioInfo",
    "audio_info",
    "decode_wav",
    "load_audio",
    "read_audio",
    "resample",
    "write_wav",
]

_FLOAT_FMT = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-L"]


class AudioError(RuntimeError):
    """Audio that cannot be read; the message names the file or command."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_samples: int
    num_channels: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass(frozen=True)
class _WavLayout:
    sample_rate: int
    num_channels: int
    dtype: np.dtype  # on-disk sample dtype; "V3" for 24-bit PCM
    data_offset: int
    num_frames: int


def audio_info(audio: str | os.PathLike) -> AudioInfo:
    """Sample rate, length and channels of a file (WAV header, else ``soxi``) or a pipe command."""
    audio = str(audio)
    if audio.rstrip().endswith("|"):
        data = _run_pipe(audio)
        lay = _parse_wav_header(data, audio, len(data))
        return AudioInfo(lay.sample_rate, lay.num_frames, lay.num_channels)
    if _is_wav(audio):
        with open(audio, "rb") as f:
            head = f.read(1 << 16)
        lay = _parse_wav_header(head, audio, os.path.getsize(audio))
        return AudioInfo(lay.sample_rate, lay.num_frames, lay.num_channels)
    out = _run([_sox("soxi"), "-r", audio], audio).split()[0]
    n = _run([_sox("soxi"), "-s", audio], audio).split()[0]
    c = _run([_sox("soxi"), "-c", audio], audio).split()[0]
    return AudioInfo(int(float(out)), int(n), int(c))


def read_audio(
    audio: str | os.PathLike,
    start: float = 0.0,
    duration: float | None = None,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Read ``duration`` seconds from ``start`` of a file or pipe command.

    Args:
        audio: WAV file (read natively), another format sox reads (FLAC, MP3 if built in, SPH...),
            or a Kaldi pipe command ending in ``|`` whose stdout is a WAV file.
        start: Offset in seconds.
        duration: Seconds to read; None reads to the end.
        sample_rate: Rate of the returned samples; other rates are resampled with sox.

    Returns:
        float32 array ``[num_samples]``, mono, in [-1, 1].
    """
    audio = str(audio)
    if audio.rstrip().endswith("|"):
        data = _run_pipe(audio)
        samples, sr = _read_wav_bytes(data, audio, start, duration)
    elif _is_wav(audio):
        samples, sr = _read_wav_file(audio, start, duration)
    else:
        cmd = [_sox("sox"), "-V1", audio, *_FLOAT_FMT, "-r", str(sample_rate), "-"]
        if start or duration is not None:
            cmd += ["trim", f"{start:.6f}"] + ([f"{duration:.6f}"] if duration is not None else [])
        raw = subprocess.run(cmd, capture_output=True)
        if raw.returncode != 0:
            raise AudioError(f"{audio}: sox failed: {raw.stderr.decode(errors='replace').strip()}")
        return np.frombuffer(raw.stdout, dtype="<f4").copy()
    if sr != sample_rate:
        samples = resample(samples, sr, sample_rate)
    return samples


def load_audio(utt, sample_rate: int = 16000) -> np.ndarray:
    """Samples of an :class:`~kdcache.data.manifest.Utterance` (its span of its recording)."""
    if utt.audio is None:
        raise AudioError(f"utterance {utt.id!r} has no audio")
    return read_audio(utt.audio, utt.start, utt.duration, sample_rate)


def decode_wav(data: bytes, name: str = "<wav bytes>") -> tuple[np.ndarray, int]:
    """Decode a whole WAV file held in memory: (float32 mono samples, sample rate)."""
    return _read_wav_bytes(data, name, 0.0, None)


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample float32 mono samples with sox's ``rate`` effect."""
    if orig_rate == new_rate:
        return samples
    cmd = [
        _sox("sox"),
        "-V1",
        *_FLOAT_FMT,
        "-r",
        str(orig_rate),
        "-",
        *_FLOAT_FMT,
        "-r",
        str(new_rate),
        "-",
    ]
    res = subprocess.run(
        cmd, input=np.ascontiguousarray(samples, dtype="<f4").tobytes(), capture_output=True
    )
    if res.returncode != 0:
        raise AudioError(f"sox resampling failed: {res.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(res.stdout, dtype="<f4").copy()


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    """Write float samples in [-1, 1] (``[T]`` or ``[T, C]``) as 16-bit PCM WAV (clipped)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2")
    ch = pcm.shape[1]
    data = pcm.tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, ch, sample_rate, sample_rate * 2 * ch, 2 * ch, 16
    )
    header += b"data" + struct.pack("<I", len(data))
    p = Path(path)
    with open(p, "wb") as f:
        f.write(header + data)
    return p


# ---------------------------------------------------------------------------------------------


def _sox(prog: str) -> str:
    exe = shutil.which(prog)
    if exe is None:
        raise AudioError(f"'{prog}' is not installed (apt-get install sox): needed for this audio")
    return exe


def _run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AudioError(f"{what}: {' '.join(cmd[:2])} failed: {res.stderr.strip()}")
    return res.stdout


def _run_pipe(command: str) -> bytes:
    cmd = command.rstrip()[:-1]
    res = subprocess.run(cmd, shell=True, capture_output=True)
    if res.returncode != 0:
        raise AudioError(
            f"pipe command {command!r} failed: {res.stderr.decode(errors='replace').strip()}"
        )
    return res.stdout


def _is_wav(path: str) -> bool:
    if re.search(r"\.ark:\d+$", path):
        raise AudioError(
            f"{path}: Kaldi archive offsets (wav.ark:N) are not supported; "
            "use wav files or a pipe command (wav-copy ... - |) in wav.scp"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        raise AudioError(f"{path}: audio file not found") from None
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


def _parse_wav_header(buf: bytes, name: str, total_size: int) -> _WavLayout:
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise AudioError(f"{name}: not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(buf):
        cid, size = buf[pos : pos + 4], struct.unpack("<I", buf[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            tag, ch, sr, _, block, bits = struct.unpack("<HHIIHH", buf[body : body + 16])
            if tag == 0xFFFE and size >= 40:  # WAVE_FORMAT_EXTENSIBLE: sub-format GUID
                tag = struct.unpack("<H", buf[body + 24 : body + 26])[0]
            fmt = (tag, ch, sr, block, bits)
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{name}: 'data' chunk before 'fmt '")
            tag, ch, sr, block, bits = fmt
            dtype = {
                (1, 8): np.dtype("u1"),
                (1, 16): np.dtype("<i2"),
                (1, 24): np.dtype("V3"),
                (1, 32): np.dtype("<i4"),
                (3, 32): np.dtype("<f4"),
                (3, 64): np.dtype("<f8"),
            }.get((tag, bits))
            if dtype is None:
                raise AudioError(f"{name}: unsupported WAV encoding (format {tag}, {bits} bit)")
            avail = total_size - body
            # sox and other streaming writers leave 0 or 0xFFFFFFFF when the length is unknown.
            nbytes = avail if size in (0, 0xFFFFFFFF) or size > avail else size
            return _WavLayout(sr, ch, dtype, body, nbytes // block)
        pos = body + size + (size & 1)
    raise AudioError(f"{name}: no 'data' chunk found in the WAV header")


def _to_float(raw: np.ndarray, dtype: np.dtype, ch: int) -> np.ndarray:
    if dtype.kind == "V":  # 24-bit little-endian PCM
        b = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
        x = x.astype(np.float32) / 8388608.0
    elif dtype.kind == "f":
        x = raw.astype(np.float32)
    elif dtype == np.dtype("u1"):
        x = (raw.astype(np.float32) - 128.0) / 128.0
    else:
        x = raw.astype(np.float32) / float(2 ** (8 * dtype.itemsize - 1))
    x = x.reshape(-1, ch)
    return x[:, 0].copy() if ch == 1 else x.mean(axis=1, dtype=np.float32)


def _span(lay: _WavLayout, start: float, duration: float | None, name: str) -> tuple[int, int]:
    first = int(round(start * lay.sample_rate))
    n = lay.num_frames - first if duration is None else int(round(duration * lay.sample_rate))
    if first > lay.num_frames:
        raise AudioError(
            f"{name}: start {start:.3f}s is past the end ({lay.num_frames / lay.sample_rate:.3f}s)"
        )
    # Segment ends a few ms past the end of the file are common (rounding); clamp them.
    return first, max(0, min(n, lay.num_frames - first))


def _read_wav_file(path: str, start: float, duration: float | None) -> tuple[np.ndarray, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    lay = _parse_wav_header(head, path, size)
    first, n = _span(lay, start, duration, path)
    item = lay.dtype.itemsize * lay.num_channels
    with open(path, "rb") as f:
        f.seek(lay.data_offset + first * item)
        raw = np.frombuffer(
            f.read(n * item), dtype=lay.dtype if lay.dtype.kind != "V" else np.uint8
        )
    if lay.dtype.kind != "V":
        raw = raw.view(lay.dtype)
    return _to_float(raw, lay.dtype, lay.num_channels), lay.sample_rate


def _read_wav_bytes(
    data: bytes, name: str, start: float, duration: float | None
) -> tuple[np.ndarray, int]:
    lay = _parse_wav_header(data, name, len(data))
    first, n = _span(lay, start, duration, name)
    item = lay.dtype.itemsize * lay.num_channels
    chunk = data[lay.data_offset + first * item : lay.data_offset + (first + n) * item]
    raw = np.frombuffer(chunk, dtype=lay.dtype if lay.dtype.kind != "V" else np.uint8)
    return _to_float(raw, lay.dtype, lay.num_channels), lay.sample_rate
