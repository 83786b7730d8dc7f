"""Multi-node builds: ``torchrun --nnodes 2`` simulated on one machine -- two launchers (one per
"node", --nproc-per-node 1) meeting at a c10d rendezvous on localhost -- run ``kdcache build``
into one cache, which holds exactly what a single-process build of the same data holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_cache import assert_same, targets
from tiny_models import SENTENCES, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_build_equals_single_process(tmp_path, tiny_llama):
    from kdcache.teachers.build import build_cache

    m = write_manifest(tmp_path / "m.jsonl")
    build = ["build", "--teacher", "causal_lm", "--model", str(tiny_llama), "--data", str(m)]
    build += ["--top-k", "5", "--hidden-layers", "-1", "--device", "cpu", "--no-progress"]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "kdcache-test",
                "--max-restarts",
                "0",
                "-m",
                "kdcache.cli",
                *build,
                "--out",
                str(tmp_path / "multi.kdc"),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    outs = []
    try:
        for p in launchers:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(outs)[-4000:]
    # One worker per node, ranks 0 and 1 of 2 (the rendezvous decides which node gets which).
    log = "\n".join(outs)
    assert "rank 0/2" in log and "rank 1/2" in log, log[-4000:]
    commits = sorted(os.listdir(tmp_path / "multi.kdc" / "commits" / "causal_lm"))
    assert [c[:6] for c in commits] == ["r00000", "r00001"]

    build_cache(
        teacher="causal_lm",
        model=str(tiny_llama),
        data=str(m),
        out=str(tmp_path / "one.kdc"),
        k=5,
        hidden_layers=(-1,),
        device="cpu",
        progress=False,
    )
    one, multi = (
        targets(tmp_path / "one.kdc", "causal_lm"),
        targets(tmp_path / "multi.kdc", "causal_lm"),
    )
    assert len(multi) == len(SENTENCES)
    assert_same(one, multi, atol=1e-3)
    from kdcache.cache_format import verify_cache

    assert verify_cache(str(tmp_path / "multi.kdc")) == []
