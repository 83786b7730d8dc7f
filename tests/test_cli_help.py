"""``--help`` reads like classic Unix help (issue 14, item 6): PATH, DIR, N, FLOAT, TEXT or a word
of the option's own after each option (no typer ``<str>``/``<int>``/``<path>``/``<bool>``), nothing
after a flag, ``[a|b|c]`` for an option with a fixed set of values; a value outside that set is
refused with one ``error:`` line; ``kdtrain recipes`` lists and prints the shipped YAML files."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from test_cli_errors import one_error
from typer.testing import CliRunner

from kdcache.cli import app, train_app
from kdcache.student.evaluate import DECODERS
from kdcache.student.objectives import RECIPES

APPS = {"kdcache": app, "kdtrain": train_app}
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # one line per option: nothing folds
PLACEHOLDER = re.compile(r"<(str|int|float|path|bool|list|tuple|file|dir|datetime|uuid)\b", re.I)


def _commands() -> list[tuple[str, str]]:
    return [
        (prog, name)
        for prog, a in APPS.items()
        for name in sorted(typer.main.get_command(a).commands)
    ]


def help_of(prog: str, *args: str) -> str:
    res = CliRunner().invoke(APPS[prog], [*args, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return re.sub(r"\x1b\[[0-9;]*m", "", res.output)  # FORCE_COLOR / CI terminals


def test_every_command_is_covered():
    names = {f"{p} {n}" for p, n in _commands()}
    assert {"kdcache build", "kdcache tokenizer", "kdtrain run", "kdtrain eval"} <= names
    assert "kdtrain recipes" in names


@pytest.mark.parametrize("prog, name", [(p, None) for p in APPS] + _commands())
def test_no_type_placeholders(prog, name):
    out = help_of(prog, *([name] if name else []))
    assert not PLACEHOLDER.search(out), PLACEHOLDER.search(out).group(0) + "\n" + out
    assert re.search(r"--help\s+Show this message and exit", out), out  # a flag: no placeholder


def test_build_help_reads_like_unix_help():
    out = help_of("kdcache", "build")
    for option, metavar in [
        ("--model", "MODEL"),
        ("--data", "PATH"),
        ("--out", "PATH"),
        ("--top-k", "N"),
        ("--temperature", "FLOAT"),
        ("--device", "DEVICE"),
        ("--threads", "N"),
    ]:
        assert re.search(rf"{option}\s+{metavar}\s", out), (option, out)
    assert re.search(r"--threads\s+N\s+torch intra-op threads", out), out
    assert re.search(r"--skip-bad\s+Skip utterances", out), out
    assert re.search(r"--no-progress\s+Show a progress bar", out), out


@pytest.mark.parametrize(
    "prog, name, option, values",
    [
        (
            "kdcache",
            "build",
            "--teacher",
            ("bert", "causal_lm", "lstm_lm", "ensemble", "aligned_lm"),
        ),
        ("kdcache", "build", "--hidden-codec", ("float16", "int8", "pq")),
        ("kdcache", "build", "--mlm-mode", ("masked", "unmasked")),
        ("kdcache", "train-lm", "--arch", ("lstm", "bert", "gpt")),
        ("kdcache", "train-lm", "--init", ("minilm",)),
        ("kdcache", "demo-corpus", "--size", ("tiny", "small", "demo", "large")),
        ("kdcache", "demo-corpus", "--voices", ("heldout", "shared")),
        ("kdcache", "tokenizer", "--kind", ("char", "bpe", "phone")),
        ("kdtrain", "eval", "--decode", DECODERS),
        ("kdtrain", "curves", "--metric", ("dev_cer", "dev_wer")),
    ],
)
def test_choices_are_shown(prog, name, option, values):
    out = help_of(prog, name)
    assert re.search(rf"{option}\s+\[{re.escape('|'.join(values))}\]", out), (option, out)


def test_recipe_choices_are_shown():
    out = help_of("kdtrain", "run")
    assert re.search(r"--recipe\s+RECIPE\s", out), out
    for r in RECIPES:  # one line per option at this width: every name on --recipe's help
        assert re.search(rf"\b{r}: ", out), (r, out)


@pytest.mark.parametrize(
    "prog, args, option, values",
    [
        ("kdcache", ["build", "--model", "m", "--data", "d", "--out", "o.kdc", "--teacher",
                     "gpt"], "--teacher", ("bert", "causal_lm", "lstm_lm", "ensemble", "aligned_lm")),
        ("kdcache", ["build", "--teacher", "bert", "--model", "m", "--data", "d", "--out",
                     "o.kdc", "--hidden-codec", "bf16"], "--hidden-codec", ("float16", "int8", "pq")),
        ("kdcache", ["build", "--teacher", "bert", "--model", "m", "--data", "d", "--out",
                     "o.kdc", "--mlm-mode", "sideways"], "--mlm-mode", ("masked", "unmasked")),
        ("kdtrain", ["run", "--out", "RUN", "--recipe", "lts"], "--recipe", RECIPES),
        ("kdtrain", ["eval", "--run", "r", "--data", "d", "--features", "f", "--decode", "beam"],
         "--decode", DECODERS),
        ("kdtrain", ["curves", "a=r", "--out", "c.png", "--metric", "loss"], "--metric",
         ("dev_cer", "dev_wer")),
        ("kdcache", ["demo-corpus", "--out", "RUN", "--size", "huge"], "--size", ("tiny", "large")),
        ("kdcache", ["demo-corpus", "--out", "RUN", "--voices", "all"], "--voices", ("heldout",)),
        ("kdcache", ["tokenizer", "train", "--kind", "words"], "--kind", ("char", "bpe", "phone")),
        ("kdcache", ["tokenizer", "frob"], "ACTION", ("train", "show", "encode", "export")),
    ],
)  # fmt: skip
def test_bad_choice_is_one_error_line(tmp_path, prog, args, option, values):
    out = tmp_path / "run"
    args = [str(out) if a == "RUN" else a for a in args]
    res = CliRunner().invoke(APPS[prog], args)
    line = one_error(res, option, *values)
    assert "use one of" in line
    assert not out.exists()


def test_choices_match_the_library():
    """The command modules spell out the values that importing would cost numpy for."""
    from kdcache.cache_format import spec
    from kdcache.commands import build, data
    from kdcache.data import demo_corpus
    from kdcache.teachers import build as tbuild
    from kdcache.teachers import lstm_lm, masked_lm, transformer_lm

    assert build.TEACHERS == tbuild.TEACHERS
    assert build.HIDDEN_CODECS == spec.HIDDEN_CODECS
    assert build.TOPK_LAYOUTS == spec.TOPK_LAYOUTS
    assert build.LOGPROB_ROUNDINGS == spec.LOGPROB_ROUNDINGS
    assert build.MLM_MODES == masked_lm.MLM_MODES
    assert build.LM_ARCHES == ("lstm", *transformer_lm.ARCHES)
    assert build.LM_INITS == transformer_lm.INITS
    for key in ("layers", "hidden", "dropout", "lr"):
        assert build.LM_DEFAULTS["bert"][key] == build.LM_DEFAULTS["gpt"][key]
        assert build.LM_DEFAULTS["bert"][key] == transformer_lm.DEFAULTS[key]
    lstm = inspect.signature(lstm_lm.train_lm).parameters
    assert build.LM_DEFAULTS["lstm"] == {k: lstm[k].default for k in build.LM_DEFAULTS["lstm"]}
    assert data.CORPUS_SIZES == tuple(demo_corpus.SIZES)
    assert data.VOICE_MODES == demo_corpus.VOICE_MODES
    out = " ".join(help_of("kdcache", "build").split())
    assert f"default: {spec.DEFAULT_LOGPROB_KEEPBITS})" in out
    b = tbuild.DEFAULT_BUDGET
    assert f"default: {b['cpu']} on CPU, {b['cuda']} on GPU" in out


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from kdcache.cli import app; "
        "heavy = {'numpy', 'torch', 'zarr', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- kdtrain recipes


def test_recipes_lists_the_shipped_files():
    res = CliRunner().invoke(train_app, ["recipes"])
    assert res.exit_code == 0, res.output
    names = res.stdout.split()
    assert {"none", "lst", "cpu/none", "cpu/lst", "plans/cpu"} <= set(names)
    assert set(RECIPES) <= set(names)  # every recipe has its full-size config
    for name in names:
        text = CliRunner().invoke(train_app, ["recipes", name]).stdout
        cfg = yaml.safe_load(text)
        assert isinstance(cfg, dict), name
        if not name.startswith("plans/"):
            assert cfg["recipe"] == name.rpartition("/")[2], name


@pytest.mark.parametrize("name", ["cpu/lst", "cpu/lst.yaml", "recipes/cpu/lst.yaml"])
def test_recipes_prints_one(name):
    from kdcache.commands.recipes import RECIPES_DIR

    res = CliRunner().invoke(train_app, ["recipes", name])
    assert res.exit_code == 0, res.output
    assert res.stdout == (RECIPES_DIR / "cpu" / "lst.yaml").read_text()
    assert yaml.safe_load(res.stdout)["recipe"] == "lst"


def test_recipes_unknown_name():
    one_error(CliRunner().invoke(train_app, ["recipes", "cpu/nope"]), "'cpu/nope'", "cpu/lst")
    one_error(CliRunner().invoke(train_app, ["recipes", "../pyproject"]), "'../pyproject'")


def test_recipes_without_the_directory(tmp_path, monkeypatch):
    from kdcache.commands import recipes

    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path / "recipes")
    one_error(CliRunner().invoke(train_app, ["recipes"]), "no recipes directory", "pip install -e")


def test_a_wheel_carries_the_recipes(tmp_path):
    """The recipes are package data: a wheel built from the source holds every shipped file,
    byte for byte (so `kdtrain recipes` works from a plain `pip install`)."""
    import shutil
    import zipfile

    from kdcache.commands.recipes import RECIPES_DIR, shipped

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(root / f, src / f)
    shutil.copytree(root / "kdcache", src / "kdcache", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "dist").glob("kdcache-*.whl")
    files = shipped()
    assert len(files) >= 15 and "cpu/lst" in files and "plans/cpu_large" in files
    with zipfile.ZipFile(wheel) as z:
        for name, path in files.items():
            arc = f"kdcache/recipes/{name}.yaml"
            assert z.read(arc) == path.read_bytes(), arc
    assert RECIPES_DIR == Path(__file__).resolve().parents[1] / "kdcache" / "recipes"
