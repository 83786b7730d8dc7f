"""A run directory and what training and evaluation both need from it.

A run directory (``kdtrain run --out RUN``) holds ``config.yaml`` (the resolved config),
``run.json`` (the input paths, so ``--resume`` needs only ``--out``), ``tokenizer/`` (a copy of
the student tokenizer), ``checkpoints/``, ``metrics.csv`` (training losses) and, when a dev set
is given, ``dev.csv`` (dev WER/CER against step and training seconds).

This module is the one place that turns such a directory (or a manifest + feature store) into
objects: the device, the tokenizer, the model with restored weights, a prepared split of
utterances, and decoded hypotheses. ``recipe.py`` (training) and ``evaluate.py`` (scoring) both
use it; neither imports the other.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.student.checkpoint import load_checkpoint, load_latest
from kdcache.student.config import RunConfig
from kdcache.student.model import Student

RUN_FILE = "run.json"  # input paths of the run


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str | Path):
    from kdcache.data.tokenizer import Tokenizer

    return Tokenizer.load(path)


def build_model(cfg: RunConfig, tokenizer=None) -> Student:
    """The student of a resolved config (``cfg.model`` already holds vocab and heads)."""
    return Student(cfg.model)


def restore_model(model: Student, run_dir: Path, checkpoint: str | Path | None = None):
    """Load weights from ``checkpoint`` or the newest of ``run_dir``; return (step, path)."""
    if checkpoint:
        path, state = Path(checkpoint), load_checkpoint(checkpoint)
    else:  # the newest readable one: a truncated newest is skipped with a warning
        found = load_latest(run_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
        path, state = found
    model.load_state_dict(state["model"])
    return int(state["step"]), path


@dataclass
class Split:
    """The utterances of a manifest that have a transcript, ready to train on or to score.

    Attributes:
        name: a short name for messages and output files (the manifest's file or dir name).
        utt_ids: utterance ids in manifest order.
        texts: utt id -> normalised transcript (kdcache.data.text.normalize_text).
        tokens: utt id -> student token ids of that transcript.
        store: the opened feature store (every utterance of ``utt_ids`` is in it).
    """

    name: str
    utt_ids: list[str]
    texts: dict[str, str]
    tokens: dict[str, np.ndarray]
    store: Any


def prepare_split(
    manifest: str | Path, features: str | Path, tokenizer, *, what: str = ""
) -> Split:
    """Load a manifest, normalise and tokenise its transcripts, open and check the features.

    Raises:
        ValueError: an utterance has no features in the store (the message names up to five).
    """
    from kdcache.data.features import open_features
    from kdcache.data.manifest import load_manifest
    from kdcache.data.text import normalize_text

    utts = [u for u in load_manifest(manifest) if u.text is not None]
    texts = {u.id: normalize_text(u.text) for u in utts}
    tokens = {u: np.asarray(tokenizer.encode(t), dtype=np.int64) for u, t in texts.items()}
    store = open_features(features, in_memory=False)
    missing = [u for u in texts if u not in store]
    if missing:
        raise ValueError(
            f"{len(missing)} {what + ' ' if what else ''}utterances of {manifest} have no "
            f"features in {features}: {', '.join(repr(u) for u in missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}"
        )
    return Split(Path(str(manifest)).name.split(".")[0], list(texts), texts, tokens, store)


def decode_split(
    model: Student,
    split: Split,
    tokenizer,
    search,
    device: torch.device,
    *,
    max_frames: int,
    max_utts: int,
    cmvn: bool = True,
    lm=None,
) -> dict[str, str]:
    """Decode every utterance of ``split`` (the model is used as it is: call ``.eval()``);
    ``lm`` (an `LMFusion`) is fused into attention search with ``search.lm_weight``.

    Returns:
        utt id -> normalised hypothesis text.
    """
    from kdcache.data.text import normalize_text
    from kdcache.student import decode as dec
    from kdcache.student.data import eval_batches

    hyps: dict[str, str] = {}
    with torch.inference_mode():
        for batch in eval_batches(split.utt_ids, split.tokens, split.texts, split.store,
                                  max_frames=max_frames, max_utts=max_utts,
                                  pad_id=tokenizer.pad_id, cmvn=cmvn):  # fmt: skip
            batch = batch.to(device)
            ids = dec.decode(model, batch.feats, batch.feat_lens, search, lm=lm)
            for utt_id, seq in zip(batch.utt_ids, ids, strict=True):
                hyps[utt_id] = normalize_text(tokenizer.decode([int(i) for i in seq]))
    return hyps


class CsvLog:
    """An append-only CSV of rows keyed by ``step``, flushed per row. On resume, rows after the
    checkpoint's step are dropped, so the file always describes one consistent run."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.fields: list[str] | None = None
        self._f = None
        self._w = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.fields = rows[0]
                keep = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
                tmp = self.path.with_suffix(".csv.tmp")
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows([self.fields, *keep])
                os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            new = self.fields is None
            if new:
                self.fields = list(row)
            self._f = open(self.path, "a", newline="")
            self._w = csv.DictWriter(self._f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                self._w.writeheader()
        self._w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(run_dir: str | Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    """Rows of RUN_DIR/metrics.csv (or RUN_DIR/dev.csv with ``name``) as dicts of strings."""
    with open(Path(run_dir) / name, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: Sequence[dict[str, str]], key: str) -> list[float]:
    """One numeric column of ``read_metrics`` rows (missing cells are NaN)."""
    return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]
