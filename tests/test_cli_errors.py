"""Every mistake a user can make gets one clear line (issue 15): ``error: ...`` on stderr, naming
the file, option or utterance, exit status 2 (``kdcache verify``: 1 for a damaged cache), no
traceback; nothing is silently overwritten and nothing half-made is left behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli import app, train_app

TINY = [
    "model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.decoder_layers=1",
    "model.decoder_heads=2", "model.ff_mult=2", "model.conv_kernel=7", "data.max_frames=1000",
    "optim.warmup_steps=2", "train.log_every=1", "train.progress=false", "train.device=cpu",
]  # fmt: skip


def one_error(res, *needles: str, code: int = 2) -> str:
    """The result failed with ``code`` and exactly one ``error:`` line on stderr (other stderr
    lines may only be log records) that contains every needle; no traceback anywhere."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    others = [x for x in lines if not x.startswith(("error: ", "INFO ", "WARNING "))]
    assert len(errors) == 1 and not others, res.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=8, seed=0)


def _run_args(toy, out, *extra):
    return ["run", "--recipe", "lst", "--cache", str(toy.cache), "--data", str(toy.manifest),
            "--features", str(toy.features), "--tokenizer", str(toy.tokenizer), "--out", str(out),
            *TINY, *extra]  # fmt: skip


def _swap(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


# ------------------------------------------------------------------------------- kdtrain run


def test_run_missing_cache(toy, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        train_app, _swap(_run_args(toy, out), "--cache", str(tmp_path / "nope.kdc"))
    )
    one_error(res, "nope.kdc")
    assert not out.exists()


def test_run_features_pointing_at_a_cache(toy, tmp_path):
    res = CliRunner().invoke(
        train_app, _swap(_run_args(toy, tmp_path / "run"), "--features", str(toy.cache))
    )
    one_error(res, str(toy.cache))


def test_run_damaged_cache(toy, tmp_path):
    import shutil

    bad = tmp_path / "bad.kdc"
    shutil.copytree(toy.cache, bad)
    (bad / "zarr.json").write_text((bad / "zarr.json").read_text()[:30])
    res = CliRunner().invoke(
        train_app, _swap(_run_args(toy, tmp_path / "run"), "--cache", str(bad))
    )
    one_error(res, "bad.kdc")


def test_run_tokenizer_name_offline_is_fast(toy, tmp_path, monkeypatch):
    from kdcache import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.offline_reason.cache_clear()
    t0 = time.monotonic()
    res = CliRunner().invoke(
        train_app, _swap(_run_args(toy, tmp_path / "run"), "--tokenizer", "nope")
    )
    hub.offline_reason.cache_clear()
    one_error(res, "'nope'", "HF_HUB_OFFLINE")
    assert time.monotonic() - t0 < 20


def test_hub_unreachable_without_env(monkeypatch):
    """No HF_HUB_OFFLINE but no network: the probe says so within its timeout; the message says
    what to pass instead."""
    from kdcache import hub
    from kdcache.teachers.loading import resolve_model

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub.offline_reason.cache_clear()
    try:
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError, match="hub.invalid is unreachable.*minilm, smollm2"):
            resolve_model("some-org/some-model")
        assert time.monotonic() - t0 < hub.PROBE_SECONDS + 1
    finally:
        hub.offline_reason.cache_clear()


def test_run_yaml_syntax_error(toy, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim:\n  lr: [1e-3\ntrain:\n  max_steps: 2\n")
    res = CliRunner().invoke(train_app, _run_args(toy, tmp_path / "run", "--config", str(cfg)))
    one_error(res, "bad.yaml:", "not valid YAML")


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-1",
        "optim.lr=0",
        "optim.eps=0",
        "train.max_steps=0",
        "optim.betas=[0.9,1.5]",
        "data.specaug.time_mask_max_ratio=2",
    ],
)
def test_run_bad_value_is_refused_before_anything_is_made(toy, tmp_path, override):
    out = tmp_path / "run"
    res = CliRunner().invoke(train_app, _run_args(toy, out, override))
    one_error(res, override.split("=")[0])
    assert not out.exists()


