"""kdtrain study: the statistics on hand-made examples with known answers, plan checking, and a
tiny end-to-end study on the toy corpus (2 seeds x a few steps) that checks the plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.student.config import ConfigError
from kdcache.student.study import (
    bootstrap_ci,
    edit_errors,
    load_plan,
    paired_differences,
    run_study,
    seed_t_ci,
)


def test_paired_differences_are_per_seed():
    base = {1: 0.30, 2: 0.20, 3: 0.25}
    arm = {1: 0.28, 2: 0.21, 3: 0.20, 4: 0.10}  # seed 4 has no baseline: left out
    d = paired_differences(arm, base)
    assert list(d) == [1, 2, 3]
    assert (
        d[1] == pytest.approx(-0.02)
        and d[2] == pytest.approx(0.01)
        and d[3] == pytest.approx(-0.05)
    )


def test_seed_t_interval_by_hand():
    """Diffs 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3) = 2.484; a
    constant difference has a zero-width interval; one seed gives none."""
    m, lo, hi = seed_t_ci([0.01, 0.02, 0.03])
    assert m == pytest.approx(0.02)
    assert (lo, hi) == (
        pytest.approx(0.02 - 0.02484, abs=1e-5),
        pytest.approx(0.02 + 0.02484, abs=1e-5),
    )
    assert seed_t_ci([-0.05, -0.05, -0.05, -0.05]) == pytest.approx((-0.05, -0.05, -0.05))
    m, lo, hi = seed_t_ci([0.0, 1.0])  # t(0.975, 1) = 12.706, sd 0.7071: half-width 6.353
    assert (lo, hi) == (pytest.approx(0.5 - 6.353, abs=1e-3), pytest.approx(0.5 + 6.353, abs=1e-3))
    assert seed_t_ci([0.1]) is None


def test_bootstrap_of_a_constant_improvement_is_that_constant():
    # Every utterance has 10 reference words and the arm makes exactly one error fewer on each,
    # in both seeds: every resample gives -1/10, so the interval is a point.
    rng = np.random.default_rng(0)
    base = rng.integers(1, 6, size=(2, 50))
    arm = base - 1
    obs, lo, hi = bootstrap_ci(arm, base, np.full(50, 10), n_boot=500)
    assert obs == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)


def test_bootstrap_interval_matches_the_resampling_distribution():
    # One seed, half the utterances 2 errors better and half 2 worse (10 words each): the pooled
    # difference is 0 and a resample's difference is 0.2 (2 x Binomial(n, 1/2) / n - 1), whose
    # 95% interval is about +-0.2 / sqrt(n) x 1.96.
    n = 400
    base = np.full((1, n), 5)
    arm = base + np.where(np.arange(n) % 2 == 0, -2, 2)[None, :]
    obs, lo, hi = bootstrap_ci(arm, base, np.full(n, 10), n_boot=4000, seed=1)
    assert obs == pytest.approx(0.0)
    half = 1.96 * 0.2 / np.sqrt(n)
    assert lo == pytest.approx(-half, abs=0.004) and hi == pytest.approx(half, abs=0.004)
    assert lo < 0 < hi


def test_bootstrap_pools_seeds_and_resamples_utterances_jointly():
    # Seed 1 improves utterance 0 by 4 errors, seed 2 worsens it by 4: pooled, nothing changes,
    # and since both seeds always see the same resampled utterances the interval is a point at 0.
    base = np.array([[5, 5, 5], [5, 5, 5]])
    arm = np.array([[1, 5, 5], [9, 5, 5]])
    obs, lo, hi = bootstrap_ci(arm, base, np.array([10, 10, 10]), n_boot=300)
    assert (obs, lo, hi) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same utterances"):
        bootstrap_ci(arm, base, np.array([10, 10]))


def test_edit_errors_words_and_chars():
    assert edit_errors("the cat sat", "the bat sat down", "word") == (2, 3)
    assert edit_errors("abc", "abd", "char") == (1, 3)
    assert edit_errors("a b", "", "word") == (2, 2)


def _write_plan(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_plan_errors_name_the_file_and_key(tmp_path):
    p = _write_plan(tmp_path / "p.yaml", "name: x\narms: []\n")
    with pytest.raises(ConfigError, match="p.yaml: data needs"):
        load_plan(p)
    p = _write_plan(tmp_path / "q.yaml", "name: x\nstepz: 3\n")
    with pytest.raises(ConfigError, match=r"q.yaml: unknown keys \['stepz'\]"):
        load_plan(p)
    data = (
        "data: {train: a, train_features: b, dev: c, dev_features: d, test: e, "
        "test_features: f, tokenizer: g}\n"
    )
    p = _write_plan(tmp_path / "r.yaml", data + "arms:\n  - {name: lst, config: x.yaml}\n")
    with pytest.raises(ConfigError, match="baseline 'none' is not an arm"):
        load_plan(p)
    arms = "arms:\n  - {name: none, config: x.yaml}\n"
    p = _write_plan(tmp_path / "s.yaml", data + arms + "decode: {method: attention_beam, bem: 4}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: decode: unknown keys \['bem'\]"):
        load_plan(p)
    p = _write_plan(tmp_path / "t.yaml", data + arms + "decode: {lm: lstm_lm}\n")
    with pytest.raises(ConfigError, match="t.yaml: decode: lm .* needs lm_weight"):
        load_plan(p)


def test_plan_lm_reaches_the_eval_command(tmp_path):
    from kdcache.student.study import eval_command

    data = (
        "data: {train: a, train_features: b, dev: c, dev_features: d, test: e, "
        "test_features: f, tokenizer: g}\narms:\n  - {name: none, config: x.yaml}\n"
    )
    plain = load_plan(_write_plan(tmp_path / "a.yaml", data))
    fused = load_plan(
        _write_plan(
            tmp_path / "b.yaml",
            data + "decode: {method: attention_beam, beam: 4, "
            "ctc_weight: 0.5, lm: lms/char, lm_weight: 0.3}\n",
        )  # fmt: skip
    )
    assert "--lm" not in eval_command(plain, tmp_path / "rd", "test", tmp_path)
    ev = eval_command(fused, tmp_path / "rd", "test", tmp_path)
    i = ev.index("--lm")
    assert ev[i : i + 4] == ["--lm", str(tmp_path / "lms/char"), "--lm-weight", "0.3"]
    assert ev[ev.index("--data") + 1] == str(tmp_path / "e")
    assert ev[ev.index("--ctc-weight") + 1] == "0.5"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=24, seed=0)


TINY_MODEL = (
    "{d_model: 32, num_heads: 2, num_layers: 2, ff_mult: 2, decoder_layers: 1, "
    "decoder_heads: 2, dropout: 0.0, subsampling_channels: 8}"
)


def test_tiny_study_end_to_end(toy, tmp_path):
    root = toy.root
    rel = {
        k: str(Path(getattr(toy, k)).relative_to(root))
        for k in ("manifest", "features", "tokenizer", "cache")
    }
    for name, recipe in (("none", "none"), ("lst", "lst")):
        (tmp_path / f"{name}.yaml").write_text(
            f"recipe: {recipe}\nmodel: {TINY_MODEL}\n"
            "data: {max_frames: 4000, speed_perturb: [], specaug: {enabled: false}}\n"
            "optim: {lr: 3.0e-3, warmup_steps: 5}\ntrain: {ckpt_every: 4, log_every: 2}\n"
            "lst: {kd_weight: 0.3, temperature: 2.0}\n"
        )
    plan = _write_plan(
        tmp_path / "study.yaml",
        f"""
