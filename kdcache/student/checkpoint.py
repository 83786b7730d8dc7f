"""Checkpoints of a run: model, optimizer, scheduler, RNG and data position, written atomically.

A checkpoint is ``RUN_DIR/checkpoints/step-00001000.pt`` (one ``torch.save`` dict). It is written
to a temporary name in the same directory, flushed and fsync'ed, then renamed: a killed run leaves
either the previous checkpoint or the new one, never half of one, and loses at most
``train.ckpt_every`` steps. The newest ``train.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def rng_state() -> dict[str, Any]:
    """Every RNG the training process draws from (data augmentation has its own seeds)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; prune to the newest ``keep``."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    for stale in path.parent.glob(".step-*.pt.tmp-*"):  # leftovers of killed writers
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged, not a kdtrain checkpoint)."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, damaged or not a kdtrain checkpoint.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        # weights_only=False: the state holds RNG tuples and numpy arrays, and it is our own file.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch/pickle/zip raise many types for a bad file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a kdtrain checkpoint (no model/step)")
    return state


def load_latest(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest readable checkpoint of a run, newest first: a damaged or truncated one is
    skipped with a warning naming it, and the previous kept checkpoint is used. None when the
    run has no checkpoint.

    Raises:
        CheckpointError: the run has checkpoints and none of them can be read.
    """
    import logging

    log = logging.getLogger(__name__)
    ckpts = list_checkpoints(run_dir)
    skipped: list[str] = []
    for _, path in reversed(ckpts):
        try:
            state = load_checkpoint(path, map_location)
        except (CheckpointError, FileNotFoundError) as e:  # FileNotFoundError: pruned meanwhile
            log.warning("skipping %s", e)
            skipped.append(path.name)
            continue
        if skipped:
            log.warning("using the previous checkpoint %s instead of %s", path, ", ".join(skipped))
        return path, state
    if ckpts:
        raise CheckpointError(
            f"{Path(run_dir) / CKPT_DIR}: no readable checkpoint "
            f"({', '.join(skipped)} damaged or truncated)"
        )
    return None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (state dicts are saved without the ``module.`` prefix)."""
    return model.module if hasattr(model, "module") else model
