"""``kdtrain run`` and ``kdtrain eval``: thin wrappers over kdcache.student.recipe / evaluate.

Heavy imports (torch, the model) happen inside the functions so ``kdtrain --help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.commands.errors import fail, user_errors
from kdcache.commands.params import DEVICE_HELP, one_of
from kdcache.student.evaluate import DECODERS
from kdcache.student.objectives import OBJECTIVES, RECIPES, recipes_help

_NO_CACHE = " / ".join(o.name for o in OBJECTIVES.values() if not o.needs_cache)
_SEVERAL = " / ".join(o.name for o in OBJECTIVES.values() if o.several_teachers)
_METRICS = ("dev_cer", "dev_wer")


def run(
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Run directory (config.yaml, checkpoints/, metrics.csv)."
    ),
    data: Path = typer.Option(
        None, "--data", metavar="PATH", help="Training manifest (Kaldi dir, lhotse cuts or JSONL)."
    ),
    features: Path = typer.Option(
        None, "--features", metavar="DIR", help="Feature store of the training utterances."
    ),
    tokenizer: Path = typer.Option(
        None, "--tokenizer", metavar="DIR", help="Student tokenizer directory."
    ),
    cache: list[str] = typer.Option(
        None,
        "--cache",
        metavar="PATH",
        help=f"Teacher-target cache (NAME.kdc or an fsspec URL such as s3://bucket/NAME.kdc); not needed for --recipe {_NO_CACHE}. Repeatable for --recipe {_SEVERAL} (teachers of all the caches).",
    ),
    recipe: str = typer.Option(
        None,
        "--recipe",
        help=f"Training recipe, one of: {recipes_help()}",
        **one_of(RECIPES, metavar="RECIPE"),
    ),
    config: Path = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="YAML config file, e.g. recipes/cpu/lst.yaml (kdtrain recipes lists the shipped ones).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue RUN_DIR from its newest checkpoint."
    ),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Skip training utterances the cache lacks (warns)."
    ),
    dev_data: Path = typer.Option(
        None,
        "--dev-data",
        metavar="PATH",
        help="Dev manifest: CTC-greedy WER/CER every train.eval_every steps into RUN_DIR/dev.csv (learning curves).",
    ),
    dev_features: Path = typer.Option(
        None, "--dev-features", metavar="DIR", help="Feature store of the dev utterances."
    ),
    overrides: list[str] = typer.Argument(
        None,
        metavar="KEY=VALUE",
        help="Config overrides, dotted for sections: optim.lr=1e-3",
    ),
) -> None:
    """Train a student ASR model, distilling from a kdcache (no teacher is loaded)."""
    import logging

    from kdcache.student.recipe import RunInputs, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if recipe is None and config is None and not resume:
        fail(f"pass --recipe ({', '.join(RECIPES)}) or a --config that sets it")
    with user_errors():
        result = train(
            RunInputs(
                out=out,
                data=data,
                features=features,
                tokenizer=tokenizer,
                cache=(cache[0] if len(cache) == 1 else list(cache)) if cache else None,
                recipe=recipe,
                config=config,
                overrides=list(overrides or []),
                resume=resume,
                allow_missing=allow_missing,
                dev_data=dev_data,
                dev_features=dev_features,
            )
        )
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    typer.echo(
        f"done: step {result.step}, last loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
        f"run dir {out}"
    )


def evaluate(
    run_dir: list[Path] = typer.Option(
        ...,
        "--run",
        metavar="DIR",
        help="Run directory written by kdtrain run. Repeat it to decode an ensemble: CTC greedy "
        "on the runs' combined frame posteriors (--combine).",
    ),
    data: Path = typer.Option(
        ..., "--data", metavar="PATH", help="Manifest of the utterances to decode."
    ),
    features: Path = typer.Option(
        ..., "--features", metavar="DIR", help="Feature store of those utterances."
    ),
    decode: str = typer.Option(
        "ctc_greedy",
        "--decode",
        help="Decoder: CTC greedy, attention beam search (with CTC rescoring) or the CIF decoder.",
        **one_of(DECODERS),
    ),
    beam: int = typer.Option(4, "--beam", metavar="N", help="Beam size (attention_beam)."),
    ctc_weight: float = typer.Option(
        0.3, "--ctc-weight", metavar="FLOAT", help="CTC rescoring weight in attention_beam."
    ),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", metavar="FILE", help="Checkpoint to load (default: the newest)."
    ),
    out: Path = typer.Option(
        None, "--out", metavar="DIR", help="Output directory (default RUN_DIR/eval/DATA-DECODE)."
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        metavar="DEVICE",
        help=DEVICE_HELP,
    ),
    lm: Path = typer.Option(
        None,
        "--lm",
        metavar="DIR",
        help="Shallow fusion (attention_beam): an LSTM LM directory (kdcache train-lm) in the "
        "student's units.",
    ),
    lm_weight: float = typer.Option(
        0.0,
        "--lm-weight",
        metavar="FLOAT",
        help="Weight of the --lm log-probs in the beam score (e.g. 0.3).",
    ),
    combine: str = typer.Option(
        "mean",
        "--combine",
        help="Several --run: mean of their probabilities, or their product (log-linear).",
        **one_of(("mean", "product")),
    ),
) -> None:
    """Decode a set with a trained student (or an ensemble of them); write hypotheses and
    WER/CER (jiwer)."""
    import json

    from kdcache.student.evaluate import evaluate_ensemble, evaluate_run

    if len(run_dir) > 1:
        if decode != "ctc_greedy":
            fail(f"several --run decode as an ensemble with --decode ctc_greedy, not {decode}")
        if lm is not None or checkpoint is not None:
            fail("--lm and --checkpoint are for a single --run")
        with user_errors(ValueError):
            res = evaluate_ensemble(
                [str(r) for r in run_dir], data, features, combine=combine, out_dir=out,
                device=device,
            )  # fmt: skip
        typer.echo(
            json.dumps({k: res[k] for k in ("wer", "cer", "utterances", "decode", "out_dir")})
        )
        return
    if combine != "mean":
        fail("--combine is for several --run (an ensemble)")
    with user_errors(ValueError):
        res = evaluate_run(
            run_dir[0],
            data,
            features,
            decode=decode,
            beam=beam,
            ctc_weight=ctc_weight,
            checkpoint=checkpoint,
            out_dir=out,
            device=device,
            lm=lm,
            lm_weight=lm_weight,
        )
    typer.echo(json.dumps({k: res[k] for k in ("wer", "cer", "utterances", "decode", "out_dir")}))


def study(
    plan: Path = typer.Option(
        ...,
        "--plan",
        metavar="FILE",
        help="Study plan YAML (e.g. recipes/plans/cpu.yaml): data, arms, seeds, steps.",
    ),
    root: Path = typer.Option(
        Path("."),
        "--root",
        metavar="DIR",
        help="Directory the plan's data and cache paths are relative to (e.g. demo).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        metavar="DIR",
        help="Study directory: runs/ARM/seedN/, study.json, study.md, curves.png.",
    ),
    jobs: int = typer.Option(
        1, "--jobs", metavar="N", help="Runs side by side (each gets cores / jobs threads)."
    ),
    arms: list[str] = typer.Option(
        None,
        "--arm",
        metavar="NAME",
        help="Run only these arms (repeatable); the summary covers every finished run.",
    ),
    seeds: int = typer.Option(
        0, "--seeds", metavar="N", help="Use the first N seeds of the plan (0 = all)."
    ),
    steps: int = typer.Option(
        0, "--steps", metavar="N", help="Override the plan's steps per run (0 = the plan's)."
    ),
    summarize_only: bool = typer.Option(
        False,
        "--summarize",
        help="Only rewrite study.json / study.md / curves.png from finished runs.",
    ),
) -> None:
    """Train and evaluate every arm of a study plan against the same baseline, N seeds each.

    Resumable: finished runs are skipped, killed ones resume. Writes study.json (per run:
    dev/test WER and CER, steps, time, caches, config hash, commit, machine), study.md (mean +- sd,
    paired differences against the baseline, 95% bootstrap interval over test utterances) and
    curves.png (dev CER against step)."""
    from kdcache.student.study import load_plan, run_study, summarize

    with user_errors(RuntimeError):
        p = load_plan(plan)
        if seeds:
            p.seeds = p.seeds[:seeds]
        if steps:
            p.steps = steps
        if summarize_only:
            summarize(p, root, out)
        else:
            run_study(p, root, out, jobs=jobs, arms=list(arms or []))
    typer.echo((out / "study.md").read_text())


def curves(
    runs: list[str] = typer.Argument(
        ...,
        metavar="[LABEL=]RUN_DIR",
        help="Run directories with a dev.csv, each optionally labelled: none=runs/none.",
    ),
    out: Path = typer.Option(..., "--out", metavar="FILE", help="PNG to write."),
    metric: str = typer.Option(
        "dev_cer", "--metric", help="Dev CER or dev WER.", **one_of(_METRICS)
    ),
) -> None:
    """Plot learning curves (dev CER/WER against step and against training time) of runs
    trained with --dev-data."""
    from kdcache.student.study import plot_runs

    named = {}
    for r in runs:
        label, _, path = r.rpartition("=") if "=" in r else (Path(r).name, "", r)
        if not (Path(path) / "dev.csv").exists():
            fail(f"{path}/dev.csv not found (train the run with --dev-data)")
        named[label] = Path(path)
    plot_runs(named, out, metric=metric)
    typer.echo(str(out))
