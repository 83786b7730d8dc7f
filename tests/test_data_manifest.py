"""Manifest readers and writers: Kaldi dirs, plain JSONL, lhotse cuts; malformed input names file:line."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from kdcache.data.audio import write_wav
from kdcache.data.manifest import (
    ManifestError,
    Utterance,
    load_manifest,
    write_jsonl,
    write_kaldi_dir,
    write_lhotse_cuts,
)


@pytest.fixture
def wavs(tmp_path):
    """Three 1-second 16 kHz WAV files under tmp_path/audio."""
    d = tmp_path / "audio"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_wav(d / f"r{i}.wav", 0.1 * rng.standard_normal(16000), 16000)
    return d


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- plain JSONL --------------------------------------------------------------------------------


def test_jsonl_reads_fields_and_resolves_relative_paths(tmp_path, wavs):
    m = _write(
        tmp_path / "m.jsonl",
        '{"id": "a", "audio": "audio/r0.wav", "text": "Hello"}\n'
        "\n"
        '{"id": "b", "audio": "audio/r1.wav", "text": "x", "start": 0.25, "duration": 0.5, "speaker": "s"}\n'
        '{"id": "c", "audio": null, "text": "text only"}\n',
    )
    utts = load_manifest(m)
    assert [u.id for u in utts] == ["a", "b", "c"]
    assert utts[0].audio == str((tmp_path / "audio/r0.wav").resolve())
    assert utts[1] == Utterance(
        "b", str((tmp_path / "audio/r1.wav").resolve()), "x", 0.25, 0.5, "s"
    )
    assert utts[2].audio is None and utts[2].text == "text only"


def test_jsonl_gz(tmp_path, wavs):
    p = tmp_path / "m.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"id": "a", "audio": str(wavs / "r0.wav"), "text": "t"}) + "\n")
    assert load_manifest(p)[0].audio == str(wavs / "r0.wav")


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"audio": "x.wav", "text": "t"}', "no 'id'"),
        ('{"id": "", "audio": "x.wav"}', "'id' must be a non-empty string"),
        ('{"id": "b", "audio": 3}', "'audio' must be a string"),
        ('{"id": "b", "audio": "x.wav", "start": "soon"}', "must be numbers"),
        ('{"id": "b", "audio": "x.wav", "duration": -1}', "'duration' must be > 0"),
        ('{"id": "b", "audio": "x.wav", "text": 5}', "'text' must be a string"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, message):
    m = _write(
        tmp_path / "bad.jsonl", '{"id": "a", "audio": "x.wav", "text": "ok"}\n' + line + "\n"
    )
    with pytest.raises(ManifestError, match=rf"bad\.jsonl:2: .*{message}"):
        load_manifest(m)


def test_jsonl_duplicate_id(tmp_path):
    m = _write(tmp_path / "d.jsonl", '{"id": "a", "audio": null}\n{"id": "a", "audio": null}\n')
    with pytest.raises(
        ManifestError, match=r"d\.jsonl:2: duplicate utterance id 'a' \(first at .*d\.jsonl:1\)"
    ):
        load_manifest(m)


def test_unknown_format_and_missing(tmp_path):
    with pytest.raises(ManifestError, match="unknown manifest format"):
        load_manifest(_write(tmp_path / "m.csv", "a,b\n"))
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ManifestError, match="not a Kaldi data directory"):
        load_manifest(tmp_path / "empty_dir")


# --- Kaldi ---------------------------------------------------------------------------------------


def test_kaldi_dir_without_segments(tmp_path, wavs):
    d = tmp_path / "data" / "train"
    _write(d / "wav.scp", f"u1 {wavs}/r0.wav\nu2 ../../audio/r1.wav\n")
    _write(d / "text", "u1 HELLO WORLD\nu2\n")
    _write(d / "utt2spk", "u1 spk1\nu2 spk2\n")
    utts = load_manifest(d)
    assert [u.id for u in utts] == ["u1", "u2"]
    assert utts[0].text == "HELLO WORLD" and utts[0].speaker == "spk1"
    assert utts[1].text == "" and utts[1].audio == str((d / "../../audio/r1.wav").resolve())


def test_kaldi_dir_with_segments_and_pipe(tmp_path, wavs):
    d = tmp_path / "k"
    _write(d / "wav.scp", f"rec0 {wavs}/r0.wav\nrec1 sox {wavs}/r1.wav -t wav - |\n")
    _write(d / "segments", "a rec0 0.0 0.5\nb rec0 0.5 -1\nc rec1 0.1 0.9\n")
    _write(d / "text", "a one\nb two\nc three\n")
    utts = load_manifest(d)
    assert [(u.id, u.start, u.duration) for u in utts] == [
        ("a", 0.0, 0.5),
        ("b", 0.5, None),
        ("c", 0.1, pytest.approx(0.8)),
    ]
    assert utts[2].audio == f"sox {wavs}/r1.wav -t wav - |" and utts[2].is_pipe


@pytest.mark.parametrize(
    "files, where, message",
    [
        ({"wav.scp": "r0 a.wav\nr1\n"}, "wav.scp:2", "expected '<key> <value>'"),
        ({"wav.scp": "r0 a.wav\nr0 b.wav\n"}, "wav.scp:2", "duplicate recording id"),
        (
            {"wav.scp": "r0 a.wav\n", "segments": "s r0 0 1\ns2 r9 0 1\n"},
            "segments:2",
            "recording 'r9'",
        ),
        ({"wav.scp": "r0 a.wav\n", "segments": "s r0 zero 1\n"}, "segments:1", "must be numbers"),
        (
            {"wav.scp": "r0 a.wav\n", "segments": "s r0 0\n"},
            "segments:1",
            "expected '<utt-id> <rec-id>",
        ),
        ({"wav.scp": "r0 a.wav\n", "text": "r0 hi\nr0 again\n"}, "text:2", "duplicate key"),
        ({"wav.scp": "r0 a.wav\n", "text": "zz hi\n"}, "text", "not in wav.scp"),
        (
            {"wav.scp": "r0 a.wav\n", "segments": "s r0 0 1\ns r0 1 2\n"},
            "segments:2",
            "duplicate utterance id 's'",
        ),
    ],
)
def test_kaldi_malformed(tmp_path, files, where, message):
    d = tmp_path / "k"
    for name, text in files.items():
        _write(d / name, text)
    with pytest.raises(ManifestError, match=rf"{where}.*{message}"):
        load_manifest(d)


def test_kaldi_text_only_dir(tmp_path):
    d = tmp_path / "lm"
    _write(d / "text", "s1 some text\ns2 more text\n")
    utts = load_manifest(d)
    assert [(u.id, u.audio, u.text) for u in utts] == [
        ("s1", None, "some text"),
        ("s2", None, "more text"),
    ]


# --- lhotse cuts ---------------------------------------------------------------------------------


def _cut(
    cut_id,
    source,
    *,
    start=0.0,
    duration=1.0,
    text="hi there",
    speaker="spk",
    stype="file",
    kind="MonoCut",
):
    return {
        "id": cut_id,
        "start": start,
        "duration": duration,
        "channel": 0,
        "supervisions": [
            {
                "id": cut_id,
                "recording_id": "r",
                "start": 0.0,
                "duration": duration,
                "channel": 0,
                "text": text,
                "speaker": speaker,
            }
        ],
        "recording": {
            "id": "r",
            "sources": [{"type": stype, "channels": [0], "source": source}],
            "sampling_rate": 16000,
            "num_samples": 16000,
            "duration": 1.0,
        },
        "type": kind,
    }


def test_lhotse_cuts(tmp_path, wavs):
    p = tmp_path / "cuts.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps(_cut("c1", "audio/r0.wav", start=0.2, duration=0.5)) + "\n")
        f.write(json.dumps(_cut("c2", "sox x.flac -t wav -", stype="command")) + "\n")
    utts = load_manifest(p)
    assert utts[0] == Utterance(
        "c1", str((tmp_path / "audio/r0.wav").resolve()), "hi there", 0.2, 0.5, "spk"
    )
    assert utts[1].audio == "sox x.flac -t wav - |"


@pytest.mark.parametrize(
    "cut, message",
    [
        (_cut("x", "a.wav", kind="MixedCut"), "cut type 'MixedCut' is not supported"),
        (_cut("x", "s3://bucket/a.wav", stype="url"), "source type 'url'"),
        (
            {**_cut("x", "a.wav"), "recording": {"id": "r", "sources": []}},
            "recording has no sources",
        ),
        ({k: v for k, v in _cut("x", "a.wav").items() if k != "id"}, "cut has no 'id'"),
    ],
)
def test_lhotse_malformed(tmp_path, cut, message):
    p = tmp_path / "cuts.jsonl"
    p.write_text(json.dumps(_cut("ok", "a.wav")) + "\n" + json.dumps(cut) + "\n")
    with pytest.raises(ManifestError, match=rf"cuts\.jsonl:2: .*{message}"):
        load_manifest(p)


# --- writers round-trip --------------------------------------------------------------------------


def _utts(wavs):
    return [
        Utterance("u0", str(wavs / "r0.wav"), "first one", 0.0, None, "s1"),
        Utterance("u1", str(wavs / "r1.wav"), "second", 0.25, 0.5, "s1"),
        Utterance("u2", str(wavs / "r2.wav"), "third", 0.0, 1.0, "s2"),
    ]


def test_write_jsonl_round_trip_relocatable(tmp_path, wavs):
    utts = _utts(wavs)
    p = write_jsonl(utts, tmp_path / "m.jsonl")
    assert load_manifest(p) == utts
    assert '"audio": "audio/r0.wav"' in p.read_text()  # relative: the directory can move
    moved = shutil.copytree(tmp_path, tmp_path.parent / (tmp_path.name + "-moved"))
    assert load_manifest(moved / "m.jsonl")[0].audio == str(moved / "audio" / "r0.wav")


def test_write_kaldi_round_trip(tmp_path, wavs):
    utts = _utts(wavs)
    d = write_kaldi_dir(utts, tmp_path / "kaldi")
    assert (d / "segments").exists() and (d / "spk2utt").read_text() == "s1 u0 u1\ns2 u2\n"
    back = load_manifest(d)
    assert [(u.id, u.audio, u.text, u.start, u.duration, u.speaker) for u in back] == [
        (u.id, u.audio, u.text, u.start, u.duration, u.speaker) for u in utts
    ]


def test_write_kaldi_without_segments_and_bad_ids(tmp_path, wavs):
    utts = [
        Utterance("b", str(wavs / "r1.wav"), "two"),
        Utterance("a", str(wavs / "r0.wav"), "one"),
    ]
    d = write_kaldi_dir(utts, tmp_path / "k")
    assert not (d / "segments").exists()
    assert (d / "wav.scp").read_text().splitlines()[0].startswith("a ")  # sorted by key
    assert [u.speaker for u in load_manifest(d)] == ["a", "b"]  # own speaker when unknown
    with pytest.raises(ManifestError, match="without spaces"):
        write_kaldi_dir([Utterance("a b", None, "x")], tmp_path / "k2")


def test_write_lhotse_round_trip(tmp_path, wavs):
    utts = _utts(wavs)
    p = write_lhotse_cuts(utts, tmp_path / "cuts.jsonl.gz")
    back = load_manifest(p)
    assert [(u.id, u.audio, u.text, u.start, u.speaker) for u in back] == [
        (u.id, u.audio, u.text, u.start, u.speaker) for u in utts
    ]
    assert back[0].duration == 1.0 and back[1].duration == 0.5  # to the end of the recording
    with gzip.open(p, "rt") as f:
        cut = json.loads(f.readline())
    assert cut["type"] == "MonoCut" and cut["recording"]["sampling_rate"] == 16000
    assert (
        cut["recording"]["num_samples"] == 16000 and cut["supervisions"][0]["text"] == "first one"
    )
    assert write_lhotse_cuts(utts, tmp_path / "again.jsonl.gz").read_bytes() == p.read_bytes()


def test_lhotse_reads_what_lhotse_would(tmp_path, wavs):
    lhotse = pytest.importorskip("lhotse")  # optional: only where lhotse is installed
    p = write_lhotse_cuts(_utts(wavs), tmp_path / "cuts.jsonl.gz")
    cuts = lhotse.CutSet.from_file(p)
    assert [c.id for c in cuts] == ["u0", "u1", "u2"]
