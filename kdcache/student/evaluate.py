"""Decode a set with a trained student and score it (WER and CER with jiwer).

``evaluate_run`` loads RUN_DIR's config, tokenizer copy and newest checkpoint, decodes every
utterance of a manifest whose features are in the given store, and writes into the output
directory:

* ``hyp.jsonl``: one ``{"utt_id", "ref", "hyp"}`` object per utterance (normalised text);
* ``hyp.txt``: ``utt_id hyp`` lines (Kaldi ``text`` style), ``ref.txt`` likewise;
* ``results.json``: WER, CER, counts, decode options, checkpoint step.

References are the normalised transcripts (kdcache.data.text.normalize_text), the same text the
student was trained on, so WER measures the model and not the normaliser.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DECODERS = ("ctc_greedy", "attention_beam", "cif")


def score(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer); an empty reference counts its hypothesis words as insertions."""
    import jiwer

    if not refs:
        return {"wer": float("nan"), "cer": float("nan")}
    # jiwer refuses empty references; score those pairs by hand (all insertions).
    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    extra_w = sum(len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r.strip())
    extra_c = sum(len(h) for r, h in zip(refs, hyps, strict=True) if not r.strip())
    if not pairs:
        return {"wer": float("inf") if extra_w else 0.0, "cer": float("inf") if extra_c else 0.0}
    r, h = [p[0] for p in pairs], [p[1] for p in pairs]
    w = jiwer.process_words(r, h)
    c = jiwer.process_characters(r, h)
    n_w = sum(len(x.split()) for x in r)
    n_c = sum(len(x) for x in r)
    wer_err = w.substitutions + w.deletions + w.insertions + extra_w
    cer_err = c.substitutions + c.deletions + c.insertions + extra_c
    return {"wer": wer_err / max(n_w, 1), "cer": cer_err / max(n_c, 1)}


def set_name(data: str | os.PathLike) -> str:
    """A name for the set a manifest holds, distinct for the splits of one corpus: a Kaldi dir's
    own name (``corpus/test`` -> ``test``); for a manifest file, its directory's name and its
    stem (``corpus/dev/cuts.jsonl.gz`` -> ``dev-cuts``), so that decoding test and then dev never
    writes both into one directory."""
    p = Path(str(data))
    if p.is_dir() or not p.suffix:
        return p.name or "data"
    stem = p.name.split(".")[0]
    return f"{p.parent.name}-{stem}" if p.parent.name else stem


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def evaluate_run(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    features: str | os.PathLike,
    *,
    decode: str = "ctc_greedy",
    beam: int = 4,
    ctc_weight: float = 0.3,
    checkpoint: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str = "auto",
    max_frames: int | None = None,
    lm: str | os.PathLike | None = None,
    lm_weight: float = 0.0,
) -> dict[str, Any]:
    """Decode ``data`` with the student of ``run_dir``; write hypotheses and scores.

    ``lm`` (a ``kdcache train-lm`` directory in the student's units) is fused into the attention
    beam with weight ``lm_weight`` (shallow fusion, `kdcache.student.lm`).

    Returns:
        The results dict also written to ``results.json``.
    """
    from kdcache.student import decode as dec
    from kdcache.student.config import load_config
    from kdcache.student.rundir import (
        build_model,
        decode_split,
        load_tokenizer,
        pick_device,
        prepare_split,
        restore_model,
    )

    if decode not in DECODERS:
        raise ValueError(f"--decode {decode!r}: use one of {DECODERS}")
    if lm is not None and decode != "attention_beam":
        raise ValueError(f"--lm: shallow fusion needs --decode attention_beam, not {decode!r}")
    if lm is None and lm_weight != 0.0:
        raise ValueError("--lm-weight needs --lm (the LM directory to fuse)")
    if lm is not None and lm_weight <= 0.0:
        raise ValueError(f"--lm-weight must be > 0 with --lm, got {lm_weight}")
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a kdtrain run directory?")
    cfg = load_config(cfg_path)
    tok = load_tokenizer(run_dir / "tokenizer")
    dev = pick_device(device)
    model = build_model(cfg)
    step, ckpt_path = restore_model(model, run_dir, checkpoint)
    model.to(dev).eval()
    if decode == "cif" and model.cif is None:
        raise ValueError("--decode cif: this run's model has no CIF module (recipe cif_hkd)")
    if decode == "attention_beam" and model.decoder is None:
        raise ValueError("--decode attention_beam: this run's model has no attention decoder")

    fusion = None
    if lm is not None:
        from kdcache.student.lm import LMFusion

        fusion = LMFusion.from_dir(lm, tok).to(dev)
    split = prepare_split(data, features, tok)
    search = dec.DecodeConfig(
        method={"ctc_greedy": "ctc_greedy", "attention_beam": "attention", "cif": "cif_greedy"}[
            decode
        ],
        beam_size=beam,
        ctc_weight=ctc_weight if decode == "attention_beam" else 0.0,
        lm_weight=lm_weight if fusion is not None else 0.0,
    )
    hyps = decode_split(
        model,
        split,
        tok,
        search,
        dev,
        max_frames=max_frames or cfg.data.max_frames,
        max_utts=cfg.data.max_utts,
        cmvn=cfg.data.cmvn,
        lm=fusion,
    )
    order = split.utt_ids
    refs = [split.texts[u] for u in order]
    hyp_list = [hyps[u] for u in order]
    scores = score(refs, hyp_list)
    default = f"{set_name(data)}-{decode}" + (f"-lm{lm_weight:g}" if fusion is not None else "")
    out = Path(out_dir) if out_dir is not None else run_dir / "eval" / default
    _write_hyps(out, order, refs, hyp_list)
    results = {
        "wer": scores["wer"],
        "cer": scores["cer"],
        "utterances": len(order),
        "decode": decode,
        "beam": beam if decode == "attention_beam" else None,
        "ctc_weight": ctc_weight if decode == "attention_beam" else None,
        "lm": str(lm) if lm is not None else None,
        "lm_weight": lm_weight if lm is not None else None,
        "checkpoint": str(ckpt_path),
        "step": step,
        "data": str(data),
        "features": str(features),
        "out_dir": str(out),
    }
    _atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    log.info(
        "WER %.4f CER %.4f on %d utterances (%s)", scores["wer"], scores["cer"], len(order), decode
    )
    return results