# ------------------------------------------------------------------ checkpoints: newest damaged


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    res = CliRunner().invoke(
        train_app,
        _run_args(toy, run, "train.max_steps=4", "train.ckpt_every=2", "train.keep_checkpoints=2"),
    )
    assert res.exit_code == 0, res.output
    return run


def _truncated_copy(trained, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = run / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    return run


def test_eval_falls_back_from_a_truncated_checkpoint(toy, trained, tmp_path, caplog):
    run = _truncated_copy(trained, tmp_path)
    res = CliRunner().invoke(
        train_app,
        [
            "eval",
            "--run",
            str(run),
            "--data",
            str(toy.manifest),
            "--features",
            str(toy.features),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    results = json.loads((Path(out["out_dir"]) / "results.json").read_text())
    assert results["checkpoint"].endswith("step-00000002.pt")
    assert "step-00000004.pt" in caplog.text and "truncated" in caplog.text


def _eval_args(toy, run, *extra):
    return ["eval", "--run", str(run), "--data", str(toy.manifest), "--features",
            str(toy.features), "--device", "cpu", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def toy_lm(toy, tmp_path_factory):
    """An LSTM LM in the toy student's units (a few sentences of its own alphabet)."""
    from kdcache.teachers.lstm_lm import train_lm

    out = tmp_path_factory.mktemp("lm") / "lm"
    texts = [json.loads(x)["text"] for x in Path(toy.manifest).read_text().splitlines()]
    train_lm(texts, str(toy.tokenizer), str(out), layers=1, hidden=16, epochs=1, progress=False)
    return out


def test_eval_with_shallow_fusion(toy, trained, toy_lm, tmp_path):
    res = CliRunner().invoke(
        train_app,
        _eval_args(
            toy,
            trained,
            "--decode",
            "attention_beam",
            "--beam",
            "2",
            "--lm",
            str(toy_lm),
            "--lm-weight",
            "0.3",
        ),  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    out = Path(json.loads(res.stdout.strip().splitlines()[-1])["out_dir"])
    assert out.name.endswith("-attention_beam-lm0.3")  # never overwrites the unfused eval
    results = json.loads((out / "results.json").read_text())
    assert results["lm"] == str(toy_lm) and results["lm_weight"] == 0.3


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--decode", "ctc_greedy", "--lm", "LM"], ["--lm", "attention_beam"]),
        (["--decode", "attention_beam", "--lm-weight", "0.3"], ["--lm-weight", "needs --lm"]),
        (["--decode", "attention_beam", "--lm", "LM", "--lm-weight", "0"], ["--lm-weight"]),
        (["--decode", "attention_beam", "--lm", "NOTLM", "--lm-weight", "0.3"],
         ["not an LSTM LM directory"]),
        (["--decode", "attention_beam", "--lm", "OTHER", "--lm-weight", "0.3"],
         ["not the student's", "student's units"]),
    ],
)  # fmt: skip
def test_eval_lm_errors(toy, trained, toy_lm, tmp_path, extra, needles):
    import shutil

    from kdcache.data.tokenizer import Tokenizer

    other = tmp_path / "other"
    shutil.copytree(toy_lm, other)
    Tokenizer.build_char(["zzz qqq xyz"]).save(other / "tokenizer")
    paths = {"LM": str(toy_lm), "NOTLM": str(tmp_path), "OTHER": str(other)}
    extra = [paths.get(x, x) for x in extra]
    one_error(CliRunner().invoke(train_app, _eval_args(toy, trained, *extra)), *needles)


def test_resume_falls_back_from_a_truncated_checkpoint(toy, trained, tmp_path, caplog):
    run = _truncated_copy(trained, tmp_path)
    res = CliRunner().invoke(train_app, ["run", "--out", str(run), "--resume", "train.max_steps=5"])
    assert res.exit_code == 0, res.output
    assert "done: step 5" in res.stdout
    assert "step-00000004.pt is damaged or truncated" in caplog.text
    assert "using the previous checkpoint" in caplog.text and "step-00000002.pt" in caplog.text


def test_every_checkpoint_damaged(toy, trained, tmp_path):
    run = _truncated_copy(trained, tmp_path)
    (run / "checkpoints" / "step-00000002.pt").write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(
        train_app,
        [
            "eval",
            "--run",
            str(run),
            "--data",
            str(toy.manifest),
            "--features",
            str(toy.features),
            "--device",
            "cpu",
        ],
    )
    one_error(res, "no readable checkpoint")
    res = CliRunner().invoke(train_app, ["run", "--out", str(run), "--resume", "train.max_steps=5"])
    one_error(res, "no readable checkpoint")


# ------------------------------------------------------------------------------ kdcache build


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_build_out_not_a_cache(toy, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine\n")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    res = CliRunner().invoke(
        app,
        [
            "build",
            "--teacher",
            "bert",
            "--model",
            "nope",
            "--data",
            str(toy.manifest),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    one_error(res, str(out))
    if kind == "file":
        assert out.read_text() == "mine\n"
    else:
        assert sorted(p.name for p in out.iterdir()) == before  # no .kdcache.lock left behind


def test_build_bare_model_name_offline(toy, tmp_path, monkeypatch):
    from kdcache import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.offline_reason.cache_clear()
    t0 = time.monotonic()
    res = CliRunner().invoke(
        app,
        [
            "build",
            "--teacher",
            "bert",
            "--model",
            "some-org/some-bert",
            "--data",
            str(toy.manifest),
            "--out",
            str(tmp_path / "c.kdc"),
            "--no-progress",
        ],
    )
    hub.offline_reason.cache_clear()
    one_error(res, "'some-org/some-bert'", "minilm")
    assert time.monotonic() - t0 < 20


def test_build_refuses_a_tokenizer_that_knows_nothing(tmp_path, tiny_bert):
    from tiny_models import write_manifest

    m = write_manifest(tmp_path / "m.jsonl", texts=["中文", "文中 中"])
    out = tmp_path / "c.kdc"
    res = CliRunner().invoke(
        app,
        [
            "build",
            "--teacher",
            "bert",
            "--model",
            str(tiny_bert),
            "--data",
            str(m),
            "--out",
            str(out),
            "--top-k",
            "4",
            "--no-progress",
        ],
    )
    one_error(res, "unknown token", "--model")
    assert not out.exists()


# ------------------------------------------------------------------------------ manifests


def test_non_utf8_kaldi_text_names_file_and_line(tmp_path):
    from kdcache.data.manifest import ManifestError, load_manifest

    d = tmp_path / "kaldi"
    d.mkdir()
    (d / "text").write_bytes(b"u1 hello\nu2 caf\xe9 au lait\n")
    with pytest.raises(ManifestError, match=r"kaldi/text:2: not UTF-8"):
        load_manifest(d)
    res = CliRunner().invoke(
        app,
        ["tokenizer", "train", "--kind", "char", "--text", str(d), "--out", str(tmp_path / "tok")],
    )
    one_error(res, "text:2", "UTF-8")


def test_non_utf8_jsonl_names_the_line(tmp_path):
    from kdcache.data.manifest import ManifestError, load_manifest

    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not UTF-8"):
        load_manifest(p)


# ------------------------------------------------------------------------ tokenizer / train-lm


def test_tokenizer_train_strips_kaldi_ids(tmp_path):
    from kdcache.data.tokenizer import Tokenizer

    d = tmp_path / "data"
    d.mkdir()
    (d / "text").write_text("spk1-utt001 hello world\nspk1-utt002 low wood\n")
    (d / "wav.scp").write_text("spk1-utt001 a.wav\nspk1-utt002 b.wav\n")
    plain = tmp_path / "ids.txt"  # same content under another name: the ids still look like ids
    plain.write_text((d / "text").read_text())
    for src in (d / "text", plain):
        out = tmp_path / f"tok-{src.name}"
        res = CliRunner().invoke(
            app, ["tokenizer", "train", "--kind", "char", "--text", str(src), "--out", str(out)]
        )
        assert res.exit_code == 0, res.output
        assert "Kaldi text" in res.stderr
        pieces = {Tokenizer.load(out).id_to_piece(i) for i in range(Tokenizer.load(out).vocab_size)}
        assert not pieces & set("0123456789-"), pieces


def test_plain_text_is_not_taken_for_kaldi(tmp_path):
    from kdcache.data.manifest import read_text_lines

    p = tmp_path / "lm.txt"
    p.write_text("1984 was a year\n2001 a space odyssey\nthe end\n")
    assert read_text_lines(p) == (["1984 was a year", "2001 a space odyssey", "the end"], False)
    p.write_text("1984 was a year\n2001 a space odyssey\n")  # numbers are not ids
    assert read_text_lines(p)[1] is False


def test_tokenizer_train_refuses_to_overwrite(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--kind", "char", "--text", str(text), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    meta = (out / "tokenizer.json").read_bytes() if (out / "tokenizer.json").exists() else None
    text.write_text("other words entirely\n")
    one_error(CliRunner().invoke(app, args), str(out), "--overwrite")
    if meta is not None:
        assert (out / "tokenizer.json").read_bytes() == meta
    res = CliRunner().invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output


def test_train_lm_refuses_to_overwrite(toy, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    out = tmp_path / "lm"
    out.mkdir()
    (out / "model.pt").write_bytes(b"precious")
    res = CliRunner().invoke(
        app,
        [
            "train-lm",
            "--text",
            str(text),
            "--tokenizer",
            str(toy.tokenizer),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--no-progress",
        ],
    )
    one_error(res, str(out), "--overwrite")
    assert (out / "model.pt").read_bytes() == b"precious"


# ------------------------------------------------------------------------------ exit status


def test_one_exit_status_for_input_errors(tmp_path):
    r = CliRunner()
    one_error(r.invoke(app, ["inspect", str(tmp_path / "nothing.kdc")]), "nothing.kdc")
    one_error(r.invoke(app, ["tokenizer", "show", str(tmp_path / "nope")]), "nope")
    one_error(
        r.invoke(app, ["features", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "f")]),
        "nope.jsonl",
    )
    res = r.invoke(app, ["verify", str(tmp_path / "nothing.kdc"), "--no-progress"])
    assert res.exit_code == 1 and "Traceback" not in res.output  # verify's verdict: not intact
    one_error(r.invoke(train_app, ["run", "--out", str(tmp_path / "r")]), "--recipe")


def test_curves_names_the_run_without_dev_csv(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import train_app

    r = CliRunner().invoke(train_app, ["curves", f"x={tmp_path}", "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2
    assert "dev.csv not found" in r.output and str(tmp_path) in r.output
    assert "Traceback" not in r.output


def test_features_repack(toy, tmp_path):
    src = toy.features
    runner = CliRunner()
    one_error(runner.invoke(app, ["features", str(src), "--repack"]), "--repack needs --out")
    one_error(
        runner.invoke(
            app, ["features", str(tmp_path / "nope"), "--repack", "--out", str(tmp_path / "x")]
        ),
        "nope",
    )
    res = runner.invoke(
        app,
        [
            "features",
            str(src),
            "--repack",
            "--keepbits",
            "5",
            "--out",
            str(tmp_path / "k5"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "keepbits 5" in res.stdout and "% of" in res.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "prog, args, needles",
    [
        (app, ["build", "--teacher", "bert"], ("missing option '--model'", "kdcache build --help")),
        (app, ["build", "--teacher", "bert", "--model", "m", "--data", "d", "--out", "o.kdc",
               "--top-k", "many"], ("'--top-k'", "integer")),
        (app, ["frob"], ("no such command 'frob'", "kdcache --help")),
        (train_app, ["run", "--bogus"], ("no such option: --bogus", "kdtrain run --help")),
        (train_app, ["eval", "--run", "r"], ("missing option '--data'",)),
    ],
)  # fmt: skip
def test_usage_mistakes_are_one_error_line(prog, args, needles):
    """What the argument parser itself refuses (a missing or unknown option, a value of the wrong
    type, an unknown command) reads like every other mistake: one error line, status 2, no
    boxed panel."""
    res = CliRunner().invoke(prog, args)
    one_error(res, *needles)
    assert "╭" not in res.output
