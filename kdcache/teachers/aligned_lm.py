"""LM knowledge at frame level (paper 000's hybrid setting): a token-level LM cache turned into
frame-level targets through a CTC forced alignment.

``kdcache build --teacher aligned_lm --model RUN --lm-cache LM.kdc --data M --features STORE
--out X.kdc``: a trained kdtrain run (the aligner) computes its CTC log-posteriors over each
utterance's stored features; the utterance's tokens, as the LM cache stores them, are aligned to
those frames along the best CTC path (:func:`kdcache.teachers.align.ctc_forced_align`); then

* a frame aligned to token i gets the LM's stored distribution at position i (its top k, tail
  and temperature unchanged: ``P(token_i | token_<i)`` for a causal or LSTM LM, the masked-LM
  distribution for a BERT);
* a blank frame gets no LM knowledge: it is stored as a hard blank (the blank id with log-prob
  0, ``-inf`` fillers, tail ``-inf``), which the student masks out of the distillation term
  (``options["blank_frames"] == "masked"``). An utterance the aligner cannot align (fewer frames
  than its tokens need) is stored all blank, i.e. fully masked, and counted in the log.

The LM cache must be in the aligner's units (same tokenizer content hash; an LM in other units
teaches through the hierarchical recipe instead) and hold every utterance of the manifest with
the manifest's transcript. The record says ``kind="aligned_lm"``, ``units="frames"`` and the
aligner's subsampling, so the ``essence`` recipe reads it like an ensemble cache. Resumable and
sliced by rank like every build; ``input_hash`` is the hash of the stored features.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kdcache.teachers.base import BuildError, hard_label
from kdcache.teachers.build import with_build_threads

log = logging.getLogger(__name__)

BLANK_FRAMES = "masked"


def blank_frame_mask(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, blank_id: int):
    """[..., k] stored frame targets -> [...] bool, True at an aligned-LM cache's blank frames
    (the hard blank: top-1 the blank id with probability 1)."""
    return (topk_ids[..., 0] == blank_id) & (topk_logprobs[..., 0] >= -1e-6)


@with_build_threads
def build_aligned_lm_cache(
    *,
    model: str,
    lm_cache: str,
    data: str,
    features: str,
    out: str,
    lm_teacher: str | None = None,
    name: str | None = None,
    logprob_keepbits: int | None = None,
    max_frames: int = 20000,
    device: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    shard_positions: int | None = None,
    progress: bool = True,
    threads: int | str = "auto",  # applied by with_build_threads
):
    """Build (or resume) the frame-level LM targets for a manifest into a cache.

    Args:
        model: The aligner, a kdtrain run directory (its newest readable checkpoint).
        lm_cache: A token-level LM cache of the same utterances in the aligner's units.
        lm_teacher: The teacher inside ``lm_cache`` (default: its only one).

    Returns the :class:`kdcache.teachers.build.BuildSummary` (positions are frames).
    """
    from kdcache.cache_format import CacheError, open_cache, spec
    from kdcache.data.text import normalize_text
    from kdcache.teachers.align import ctc_forced_align
    from kdcache.teachers.build import pick_device
    from kdcache.teachers.ensemble import (
        FEATURE_SHIFT_MS,
        EnsembleTeacher,
        build_frames,
        check_frame_options,
        open_frame_inputs,
    )

    t0, c0 = time.monotonic(), time.process_time()
    name = check_frame_options(name or "aligned_lm", out, "float16", logprob_keepbits)
    utts, store = open_frame_inputs(data, features, "aligned_lm")
    try:
        lm = open_cache(lm_cache)
    except (FileNotFoundError, CacheError) as e:
        raise BuildError(f"--lm-cache {lm_cache!r}: {e}") from None
    names = sorted(lm.teachers)
    if lm_teacher is None:
        if len(names) != 1:
            raise BuildError(
                f"--lm-cache {lm_cache!r} holds teachers {names}: name one with --lm-teacher"
            )
        lm_teacher = names[0]
    if lm_teacher not in lm.teachers:
        raise BuildError(f"--lm-teacher {lm_teacher!r}: not in {lm_cache!r} (it holds {names})")
    lrec = lm.teachers[lm_teacher]
    if lrec.units != "tokens":
        raise BuildError(
            f"--lm-cache {lm_cache!r}: teacher {lm_teacher!r} has {lrec.units}-level targets; "
            f"aligned_lm aligns a token-level LM cache"
        )
    if lrec.k < 1:
        raise BuildError(
            f"--lm-cache {lm_cache!r}: teacher {lm_teacher!r} stores no top-k (k = 0), only "
            f"hidden states; build it with --top-k"
        )
    dev = pick_device(device)
    aligner = EnsembleTeacher.load([model], k=1, device=dev)
    member = aligner.members[0]
    if lrec.tokenizer_hash != member.tokenizer_hash:
        raise BuildError(
            f"--lm-cache {lm_cache!r} (teacher {lm_teacher!r}) is in the units of tokenizer "
            f"{lrec.tokenizer_id!r} (content hash {lrec.tokenizer_hash}), the aligner "
            f"{model!r} in those of its own (content hash {member.tokenizer_hash}); an LM in "
            f"other units teaches through the hierarchical recipe"
        )
    if lrec.vocab_size != aligner.vocab_size:
        raise BuildError(
            f"--lm-cache {lm_cache!r}: vocabulary {lrec.vocab_size}, the aligner's CTC head "
            f"{aligner.vocab_size}"
        )
    have = set(lm.utt_ids(lm_teacher))
    missing = [u.id for u in utts if u.id not in have]
    if missing:
        raise BuildError(
            f"--lm-cache {lm_cache!r} (teacher {lm_teacher!r}) lacks {len(missing)} "
            f"utterance(s) of {data!r}, e.g. {missing[0]!r}"
        )
    blank = int(member.model.cfg.blank_id)
    k = int(lrec.k)
    record = spec.TeacherRecord(
        name=name,
        kind="aligned_lm",
        model_id=f"{lrec.model_id} aligned by {member.run_dir}",
        model_hash=spec.content_hash(f"{lrec.model_hash}|{aligner.model_hash()}"),
        tokenizer_id=aligner.tokenizer_id,
        tokenizer_hash=member.tokenizer_hash,
        vocab_size=aligner.vocab_size,
        k=k,
        temperature=float(lrec.temperature),
        units="frames",
        frame_shift_ms=FEATURE_SHIFT_MS * aligner.subsampling,
        options={
            "aligner": {
                "run": str(member.run_dir),
                "checkpoint": member.checkpoint.name,
                "step": member.step,
            },
            "lm_cache": str(lm_cache),
            "lm_teacher": lm_teacher,
            "lm_kind": lrec.kind,
            "lm_model_id": lrec.model_id,
            "subsampling": aligner.subsampling,
            "blank_id": blank,
            "blank_frames": BLANK_FRAMES,
        },
        **({"logprob_keepbits": logprob_keepbits} if logprob_keepbits is not None else {}),
    )
    texts = {u.id: normalize_text(u.text or "") for u in utts}
    hard_ids, hard_lp = hard_label(blank, k)
    counts = {"aligned": 0, "unaligned": 0, "frames_token": 0, "frames": 0}

    def targets(u: str, logp: torch.Tensor, _hid):
        lt = lm.get(u, lm_teacher, hidden=False)
        if lt.text and lt.text != texts[u]:
            raise BuildError(
                f"utterance {u!r}: the LM cache holds the transcript {lt.text!r}, the manifest "
                f"{texts[u]!r}; build the LM cache from this manifest"
            )
        n = logp.shape[0]
        ids = np.broadcast_to(hard_ids, (n, k)).copy()
        lp = np.broadcast_to(hard_lp, (n, k)).copy()
        tail = np.full(n, -np.inf, dtype=np.float32)
        toks = [] if lt.token_ids is None else [int(x) for x in lt.token_ids]
        res = ctc_forced_align(logp.float().cpu().numpy(), toks, blank) if toks else None
        if toks and res is None:
            counts["unaligned"] += 1
            log.warning(
                "utterance %r: %d tokens do not fit its %d frames; stored all blank (masked)",
                u, len(toks), n,
            )  # fmt: skip
        elif res is not None:
            frame_token, _ = res
            at = np.nonzero(frame_token >= 0)[0]
            src = frame_token[at]
            ids[at] = lt.topk_ids[src]
            lp[at] = lt.topk_logprobs[src]
            tail[at] = lt.tail_logmass[src]
            counts["aligned"] += 1
            counts["frames_token"] += len(at)
        counts["frames"] += n
        return ids, lp, tail, {}

    summary = build_frames(
        aligner, record, targets, utts=utts, store=store, out=out, max_frames=max_frames,
        dev=dev, rank=rank, world_size=world_size, shard_positions=shard_positions,
        progress=progress, t0=t0, c0=c0,
    )  # fmt: skip
    if counts["frames"]:
        log.info(
            "aligned_lm: %d utterances aligned, %d not; %.1f%% of frames carry LM targets",
            counts["aligned"], counts["unaligned"],
            100.0 * counts["frames_token"] / counts["frames"],
        )  # fmt: skip
    summary.notes = [
        f"{counts['aligned']} utterance(s) aligned, {counts['unaligned']} could not be "
        f"(stored all blank, masked); {counts['frames_token']} of {counts['frames']} frames "
        f"carry LM targets, the rest are blank (masked)"
    ]
    return summary


__all__ = ["BLANK_FRAMES", "blank_frame_mask", "build_aligned_lm_cache"]
