"""Refuse a cache that does not fit the student before any step is taken.

Token-level distillation is only meaningful when teacher position i *is* student token i: the
same tokenizer (content hash, not just name), the same vocabulary, the same token ids for the
same normalised transcript, and targets for every training utterance. Each check raises
:class:`CacheMismatchError` whose message says what differs and how to fix it.

Exception: the ``hierarchical`` recipe's teachers in *other units* (a different tokenizer hash)
are distilled through their own aux decoder, teacher-forced on their own token ids, so they are
checked against themselves: token-level targets and token_ids for every training utterance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdcache.student.data import TargetMismatchError, check_alignment

log = logging.getLogger(__name__)

# Utterances whose stored token ids are compared up front (all are checked again as they stream).
TOKEN_CHECK_SAMPLE = 16


class CacheMismatchError(ValueError):
    """The cache's teacher does not match the student's units or the training data."""


def _fmt_ids(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(u) for u in list(ids)[:n])
    return shown + (", ..." if len(ids) > n else "")


def check_teacher_units(record: Any, tokenizer: Any, frames_ok: bool = False) -> None:
    """Tokenizer hash and vocabulary size of a teacher record against the student's tokenizer
    (``frames_ok``: frame-level targets over the same vocabulary are accepted too)."""
    if record.units != "tokens" and not (frames_ok and record.units == "frames"):
        raise CacheMismatchError(
            f"teacher {record.name!r} stores {record.units}-level targets; the student recipes "
            f"distil token-level targets"
        )
    student_hash = tokenizer.content_hash()
    if record.tokenizer_hash != student_hash:
        raise CacheMismatchError(
            f"teacher {record.name!r}: tokenizer hash differs: the cache was built with "
            f"{record.tokenizer_id!r} (tokenizer_hash {record.tokenizer_hash}), the student uses "
            f"{getattr(tokenizer, 'name', '?')!r} (content_hash {student_hash}); token-level KD "
            f"needs the same tokenizer: pass the cache's tokenizer with --tokenizer or rebuild "
            f"the cache with the student's"
        )
    if record.vocab_size != tokenizer.vocab_size:
        raise CacheMismatchError(
            f"teacher {record.name!r}: vocabulary size differs: cache {record.vocab_size}, "
            f"student tokenizer {tokenizer.vocab_size}"
        )


def check_own_units_teacher(cache: Any, name: str, utt_ids: Sequence[str]) -> list[str]:
    """A teacher in other units than the student's, checked against itself: token-level
    targets, a vocabulary, and token_ids in the cache index for every utterance. Returns the
    utterances that lack token_ids (the caller decides whether that is fatal)."""
    rec = cache.teachers[name]
    if rec.units != "tokens":
        raise CacheMismatchError(
            f"teacher {name!r} stores {rec.units}-level targets; an aux decoder needs "
            f"token-level targets"
        )
    if rec.vocab_size < 1:
        raise CacheMismatchError(f"teacher {name!r}: its record has no vocab_size")
    no_tok: set[str] = set()
    for si in cache.shards[name]:
        vals = np.asarray(si.token_values)
        if len(vals) and (vals.min() < 0 or vals.max() >= rec.vocab_size):
            raise CacheMismatchError(
                f"teacher {name!r}: token_ids outside its vocabulary [0, {rec.vocab_size}) in "
                f"shard {si.name}"
            )
        no_tok.update(si.utt_ids[int(row)] for row in np.flatnonzero(~np.asarray(si.token_valid)))
    return [u for u in utt_ids if u in no_tok]


def check_cache(
    cache: Any,
    teachers: Sequence[str],
    tokenizer: Any,
    utt_ids: Sequence[str],
    tokens: dict[str, np.ndarray],
    allow_missing: bool = False,
    own_units: Sequence[str] = (),
    frame_units: Sequence[str] = (),
) -> list[str]:
    """Check ``cache`` against the student and the training set; return the usable utterances.

    Args:
        cache: An opened KDCache.
        teachers: The teachers the recipe reads.
        tokenizer: The student's Tokenizer.
        utt_ids: Training utterance ids.
        tokens: utt id -> student token ids of the normalised transcript.
        allow_missing: Skip utterances the cache lacks with a warning instead of raising.
        own_units: Teachers in other units than the student's (hierarchical KD through aux
            decoders): checked against themselves (check_own_units_teacher), not against the
            student's tokenizer.
        frame_units: Teachers with frame-level targets the recipe reads (an ensemble on the
            CTC head): their vocabulary must be the student's; frame counts are checked per
            batch against the encoder.

    Returns:
        ``utt_ids`` minus the missing ones (all of them unless ``allow_missing``).
    """
    for name in teachers:
        if name not in cache.teachers:
            raise CacheMismatchError(
                f"teacher {name!r} is not in the cache; it holds {sorted(cache.teachers)}"
            )
        if name in own_units:
            continue
        check_teacher_units(cache.teachers[name], tokenizer, frames_ok=name in frame_units)
    have: set[str] | None = None
    for name in teachers:
        ids = set(cache.utt_ids(name))
        have = ids if have is None else have & ids
    have = have or set()
    missing = [u for u in utt_ids if u not in have]
    if missing:
        msg = (
            f"the cache lacks {len(missing)} of {len(utt_ids)} training utterances "
            f"(teachers {list(teachers)}): {_fmt_ids(missing)}"
        )
        if not allow_missing:
            raise CacheMismatchError(
                msg + "; build them (kdcache build resumes) or pass --allow-missing to skip them"
            )
        log.warning("%s; skipping them (--allow-missing)", msg)
    usable = [u for u in utt_ids if u in have]
    for name in own_units:
        no_tok = check_own_units_teacher(cache, name, usable)
        if no_tok:
            raise CacheMismatchError(
                f"teacher {name!r} (units other than the student's, distilled through an aux "
                f"decoder teacher-forced on its own tokens) has no token_ids for {len(no_tok)} "
                f"of {len(usable)} training utterances: {_fmt_ids(no_tok)}; rebuild them with a "
                f"teacher that records its input token ids"
            )
    if not usable:
        raise CacheMismatchError("no training utterance has cached targets")
    for utt_id in usable[:TOKEN_CHECK_SAMPLE]:
        targets = {name: cache.get(utt_id, name, hidden=False) for name in teachers}
        try:
            check_alignment(utt_id, tokens[utt_id], targets, own_units, frame_units)
        except TargetMismatchError as e:
            raise CacheMismatchError(str(e)) from e
    return usable
