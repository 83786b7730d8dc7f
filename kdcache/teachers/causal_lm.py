"""Causal-LM teacher: ``P(token_i | BOS, token_<i)`` at every position in one pass, plus hidden
states.

Input row: ``[BOS] + token_ids``. The output at row position j is the distribution of token j
(given BOS and tokens before j), and the hidden state at row position j + 1 is that of token j
itself (the state after reading it): both aligned one to one with ``token_ids``.

BOS: the tokenizer's ``bos_token_id``; if it has none, its ``eos_token_id`` (GPT-2 style models
were trained with ``<|endoftext|>`` between documents, so it is the natural "start" context); if it
has neither, position 0 cannot be predicted and gets a hard label: the true token with log-prob 0,
``-inf`` fillers and tail ``-inf`` (``options["position0"] == "hard_label"``), so a KD loss there
reduces to cross-entropy on the transcript.

Long inputs are cut into overlapping windows of the model's maximum length (stride half a window);
each position is taken from the earliest window that contains it, where it has the most left
context (:func:`kdcache.teachers.base.left_owner`). Windows after the first do not start with BOS.
"""

from __future__ import annotations

from kdcache.teachers.base import Row, left_owner, resolve_hidden_layers, windows
from kdcache.teachers.loading import (
    ModelSource,
    hf_tokenizer_hash,
    kdcache_tokenizer,
    model_hash,
)

# Windows longer than this gain nothing for transcripts and cost memory; a model's declared
# maximum (8k, 128k) is often far beyond what a batch of transcripts needs.
MAX_WINDOW = 2048


class CausalLMTeacher:
    """A Hugging Face causal LM (GPT-2, Llama, SmolLM2 GGUF, ...) as a teacher.

    Args:
        source: Where to load from.
        k: Top entries per position (0: hidden states only).
        temperature: Softmax temperature.
        hidden_layers: Indices into the model's hidden states (0 = embeddings, -1 = last),
            stored normalised to non-negative.
        device: torch device string.
        max_len: Window length including BOS; default min(model maximum, 2048).
        bos_id: Override the BOS token id (-1: no BOS, position 0 gets a hard label).
    """

    kind = "causal_lm"

    def __init__(
        self,
        source: ModelSource,
        *,
        k: int,
        temperature: float = 1.0,
        hidden_layers: tuple[int, ...] = (),
        device: str = "cpu",
        max_len: int | None = None,
        bos_id: int | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.source, self.temperature = source, temperature
        self.device = torch.device(device)
        kw = source.from_pretrained_kwargs()
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
        # Encode and hash with the Tokenizer class the student loads, where it reads this one.
        self.kd_tokenizer = kdcache_tokenizer(source)
        dtype = torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kw)
        self.model = self.model.eval().to(self.device)
        cfg = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if k > self.vocab_size:
            raise ValueError(f"--top-k {k} is larger than the vocabulary ({self.vocab_size})")
        self.k = k
        self.hidden_layers = resolve_hidden_layers(hidden_layers, cfg.num_hidden_layers + 1)
        self.hidden_dims = {layer: int(cfg.hidden_size) for layer in self.hidden_layers}
        tok = self.tokenizer
        if bos_id is None:
            bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.bos_id = None if bos_id is None or bos_id < 0 else int(bos_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.unk_id = tok.unk_token_id
        limit = max_len or min(
            getattr(cfg, "max_position_embeddings", MAX_WINDOW) or MAX_WINDOW, MAX_WINDOW
        )
        self.width = int(limit)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.autocast = self.device.type == "cuda"

    def model_hash(self) -> str:
        return model_hash(self.source, self.model)

    def tokenizer_hash(self) -> str:
        if self.kd_tokenizer is not None:
            return self.kd_tokenizer.content_hash()
        return "hf:" + hf_tokenizer_hash(self.tokenizer)

    def options(self) -> dict:
        return {
            "bos_id": self.bos_id,
            "position0": "predicted" if self.bos_id is not None else "hard_label",
            "window": self.width,
            "window_rule": "stride width/2, position from the earliest window containing it",
            "hidden_alignment": "state after reading token i",
        }

    def encode(self, text: str) -> list[int]:
        if self.kd_tokenizer is not None:
            return list(self.kd_tokenizer.encode(text))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cost(self, n: int) -> int:
        return n + 1

    def rows(self, utt: int, ids: list[int]) -> list[Row]:
        return causal_rows(
            utt, ids, self.bos_id, self.width, bool(self.k), bool(self.hidden_layers)
        )

    def forward(self, input_ids, attention_mask, topk_index, hid_index):
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=bool(self.hidden_layers),
                use_cache=False,
            )
            hidden = (
                {layer: out.hidden_states[layer][hid_index] for layer in self.hidden_layers}
                if self.hidden_layers
                else {}
            )
            logits = None
            if self.k:
                logits = self.model.get_output_embeddings()(out.last_hidden_state[topk_index])
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits, hidden


def causal_rows(
    utt: int, ids: list[int], bos_id: int | None, width: int, topk: bool, hidden: bool
) -> list[Row]:
    """Rows for a left-to-right model (shared by the causal and LSTM teachers).

    Row sequence ``x = [bos] + ids`` (or ``ids``). Output j predicts ``x[j + 1]``; the hidden
    state at j belongs to ``x[j]``. With BOS, token i is predicted at x-position i and its state
    is at x-position i + 1; without, token i >= 1 is predicted at i - 1, token 0 gets a hard
    label, and its state is at i.
    """
    off = 1 if bos_id is not None else 0
    x = ([bos_id] if off else []) + list(ids)
    n = len(x)
    wins = windows(n, width) if width < n else [(0, n)]
    owner = left_owner(n, wins)
    rows = []
    for w, (s, e) in enumerate(wins):
        r = Row(utt, x[s:e])
        for j in range(s, e):
            if owner[j] != w:
                continue
            tok = j + 1 - off  # token predicted by output j
            if topk and tok < len(ids):
                r.topk_src.append(j - s)
                r.topk_dst.append(tok)
            own = j - off  # token whose state is at j
            if hidden and own >= 0:
                r.hid_src.append(j - s)
                r.hid_dst.append(own)
        if w == 0 and not off and topk and ids:
            r.fixed = {0: int(ids[0])}
        if r.topk_src or r.hid_src or r.fixed:
            rows.append(r)
    return rows
