"""Cache targets on lhotse cuts (``pip install kdcache[lhotse]``), for icefall-style trainers.

Like icefall's MVQ codebook indexes, the targets travel with the cuts as a custom field, so a
``CutSet`` saved to disk, sampled, bucketed or speed-perturbed still knows where its targets are::

    from kdcache.lhotse import attach_targets, load_targets

    cuts = attach_targets(CutSet.from_file("cuts_train.jsonl.gz"), "lm.kdc")
    cuts.to_file("cuts_train_kd.jsonl.gz")
    ...
    # at batch time (a K2SpeechRecognitionDataset subclass, or the training loop):
    kd = load_targets(batch["supervisions"]["cut"], length=ys.size(1))
    t = kd["lstm_lm"]                       # a kdcache.torch.TeacherBatch, row b = cut b

The field ``cut.custom["kd"]`` holds ``{"cache": [paths], "key": utt_id, "input_hash": {teacher:
hash}}``. ``key`` is the utterance id the targets are stored under: lhotse renames a cut when it
perturbs its speed or volume (``utt_sp0.9``) and the key keeps pointing at the original, whose
token positions are unchanged. ``input_hash`` is the hash of the normalised transcript the
teacher read; it is checked when the field is attached (against the cut's supervisions) and again
when targets are loaded (against the cache, and against the cut's transcript then), so ids that
drift between corpus preparation and cache build, or a cache rebuilt from other text, raise
:class:`~kdcache.torch.TargetMismatchError` naming the cut instead of teaching the wrong targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdcache.cache_format.spec import content_hash
from kdcache.torch import CacheTargets, MissingTargetsError, TargetMismatchError, TeacherBatch

__all__ = ["FIELD", "attach_targets", "cut_text", "load_targets"]

FIELD = "kd"

_OPEN: dict[tuple[tuple[str, ...], tuple[str, ...], bool], CacheTargets] = {}


def _targets(paths: Sequence[str], teachers: Sequence[str] | None, hidden: bool) -> CacheTargets:
    """One CacheTargets per (caches, teachers, hidden) and process (DataLoader workers too)."""
    key = (tuple(paths), tuple(teachers or ()), hidden)
    if key not in _OPEN:
        _OPEN[key] = CacheTargets(list(paths), teachers=teachers, hidden=hidden)
    return _OPEN[key]


def cut_text(cut: Any) -> str:
    """The cut's transcript as kdcache reads it: its supervisions' texts joined by a space,
    normalised (``kdcache.data.text.normalize_text``)."""
    from kdcache.data.text import normalize_text

    return normalize_text(" ".join(s.text or "" for s in cut.supervisions))


def attach_targets(
    cuts: Iterable[Any],
    cache: str | Path | Sequence[str | Path],
    *,
    teachers: Sequence[str] | None = None,
    key: Any = None,
    missing: str = "error",
):
    """Return a ``CutSet`` whose cuts carry ``custom["kd"]`` pointing at their targets.

    Args:
        cuts: A lhotse ``CutSet`` (or any iterable of cuts).
        cache: The cache path(s) (several: their teachers are read together).
        teachers: The teachers to check (default: all).
        key: cut -> utterance id in the cache (default: ``cut.id``).
        missing: "error" (default): raise on a cut the cache does not hold; "drop": leave it out.

    Raises:
        MissingTargetsError: a cut's key is not in the cache (with ``missing="error"``).
        TargetMismatchError: a cut's transcript is not the one the teacher read.
    """
    from lhotse import CutSet

    if missing not in ("error", "drop"):
        raise ValueError(f"missing must be 'error' or 'drop', got {missing!r}")
    paths = [str(cache)] if isinstance(cache, (str, Path)) else [str(p) for p in cache]
    targets = _targets(paths, teachers, False)
    out = []
    for cut in cuts:
        utt_id = cut.id if key is None else str(key(cut))
        try:
            got = targets.get(utt_id, text=cut_text(cut))
        except MissingTargetsError:
            if missing == "drop":
                continue
            raise
        except TargetMismatchError as e:
            raise TargetMismatchError(f"cut {cut.id!r}: {e}") from None
        field = {
            "cache": paths,
            "key": utt_id,
            "input_hash": {t: u.input_hash for t, u in got.items()},
        }
        out.append(cut.with_custom(FIELD, field))
    return CutSet.from_cuts(out)


def load_targets(
    cuts: Iterable[Any],
    *,
    length: int | None = None,
    tokens: Sequence[Any] | None = None,
    teachers: Sequence[str] | None = None,
    hidden: bool = False,
) -> dict[str, TeacherBatch]:
    """Targets of a batch of cuts (carrying ``custom["kd"]``): teacher -> TeacherBatch, row b =
    cut b, padded to ``length`` positions (default: the longest).

    Args:
        cuts: The batch's cuts, in batch order (a ``CutSet`` or a list).
        length: Padded position count, e.g. the longest token sequence of the batch.
        tokens: Per cut, the trainer's token ids (no specials): checked against the stored ones.
        teachers: Teachers to read (default: all in the field's caches).
        hidden: Also read the stored hidden states.

    Raises:
        KeyError: a cut has no ``custom["kd"]`` (run :func:`attach_targets`), naming the cut.
        ValueError: the cuts point at different caches.
        TargetMismatchError: the transcript or the cache changed since the field was attached.
    """
    cuts = list(cuts)
    if not cuts:
        return {}
    fields = []
    for cut in cuts:
        f = (cut.custom or {}).get(FIELD)
        if f is None:
            raise KeyError(
                f"cut {cut.id!r} has no custom[{FIELD!r}] field; attach the cache first "
                f"(kdcache.lhotse.attach_targets)"
            )
        fields.append(f)
    paths = list(fields[0]["cache"])
    for cut, f in zip(cuts, fields, strict=True):
        if list(f["cache"]) != paths:
            raise ValueError(
                f"cut {cut.id!r} points at caches {f['cache']}, the batch's first cut at {paths}"
            )
    targets = _targets(paths, teachers, hidden)
    items = []
    for i, (cut, f) in enumerate(zip(cuts, fields, strict=True)):
        text_hash = content_hash(cut_text(cut))
        try:
            got = targets.get(f["key"], tokens=None if tokens is None else tokens[i])
        except TargetMismatchError as e:
            raise TargetMismatchError(f"cut {cut.id!r}: {e}") from None
        for t, u in got.items():
            want = f["input_hash"].get(t)
            if want is not None and u.input_hash != want:
                raise TargetMismatchError(
                    f"cut {cut.id!r}: teacher {t!r} of {', '.join(paths)} now holds targets for "
                    f"{u.text!r} under {f['key']!r}, not the transcript attached to the cut; "
                    f"the cache was rebuilt from other text: attach it again"
                )
            if u.input_hash and u.input_hash != text_hash:
                raise TargetMismatchError(
                    f"cut {cut.id!r}: its transcript {cut_text(cut)!r} is not the one teacher "
                    f"{t!r} read ({u.text!r})"
                )
        items.append(got)
    return targets.collate(items, length=length)
