"""How every ``kdcache`` and ``kdtrain`` option reads in ``--help``: classic Unix placeholders.

Each option names its value with ``metavar=``: ``PATH``, ``DIR``, ``FILE``, ``N``, ``FLOAT``,
``TEXT`` or a word of its own (``NAME``, ``DEVICE``); an option with a fixed set of values takes
:func:`one_of`, which shows them as ``[a|b|c]`` and refuses anything else with one ``error:`` line
(the rule of kdcache.commands.errors). :class:`Command` (every command in kdcache.cli) and
:class:`Group` (the two apps) drop the rest of typer's ``<type>`` column: nothing follows a flag
(``--overwrite``, ``--progress/--no-progress``, ``--help``) or a positional argument, whose name
is its metavar.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.29 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError

from kdcache.commands.errors import fail

DEVICE_HELP = "auto (CUDA if available), cpu, cuda, or a torch device such as cuda:1."


def one_of(values: Sequence[str], metavar: str | None = None) -> dict[str, Any]:
    """``typer.Option(..., **one_of(CHOICES))`` for a ``str`` option that takes one of ``values``.

    Help shows ``[a|b|c]``, or ``metavar`` (a positional argument's name, or a word where the list
    is long and the help names every value). Any other value exits with status 2 and
    ``error: --opt 'x': use one of a, b, c`` before the command runs. (A ``click.Choice``, ``Enum``
    or ``Literal`` type would have typer print a boxed usage error instead.)
    """
    values = tuple(values)

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if value is None or ctx.resilient_parsing or value in values:
            return value
        name = param.opts[0] if param.param_type_name == "option" else param.metavar or param.name
        fail(f"{name} {value!r}: use one of {', '.join(values)}")

    return {"metavar": metavar or "[" + "|".join(values) + "]", "callback": check}


class Command(TyperCommand):
    """A typer command whose help shows no type placeholder where classic help shows none, and
    whose docstring paragraphs flow to the terminal's width (a ``\\b`` paragraph keeps its lines)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain(param)
        if self.help:
            text, cut, rest = inspect.cleandoc(self.help).partition("\f")  # \f: help ends there
            paragraphs = [
                p if p.startswith("\b") else " ".join(p.split()) for p in text.split("\n\n")
            ]
            self.help = "\n\n".join(paragraphs) + cut + rest

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain(option)
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as e:  # a missing option, an unknown one, a bad number, ...
            _usage_error(ctx, e)


class Group(TyperGroup):
    """The ``kdcache`` and ``kdtrain`` apps: ``--help`` without a placeholder there too."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain(option)
        return option

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:  # no such command
            _usage_error(ctx, e)


def _usage_error(ctx: Any, e: Any) -> None:
    """A usage mistake as one ``error:`` line and status 2, like every other mistake (typer would
    print a boxed panel)."""
    msg = e.format_message().rstrip(".")
    msg = msg[0].lower() + msg[1:] if msg[:1].isupper() and msg[1:2].islower() else msg
    fail(f"{msg} (see {ctx.command_path} --help)")


def _plain(param: Any) -> None:
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # a flag takes no value: no placeholder
    if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
        # typer 0.29 (with its own copy of click) prints an argument's type (<str>, <path>)
        # beside its name, and metavar= only renames it: the name (PATH, MANIFEST) says it all.
        param.display_type_rich = lambda ctx: None
