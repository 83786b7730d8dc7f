"""Shallow fusion: an external language model in the student's units scores the attention beam.

The score of a hypothesis token is ``(1 - w) log p_att + w (CTC prefix delta) + beta log p_lm``
(Chorowski & Jaitly 2017; ESPnet's ``lm_weight``). The LM is an LSTM LM directory written by
``kdcache train-lm`` with the student's tokenizer (same content hash); it is loaded only for
decoding, never for training.

`LMFusion.scorer()` gives a per-utterance next-token scorer that keeps each hypothesis' LSTM
state: a call advances every prefix by its last token from its parent's state (the prefix
without its last token, from the previous call), as `IncrementalDecoder` does for the decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from kdcache.student.decoder import parent_rows


class LMFusion:
    """An LSTM LM ready for shallow fusion with a student that uses its tokenizer (so the two agree
    on every id and on the vocabulary size; `from_dir` checks the tokenizer hash).

    Args:
        model: the LSTM LM module of ``kdcache.teachers.lstm_lm.build_model``.
        bos_id: the id the LM reads first (its own; the student's bos is replaced by it).
        eos_id: the id the LM predicts after a sentence (the student's eos), or -1 when it was
            trained without one (then eos gets no LM score: log p_lm(eos) = 0).
    """

    def __init__(self, model, *, bos_id: int, eos_id: int) -> None:
        self.model = model.eval()
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, tokenizer) -> LMFusion:
        """Load ``kdcache train-lm`` output and check it speaks the student's units.

        Raises:
            ValueError: not an LSTM LM directory, or trained with another tokenizer.
        """
        from kdcache.teachers.lstm_lm import CONFIG_FILE, load_model

        d = Path(model_dir)
        if not (d / CONFIG_FILE).is_file():
            raise ValueError(
                f"--lm {model_dir}: not an LSTM LM directory (no {CONFIG_FILE}); "
                f"train one with `kdcache train-lm --tokenizer <the student's tokenizer>`"
            )
        model, cfg, lm_tok = load_model(d)
        if lm_tok.content_hash() != tokenizer.content_hash():
            raise ValueError(
                f"--lm {model_dir}: its tokenizer ({lm_tok.name!r}, hash "
                f"{lm_tok.content_hash()}) is not the student's ({tokenizer.name!r}, hash "
                f"{tokenizer.content_hash()}); shallow fusion needs an LM in the student's units"
            )
        return cls(model, bos_id=cfg.bos_id, eos_id=cfg.eos_id)

    def to(self, device: torch.device) -> LMFusion:
        self.model.to(device)
        return self

    def scorer(self, student_eos_id: int) -> IncrementalLM:
        """A fresh next-token scorer for one utterance's beam search."""
        return IncrementalLM(self, student_eos_id)


class IncrementalLM:
    """`step(prefixes [N, i + 1], bos first) -> log p_lm(next token | prefix) [N, V]`, equal to
    the LM's full pass over ``[lm_bos] + prefix[1:]`` at its last position, but one LSTM step per
    prefix and call. Hypotheses may be reordered, dropped or repeated between calls; a prefix
    whose parent is unknown is run from scratch."""

    def __init__(self, lm: LMFusion, student_eos_id: int) -> None:
        self.lm = lm
        self.student_eos = student_eos_id
        self.device = next(lm.model.parameters()).device
        self.prev: dict[tuple[int, ...], int] = {}
        self.prev_state: list[tuple[Tensor, Tensor]] = []
        self.prev_len = -1

    @torch.no_grad()
    def step(self, prefixes: Tensor) -> Tensor:
        length = prefixes.shape[1]
        ids = prefixes.to(self.device).clone()
        ids[:, 0] = self.lm.bos_id
        rows = prefixes.tolist()
        parents = parent_rows(rows, self.prev, self.prev_len)
        if parents is not None:
            idx = torch.tensor(parents, dtype=torch.long, device=self.device)
            state = [(h[:, idx], c[:, idx]) for h, c in self.prev_state]
            out, state = self._run(ids[:, -1:], state)
        else:
            out, state = self._run(ids, None)
        self.prev = {tuple(r): j for j, r in enumerate(rows)}
        self.prev_state, self.prev_len = state, length
        logp = self.lm.model.out(out[:, -1]).float().log_softmax(-1)
        if self.lm.eos_id < 0:  # an LM without an end of sentence says nothing about eos
            logp[:, self.student_eos] = 0.0
        return logp

    def _run(self, ids: Tensor, state):
        m = self.lm.model
        x = m.embed(ids)
        new_state = []
        for j, rnn in enumerate(m.rnns):
            x, hc = rnn(x, state[j] if state is not None else None)
            new_state.append(hc)
        return x, new_state