def _write_hyps(out: Path, order: list[str], refs: list[str], hyps: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        out / "hyp.jsonl",
        "".join(
            json.dumps({"utt_id": u, "ref": r, "hyp": h}, ensure_ascii=False) + "\n"
            for u, r, h in zip(order, refs, hyps, strict=True)
        ),
    )
    _atomic_write(out / "hyp.txt", "".join(f"{u} {h}\n" for u, h in zip(order, hyps, strict=True)))
    _atomic_write(out / "ref.txt", "".join(f"{u} {r}\n" for u, r in zip(order, refs, strict=True)))


def evaluate_ensemble(
    run_dirs: list[str | os.PathLike],
    data: str | os.PathLike,
    features: str | os.PathLike,
    *,
    combine: str = "mean",
    weights: list[float] | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str = "auto",
    max_frames: int = 20000,
) -> dict[str, Any]:
    """Decode ``data`` with an ensemble of students: CTC greedy on their combined frame
    posteriors (the rules of ``kdcache build --teacher ensemble``: mean, weighted, product).

    Returns:
        The results dict also written to ``results.json`` (default out dir:
        FIRST_RUN/eval/SET-ensembleN-ctc_greedy).
    """
    import torch

    from kdcache.data.text import normalize_text
    from kdcache.student.data import eval_batches
    from kdcache.student.rundir import load_tokenizer, pick_device, prepare_split
    from kdcache.teachers.base import BuildError
    from kdcache.teachers.ensemble import EnsembleTeacher

    dev = pick_device(device)
    try:
        t = EnsembleTeacher.load(
            [str(r) for r in run_dirs], k=1, combine=combine, weights=weights, device=str(dev)
        )
    except BuildError as e:
        raise ValueError(str(e).replace("--model", "--run")) from None
    first = Path(run_dirs[0])
    tok = load_tokenizer(first / "tokenizer")
    split = prepare_split(data, features, tok)
    hyps: dict[str, str] = {}
    with torch.inference_mode():
        for batch in eval_batches(split.utt_ids, split.tokens, split.texts, split.store,
                                  max_frames=max_frames, max_utts=10_000, pad_id=tok.pad_id,
                                  cmvn=t.members[0].cmvn):  # fmt: skip
            lp, lens, _ = t.log_probs(batch.feats.to(dev), batch.feat_lens.to(dev))
            best = lp.argmax(-1).cpu()
            for u, row, n in zip(batch.utt_ids, best, lens.cpu(), strict=True):
                ids = torch.unique_consecutive(row[: int(n)]).tolist()
                hyps[u] = normalize_text(tok.decode([i for i in ids if i != tok.blank_id]))
    order = split.utt_ids
    refs = [split.texts[u] for u in order]
    hyp_list = [hyps[u] for u in order]
    scores = score(refs, hyp_list)
    n = len(t.members)
    out = (
        Path(out_dir)
        if out_dir is not None
        else first / "eval" / f"{set_name(data)}-ensemble{n}-ctc_greedy"
    )
    _write_hyps(out, order, refs, hyp_list)
    results = {
        "wer": scores["wer"],
        "cer": scores["cer"],
        "utterances": len(order),
        "decode": "ctc_greedy",
        "ensemble": t.options(),
        "data": str(data),
        "features": str(features),
        "out_dir": str(out),
    }
    _atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    log.info("ensemble of %d: WER %.4f CER %.4f on %d utterances", n, scores["wer"],
             scores["cer"], len(order))  # fmt: skip
    return results