name: toy
seeds: [1, 2]
steps: 6
eval_every: 3
data: {{train: {rel["manifest"]}, train_features: {rel["features"]}, dev: {rel["manifest"]},
        dev_features: {rel["features"]}, test: {rel["manifest"]}, test_features: {rel["features"]},
        tokenizer: {rel["tokenizer"]}}}
decode: {{method: attention_beam, beam: 2, ctc_weight: 0.3}}
arms:
  - {{name: none, config: none.yaml}}
  - {{name: lst, config: lst.yaml, cache: [{rel["cache"]}]}}
""",
    )
    out = tmp_path / "study"
    doc = run_study(load_plan(plan), root, out, jobs=2, progress=False)
    assert set(doc["runs"]) == {"none", "lst"} and set(doc["runs"]["lst"]) == {"1", "2"}
    for arm in ("none", "lst"):
        for seed in ("1", "2"):
            r = doc["runs"][arm][seed]
            assert r["steps"] == 6 and 0.0 <= r["test_cer"] and r["seed"] == int(seed)
            rows = (out / "runs" / arm / f"seed{seed}" / "dev.csv").read_text().splitlines()
            assert [x.split(",")[0] for x in rows] == ["step", "3", "6"]
    # The same seed gives both arms the same batches: identical utterance order in step 1 is
    # visible as an identical number of frames in the first logged rows.
    frames = {
        a: (out / "runs" / a / "seed1" / "metrics.csv").read_text().splitlines()[1]
        for a in ("none", "lst")
    }
    assert frames["none"].split(",")[-2] == frames["lst"].split(",")[-2]
    # Config hashes ignore the seed: one per arm.
    assert doc["runs"]["none"]["1"]["config_hash"] == doc["runs"]["none"]["2"]["config_hash"]
    assert doc["runs"]["none"]["1"]["config_hash"] != doc["runs"]["lst"]["1"]["config_hash"]
    st = doc["stats"]["lst"]
    assert set(st["paired_test_wer"]) == {1, 2}
    obs, lo, hi = st["bootstrap_test_wer"]
    assert lo <= obs <= hi
    mean_paired = np.mean(list(st["paired_test_wer"].values()))
    assert obs == pytest.approx(mean_paired, abs=1e-9)  # equal utterance sets: pooled = mean
    assert st["seed_t_test_wer"] == pytest.approx(seed_t_ci(st["paired_test_wer"].values()))
    assert json.loads((out / "study.json").read_text())["stats"]["lst"]["seeds"] == [1, 2]
    assert "| lst | 2 |" in (out / "study.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    # A second call finds every run done and trains nothing.
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/*/checkpoints/*.pt")}
    run_study(load_plan(plan), root, out, jobs=1, progress=False)
    assert before == {p: p.stat().st_mtime for p in out.glob("runs/*/*/checkpoints/*.pt")}


@pytest.mark.parametrize("name", ["cpu", "gpu", "cpu_large"])
def test_shipped_plans_load_and_every_arm_config_resolves(name):
    from kdcache.student.config import build_config
    from kdcache.student.study import _config_path

    plan = load_plan(Path(__file__).resolve().parents[1] / "recipes" / "plans" / f"{name}.yaml")
    assert plan.baseline == "none" and len(plan.seeds) >= 3
    for arm in plan.arms:
        cfg = build_config(_config_path(plan, arm), arm.recipe, [*plan.overrides, *arm.overrides])
        assert (cfg.recipe == "none") == (not arm.cache), arm.name


def test_arm_decode_overrides_the_plans(tmp_path):
    """A CIF arm decodes with its own method; the other arms keep the plan's decoding."""
    from kdcache.student.study import arm_decode, eval_command

    data = (
        "data: {train: a, train_features: b, dev: c, dev_features: d, test: e, "
        "test_features: f, tokenizer: g}\ndecode: {method: attention_beam, beam: 4, ctc_weight: 0.5}\n"
        "arms:\n  - {name: none, config: x.yaml}\n"
        "  - {name: cif, config: y.yaml, decode: {method: cif}}\n"
    )
    plan = load_plan(_write_plan(tmp_path / "a.yaml", data))
    none, cif = plan.arm("none"), plan.arm("cif")
    assert arm_decode(plan, cif) == {"method": "cif", "beam": 4, "ctc_weight": 0.5}
    ev = eval_command(plan, tmp_path / "rd", "test", tmp_path, cif)
    assert ev[ev.index("--decode") + 1] == "cif"
    ev = eval_command(plan, tmp_path / "rd", "test", tmp_path, none)
    assert ev[ev.index("--decode") + 1] == "attention_beam"
    bad = _write_plan(tmp_path / "b.yaml", data.replace("{method: cif}", "{methd: cif}"))
    with pytest.raises(ConfigError, match=r"arms\[1\] \(cif\): decode: unknown keys \['methd'\]"):
        load_plan(bad)
