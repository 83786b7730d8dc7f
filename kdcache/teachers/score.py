"""How good a teacher is on a manifest's transcripts, in its own units (``kdcache score``).

Before a teacher is cached, and next to a study's table, one wants its quality on the text the
student will be tested on: the perplexity of a causal or LSTM LM (exp of the mean of
-log p(y_i | y_<i)), the pseudo-perplexity of a masked LM (each position masked in turn, or
``--mask-stride``'s groups, as the build masks them), and the share of positions whose token is
the teacher's top-1. The positions are exactly the ones a cache stores, run through the same
adapters and batching as ``kdcache build`` (:func:`kdcache.teachers.base.run_rows` with
``labels=True``); a causal LM's first token without a BOS, which the build stores as a hard
label, is not predicted and not counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from kdcache.teachers.build import (
    DEFAULT_BUDGET,
    BuildError,
    _check_unknown_tokens,
    build_threads,
    load_teacher,
    pick_device,
    prepare,
)


@dataclass
class ScoreSummary:
    """What ``kdcache score`` measured."""

    teacher: str
    model: str
    data: str
    units: str  # the teacher's tokenizer id
    vocab_size: int
    utterances: int
    positions: int  # scored positions
    unscored: int  # positions the model does not predict (a causal LM's first token, no BOS)
    nll: float  # mean -log p(token), nats
    characters: int  # characters of the scored utterances' normalised text
    top1: float  # share of scored positions whose token is the teacher's top-1
    seconds: float
    mlm_mode: str | None = None
    mask_stride: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.positions else float("nan")

    @property
    def bits_per_char(self) -> float:
        """All scored nats over the text's characters, in bits: comparable across units."""
        return (
            self.nll * self.positions / math.log(2) / self.characters
            if self.characters
            else float("nan")
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_char": self.bits_per_char}

    def lines(self) -> list[str]:
        kind = "pseudo-perplexity" if self.teacher == "bert" else "perplexity"
        how = f", {self.mlm_mode}" if self.mlm_mode else ""
        if self.mask_stride:
            how += f", mask stride {self.mask_stride}"
        return [
            f"teacher   {self.teacher} {self.model} ({self.units} units, vocabulary "
            f"{self.vocab_size:,}{how})",
            f"data      {self.data}: {self.utterances:,} utterances, {self.positions:,} "
            f"positions scored" + (f", {self.unscored:,} not predicted" if self.unscored else ""),
            f"quality   {kind} {self.perplexity:.3f} per {self.units} unit (mean -log p "
            f"{self.nll:.4f} nats, {self.nll / math.log(2):.4f} bits); top-1 "
            f"{100 * self.top1:.2f}% of positions",
            f"per text  {self.bits_per_char:.4f} bits per character of the normalised text "
            f"({self.characters:,} characters; comparable across units)",
            f"time      {self.seconds:.1f} s",
        ]


def score_teacher(
    *,
    teacher: str,
    model: str,
    data: str,
    mlm_mode: str = "masked",
    mask_stride: int = 0,
    batch_tokens: int = 0,
    device: str = "auto",
    skip_bad: bool = False,
    progress: bool = True,
    threads: int | str = "auto",
    loaded=None,
) -> ScoreSummary:
    """Score a teacher on a manifest's transcripts (see the module docstring).

    Args:
        teacher: ``bert``, ``causal_lm`` or ``lstm_lm``.
        model: As for ``kdcache build``.
        data: Manifest whose transcripts are scored.
        mlm_mode, mask_stride: The masked LM's modes, as for the build.
        batch_tokens: Padded tokens per batch (0: the build's default).
        threads: torch threads for the run (restored after), as ``kdcache build --threads``.
        loaded: An already-loaded teacher with ``k == 1`` (tests), instead of loading ``model``.

    Raises:
        BuildError: a bad option, manifest or model, in words that name it.
    """
    from tqdm import tqdm

    from kdcache.data.manifest import load_manifest
    from kdcache.teachers.base import run_rows
    from kdcache.threads import scoped_threads

    t0 = time.monotonic()
    try:
        utts = load_manifest(data)
    except FileNotFoundError:
        raise BuildError(f"--data {data!r}: no such manifest") from None
    dev = pick_device(device)
    with scoped_threads(build_threads(threads, dev)):
        t = loaded or load_teacher(
            teacher, model, k=1, mlm_mode=mlm_mode, device=dev, mask_stride=mask_stride
        )
        prepared, _ = prepare(utts, t.encode, skip_bad=skip_bad)
        _check_unknown_tokens(prepared, getattr(t, "unk_id", None), model)
        budget = batch_tokens or DEFAULT_BUDGET["cuda" if dev.startswith("cuda") else "cpu"]
        order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i].token_ids), i))
        nll = 0.0
        scored = unscored = top1 = 0
        bar = tqdm(
            total=sum(len(p.token_ids) for p in prepared),
            unit="pos",
            unit_scale=True,
            disable=not progress,
            desc=f"score {teacher}",
            dynamic_ncols=True,
        )
        with bar:
            for _, tg in run_rows(
                t, ((i, prepared[i].token_ids) for i in order), budget, labels=True
            ):
                lp, best = tg.topk_logprobs[:, 0].astype(np.float64), tg.tail_logmass
                ok = ~np.isnan(lp)
                unscored += int((~ok).sum())
                scored += int(ok.sum())
                nll -= float(lp[ok].sum())
                top1 += int((lp[ok] >= best[ok].astype(np.float64) - 1e-6).sum())
                bar.update(len(lp))
    is_bert = teacher == "bert"
    return ScoreSummary(
        teacher=teacher,
        model=str(model),
        data=str(data),
        units=_units(t),
        vocab_size=int(t.vocab_size),
        utterances=len(prepared),
        positions=scored,
        unscored=unscored,
        nll=nll / scored if scored else float("nan"),
        characters=sum(len(p.text) for p in prepared),
        top1=top1 / scored if scored else float("nan"),
        seconds=time.monotonic() - t0,
        mlm_mode=mlm_mode if is_bert else None,
        mask_stride=(mask_stride or None) if is_bert else None,
    )


def _units(t) -> str:
    """``char``, ``bpe``, ``phone`` for a kdcache tokenizer; ``model-token`` for a HF one."""
    kind = getattr(getattr(t, "tokenizer", None), "kind", None)
    return kind if isinstance(kind, str) else "model-token"


def write_json(summary: ScoreSummary, path: str) -> None:
    """The summary as JSON, written atomically."""
    from kdcache.cache_format.storage import atomic_write

    text = json.dumps(summary.to_dict(), indent=1) + "\n"
    atomic_write(os.path.abspath(path), text.encode(), fsync=False)
