"""``kdtrain run`` and ``kdtrain eval``: thin wrappers over kdcache.student.recipe / evaluate.

Heavy imports (torch, the model) happen inside the functions so ``kdtrain --help`` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer


def run(
    out: Path = typer.Option(..., "--out", help="Run directory (config.yaml, checkpoints/, metrics.csv)."),
    data: Path = typer.Option(None, "--data", help="Training manifest (Kaldi dir, lhotse cuts or JSONL)."),
    features: Path = typer.Option(None, "--features", help="Feature store of the training utterances."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Student tokenizer directory."),
    cache: list[Path] = typer.Option(None, "--cache", help="Teacher-target cache (NAME.kdc); not needed for --recipe none. Repeatable for --recipe hierarchical (teachers of all the caches)."),
    recipe: str = typer.Option(None, "--recipe", help="none | lst | multitask | essence | interaed | cif_hkd | hierarchical."),
    config: Path = typer.Option(None, "--config", help="YAML config file (e.g. recipes/lst.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue RUN_DIR from its newest checkpoint."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Skip training utterances the cache lacks (warns)."),
    overrides: list[str] = typer.Argument(None, help="key=value config overrides, dotted for sections: optim.lr=1e-3"),
) -> None:
    """Train a student ASR model, distilling from a kdcache (no teacher is loaded)."""
    import logging

    from kdcache.student.checks import CacheMismatchError
    from kdcache.student.config import ConfigError
    from kdcache.student.recipe import RunInputs, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if recipe is None and config is None and not resume:
        typer.echo("kdtrain run: error: pass --recipe (none, lst, multitask, essence, interaed, "
                   "cif_hkd, hierarchical) or a --config that sets it", err=True)
        raise typer.Exit(2)
    try:
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
            )
        )
    except (ConfigError, CacheMismatchError, FileNotFoundError) as e:
        typer.echo(f"kdtrain run: error: {e}", err=True)
        raise typer.Exit(2) from None
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    typer.echo(
        f"done: step {result.step}, last loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
        f"run dir {out}"
    )


def evaluate(
    run_dir: Path = typer.Option(..., "--run", help="Run directory written by kdtrain run."),
    data: Path = typer.Option(..., "--data", help="Manifest of the utterances to decode."),
    features: Path = typer.Option(..., "--features", help="Feature store of those utterances."),
    decode: str = typer.Option("ctc_greedy", "--decode", help="ctc_greedy | attention_beam | cif."),
    beam: int = typer.Option(4, "--beam", help="Beam size (attention_beam)."),
    ctc_weight: float = typer.Option(0.3, "--ctc-weight", help="CTC rescoring weight in attention_beam."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Checkpoint to load (default: the newest)."),
    out: Path = typer.Option(None, "--out", help="Output directory (default RUN_DIR/eval/<data>-<decode>)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
) -> None:
    """Decode a set with a trained student; write hypotheses and WER/CER (jiwer)."""
    import json

    from kdcache.student.evaluate import evaluate_run

    try:
        res = evaluate_run(
            run_dir,
            data,
            features,
            decode=decode,
            beam=beam,
            ctc_weight=ctc_weight,
            checkpoint=checkpoint,
            out_dir=out,
            device=device,
        )
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"kdtrain eval: error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({k: res[k] for k in ("wer", "cer", "utterances", "decode", "out_dir")}))
