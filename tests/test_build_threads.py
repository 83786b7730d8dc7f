"""``kdcache build --threads`` (issue 13, item 8): the count reaches torch inside the build and
Blosc runs on the calling threads, the process's settings come back afterwards (also after a
failed build), ``auto`` follows its rule, and a bad value is refused naming --threads."""

from __future__ import annotations

import pytest
import torch
from numcodecs import blosc
from tiny_models import SENTENCES, write_manifest
from typer.testing import CliRunner

from kdcache import threads as kt
from kdcache.teachers.build import BuildError, build_cache, load_teacher


def _recording_teacher(tiny_bert):
    """The tiny BERT, its forward recording torch's thread count, its writer Blosc's settings."""
    t = load_teacher("bert", str(tiny_bert), k=4, device="cpu")
    seen: dict[str, list] = {"torch": [], "blosc": []}
    forward = t.forward

    def recording_forward(*args, **kw):
        seen["torch"].append(torch.get_num_threads())
        seen["blosc"].append((blosc.use_threads, blosc.get_nthreads()))
        return forward(*args, **kw)

    t.forward = recording_forward
    return t, seen


@pytest.fixture
def settings():
    """Known process settings before the test, put back after it."""
    old = torch.get_num_threads(), blosc.use_threads, blosc.get_nthreads()
    torch.set_num_threads(3)
    blosc.use_threads, _ = None, blosc.set_nthreads(2)
    yield (3, None, 2)
    torch.set_num_threads(old[0])
    blosc.use_threads, _ = old[1], blosc.set_nthreads(old[2])


def _manifest(tmp_path):
    # Two short sentences: more than one thread on a busy 2-core machine is slow (the point of
    # the option), and the test only needs the forward to run.
    return write_manifest(tmp_path / "m.jsonl", texts=SENTENCES[2:4])


def _now():
    return torch.get_num_threads(), blosc.use_threads, blosc.get_nthreads()


@pytest.mark.parametrize("threads", [1, 2, "2"])
def test_threads_reach_torch_and_blosc_and_are_restored(tmp_path, tiny_bert, settings, threads):
    t, seen = _recording_teacher(tiny_bert)
    m = _manifest(tmp_path)
    s = build_cache(
        teacher="bert", model=str(tiny_bert), data=str(m), out=str(tmp_path / "c.kdc"), k=4,
        device="cpu", progress=False, loaded=t, threads=threads,
    )  # fmt: skip
    assert seen["torch"] and set(seen["torch"]) == {int(threads)}
    # Blosc compresses on the thread zarr gives each chunk, without its own pool or global lock.
    assert set(seen["blosc"]) == {(False, 1)}
    assert s.threads == int(threads) and f"{int(threads)} torch thread(s)" in "\n".join(s.lines())
    assert _now() == settings


def test_auto_in_the_build_follows_the_rule(tmp_path, tiny_bert, settings, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(kt, "usable_cpus", lambda: 3)
    t, seen = _recording_teacher(tiny_bert)
    m = _manifest(tmp_path)
    s = build_cache(
        teacher="bert", model=str(tiny_bert), data=str(m), out=str(tmp_path / "c.kdc"), k=4,
        device="cpu", progress=False, loaded=t,
    )  # fmt: skip
    assert set(seen["torch"]) == {2} and s.threads == 2  # 3 CPUs, one left to the writer
    assert _now() == settings


def test_settings_restored_after_a_failed_build(tmp_path, tiny_bert, settings):
    with pytest.raises(BuildError, match="no such manifest"):
        build_cache(
            teacher="bert", model=str(tiny_bert), data=str(tmp_path / "missing.jsonl"),
            out=str(tmp_path / "c.kdc"), k=4, device="cpu", progress=False, threads=1,
        )  # fmt: skip
    assert _now() == settings


@pytest.mark.parametrize("bad", [0, -2, "many", "1.5"])
def test_bad_threads_refused_before_anything_loads(tmp_path, bad, settings):
    with pytest.raises(BuildError, match="--threads"):
        build_cache(
            teacher="bert", model=str(tmp_path / "no_model"), data=str(tmp_path / "no.jsonl"),
            out=str(tmp_path / "c.kdc"), k=4, device="cpu", progress=False, threads=bad,
        )  # fmt: skip
    assert _now() == settings


@pytest.mark.parametrize(
    "cpus, env, device, want",
    [
        (2, {}, "cpu", 1),  # the measured case: one core for the model, one for the writer
        (1, {}, "cpu", 1),
        (16, {}, "cpu", 15),
        (16, {"LOCAL_WORLD_SIZE": "4"}, "cpu", 3),  # 4 torchrun ranks share the 16 CPUs
        (16, {}, "cuda:0", 2),
        (1, {}, "cuda:0", 1),
        (16, {"OMP_NUM_THREADS": "3"}, "cpu", 3),  # an explicit choice is kept
        (16, {"OMP_NUM_THREADS": "1"}, "cuda:0", 1),  # torchrun's default per process
    ],
)
def test_auto_rule(monkeypatch, cpus, env, device, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(kt, "usable_cpus", lambda: cpus)
    assert kt.auto_build_threads(device) == want


def test_usable_cpus_is_the_affinity_mask():
    import os

    if hasattr(os, "sched_getaffinity"):
        assert kt.usable_cpus() == len(os.sched_getaffinity(0))
    assert kt.usable_cpus() >= 1


@pytest.mark.parametrize(
    "bad, needle", [("0", "--threads 0: must be >= 1"), ("x", "--threads 'x'")]
)
def test_cli_refuses_bad_threads(tmp_path, bad, needle):
    from test_cli_errors import one_error

    from kdcache.cli import app

    m = write_manifest(tmp_path / "m.jsonl")
    res = CliRunner().invoke(
        app,
        ["build", "--teacher", "bert", "--model", str(tmp_path / "none"), "--data", str(m),
         "--out", str(tmp_path / "c.kdc"), "--threads", bad],
    )  # fmt: skip
    one_error(res, needle)
    assert not (tmp_path / "c.kdc").exists()


def test_cli_threads_reach_the_build(tmp_path, tiny_bert, settings):
    from kdcache.cli import app

    m = _manifest(tmp_path)
    res = CliRunner().invoke(
        app,
        ["build", "--teacher", "bert", "--model", str(tiny_bert), "--data", str(m),
         "--out", str(tmp_path / "c.kdc"), "--top-k", "4", "--device", "cpu", "--threads", "1",
         "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1 torch thread(s)" in res.output
    assert _now() == settings
