"""Cached teacher targets for any PyTorch trainer (icefall-, ESPnet-style or your own loop).

kdtrain is one student stage; this module is the one for everybody else. It needs only the
cache and the trainer's own utterance ids, transcripts or token ids::

    from kdcache.torch import CacheTargets
    from kdcache.losses import lst_loss

    targets = CacheTargets("lm.kdc")                      # every teacher in the cache(s)
    # in Dataset.__getitem__ (each DataLoader worker opens the cache once, lazily):
    item["kd"] = targets.get(utt_id, text=transcript, tokens=token_ids)
    # in collate_fn: padded tensors, position i = the trainer's token i
    batch["kd"] = targets.collate([it["kd"] for it in items], length=max_tokens)
    t = batch["kd"]["lstm_lm"]                            # a TeacherBatch
    loss = lst_loss(logits, ys, t.topk_ids, t.topk_logprobs, t.tail_logmass, mask,
                    build_temperature=t.temperature)

Keys and checks. Targets are keyed by utterance id. Ids drift (a re-segmented corpus, a
renamed cut, a differently normalised transcript: icefall's MVQ users met all three), so
:meth:`CacheTargets.get` checks what it is given: ``text`` against the cache's ``input_hash``
(sha256 of the normalised transcript the teacher read, ``kdcache.data.text.normalize_text``)
and ``tokens`` against the stored token ids and the position count. A mismatch raises
:class:`TargetMismatchError` naming the utterance and the teacher; an absent id raises
:class:`MissingTargetsError` naming the cache. :meth:`CacheTargets.check_tokenizer` compares a
kdcache tokenizer with the one each teacher was built in.

Layout of a :class:`TeacherBatch` (one per teacher): position ``i`` of utterance ``b`` is the
teacher's distribution for token ``i`` of the normalised transcript (no specials): for an
attention decoder fed ``[sos, y_1 .. y_L]`` it is the target of output ``i``; the final ``eos``
output has no teacher position. Padding: ids 0, log-probs ``log(1/k)``, tail ``-inf``, mask False,
so no loss sees ``-inf`` in a log-prob.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache_format.spec import UttTargets, content_hash

__all__ = [
    "CacheTargets",
    "MissingTargetsError",
    "TargetMismatchError",
    "TeacherBatch",
    "collate_targets",
]


class TargetMismatchError(ValueError):
    """Cached targets do not line up with the trainer's text or tokens of the same utterance."""


class MissingTargetsError(KeyError):
    """An utterance id has no targets in the cache."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


@dataclass
class TeacherBatch:
    """Cached targets of one teacher for a batch, padded to L positions.

    Attributes:
        topk_ids: [B, L, k] int64 teacher top-k ids (0 at padding).
        topk_logprobs: [B, L, k] float32 log-probs at the cache's build temperature, sorted
            descending (uniform log(1/k) at padding so no loss sees -inf there).
        tail_logmass: [B, L] float32 log of the mass outside the top k (-inf at padding).
        mask: [B, L] bool, True at real positions.
        hidden: layer -> [B, L, D] float32 teacher hidden states (0 at padding).
        temperature: the cache's build temperature.
        token_ids: [B, L] int64 the teacher's own input token ids (0 at padding), only for
            teachers in other units than the student's (``own_units``); None otherwise. For
            those teachers L is the teacher's longest utterance, not the student's.
        token_lens: [B] int64 teacher positions per utterance (with ``token_ids``).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    mask: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    temperature: float = 1.0
    token_ids: torch.Tensor | None = None
    token_lens: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TeacherBatch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return dataclasses.replace(
            self,
            topk_ids=self.topk_ids.to(device, non_blocking=True),
            topk_logprobs=self.topk_logprobs.to(device, non_blocking=True),
            tail_logmass=self.tail_logmass.to(device, non_blocking=True),
            mask=self.mask.to(device, non_blocking=True),
            hidden={k: v.to(device, non_blocking=True) for k, v in self.hidden.items()},
            token_ids=move(self.token_ids),
            token_lens=move(self.token_lens),
        )


