"""kdtrain's thread counts (issue 13, item 8): DataLoader workers run data.worker_threads torch
threads and Blosc without its own pool; train.threads sets the training process's torch threads
for the run and puts the previous count back; bad values are refused naming the key."""

from __future__ import annotations

import pytest
import torch
from numcodecs import blosc
from torch.utils.data import IterableDataset

from kdcache.student import recipe
from kdcache.student.config import ConfigError, DataConfig, build_config
from kdcache.student.data import make_loader


class _Probe(IterableDataset):
    """Yields what a worker process sees: torch's threads and Blosc's settings."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __iter__(self):
        yield torch.get_num_threads(), blosc.use_threads, blosc.get_nthreads()


@pytest.mark.parametrize("threads", [1, 2])
def test_workers_run_data_worker_threads(threads):
    cfg = DataConfig(num_workers=1, worker_threads=threads)
    got = list(make_loader(_Probe(cfg)))
    assert [tuple(x) for x in got] == [(threads, False, 1)]


def test_keys_refused_when_bad():
    with pytest.raises(ConfigError, match="data.worker_threads"):
        build_config(recipe="none", overrides=["data.worker_threads=0"])
    with pytest.raises(ConfigError, match="train.threads"):
        build_config(recipe="none", overrides=["train.threads=-1"])
    assert build_config(recipe="none").train.threads == 0  # torch's default unless asked


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_train_threads_scope_the_run(tmp_path, monkeypatch, threads):
    before = torch.get_num_threads()
    seen = []

    def fake_train(cfg, inputs):
        seen.append(torch.get_num_threads())

    monkeypatch.setattr(recipe, "_train", fake_train)
    recipe.train(
        recipe.RunInputs(
            out=tmp_path / "run", recipe="none", overrides=[f"train.threads={threads}"]
        )
    )
    assert seen == [threads or before]
    assert torch.get_num_threads() == before
