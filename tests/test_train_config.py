"""kdtrain configuration: dataclass defaults, YAML files, key=value overrides, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcache.student.config import (
    RECIPES,
    ConfigError,
    RunConfig,
    build_config,
    load_config,
    parse_override,
    save_config,
    to_dict,
)

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


def test_defaults_are_the_papers():
    cfg = build_config(recipe="lst")
    assert cfg.recipe == "lst"
    assert cfg.ctc_weight == 0.3
    assert (cfg.lst.kd_weight, cfg.lst.temperature) == (0.1, 5.0)
    assert cfg.multitask.temperature == 1.0
    assert (cfg.cif_hkd.tau, cfg.cif_hkd.num_negatives) == (0.02, 700)
    assert (cfg.interaed.k, cfg.interaed.temperature, cfg.interaed.mix) == (8, 3.0, 0.9)


def test_cif_quantity_norm_is_checked():
    assert build_config(recipe="cif_hkd").cif_hkd.qua_norm == "utterance"  # the CIF paper's
    cfg = build_config(recipe="cif_hkd", overrides=["cif_hkd.qua_norm=token"])
    assert cfg.cif_hkd.qua_norm == "token"
    with pytest.raises(ConfigError, match="cif_hkd.qua_norm"):
        build_config(recipe="cif_hkd", overrides=["cif_hkd.qua_norm=frame"]).validate()


def test_dotted_overrides_and_types():
    cfg = build_config(
        recipe="none",
        overrides=["optim.lr=1e-3", "data.specaug.enabled=false", "data.speed_perturb=[0.9,1.0,1.1]",
                   "model.d_model=64", "train.max_steps=7", "lst.kd_weight=1"],
    )  # fmt: skip
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.specaug.enabled is False
    assert cfg.data.speed_perturb == [0.9, 1.0, 1.1]
    assert cfg.model.d_model == 64
    assert cfg.train.max_steps == 7
    assert isinstance(cfg.lst.kd_weight, float)


@pytest.mark.parametrize(
    "override, names",
    [
        ("optim.lrr=1", ["optim.lrr", "did you mean 'optim.lr'"]),
        ("lerning_rate=1", ["lerning_rate", "top level"]),
        ("data.specaug.freq_width=3", ["data.specaug.freq_width", "freq_mask_width"]),
        ("model.d_modle=3", ["model.d_modle", "model.d_model"]),
    ],
)
def test_unknown_keys_are_named(override, names):
    with pytest.raises(ConfigError) as e:
        build_config(recipe="none", overrides=[override])
    for n in names:
        assert n in str(e.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=fast", "optim.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("data.specaug.enabled=3", "data.specaug.enabled"),
        ("recipe=distil", "recipe"),
        ("ctc_weight=2", "ctc_weight"),
        ("optim=3", "optim"),
        ("nokey", "key=value"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(recipe="none", overrides=[override])


def test_yaml_file_then_recipe_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: essence\noptim:\n  lr: 5.0e-4\n  warmup_steps: 10\n")
    cfg = build_config(f, recipe="lst", overrides=["optim.warmup_steps=3"])
    assert cfg.recipe == "lst"
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.optim.warmup_steps == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1.0\n  betass: [0.9, 0.98]\n")
    with pytest.raises(ConfigError, match=r"optim\.betass.*bad\.yaml"):
        build_config(bad)


def test_save_load_roundtrip(tmp_path):
    cfg = build_config(
        recipe="multitask", overrides=["model.aux_kd_heads={lm: 30}", "multitask.lam=0.25"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert to_dict(back) == to_dict(cfg)
    assert back.model.aux_kd_heads == {"lm": 30}


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_files_load(path):
    cfg = build_config(path)
    assert cfg.recipe == path.stem
    assert isinstance(cfg, RunConfig)


def test_every_recipe_has_a_file():
    assert {p.stem for p in RECIPE_DIR.glob("*.yaml")} == set(RECIPES)


def test_recipe_registry_names_the_recipes_everywhere():
    """config.RECIPES and kdtrain run's --recipe help come from objectives.OBJECTIVES, and the
    command module (which reads the registry at import) still imports no torch."""
    import subprocess
    import sys

    from kdcache.commands.train import run
    from kdcache.student.objectives import OBJECTIVES

    assert RECIPES == tuple(OBJECTIVES) and all(o.name == n for n, o in OBJECTIVES.items())
    (help_text,) = [
        d.help for d in run.__defaults__ if "--recipe" in (getattr(d, "param_decls", None) or ())
    ]
    assert all(f"{name}: " in help_text for name in RECIPES)
    code = "import sys; import kdcache.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")