def collate_targets(
    items: Sequence[Mapping[str, UttTargets]],
    *,
    length: int | None = None,
    temperatures: Mapping[str, float] | None = None,
    hidden_layers: Mapping[str, Sequence[int]] | None = None,
    own_units: Sequence[str] = (),
    frame_units: Sequence[str] = (),
) -> dict[str, TeacherBatch]:
    """Pad per-utterance targets (one ``{teacher: UttTargets}`` per utterance, the same teachers
    in each) into one :class:`TeacherBatch` per teacher.

    Args:
        items: B dicts teacher -> UttTargets.
        length: L, the padded position count (the trainer's longest token sequence); None: the
            longest teacher sequence of the batch. Must hold every utterance's positions.
        temperatures: teacher -> build temperature copied into the batch (default 1.0).
        hidden_layers: teacher -> stored layers to stack (default none).
        own_units: teachers in other units than the student's (hierarchical KD): padded to their
            own longest utterance and carrying their token ids.
        frame_units: teachers with frame-level targets (an ensemble): padded to their own
            longest utterance (positions are encoder frames, not tokens).
    """
    if not items:
        return {}
    temperatures = temperatures or {}
    hidden_layers = hidden_layers or {}
    b = len(items)
    own = set(own_units)
    own_length = own | set(frame_units)
    out: dict[str, TeacherBatch] = {}
    for name in items[0]:
        lengths = [it[name].topk_ids.shape[0] for it in items]
        k = items[0][name].topk_ids.shape[1]
        if name in own_length or length is None:
            max_l = max(1, max(lengths))
        else:
            max_l = max(1, int(length))
            if max(lengths) > max_l:
                i = int(np.argmax(lengths))
                raise TargetMismatchError(
                    f"utterance {items[i][name].utt_id!r}: teacher {name!r} has {lengths[i]} "
                    f"positions, more than the batch length {max_l}"
                )
        tid = tlen = None
        if name in own:
            tid = torch.zeros(b, max_l, dtype=torch.long)
            tlen = torch.zeros(b, dtype=torch.long)
        ids = torch.zeros(b, max_l, k, dtype=torch.long)
        lp = torch.full((b, max_l, k), -math.log(k) if k else 0.0, dtype=torch.float32)
        tail = torch.full((b, max_l), -math.inf, dtype=torch.float32)
        mask = torch.zeros(b, max_l, dtype=torch.bool)
        hid: dict[int, torch.Tensor] = {}
        for i, per_teacher in enumerate(items):
            t = per_teacher[name]
            n = lengths[i]
            if k:
                ids[i, :n] = torch.from_numpy(np.asarray(t.topk_ids, dtype=np.int64))
                lp[i, :n] = torch.from_numpy(np.asarray(t.topk_logprobs, dtype=np.float32))
            tail[i, :n] = torch.from_numpy(np.asarray(t.tail_logmass, dtype=np.float32))
            mask[i, :n] = True
            if tid is not None:
                tid[i, :n] = torch.from_numpy(np.asarray(t.token_ids, dtype=np.int64))
                tlen[i] = n
            for layer in hidden_layers.get(name, ()):
                if layer not in t.hidden:
                    raise KeyError(
                        f"utterance {t.utt_id!r}: teacher {name!r} has no hidden layer {layer} "
                        f"(stored: {sorted(t.hidden)})"
                    )
                h = np.asarray(t.hidden[layer], dtype=np.float32)
                if layer not in hid:
                    hid[layer] = torch.zeros(b, max_l, h.shape[1], dtype=torch.float32)
                hid[layer][i, :n] = torch.from_numpy(h)
        out[name] = TeacherBatch(
            ids,
            lp,
            tail,
            mask,
            hid,
            float(temperatures.get(name, 1.0)),
            token_ids=tid,
            token_lens=tlen,
        )
    return out


def check_tokens(utt_id: str, tokens: Any, targets: Mapping[str, UttTargets]) -> None:
    """Raise :class:`TargetMismatchError` when a teacher's positions are not ``tokens``: stored
    token ids that differ, or a position count that differs."""
    want = np.asarray(tokens, dtype=np.int64)
    for name, t in targets.items():
        if t.token_ids is not None and not np.array_equal(
            np.asarray(t.token_ids, dtype=np.int64), want
        ):
            raise TargetMismatchError(
                f"utterance {utt_id!r}: teacher {name!r} token_ids {list(t.token_ids)[:12]} differ "
                f"from the student's tokenisation of the normalised transcript "
                f"{want.tolist()[:12]}; rebuild the cache with the student's tokenizer"
            )
        n = t.topk_ids.shape[0]
        if n != len(want):
            raise TargetMismatchError(
                f"utterance {utt_id!r}: teacher {name!r} has {n} positions, the student "
                f"{len(want)} tokens"
            )


