"""Audio reading, Kaldi fbank against a numpy reference, the feature store (write/read/atomicity)
and on-the-fly features."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kdcache.data.audio import audio_info, decode_wav, load_audio, read_audio, write_wav
from kdcache.data.features import (
    FeatureError,
    OnTheFlyFeatures,
    compute_fbank,
    num_frames_for,
    open_features,
    repack_features,
    write_features,
)
from kdcache.data.manifest import Utterance

needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")


def _sine(seconds=1.0, freq=440.0, sr=16000, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- numpy reference of Kaldi's fbank for one frame ---------------------------------------------


def _kaldi_fbank_frame(x: np.ndarray, sr: int = 16000, n_mels: int = 80) -> np.ndarray:
    """Log-mel energies of the first frame as Kaldi computes them (dither 0, povey window,
    pre-emphasis 0.97, DC removal, 512-point FFT, 20 Hz..Nyquist mel banks)."""
    frame = x[:400].astype(np.float64) * 32768.0
    frame = frame - frame.mean()
    frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
    n = np.arange(400)
    frame = frame * (0.5 - 0.5 * np.cos(2 * np.pi * n / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frame, 512)) ** 2  # [257]
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (n_mels + 1)
    fft_mel = mel(np.arange(256) * sr / 512)
    out = np.empty(n_mels)
    for m in range(n_mels):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        w = np.where(
            (fft_mel > left) & (fft_mel <= center), (fft_mel - left) / (center - left), 0.0
        )
        w = np.where(
            (fft_mel > center) & (fft_mel < right), (right - fft_mel) / (right - center), w
        )
        out[m] = np.log(max(np.dot(w, power[:256]), np.finfo(np.float32).eps))
    return out


def test_fbank_matches_numpy_reference_and_frame_count():
    rng = np.random.default_rng(0)
    x = (_sine(1.0, 440.0) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
    f = compute_fbank(x)
    assert f.dtype == np.float32 and f.shape == (98, 80)  # 1 + (16000 - 400) // 160
    np.testing.assert_allclose(f[0], _kaldi_fbank_frame(x), rtol=0, atol=2e-3)
    np.testing.assert_allclose(f[5], _kaldi_fbank_frame(x[5 * 160 :]), rtol=0, atol=2e-3)


def test_fbank_known_values_for_a_sine():
    # Fixed numbers (kaldi-native-fbank, a 440 Hz sine at half scale): bin 8 holds 440 Hz.
    f = compute_fbank(_sine(0.1))
    assert f.shape == (8, 80)
    assert int(np.argmax(f[3])) == int(np.argmax(_kaldi_fbank_frame(_sine(0.1)[3 * 160 :])))
    np.testing.assert_allclose(f[3, 8], _kaldi_fbank_frame(_sine(0.1)[480:])[8], atol=2e-3)


@pytest.mark.parametrize(
    "n, expected", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16000, 98)]
)
def test_num_frames_for(n, expected):
    assert num_frames_for(n) == expected
    assert len(compute_fbank(np.zeros(n, np.float32) + 0.01)) == expected


def test_fbank_is_deterministic_and_rejects_stereo():
    x = _sine(0.5)
    assert np.array_equal(compute_fbank(x), compute_fbank(x))
    with pytest.raises(ValueError, match="mono"):
        compute_fbank(np.zeros((100, 2), np.float32))


# --- audio ---------------------------------------------------------------------------------------


def test_wav_read_slice_and_info(tmp_path):
    x = _sine(1.0)
    p = write_wav(tmp_path / "a.wav", x)
    info = audio_info(p)
    assert (info.sample_rate, info.num_samples, info.num_channels) == (16000, 16000, 1)
    y = read_audio(p)
    np.testing.assert_allclose(y, x, atol=1 / 32768)
    s = read_audio(p, start=0.25, duration=0.5)
    np.testing.assert_allclose(s, x[4000:12000], atol=1 / 32768)
    assert len(read_audio(p, start=0.9, duration=0.5)) == 1600  # clamped at the end
    assert len(load_audio(Utterance("u", str(p), None, 0.5, None))) == 8000


@needs_sox
def test_other_encodings_resampling_and_pipes(tmp_path):
    sox = shutil.which("sox")
    subprocess.run(
        [
            sox,
            "-n",
            "-r",
            "8000",
            "-c",
            "2",
            "-b",
            "24",
            str(tmp_path / "s24.wav"),
            "synth",
            "0.5",
            "sine",
            "440",
        ],
        check=True,
    )
    subprocess.run(
        [
            sox,
            "-n",
            "-r",
            "16000",
            "-e",
            "floating-point",
            "-b",
            "32",
            str(tmp_path / "f.wav"),
            "synth",
            "0.5",
            "sine",
            "300",
        ],
        check=True,
    )
    subprocess.run(
        [sox, "-n", "-r", "16000", str(tmp_path / "a.flac"), "synth", "0.5", "sine", "440"],
        check=True,
    )
    y24 = read_audio(tmp_path / "s24.wav")  # 24-bit stereo 8 kHz -> mono 16 kHz
    assert len(y24) == 8000 and 0.5 < np.abs(y24).max() <= 1.0
    # Native 24-bit decoding and channel averaging agree with sox's own.
    native = read_audio(tmp_path / "s24.wav", sample_rate=8000)
    by_sox = subprocess.run(
        [
            sox,
            str(tmp_path / "s24.wav"),
            "-t",
            "raw",
            "-e",
            "floating-point",
            "-b",
            "32",
            "-c",
            "1",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    np.testing.assert_allclose(native, np.frombuffer(by_sox, "<f4"), atol=1e-6)
    yf = read_audio(tmp_path / "f.wav")
    assert len(yf) == 8000 and yf.dtype == np.float32
    yfl = read_audio(tmp_path / "a.flac", start=0.1, duration=0.2)
    assert abs(len(yfl) - 3200) <= 1
    assert audio_info(tmp_path / "a.flac").num_samples == 8000
    pipe = f"{sox} {tmp_path / 'a.flac'} -t wav - |"
    yp = read_audio(pipe, start=0.1, duration=0.2)
    np.testing.assert_allclose(yp, yfl, atol=2e-4)
    assert audio_info(pipe).num_samples == 8000
    samples, sr = decode_wav((tmp_path / "f.wav").read_bytes())
    assert sr == 16000 and len(samples) == 8000


# --- feature store -------------------------------------------------------------------------------


@pytest.fixture
def utts(tmp_path):
    rng = np.random.default_rng(1)
    out = []
    for i, secs in enumerate([0.8, 1.3, 0.02, 2.1, 0.5]):  # 0.02 s: shorter than a frame
        x = 0.2 * rng.standard_normal(int(secs * 16000)) + _sine(secs, 200 + 100 * i)
        p = write_wav(tmp_path / f"w{i}.wav", np.clip(x, -1, 1))
        out.append(Utterance(f"utt{i}", str(p), "t"))
    out.append(Utterance("seg", out[3].audio, "t", start=0.5, duration=1.0))
    return out


def test_store_write_read(tmp_path, utts):
    store = write_features(utts, tmp_path / "s.fbank", workers=1, progress=False, chunk_frames=64)
    ref = {u.id: compute_fbank(load_audio(u)) for u in utts}
    assert store.utt_ids == [u.id for u in utts] and len(store) == len(utts)
    assert "utt1" in store and "nope" not in store
    for u in utts:
        got = store[u.id]
        assert got.dtype == np.float32 and got.shape == ref[u.id].shape
        assert store.num_frames(u.id) == len(ref[u.id])
        np.testing.assert_allclose(got, ref[u.id], rtol=2e-3, atol=2e-2)  # float16 storage
    assert store.num_frames("utt2") == 0 and store["utt2"].shape == (0, 80)
    allf = np.concatenate(list(ref.values())).astype(np.float64)
    np.testing.assert_allclose(store.mean, allf.mean(0), rtol=1e-4)
    np.testing.assert_allclose(store.std, allf.std(0), rtol=1e-3)
    with pytest.raises(KeyError, match="'nope' is not in feature store"):
        store["nope"]

    lazy = open_features(tmp_path / "s.fbank", in_memory=False)
    assert not lazy.in_memory and store.in_memory  # small stores load into RAM by default
    ids = ["seg", "utt0", "utt3", "utt2", "utt0"]
    for a, b in zip(lazy.read_many(ids), ids, strict=True):
        np.testing.assert_array_equal(a, store[b])
    for u in utts:  # single reads through the chunk cache
        np.testing.assert_array_equal(lazy[u.id], store[u.id])
    np.testing.assert_array_equal(
        lazy.normalize(lazy["utt0"]), (store["utt0"] - store.mean) / store.std
    )


def test_repack_rounds_values_and_keeps_everything_else(tmp_path, utts):
    import pyarrow.parquet as pq
    import zarr

    src = write_features(utts, tmp_path / "s.fbank", progress=False, chunk_frames=64)
    exact = repack_features(src.path, tmp_path / "same.fbank", keepbits=None, progress=False)
    for u in utts:
        np.testing.assert_array_equal(exact[u.id], src[u.id])
    small = repack_features(src.path, tmp_path / "k5.fbank", keepbits=5, progress=False)
    assert small.utt_ids == src.utt_ids and small.attrs["keepbits"] == 5
    assert small.attrs["chunk_frames"] == 64 and small.attrs["extractor"] == src.attrs["extractor"]
    np.testing.assert_array_equal(small.mean, src.mean)  # CMVN of the original values
    np.testing.assert_array_equal(small.std, src.std)
    for u in utts:
        a, b = src[u.id], small[u.id]
        assert a.shape == b.shape
        # round to nearest on 5 of 10 mantissa bits: relative error <= 2^-6 (plus subnormals)
        assert np.all(np.abs(a - b) <= np.abs(a) * 2.0**-6 + 1e-6)
        # the low 5 mantissa bits are zero: an independent check on the raw float16 bits
        bits = b.astype(np.float16).view(np.uint16)
        assert not np.any(bits & 0x1F)
    assert np.any(src["utt0"] != small["utt0"])  # it did round something
    # an independent reader sees the same values
    root = zarr.open_group(str(tmp_path / "k5.fbank"), mode="r")
    idx = pq.read_table(tmp_path / "k5.fbank" / "index.parquet").to_pydict()
    i = idx["utt_id"].index("utt3")
    x = root["feats"][idx["offset"][i] : idx["offset"][i] + idx["num_frames"][i]]
    np.testing.assert_array_equal(x.astype(np.float32), small["utt3"])
    with pytest.raises(FeatureError, match="already exists"):
        repack_features(src.path, tmp_path / "k5.fbank", keepbits=5, progress=False)
    with pytest.raises(FeatureError, match="keepbits must be in 1..10"):
        repack_features(src.path, tmp_path / "k0.fbank", keepbits=0, progress=False)
    assert not (tmp_path / "k0.fbank").exists()


def test_write_with_keepbits_matches_repack(tmp_path, utts):
    direct = write_features(utts, tmp_path / "d.fbank", progress=False, keepbits=6)
    full = write_features(utts, tmp_path / "f.fbank", progress=False)
    packed = repack_features(full.path, tmp_path / "p.fbank", keepbits=6, progress=False)
    for u in utts:
        np.testing.assert_array_equal(direct[u.id], packed[u.id])
    np.testing.assert_array_equal(direct.mean, full.mean)  # statistics before rounding


def test_store_pickles_for_spawned_workers(tmp_path, utts):
    import pickle

    for in_memory in (True, False):
        store = open_features(
            write_features(utts, tmp_path / f"p{in_memory}", progress=False).path,
            in_memory=in_memory,
        )
        blob = pickle.dumps(store)
        assert len(blob) < 2000  # a path, not the data
        clone = pickle.loads(blob)
        assert clone.in_memory == in_memory
        np.testing.assert_array_equal(clone["utt3"], store["utt3"])


def test_store_is_readable_with_plain_zarr_and_pyarrow(tmp_path, utts):
    import pyarrow.parquet as pq
    import zarr

    write_features(utts, tmp_path / "s.fbank", progress=False)
    root = zarr.open_group(str(tmp_path / "s.fbank"), mode="r")
    idx = pq.read_table(tmp_path / "s.fbank" / "index.parquet").to_pydict()
    attrs = root.attrs["kdcache_features"]
    assert attrs["num_mel_bins"] == 80 and attrs["dtype"] == "float16" and len(attrs["mean"]) == 80
    i = idx["utt_id"].index("utt1")
    x = root["feats"][idx["offset"][i] : idx["offset"][i] + idx["num_frames"][i]]
    np.testing.assert_array_equal(x.astype(np.float32), open_features(tmp_path / "s.fbank")["utt1"])


def test_store_parallel_equals_serial(tmp_path, utts):
    a = write_features(utts, tmp_path / "a.fbank", workers=1, progress=False)
    b = write_features(utts, tmp_path / "b.fbank", workers=2, progress=False)
    for u in utts:
        np.testing.assert_array_equal(a[u.id], b[u.id])
    np.testing.assert_array_equal(a.mean, b.mean)


def test_store_atomic_on_failure_and_overwrite(tmp_path, utts):
    out = tmp_path / "s.fbank"
    bad = utts + [Utterance("missing", str(tmp_path / "nope.wav"), "t")]
    with pytest.raises(Exception, match="missing"):
        write_features(bad, out, workers=1, progress=False)
    assert not out.exists() and list(tmp_path.glob(".s.fbank.tmp-*")) == []

    with pytest.raises(Exception, match="missing"):  # the same through the process pool
        write_features(bad, out, workers=2, progress=False)
    assert not out.exists() and list(tmp_path.glob(".s.fbank.tmp-*")) == []

    write_features(utts[:2], out, progress=False)
    with pytest.raises(FeatureError, match="already exists"):
        write_features(utts, out, progress=False)
    with pytest.raises(Exception, match="missing"):
        write_features(bad, out, progress=False, overwrite=True)
    assert open_features(out).utt_ids == ["utt0", "utt1"]  # the old store is untouched
    assert write_features(utts, out, progress=False, overwrite=True).utt_ids == [u.id for u in utts]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_store_killed_run_leaves_nothing_at_the_target(tmp_path, utts):
    import signal
    import sys
    import time

    from kdcache.data.manifest import write_jsonl

    slow = [Utterance(f"s{i}", f"sleep 0.2; cat {utts[0].audio} |", "t") for i in range(40)]
    write_jsonl(slow, tmp_path / "slow.jsonl")
    out = tmp_path / "killed.fbank"
    code = (
        "import sys; from kdcache.data.manifest import load_manifest; "
        "from kdcache.data.features import write_features; "
        f"write_features(load_manifest({str(tmp_path / 'slow.jsonl')!r}), {str(out)!r}, progress=False)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".killed.fbank.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".killed.fbank.tmp-*"))
    write_features(utts[:1], out, progress=False)  # the next run cleans up and succeeds
    assert open_features(out).utt_ids == ["utt0"] and not list(tmp_path.glob(".killed.fbank.tmp-*"))


def test_store_stale_tmp_of_killed_run_is_removed(tmp_path, utts):
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that no longer runs
    stale = tmp_path / f".s.fbank.tmp-{proc.pid}"
    stale.mkdir()
    (stale / "junk").write_text("half written")
    write_features(utts[:1], tmp_path / "s.fbank", progress=False)
    assert not stale.exists()


def test_store_rejects_bad_input(tmp_path, utts):
    with pytest.raises(FeatureError, match="duplicate"):
        write_features([utts[0], utts[0]], tmp_path / "d", progress=False)
    with pytest.raises(FeatureError, match="has no audio"):
        write_features([Utterance("x", None, "t")], tmp_path / "d", progress=False)
    (tmp_path / "notastore").mkdir()
    with pytest.raises(FeatureError, match="cannot open feature store|not a kdcache feature store"):
        open_features(tmp_path / "notastore")


def test_on_the_fly_features(tmp_path, utts):
    store = write_features(utts, tmp_path / "s.fbank", progress=False)
    otf = OnTheFlyFeatures(utts)
    assert otf.utt_ids == store.utt_ids and "utt0" in otf
    assert otf.num_frames("seg") == store.num_frames("seg")  # from the duration, no decoding
    assert [otf.num_frames(u) for u in otf.utt_ids] == [store.num_frames(u) for u in store.utt_ids]
    for u in utts:
        np.testing.assert_allclose(otf[u.id], store[u.id], rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(otf.mean, store.mean, rtol=1e-5)
    np.testing.assert_allclose(otf.std, store.std, rtol=1e-4)
    given = OnTheFlyFeatures(utts[:1], stats=(np.zeros(80), np.ones(80)))
    assert given.mean.sum() == 0 and len(given.read_many(["utt0"])) == 1


def test_store_env_does_not_leak_threads_or_files(tmp_path, utts):
    before = set(os.listdir(tmp_path))
    write_features(utts[:2], tmp_path / "x.fbank", workers=2, progress=False)
    assert set(os.listdir(tmp_path)) - before == {"x.fbank"}
