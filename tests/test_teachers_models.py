"""The tiny teacher models of tests/tiny_models.py build and save."""

from __future__ import annotations

from tiny_models import shared_model


def test_tiny_models_build(tmp_path_factory):
    assert (shared_model("bert", tmp_path_factory) / "config.json").exists()
    assert (shared_model("llama", tmp_path_factory) / "config.json").exists()
