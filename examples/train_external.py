"""A plain PyTorch CTC/attention trainer with LST from a kdcache cache: no kdtrain anywhere.

The proof that the cache is decoupled from kdtrain: the model is torch.nn's Transformer, the loop
is thirty lines, and the teacher's targets arrive through `kdcache.torch.CacheTargets` (checked
against this trainer's transcripts and tokens) and are consumed by `kdcache.losses.lst_loss`.
Replace the Dataset with your corpus, keep the three marked KD lines.

    python examples/train_external.py --manifest demo/corpus/train --features \
        demo/corpus/feats/train.fbank --tokenizer demo/char --cache demo/caches/lstm_t5_dense.kdc
"""

from __future__ import annotations

import argparse
import json

import jiwer
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache.data.features import open_features
from kdcache.data.manifest import load_manifest
from kdcache.data.text import normalize_text
from kdcache.data.tokenizer import Tokenizer
from kdcache.losses import lst_loss
from kdcache.torch import CacheTargets


class Utts(torch.utils.data.Dataset):
    def __init__(self, manifest, features, tok, targets):
        self.utts = load_manifest(manifest)
        self.feats, self.tok, self.targets = open_features(features), tok, targets

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i):
        u = self.utts[i]
        x = torch.from_numpy(self.feats.normalize(self.feats[u.id]).astype("float32"))
        y = self.tok.encode(normalize_text(u.text))
        kd = self.targets.get(u.id, text=u.text, tokens=y)  # KD 1: this utterance's targets
        return x, torch.tensor(y), kd, normalize_text(u.text)


def collate(items, targets, pad):
    xs, ys, kds, texts = zip(*items, strict=True)
    x = nn.utils.rnn.pad_sequence(xs, batch_first=True)
    y = nn.utils.rnn.pad_sequence(ys, batch_first=True, padding_value=pad)
    kd = targets.collate(kds, length=y.size(1) + 1)  # KD 2: padded to the decoder's outputs
    return x, torch.tensor([len(a) for a in xs]), y, torch.tensor([len(a) for a in ys]), kd, texts


class Model(nn.Module):
    def __init__(self, n_mel, vocab, d=96, heads=4, layers=3):
        super().__init__()
        self.sub = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2), nn.ReLU(), nn.Conv2d(32, 32, 3, 2), nn.ReLU()
        )
        self.proj = nn.Linear(32 * (((n_mel - 1) // 2 - 1) // 2), d)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, heads, 4 * d, 0.1, batch_first=True),
            layers,
            enable_nested_tensor=False,
        )
        self.ctc = nn.Linear(d, vocab)
        self.emb = nn.Embedding(vocab, d)
        self.dec = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d, heads, 4 * d, 0.1, batch_first=True), 1
        )
        self.out = nn.Linear(d, vocab)

    def encode(self, x, lens):
        h = self.sub(x.unsqueeze(1))  # [B, C, T', F']
        h = self.proj(h.transpose(1, 2).flatten(2))
        lens = ((lens - 1) // 2 - 1) // 2
        pad = torch.arange(h.size(1))[None] >= lens[:, None]
        pos = torch.arange(h.size(1), dtype=torch.float32)[:, None] / 10000 ** (
            torch.arange(0, h.size(2), 2) / h.size(2)
        )
        pe = torch.zeros(h.size(1), h.size(2))
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        return self.enc(h * h.size(2) ** 0.5 + pe, src_key_padding_mask=pad), lens, pad

    def decode(self, ys_in, mem, mem_pad):
        causal = nn.Transformer.generate_square_subsequent_mask(ys_in.size(1))
        return self.out(
            self.dec(
                self.emb(ys_in),
                mem,
                tgt_mask=causal,
                tgt_is_causal=True,
                memory_key_padding_mask=mem_pad,
            )
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--teacher", default=None, help="cache teacher (default: the only one)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kd-weight", type=float, default=0.3)
    ap.add_argument("--report", default=None, help="write losses and the final CER here (JSON)")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.load(a.tokenizer)
    targets = CacheTargets(a.cache, teachers=[a.teacher] if a.teacher else None)
    targets.check_tokenizer(tok)
    (teacher,) = targets.teachers
    data = Utts(a.manifest, a.features, tok, targets)
    loader = torch.utils.data.DataLoader(
        data, a.batch, shuffle=True, collate_fn=lambda b: collate(b, targets, tok.pad_id)
    )
    model = Model(data.feats[data.utts[0].id].shape[1], tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    losses, kds, step = [], [], 0
    while step < a.steps:
        for x, xl, y, yl, kd, _ in loader:
            mem, ml, mem_pad = model.encode(x, xl)
            ctc = F.ctc_loss(
                model.ctc(mem).log_softmax(-1).transpose(0, 1),
                y,
                ml,
                yl,
                tok.blank_id,
                zero_infinity=True,
            )
            b = y.size(0)
            ys_in = torch.cat([torch.full((b, 1), tok.bos_id), y], 1)
            ys_out = torch.cat([y, torch.full((b, 1), tok.pad_id)], 1)
            ys_out[torch.arange(b), yl] = tok.eos_id
            mask = torch.arange(ys_out.size(1))[None] <= yl[:, None]
            t = kd[teacher]
            logits = model.decode(ys_in, mem, mem_pad)
            att = lst_loss(
                logits,
                ys_out,
                t.topk_ids,
                t.topk_logprobs,
                t.tail_logmass,
                mask,
                weight=a.kd_weight,
                build_temperature=t.temperature,
                temperature=t.temperature,
                teacher_mask=t.mask,
                label_smoothing=0.1,
            )  # KD 3: the loss, eos has no teacher
            with torch.no_grad():  # the soft-label term alone, for the report
                soft = lst_loss(
                    logits,
                    ys_out,
                    t.topk_ids,
                    t.topk_logprobs,
                    t.tail_logmass,
                    mask & t.mask,
                    weight=1.0,
                    build_temperature=t.temperature,
                    temperature=t.temperature,
                )
            loss = 0.5 * ctc + 0.5 * att
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            kds.append(soft.item())
            step += 1
            if step % 25 == 0:
                print(
                    f"step {step}  loss {loss.item():.3f}  ctc {ctc.item():.3f}  lst soft term {soft.item():.3f}",
                    flush=True,
                )
            if step >= a.steps:
                break
    model.eval()
    refs, hyps = [], []
    with torch.no_grad():
        for x, xl, _, _, _, texts in torch.utils.data.DataLoader(
            data, a.batch, collate_fn=lambda b: collate(b, targets, tok.pad_id)
        ):
            mem, ml, _ = model.encode(x, xl)
            best = model.ctc(mem).argmax(-1)
            for row, n in zip(best, ml, strict=True):
                ids = torch.unique_consecutive(row[:n]).tolist()
                hyps.append(tok.decode([i for i in ids if i != tok.blank_id]))
            refs += texts
    cer = jiwer.cer(refs, hyps)
    print(f"CTC greedy CER on the training manifest: {cer:.3f}")
    if a.report:
        with open(a.report, "w") as f:
            json.dump({"loss": losses, "kd": kds, "cer": cer, "steps": step}, f)


if __name__ == "__main__":
    main()
