"""Command-line entry points: ``kdcache`` (teacher stage) and ``kdtrain`` (student stage).

Thin on purpose: each command lives in kdcache/commands/<area>.py, parses its options and calls
library functions. Heavy imports (torch, transformers, zarr) happen inside the commands so that
``kdcache --help`` is instant.
"""

from __future__ import annotations

import typer

from kdcache.commands import build as _build
from kdcache.commands import cache as _cache
from kdcache.commands import data as _data
from kdcache.commands import train as _train

app = typer.Typer(
    name="kdcache",
    help="Build, inspect and verify offline teacher-target caches for knowledge distillation into ASR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    name="kdtrain",
    help="Train and evaluate small ASR students from audio features and a kdcache, without loading any teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Teacher stage.
app.command("build")(_build.build)
app.command("train-lm")(_build.train_lm)
# Cache format.
app.command("inspect")(_cache.inspect)
app.command("verify")(_cache.verify)
# Data.
app.command("demo-corpus")(_data.demo_corpus)
app.command("features")(_data.features)
app.command("tokenizer")(_data.tokenizer)
# Student stage.
train_app.command("run")(_train.run)
train_app.command("eval")(_train.evaluate)
train_app.command("study")(_train.study)
train_app.command("curves")(_train.curves)

if __name__ == "__main__":
    app()
