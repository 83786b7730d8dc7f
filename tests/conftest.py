"""Fixtures shared by several test modules (helpers that are not fixtures live in
tests/tiny_models.py; module-specific fixtures such as each module's toy corpus stay in it)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_bert(tmp_path_factory):
    """The session's tiny BertForMaskedLM directory (tiny_models.make_bert), made on first use."""
    from tiny_models import shared_model

    return shared_model("bert", tmp_path_factory)


@pytest.fixture
def tiny_llama(tmp_path_factory):
    """The session's tiny LlamaForCausalLM directory (tiny_models.make_llama), made on first use."""
    from tiny_models import shared_model

    return shared_model("llama", tmp_path_factory)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread. Exact CPU reproducibility needs the same thread count in
    both runs of a comparison; one thread is also the fastest on a shared 2-core machine. Modules
    whose every test needs it say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
