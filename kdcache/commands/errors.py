"""One rule for every ``kdcache`` and ``kdtrain`` command: a known failure (a usage, config or
input error: a missing or damaged file, a bad option value, a mismatch between inputs) prints one
line, ``error: ...``, on stderr and exits with :data:`EXIT_USAGE` (2). No traceback.

``kdcache verify`` is the one exception to the code: it exits 1 when the cache is damaged (its
verdict, not a usage error). Anything not listed here is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer

EXIT_USAGE = 2

# (module, class): checked only when the module is already imported (an error of that class can
# only come from a loaded module), so that handling an error never imports torch or zarr.
_KNOWN = (
    ("kdcache.cache_format.spec", "CacheError"),
    ("kdcache.student.config", "ConfigError"),
    ("kdcache.student.checks", "CacheMismatchError"),
    ("kdcache.student.data", "TargetMismatchError"),
    ("kdcache.student.checkpoint", "CheckpointError"),
    ("kdcache.data.features", "FeatureError"),
    ("kdcache.data.manifest", "ManifestError"),
    ("kdcache.data.tokenizer", "TokenizerError"),
    ("kdcache.data.audio", "AudioError"),
    ("kdcache.data.demo_corpus", "CorpusError"),
    ("kdcache.teachers.base", "BuildError"),
    ("yaml", "YAMLError"),
)
_OS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    UnicodeDecodeError,
)


def known_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    types = [
        getattr(sys.modules[m], n)
        for m, n in _KNOWN
        if m in sys.modules and hasattr(sys.modules[m], n)
    ]
    return (*types, *_OS, *extra)


def message(e: BaseException) -> str:
    """The error as one line; OS errors as ``FILE: reason``."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, UnicodeDecodeError):
        msg = f"not UTF-8 text (byte {e.start}: {e.reason})"
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def fail(msg: str | BaseException, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: MSG`` (one line) on stderr and exit with ``code``."""
    text = message(msg) if isinstance(msg, BaseException) else " ".join(str(msg).split())
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException], code: int = EXIT_USAGE) -> Iterator[None]:
    """Turn the known errors (and ``extra``) raised inside into :func:`fail`."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:
        if isinstance(e, known_errors(*extra)):
            fail(e, code)
        raise
