"""End to end: every kdtrain recipe on the toy corpus (tone WAVs -> fbank store, synthetic cache).

~30 steps of a tiny student per recipe: the loss goes down; a run stopped half-way and resumed
logs exactly the losses of the uninterrupted run (CPU); eval writes hypotheses and WER/CER; the
CLI wires it all together.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdcache.student.recipe import RunInputs, read_metrics, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: exact CPU reproducibility

TINY = [
    "model.d_model=48", "model.num_heads=2", "model.num_layers=2", "model.decoder_layers=1",
    "model.decoder_heads=2", "model.ff_mult=2", "model.conv_kernel=7", "data.max_frames=1000",
    "optim.lr=3e-3", "optim.warmup_steps=8", "train.log_every=1", "train.ckpt_every=10",
    "train.progress=false",
]  # fmt: skip
PER_RECIPE = {
    "none": [],
    "lst": [],
    "multitask": [],
    "essence": [],
    "hierarchical": [],
    "interaed": ["interaed.layers=[1,-1]", "model.decoder_layers=0"],
    "cif_hkd": ["model.decoder_layers=0", "cif_hkd.num_negatives=16"],
}
STEPS = 30


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=32, seed=0)


def _run(toy, out: Path, recipe: str, steps: int, extra=(), resume=False):
    if resume:
        return train(RunInputs(out=out, resume=True, overrides=[f"train.max_steps={steps}"]))
    return train(RunInputs(
        out=out, data=toy.manifest, features=toy.features, tokenizer=toy.tokenizer,
        cache=toy.cache, recipe=recipe,
        overrides=[*TINY, *PER_RECIPE[recipe], *extra, f"train.max_steps={steps}"],
    ))  # fmt: skip


def _logged_losses(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("recipe", list(PER_RECIPE))
def test_loss_goes_down(toy, tmp_path, recipe):
    res = _run(toy, tmp_path / recipe, recipe, STEPS)
    assert res.step == STEPS and len(res.losses) == STEPS
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.85 * first, (recipe, first, last)
    assert _logged_losses(tmp_path / recipe) == res.losses
    rows = read_metrics(tmp_path / recipe)
    assert "ctc" in rows[0] and float(rows[-1]["lr"]) > 0
    assert (tmp_path / recipe / "config.yaml").exists()


def _resume_matches(toy, tmp_path, recipe, extra=()):
    full, half = tmp_path / "full", tmp_path / "half"
    _run(toy, full, recipe, STEPS, extra)
    _run(toy, half, recipe, STEPS // 2 - 1, extra)  # odd: resume mid-way between checkpoints
    _run(toy, half, recipe, STEPS, resume=True)
    a, b = _logged_losses(full), _logged_losses(half)
    assert len(a) == len(b) == STEPS
    assert a == b


def test_resume_reproduces_uninterrupted_run(toy, tmp_path):
    _resume_matches(toy, tmp_path, "lst")


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("none", ["data.speed_perturb=[0.9,1.0,1.1]"]),
        ("multitask", ["data.num_workers=2"]),
        ("essence", ["data.reader=stream", "data.shuffle_buffer=8", "data.bucket_pool=8"]),
        ("hierarchical", []),
        ("interaed", []),
        ("cif_hkd", ["optim.accum_steps=2"]),
    ],
)
def test_resume_reproduces_every_recipe(toy, tmp_path, recipe, extra):
    _resume_matches(toy, tmp_path, recipe, extra)


def test_resume_guards(toy, tmp_path):
    from kdcache.student.config import ConfigError

    run = tmp_path / "r"
    _run(toy, run, "none", 2)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(toy, run, "none", 4)
    with pytest.raises(ConfigError, match="started with recipe 'none'"):
        train(RunInputs(out=run, resume=True, recipe="lst"))
    with pytest.raises(ConfigError, match="data.num_workers=0; resume with the same value"):
        train(
            RunInputs(out=run, resume=True, overrides=["data.num_workers=1", "train.max_steps=3"])
        )


def test_checkpoint_is_atomic_and_pruned(toy, tmp_path):
    from kdcache.student.checkpoint import list_checkpoints, save_checkpoint

    run = tmp_path / "r"
    _run(toy, run, "none", 25, extra=["train.keep_checkpoints=2"])
    assert [s for s, _ in list_checkpoints(run)] == [20, 25]
    ckdir = run / "checkpoints"
    # A writer killed mid-write leaves only a hidden tmp file, never a step-*.pt.
    (ckdir / ".step-00000030.pt.tmp-999").write_bytes(b"half")
    assert [s for s, _ in list_checkpoints(run)] == [20, 25]
    save_checkpoint(run, 26, {"x": 1}, keep=2)
    assert not list(ckdir.glob(".step-*"))


def test_eval_writes_hypotheses_and_wer(toy, tmp_path):
    from kdcache.student.evaluate import evaluate_run

    run = tmp_path / "lst"
    _run(toy, run, "lst", STEPS)
    for decode in ("ctc_greedy", "attention_beam"):
        res = evaluate_run(run, toy.manifest, toy.features, decode=decode, beam=2, ctc_weight=0.3)
        out = Path(res["out_dir"])
        assert 0.0 <= res["cer"] <= res["wer"] + 1.0 and res["utterances"] == 32
        rows = [json.loads(line) for line in (out / "hyp.jsonl").read_text().splitlines()]
        assert len(rows) == 32 and set(rows[0]) == {"utt_id", "ref", "hyp"}
        assert len((out / "hyp.txt").read_text().splitlines()) == 32
        assert json.loads((out / "results.json").read_text())["wer"] == res["wer"]
    with pytest.raises(ValueError, match="no CIF module"):
        evaluate_run(run, toy.manifest, toy.features, decode="cif")


@pytest.mark.slow
def test_cif_run_decodes_with_cif(toy, tmp_path):
    from kdcache.student.evaluate import evaluate_run

    run = tmp_path / "cif"
    _run(toy, run, "cif_hkd", STEPS)
    res = evaluate_run(run, toy.manifest, toy.features, decode="cif")
    assert res["utterances"] == 32 and res["wer"] >= 0


def test_cli_run_and_eval(toy, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import train_app

    cfg = tmp_path / "c.yaml"
    shutil.copy(Path(__file__).resolve().parents[1] / "recipes" / "lst.yaml", cfg)
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(train_app, [
        "run", "--cache", str(toy.cache), "--data", str(toy.manifest), "--features",
        str(toy.features), "--tokenizer", str(toy.tokenizer), "--recipe", "lst", "--out", str(run),
        "--config", str(cfg), *TINY, "train.max_steps=4",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "done: step 4" in res.output
    res = runner.invoke(train_app, ["run", "--out", str(run), "--resume", "train.max_steps=6"])
    assert res.exit_code == 0, res.output
    assert len(read_metrics(run)) == 6
    res = runner.invoke(train_app, [
        "eval", "--run", str(run), "--data", str(toy.manifest), "--features", str(toy.features),
        "--decode", "ctc_greedy",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert '"wer"' in res.output
    res = runner.invoke(train_app, ["run", "--out", str(tmp_path / "x"), "--data", str(toy.manifest),
                                    "--features", str(toy.features), "--tokenizer", str(toy.tokenizer),
                                    "--recipe", "lst", "optim.lrr=1"])  # fmt: skip
    assert res.exit_code == 2
    assert "optim.lrr" in res.output


@pytest.mark.slow
def test_ddp_two_ranks_gloo(toy, tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo): trains, checkpoints once, resumes."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    main = tmp_path / "main.py"
    main.write_text("import sys\nfrom kdcache.cli import train_app\nsys.exit(train_app())\n")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(main), "run"]
    args = ["--cache", str(toy.cache), "--data", str(toy.manifest), "--features", str(toy.features),
            "--tokenizer", str(toy.tokenizer), "--recipe", "lst", "--out", str(run), *TINY,
            "train.max_steps=6"]  # fmt: skip
    res = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(base + ["--out", str(run), "--resume", "train.max_steps=9"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(run)] == list(range(1, 10))
    from kdcache.student.checkpoint import latest_checkpoint, load_checkpoint

    state = load_checkpoint(latest_checkpoint(run))
    assert state["world_size"] == 2 and len(state["data"]) == 2


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(toy, tmp_path):
    """SIGKILL mid-run: the newest checkpoint loads, resume continues, metrics stay consistent."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kdcache.student.checkpoint import latest_checkpoint, load_checkpoint

    repo = Path(__file__).resolve().parents[1]
    main = tmp_path / "main.py"
    main.write_text("import sys\nfrom kdcache.cli import train_app\nsys.exit(train_app())\n")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    cmd = [sys.executable, str(main), "run", "--cache", str(toy.cache), "--data", str(toy.manifest),
           "--features", str(toy.features), "--tokenizer", str(toy.tokenizer), "--recipe", "lst",
           "--out", str(run), *TINY, "train.ckpt_every=4", "train.max_steps=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (run / "metrics.csv").exists() and len(read_metrics(run)) >= 11:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    ckpt = latest_checkpoint(run)
    step = int(load_checkpoint(ckpt)["step"])
    logged = len(read_metrics(run))
    assert step % 4 == 0 and logged - step < 4 + 2  # lost at most one interval (+ rows in flight)
    res = train(RunInputs(out=run, resume=True, overrides=[f"train.max_steps={step + 3}"]))
    assert res.step == step + 3
    assert [int(r["step"]) for r in read_metrics(run)] == list(range(1, step + 4))