class CacheTargets:
    """Random access to one or several caches' targets, checked against the trainer's data.

    Picklable before and after use: each DataLoader worker reopens the cache(s) on first access.

    Args:
        cache: A cache path or URL, or several (their teachers are read together; a teacher name
            must not repeat).
        teachers: Teachers to read (default: all of them).
        hidden: Read hidden states: False (default), True (every stored layer of every teacher)
            or teacher -> layers.
    """

    def __init__(
        self,
        cache: str | Path | Sequence[str | Path],
        *,
        teachers: Sequence[str] | None = None,
        hidden: bool | Mapping[str, Sequence[int]] = False,
    ) -> None:
        if isinstance(cache, (str, Path)):
            self.paths = [str(cache)]
        else:
            self.paths = [str(p) for p in cache]
        if not self.paths:
            raise ValueError("CacheTargets: no cache path given")
        self._reader = None
        records = self.records
        if teachers is None:
            teachers = sorted(records)
        unknown = [t for t in teachers if t not in records]
        if unknown:
            raise KeyError(
                f"teacher(s) {unknown} not in {', '.join(self.paths)} (teachers: {sorted(records)})"
            )
        self.teachers = list(teachers)
        self.temperatures = {t: float(records[t].temperature) for t in self.teachers}
        self._idsets: list[set[str]] | None = None
        if hidden is True:
            self.hidden_layers = {t: list(records[t].hidden_layers) for t in self.teachers}
        elif hidden is False:
            self.hidden_layers = {}
        else:
            self.hidden_layers = {t: [int(x) for x in v] for t, v in hidden.items()}
            for t, layers in self.hidden_layers.items():
                if t not in records:
                    raise KeyError(f"hidden: teacher {t!r} not in {', '.join(self.paths)}")
                missing = sorted(set(layers) - set(records[t].hidden_layers))
                if missing:
                    raise KeyError(
                        f"hidden: teacher {t!r} stores layers {list(records[t].hidden_layers)}, "
                        f"not {missing}"
                    )

    # ---- the opened cache (per process)

    @property
    def reader(self):
        if self._reader is None:
            from kdcache.cache_format.multi import open_caches

            self._reader = open_caches(self.paths if len(self.paths) > 1 else self.paths[0])
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_reader"] = None
        d["_idsets"] = None
        return d

    @property
    def records(self) -> dict[str, Any]:
        """teacher -> TeacherRecord (model, tokenizer hash, vocab, k, temperature, units...)."""
        return dict(self.reader.teachers)

    def _sets(self) -> list[set[str]]:
        if self._idsets is None:
            self._idsets = [set(self.reader.utt_ids(t)) for t in self.teachers]
        return self._idsets

    def utt_ids(self) -> list[str]:
        """Utterance ids that every selected teacher holds."""
        sets = self._sets()
        return [u for u in self.reader.utt_ids(self.teachers[0]) if all(u in s for s in sets[1:])]

    def __contains__(self, utt_id: object) -> bool:
        return all(utt_id in s for s in self._sets())

    def __repr__(self) -> str:
        return f"CacheTargets({self.paths}, teachers={self.teachers})"

    # ---- checks

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise when a token-level teacher was built with another tokenizer than ``tokenizer``
        (a kdcache tokenizer: anything with ``content_hash()``)."""
        h = tokenizer.content_hash()
        for t in self.teachers:
            rec = self.records[t]
            if rec.units == "tokens" and rec.tokenizer_hash != h:
                raise TargetMismatchError(
                    f"teacher {t!r} was built with tokenizer {rec.tokenizer_id!r} (content_hash "
                    f"{rec.tokenizer_hash}), not this one (content_hash {h}); its positions are "
                    f"not your tokens"
                )

    # ---- reading

    def get(
        self, utt_id: str, *, text: str | None = None, tokens: Any = None
    ) -> dict[str, UttTargets]:
        """One utterance's targets, teacher -> UttTargets (numpy arrays).

        Args:
            utt_id: The key (a manifest id, a lhotse cut id).
            text: The trainer's transcript; checked (after ``normalize_text``) against the
                hash of the text the teacher read.
            tokens: The trainer's token ids (no specials); checked against the stored token
                ids and the position count.

        Raises:
            MissingTargetsError: a teacher has no targets for ``utt_id``.
            TargetMismatchError: the text or tokens differ from what the teacher saw.
        """
        out: dict[str, UttTargets] = {}
        for t in self.teachers:
            try:
                out[t] = self.reader.get(utt_id, t, hidden=bool(self.hidden_layers.get(t)))
            except KeyError:
                raise MissingTargetsError(
                    f"utterance {utt_id!r} has no targets from teacher {t!r} in "
                    f"{', '.join(self.paths)}"
                ) from None
        if text is not None:
            from kdcache.data.text import normalize_text

            norm = normalize_text(text)
            h = content_hash(norm)
            for t, u in out.items():
                if u.input_hash and u.input_hash != h:
                    raise TargetMismatchError(
                        f"utterance {utt_id!r}: the transcript {norm!r} is not the one teacher "
                        f"{t!r} read ({u.text!r}); the id points to other speech than when the "
                        f"cache was built"
                    )
        if tokens is not None:
            check_tokens(utt_id, tokens, out)
        return out

    def collate(
        self, items: Sequence[Mapping[str, UttTargets]], *, length: int | None = None
    ) -> dict[str, TeacherBatch]:
        """Pad the :meth:`get` results of a batch: teacher -> :class:`TeacherBatch` with
        ``length`` positions (default: the longest)."""
        return collate_targets(
            items,
            length=length,
            temperatures=self.temperatures,
            hidden_layers=self.hidden_layers,
        )

    def batch(
        self,
        utt_ids: Sequence[str],
        *,
        texts: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
        length: int | None = None,
    ) -> dict[str, TeacherBatch]:
        """:meth:`get` for each id, then :meth:`collate` (for a collate_fn or the training loop)."""
        items = [
            self.get(
                u,
                text=None if texts is None else texts[i],
                tokens=None if tokens is None else tokens[i],
            )
            for i, u in enumerate(utt_ids)
        ]
        return self.collate(items, length=length)
