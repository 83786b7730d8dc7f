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
from kdcache.commands import recipes as _recipes
from kdcache.commands import train as _train
from kdcache.commands.params import Command, Group

app = typer.Typer(
    name="kdcache",
    cls=Group,
    help="Build, inspect and verify offline teacher-target caches for knowledge distillation into ASR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(
    name="kdtrain",
    cls=Group,
    help="Train and evaluate small ASR students from audio features and a kdcache, without loading any teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Teacher stage.
app.command("build", cls=Command)(_build.build)
app.command("train-lm", cls=Command)(_build.train_lm)
app.command("score", cls=Command)(_build.score)
# Cache format.
app.command("inspect", cls=Command)(_cache.inspect)
app.command("verify", cls=Command)(_cache.verify)
# Data.
app.command("demo-corpus", cls=Command)(_data.demo_corpus)
app.command("features", cls=Command)(_data.features)
app.command("tokenizer", cls=Command)(_data.tokenizer)
# Student stage.
train_app.command("run", cls=Command)(_train.run)
train_app.command("eval", cls=Command)(_train.evaluate)
train_app.command("study", cls=Command)(_train.study)
train_app.command("curves", cls=Command)(_train.curves)
train_app.command("recipes", cls=Command)(_recipes.recipes)

if __name__ == "__main__":
    app()
