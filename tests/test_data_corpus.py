"""The demo corpus at tiny size: layout, disjoint splits, equal manifests in three formats,
16 kHz audio that matches its transcript's length, determinism; and the data CLI commands."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from kdcache.commands import data as data_cmd
from kdcache.data.audio import audio_info, read_audio
from kdcache.data.manifest import load_manifest
from kdcache.data.text import normalize_text

pytestmark = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox") and shutil.which("bible")),
    reason="demo corpus needs espeak-ng, sox and bible-kjv (scripts/setup_env.sh)",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from kdcache.data.demo_corpus import build_demo_corpus

    # Built from a relative --out on purpose: the Kaldi and lhotse manifests hold absolute paths,
    # which once came out relative to the temporary build directory.
    root = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_demo_corpus("corpus", seed=3, size="tiny", workers=2, progress=False)
    finally:
        os.chdir(cwd)
    return root / "corpus"


def test_layout_and_summary(corpus):
    from kdcache.data.demo_corpus import SIZES, SPLITS

    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["format"] == "kdcache-demo-corpus" and summary["seed"] == 3
    for split in SPLITS:
        d = corpus / split
        for name in ("manifest.jsonl", "cuts.jsonl.gz", "wav.scp", "text", "utt2spk", "spk2utt"):
            assert (d / name).is_file(), name
        assert summary["splits"][split]["utterances"] == getattr(SIZES["tiny"], split)
        assert len(list((d / "wav").glob("*.wav"))) == getattr(SIZES["tiny"], split)
    assert summary["lm_text"]["sentences"] > 20000
    assert not list(corpus.parent.glob(".corpus.tmp-*"))


def test_splits_disjoint_and_normalised(corpus):
    texts = {
        s: [u.text for u in load_manifest(corpus / s / "manifest.jsonl")]
        for s in ("train", "dev", "test")
    }
    lm = (corpus / "lm_text.txt").read_text().splitlines()
    sets = {**{k: set(v) for k, v in texts.items()}, "lm": set(lm)}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], f"{a} and {b} share sentences"
    for t in [*lm[:500], *texts["train"]]:
        assert t == normalize_text(t) and t


def test_three_manifest_formats_agree(corpus):
    for split in ("train", "dev"):
        plain = load_manifest(corpus / split / "manifest.jsonl")
        kaldi = {u.id: u for u in load_manifest(corpus / split)}
        cuts = {u.id: u for u in load_manifest(corpus / split / "cuts.jsonl.gz")}
        assert set(kaldi) == set(cuts) == {u.id for u in plain}
        for u in plain:
            assert kaldi[u.id].audio == cuts[u.id].audio == u.audio
            assert kaldi[u.id].text == cuts[u.id].text == u.text
            assert kaldi[u.id].speaker == cuts[u.id].speaker == u.speaker
            assert cuts[u.id].duration == pytest.approx(u.duration, abs=1e-4)


def test_audio_is_16k_mono_speech(corpus):
    for u in load_manifest(corpus / "train" / "manifest.jsonl")[:6]:
        info = audio_info(u.audio)
        assert (info.sample_rate, info.num_channels) == (16000, 1)
        assert info.duration == pytest.approx(u.duration, abs=1e-3)
        x = read_audio(u.audio)
        assert 0.02 < np.abs(x).max() <= 1.0
        # ~2-5 words a second: the audio says the transcript, not something else
        assert 1.0 < len(u.text.split()) / u.duration < 6.0


def test_synthesis_is_deterministic_whatever_the_worker(corpus, tmp_path):
    from kdcache.data.demo_corpus import (
        SPLITS,
        _jobs_for,
        available_variants,
        load_sentences,
        split_voices,
        synthesize,
    )

    # Rebuild the first two train jobs in this process and compare bytes with the pool's output.
    summary = json.loads((corpus / "corpus.json").read_text())
    utts = load_manifest(corpus / "train" / "manifest.jsonl")[:2]
    sents = {s[2]: s for s in load_sentences()}
    accents, variants = split_voices("train", available_variants(), summary["voice_split"])
    jobs, _ = _jobs_for(
        "train",
        [sents[u.text] for u in utts],
        corpus / "train" / "wav",
        summary["seed"],
        variants,
        accents,
    )
    assert SPLITS[0] == "train"
    for job, u in zip(jobs, utts, strict=True):
        assert job.path == u.audio
        mine = replace(job, path=str(tmp_path / Path(job.path).name))
        synthesize(mine)
        assert Path(mine.path).read_bytes() == Path(u.audio).read_bytes()


def test_a_larger_train_split_keeps_dev_and_test(corpus, tmp_path, monkeypatch):
    """Sizes differ in train only ("demo" vs "large"): dev and test are the same utterances, the
    same audio bytes, so results on the two sizes compare on one test set."""
    from kdcache.data import demo_corpus as dc

    monkeypatch.setitem(dc.SIZES, "tiny_plus", dc.SizeSpec(train=28, dev=8, test=8))
    big = dc.build_demo_corpus(tmp_path / "big", seed=3, size="tiny_plus", progress=False)
    assert big["splits"]["train"]["utterances"] == 28
    for split in ("dev", "test"):
        a = load_manifest(corpus / split / "manifest.jsonl")
        b = load_manifest(tmp_path / "big" / split / "manifest.jsonl")
        assert [(u.id, u.text) for u in a] == [(u.id, u.text) for u in b]
        for ua, ub in zip(a, b, strict=True):
            assert Path(ua.audio).read_bytes() == Path(ub.audio).read_bytes()
    small_train = {u.text for u in load_manifest(corpus / "train" / "manifest.jsonl")}
    big_train = {u.text for u in load_manifest(tmp_path / "big" / "train" / "manifest.jsonl")}
    assert small_train < big_train  # the larger train split extends the smaller one


def test_dev_and_test_voices_are_never_heard_in_training(corpus):
    from kdcache.data.demo_corpus import HELDOUT_ACCENTS, HELDOUT_VARIANTS

    summary = json.loads((corpus / "corpus.json").read_text())
    assert summary["voice_split"] == "heldout"
    spk = {
        s: {u.speaker for u in load_manifest(corpus / s / "manifest.jsonl")}
        for s in ("train", "dev", "test")
    }
    accent = {s: {x.split("_")[0] for x in v} for s, v in spk.items()}
    variant = {s: {x.split("_", 1)[1] for x in v} for s, v in spk.items()}
    assert not (variant["dev"] | variant["test"]) & variant["train"]
    assert (variant["dev"] | variant["test"]) <= set(HELDOUT_VARIANTS)
    assert not accent["train"] & set(HELDOUT_ACCENTS)


def test_shared_voices_mode_is_the_old_split():
    from kdcache.data.demo_corpus import VOICES, CorpusError, split_voices

    assert split_voices("train", ("", "m1", "m3"), "shared") == (VOICES, ("", "m1", "m3"))
    assert split_voices("test", ("", "m1", "m3"), "heldout")[1] == ("m3",)
    assert "m3" not in split_voices("train", ("", "m1", "m3"), "heldout")[1]
    with pytest.raises(CorpusError, match="unknown voices mode"):
        split_voices("train", ("",), "mixed")


def test_existing_output_is_refused(corpus):
    from kdcache.data.demo_corpus import CorpusError, build_demo_corpus

    with pytest.raises(CorpusError, match="already exists"):
        build_demo_corpus(corpus, size="tiny")
    with pytest.raises(CorpusError, match="unknown size"):
        build_demo_corpus(corpus.parent / "other", size="huge")


# --- CLI -----------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("demo-corpus")(data_cmd.demo_corpus)
    app.command("features")(data_cmd.features)
    app.command("tokenizer")(data_cmd.tokenizer)
    return app


def test_cli_features_on_a_corpus_root(corpus, tmp_path):
    from kdcache.data.features import open_features

    r = CliRunner().invoke(
        _app(),
        [
            "features",
            str(corpus),
            "--out",
            str(tmp_path / "feats"),
            "--workers",
            "1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    for split in ("train", "dev", "test"):
        store = open_features(tmp_path / "feats" / f"{split}.fbank")
        assert len(store) == len(load_manifest(corpus / split / "manifest.jsonl"))
    r = CliRunner().invoke(
        _app(), ["features", str(corpus / "dev"), "--out", str(tmp_path / "feats" / "dev.fbank")]
    )
    assert r.exit_code == 2 and "already exists" in r.output


def test_cli_tokenizer_train_show_encode(corpus, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        _app(),
        [
            "tokenizer",
            "train",
            "--text",
            str(corpus / "lm_text.txt"),
            "--text",
            str(corpus / "train"),
            "--kind",
            "bpe",
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "bpe"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        _app(), ["tokenizer", "show", str(tmp_path / "bpe"), "--sample", "In the Beginning!"]
    )
    assert r.exit_code == 0, r.output
    assert "vocab_size  300" in r.output and "decoded     in the beginning" in r.output
    r = runner.invoke(
        _app(),
        [
            "tokenizer",
            "train",
            "--text",
            str(corpus / "train" / "manifest.jsonl"),
            "--kind",
            "char",
            "--out",
            str(tmp_path / "char"),
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(_app(), ["tokenizer", "encode", str(tmp_path / "char")])
    assert r.exit_code == 2 and "needs --sample" in r.output
    r = runner.invoke(_app(), ["tokenizer", "train", "--kind", "char"])
    assert r.exit_code == 2 and "needs --text" in r.output
