"""LSTM language model teacher (as in "Learn Spelling from Teachers"): trained by
``kdcache train-lm`` on external text with a kdcache :class:`~kdcache.data.tokenizer.Tokenizer`,
then run by ``kdcache build --teacher lstm_lm`` to give ``P(token_i | BOS, token_<i)``.

A model directory holds ``lstm_lm.json`` (config and training summary), ``model.safetensors``
(weights) and ``tokenizer/`` (a copy of the tokenizer, so the directory is self-contained).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kdcache.cache_format.storage import staged_dir
from kdcache.teachers.base import Row
from kdcache.teachers.causal_lm import causal_rows
from kdcache.teachers.loading import hash_files

CONFIG_FILE = "lstm_lm.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class LSTMConfig:
    """Architecture of the LSTM LM.

    Attributes:
        vocab_size: Output (and input) vocabulary, the tokenizer's.
        bos_id: Token fed before the first token of a sentence (the tokenizer's BOS, else EOS).
        eos_id: Token predicted after the last one (training only), or -1.
        pad_id: Padding id in training batches (ignored by the loss).
        layers: Stacked LSTM layers.
        hidden: LSTM state size; the embedding has the same size (tied input/output embeddings).
        dropout: Dropout between layers (training only).
    """

    vocab_size: int
    bos_id: int
    eos_id: int = -1
    pad_id: int = 0
    layers: int = 2
    hidden: int = 512
    dropout: float = 0.2

    @classmethod
    def from_dict(cls, d: dict) -> LSTMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"lstm_lm config has unknown keys {sorted(unknown)}")
        return cls(**d)


def build_model(cfg: LSTMConfig):
    """The LSTM LM as a torch module: ``forward(ids [B, S]) -> (logits [B, S, V], states)``
    where ``states[l]`` is the output of layer ``l`` (0 = embeddings), ``[B, S, H]``."""
    import torch
    from torch import nn

    class LSTMLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
            # One nn.LSTM per layer so every layer's output is available as a hidden state.
            self.rnns = nn.ModuleList(
                nn.LSTM(cfg.hidden, cfg.hidden, batch_first=True) for _ in range(cfg.layers)
            )
            self.drop = nn.Dropout(cfg.dropout)
            self.out = nn.Linear(cfg.hidden, cfg.vocab_size)
            self.out.weight = self.embed.weight  # tied: fewer parameters, better perplexity

        def forward(self, ids, return_states: bool = False):
            x = self.drop(self.embed(ids))
            states = [x]
            for rnn in self.rnns:
                x, _ = rnn(x)
                states.append(x)
                x = self.drop(x)
            return self.out(x), (states if return_states else None)

    torch.manual_seed(0)
    return LSTMLM()


def load_model(model_dir: str | Path):
    """(model, config, tokenizer) from a directory written by :func:`train_lm`."""
    from safetensors.torch import load_file

    from kdcache.data.tokenizer import Tokenizer

    d = Path(model_dir)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"--model {model_dir}: not an LSTM LM directory (no {CONFIG_FILE}); make one with "
            f"`kdcache train-lm --arch lstm` (a train-lm --arch bert|gpt directory is a "
            f"--teacher bert|causal_lm)"
        )
    meta = json.loads(cfg_path.read_text())
    cfg = LSTMConfig.from_dict(meta["config"])
    model = build_model(cfg)
    state = load_file(str(d / WEIGHTS_FILE))
    state["out.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    tok = Tokenizer.load(str(d / TOKENIZER_DIR))
    return model.eval(), cfg, tok


class LSTMTeacher:
    """An LSTM LM directory as a teacher (see :func:`kdcache.teachers.causal_lm.causal_rows`
    for the alignment: BOS is always fed, so position 0 is predicted)."""

    kind = "lstm_lm"

    def __init__(
        self,
        model_dir: str,
        *,
        k: int,
        temperature: float = 1.0,
        hidden_layers: tuple[int, ...] = (),
        device: str = "cpu",
    ):
        import torch

        self.model_dir = str(model_dir)
        model, self.cfg, self.tokenizer = load_model(model_dir)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.vocab_size = self.cfg.vocab_size
        if k > self.vocab_size:
            raise ValueError(f"--top-k {k} is larger than the vocabulary ({self.vocab_size})")
        self.k, self.temperature = k, temperature
        n_states = self.cfg.layers + 1
        layers = []
        for layer in hidden_layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"--hidden-layers {layer} out of range (0..{n_states - 1} or -1)")
            layers.append(layer % n_states)
        self.hidden_layers = tuple(layers)
        self.hidden_dims = {layer: self.cfg.hidden for layer in self.hidden_layers}
        self.pad_id = self.cfg.pad_id
        self.bos_id = self.cfg.bos_id
        self.unk_id = self.tokenizer.unk_id

    def model_hash(self) -> str:
        return hash_files([Path(self.model_dir) / WEIGHTS_FILE])

    def tokenizer_hash(self) -> str:
        return self.tokenizer.content_hash()

    def options(self) -> dict:
        return {"bos_id": self.bos_id, "layers": self.cfg.layers, "hidden": self.cfg.hidden}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def cost(self, n: int) -> int:
        return n + 1

    def rows(self, utt: int, ids: list[int]) -> list[Row]:
        # No window: an LSTM has no maximum length.
        return causal_rows(
            utt, ids, self.bos_id, len(ids) + 2, bool(self.k), bool(self.hidden_layers)
        )

    def forward(self, input_ids, attention_mask, topk_index, hid_index):
        import torch

        with torch.inference_mode():
            # Right padding never reaches earlier positions of a left-to-right model.
            logits, states = self.model(input_ids, return_states=bool(self.hidden_layers))
            hidden = {layer: states[layer][hid_index] for layer in self.hidden_layers}
            return (logits[topk_index] if self.k else None), hidden


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    epochs: int
    best_epoch: int
    best_valid_ppl: float
    valid_ppls: list[float]
    train_tokens: int
    minutes: float
    seen_tokens: int = 0  # trained on, all epochs (< train_tokens when --max-minutes cut epoch 1)


def read_lines(paths: list[str]) -> list[str]:
    """Non-empty normalised lines of text files (normalize_text, the transcripts' rule)."""
    from kdcache.data.text import normalize_text

    out = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                t = normalize_text(line)
                if t:
                    out.append(t)
    return out


def train_lm(
    texts: list[str],
    tokenizer_dir: str,
    out_dir: str,
    *,
    layers: int = 2,
    hidden: int = 512,
    dropout: float = 0.2,
    epochs: int = 10,
    max_minutes: float | None = None,
    batch_tokens: int = 8192,
    lr: float = 2e-3,
    valid_fraction: float = 0.05,
    valid_texts: list[str] | None = None,
    patience: int = 2,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train an LSTM LM on text and save it to ``out_dir``.

    Sentences are ``BOS w_1 .. w_n EOS``; Adam with gradient clipping; the learning rate halves
    when validation perplexity does not improve; training stops after ``patience`` epochs without
    improvement, after ``epochs``, or after ``max_minutes``. The best epoch's weights are saved.

    Args:
        texts: Training sentences (normalised).
        tokenizer_dir: A saved kdcache Tokenizer (copied into ``out_dir/tokenizer``).
        out_dir: Output directory.
        valid_fraction: Share of sentences held out (at least one) when ``valid_texts`` is not
            given.
        valid_texts: Validation sentences (normalised), e.g. the dev transcripts.

    Returns:
        Training summary (also stored in ``lstm_lm.json``).
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from kdcache.data.tokenizer import Tokenizer
    from kdcache.student.data import length_groups

    tok = Tokenizer.load(tokenizer_dir)
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if bos is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has neither a BOS nor an EOS token")
    eos = tok.eos_id if tok.eos_id is not None else -1
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else 0
    cfg = LSTMConfig(
        vocab_size=tok.vocab_size,
        bos_id=int(bos),
        eos_id=int(eos),
        pad_id=int(pad),
        layers=layers,
        hidden=hidden,
        dropout=dropout,
    )

    def sequences(lines: list[str]) -> list[list[int]]:
        eos = [cfg.eos_id] if cfg.eos_id >= 0 else []
        seqs = [[cfg.bos_id, *tok.encode(t), *eos] for t in lines]
        return [s for s in seqs if len(s) >= 2]

    seqs = sequences(texts)
    rng = random.Random(seed)
    if valid_texts:
        valid, train = sequences(valid_texts), seqs
        if not train or not valid:
            raise ValueError("train-lm needs non-empty training and validation sentences")
    else:
        if len(seqs) < 2:
            raise ValueError("train-lm needs at least 2 non-empty sentences")
        rng.shuffle(seqs)
        n_valid = max(1, int(len(seqs) * valid_fraction))
        valid, train = seqs[:n_valid], seqs[n_valid:]

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="sum")

    def batches(data: list[list[int]], shuffle: bool):
        groups = length_groups([len(x) for x in data], batch_tokens)
        if shuffle:
            rng.shuffle(groups)
        for g in groups:
            width = max(len(data[i]) for i in g)
            x = torch.full((len(g), width - 1), cfg.pad_id, dtype=torch.long)
            y = torch.full((len(g), width - 1), -100, dtype=torch.long)
            for r, i in enumerate(g):
                s = data[i]
                x[r, : len(s) - 1] = torch.tensor(s[:-1])
                y[r, : len(s) - 1] = torch.tensor(s[1:])
            yield x.to(dev), y.to(dev)

    def evaluate() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for x, y in batches(valid, False):
                logits, _ = model(x)
                total += loss_fn(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)).item()
                count += int((y != -100).sum())
        model.train()
        return math.exp(min(total / max(count, 1), 50.0))

    start = time.monotonic()
    deadline = start + max_minutes * 60 if max_minutes else math.inf
    best_ppl, best_epoch, bad, ppls = math.inf, 0, 0, []
    best_state = None
    train_tokens = sum(len(s) - 1 for s in train)
    seen = 0
    out = Path(out_dir)
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        bar = tqdm(
            total=train_tokens,
            desc=f"epoch {epoch}/{epochs}",
            unit="tok",
            unit_scale=True,
            disable=not progress,
            leave=False,
        )
        timed_out = False
        for x, y in batches(train, True):
            logits, _ = model(x)
            n = int((y != -100).sum())
            loss = loss_fn(logits.reshape(-1, cfg.vocab_size), y.reshape(-1)) / max(n, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            seen += n
            bar.update(n)
            bar.set_postfix(ppl=f"{math.exp(min(loss.item(), 50)):.1f}")
            if time.monotonic() > deadline:
                timed_out = True
                break
        bar.close()
        ppl = evaluate()
        ppls.append(ppl)
        tqdm.write(f"epoch {epoch}: valid ppl {ppl:.2f}" + (" (best)" if ppl < best_ppl else ""))
        if ppl < best_ppl:
            best_ppl, best_epoch, bad = ppl, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            for g in opt.param_groups:
                g["lr"] *= 0.5
        if bad >= patience or timed_out:
            break
    result = TrainResult(
        epochs=epoch,
        best_epoch=best_epoch,
        best_valid_ppl=best_ppl,
        valid_ppls=ppls,
        train_tokens=train_tokens,
        seen_tokens=seen,
        minutes=(time.monotonic() - start) / 60,
    )
    if best_state is None:  # validation never gave a finite perplexity: keep the last weights
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    best_state.pop("out.weight", None)  # tied to embed.weight
    meta = {
        "config": asdict(cfg),
        "training": asdict(result),
        "tokenizer_id": tok.name,
        "texts": len(texts),
    }
    with staged_dir(out) as tmp:  # a killed save leaves no half-written model directory
        tmp = Path(tmp)
        save_file(best_state, str(tmp / WEIGHTS_FILE))
        tok.save(str(tmp / TOKENIZER_DIR))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return result
