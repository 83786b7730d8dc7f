"""``kdcache inspect`` and ``kdcache verify``: thin wrappers over kdcache.cache_format."""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.commands.errors import EXIT_USAGE, fail


def _fail(e: BaseException, path: str | None = None, code: int = EXIT_USAGE) -> None:
    """One line on stderr; exit 2 (``verify``: 1, its verdict that the cache is not intact).
    Errors the cache code does not expect (a bug, or damage it does not yet name) still come out
    as one line naming the cache, never a traceback."""
    from kdcache.cache_format import CacheError

    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if path is not None and not isinstance(e, (CacheError, KeyError)):
        msg = f"{path}: {type(e).__name__}: {msg}"
    fail(msg, code)


def inspect(
    path: str = typer.Argument(
        ..., metavar="PATH", help="Cache directory (NAME.kdc) or fsspec URL."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print one JSON object instead of a table."
    ),
    utt: str | None = typer.Option(
        None, "--utt", metavar="ID", help="Show one utterance position by position."
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", metavar="NAME", help="Only this teacher (--utt, --plot)."
    ),
    top: int = typer.Option(
        5, "--top", metavar="N", help="Top entries shown per position with --utt."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", metavar="FILE", help="Write top-k mass and entropy plots to this PNG."
    ),
) -> None:
    """Summarise a cache: teachers, utterances, positions, bytes per position."""
    import json

    from kdcache.cache_format import CacheError, open_cache
    from kdcache.cache_format import inspect as insp

    try:
        cache = open_cache(path)
        if teacher is not None and teacher not in cache.teachers:
            raise KeyError(
                f"teacher {teacher!r} not in cache {path} (teachers: {sorted(cache.teachers)})"
            )
        if utt is not None:
            typer.echo(insp.utterance_view(cache, utt, teacher=teacher, top=top))
        if plot is not None:
            insp.plot_cache(cache, str(plot), teacher=teacher)
            typer.echo(f"wrote {plot}", err=True)
        if utt is None and (plot is None or json_out):
            s = insp.summarize(cache)
            typer.echo(json.dumps(s) if json_out else insp.format_summary(s))
    except (CacheError, KeyError, ValueError, OSError) as e:
        _fail(e, path)
    except Exception as e:  # noqa: BLE001 - see _fail
        _fail(e, path)


def verify(
    path: str = typer.Argument(
        ..., metavar="PATH", help="Cache directory (NAME.kdc) or fsspec URL."
    ),
    workers: int = typer.Option(4, "--workers", metavar="N", help="Threads decoding chunks."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Check every chunk checksum, index and commit marker; exit 0 only when the cache is intact."""
    from kdcache.cache_format import CacheError, verify_cache

    try:
        problems = verify_cache(path, workers=workers, progress=progress, include_info=True)
    except (CacheError, OSError, ValueError) as e:
        _fail(e, path, 1)
    except Exception as e:  # noqa: BLE001 - see _fail
        _fail(e, path, 1)
    errors = [p for p in problems if p.severity == "error"]
    for p in problems:
        typer.echo(str(p))
    if errors:
        typer.echo(f"{path}: {len(errors)} problem(s) found", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: intact" + (f" ({len(problems)} note(s))" if problems else ""))
