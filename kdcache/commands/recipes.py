"""``kdtrain recipes``: list the shipped recipe configs and study plans, or print one.

They live in kdcache/recipes/ (package data: a wheel carries them; the repository's top-level
recipes/ is a link to it, so the paths in the docs work from a checkout).
"""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.commands.errors import fail

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def shipped() -> dict[str, Path]:
    """``{"none": .../none.yaml, "cpu/lst": .../cpu/lst.yaml, "plans/cpu": ...}``, top level first."""
    root = RECIPES_DIR
    if not root.is_dir():
        fail(
            f"no recipes directory at {root}: the kdcache installation lacks its package data; "
            "reinstall it (pip install kdcache, or pip install -e . from a checkout)"
        )
    files = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), p))
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in files}


def recipes(
    name: str | None = typer.Argument(
        None, metavar="NAME", help="The file to print, e.g. lst or cpu/lst (.yaml optional)."
    ),
) -> None:
    """List the shipped recipe configs and study plans, or print one.

    NAME is a config for kdtrain run --config at full (GPU) size, cpu/NAME the same recipe at the
    2-core CPU size, plans/NAME a study plan for kdtrain study --plan."""
    files = shipped()
    if name is None:
        typer.echo("\n".join(files))
        return
    key = name.removeprefix("recipes/").removesuffix(".yaml")
    if key not in files:
        fail(f"no recipe file {name!r}: use one of {', '.join(files)}")
    typer.echo(files[key].read_text(), nl=False)
