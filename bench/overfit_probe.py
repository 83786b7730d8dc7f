"""Overfit probe: can the student's encoder + CTC head memorise N utterances?

Rules out a defect in the model, features or loss before any tuning (docs/training.md,
"Convergence on 2 CPU cores"): full-batch CTC on the first N training utterances, character
units, no dropout or augmentation, constant lr after a short warm-up. A healthy set-up drives
the CTC loss to ~0 and the greedy output to the reference within a few hundred steps.

    .venv/bin/python bench/overfit_probe.py --data demo/corpus/train \
        --features demo/corpus/feats/train.fbank --utts 20 --steps 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data.tokenizer import Tokenizer
from kdcache.student.data import collate
from kdcache.student.decode import ctc_greedy
from kdcache.student.model import Student, StudentConfig
from kdcache.student.rundir import prepare_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--utts", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    from kdcache.data.manifest import load_manifest
    from kdcache.data.text import normalize_text

    texts = [normalize_text(u.text) for u in load_manifest(args.data) if u.text]
    tok = Tokenizer.build_char(texts)
    split = prepare_split(args.data, args.features, tok)
    ids = split.utt_ids[: args.utts]
    st = split.store
    feats = [st.normalize(np.asarray(st[u])) for u in ids]
    b = collate(ids, feats, [split.tokens[u] for u in ids], [], tok.pad_id, {}, {})
    model = Student(
        StudentConfig(
            vocab_size=tok.vocab_size,
            num_layers=args.layers,
            decoder_layers=0,
            dropout=0.0,
            subsampling_channels=32,
            blank_id=tok.blank_id,
            bos_id=tok.bos_id,
            eos_id=tok.eos_id,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 50)
        out = model(b.feats, b.feat_lens)
        loss = F.ctc_loss(
            out.ctc_logits.log_softmax(-1).transpose(0, 1),
            b.tokens.clamp(min=0),
            out.enc_lens,
            b.token_lens,
            blank=tok.blank_id,
            zero_infinity=True,
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 20 == 0 or step == args.steps:
            hyp = tok.decode(
                ctc_greedy(out.ctc_logits[:1].detach(), out.enc_lens[:1], tok.blank_id)[0]
            )
            print(
                f"step {step:4d}  ctc {loss.item():.3f}  {time.perf_counter() - t0:5.0f}s  "
                f"{hyp[:60]!r}",
                flush=True,
            )
    print(f"reference             {split.texts[ids[0]][:60]!r}")


if __name__ == "__main__":
    main()
