"""Masked-LM teacher (BERT family): per-position distributions and hidden states.

Modes:
  * ``masked`` (default, as in the papers): position i of a sentence gets
    ``P(token_i | sentence with token_i replaced by [MASK])``. One input row per position; rows
    of all utterances are batched together by length.
    With ``mask_stride`` S >= 2, positions S apart are masked together: S copies per sentence
    instead of one per position (a sentence of n tokens costs S rows, not n), and position i gets
    ``P(token_i | sentence with every position j = i mod S masked)``. S = 8 masks 12.5% of the
    tokens, about BERT's training rate (15%); S = 0 (default) is the exact one-mask-per-copy form.
  * ``unmasked``: one pass over the plain sentence; position i gets the head's distribution at
    token i (cheap, but the model sees the answer).

Hidden states always come from an unmasked pass: one vector per teacher token, aligned one to one
with ``token_ids`` ([CLS]/[SEP] dropped), for representation losses (CIF hierarchical KD).

Sequences longer than the model's maximum are cut into overlapping windows of the maximum length
(stride half a window, last window aligned to the end, [CLS]/[SEP] around each); every position is
taken from the window where its context on the shorter side is longest
(:func:`kdcache.teachers.base.centre_owner`).
"""

from __future__ import annotations

from kdcache.teachers.base import BuildError, Row, centre_owner, resolve_hidden_layers, windows
from kdcache.teachers.loading import (
    ModelSource,
    hf_tokenizer_hash,
    kdcache_tokenizer,
    model_hash,
)

MLM_MODES = ("masked", "unmasked")


class MissingHeadError(BuildError):
    """The checkpoint has no masked-LM head but top-k targets were asked for."""


class MaskedLMTeacher:
    """A Hugging Face masked LM as a teacher.

    Args:
        source: Where to load from (:func:`kdcache.teachers.loading.resolve_model`).
        k: Top entries kept per position; 0 for hidden states only (no head needed).
        temperature: Softmax temperature.
        hidden_layers: Indices into the model's hidden states (0 = embeddings, -1 = last layer);
            stored normalised to non-negative.
        mode: ``"masked"`` or ``"unmasked"``.
        device: torch device string.
        max_len: Window length including [CLS]/[SEP]; default the model's maximum.
    """

    kind = "masked_lm"

    def __init__(
        self,
        source: ModelSource,
        *,
        k: int,
        temperature: float = 1.0,
        hidden_layers: tuple[int, ...] = (),
        mode: str = "masked",
        device: str = "cpu",
        max_len: int | None = None,
        mask_stride: int = 0,
    ):
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

        if mode not in MLM_MODES:
            raise ValueError(f"--mlm-mode {mode!r} must be one of {MLM_MODES}")
        if mask_stride < 0 or mask_stride == 1:
            raise ValueError(
                f"--mask-stride {mask_stride} must be 0 (one masked position per copy) or >= 2"
            )
        if mask_stride and mode != "masked":
            raise ValueError(f"--mask-stride {mask_stride} applies to --mlm-mode masked only")
        self.source, self.mode, self.temperature = source, mode, temperature
        self.mask_stride = int(mask_stride)
        self.device = torch.device(device)
        kw = source.from_pretrained_kwargs()
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
        # Encode and hash with the Tokenizer class the student loads, where it reads this one.
        self.kd_tokenizer = kdcache_tokenizer(source)
        if k > 0:
            model, info = AutoModelForMaskedLM.from_pretrained(
                source.path, output_loading_info=True, **kw
            )
            head_missing = [n for n in info["missing_keys"] if "embeddings" not in n]
            if head_missing:
                raise MissingHeadError(
                    f"model {source.model_id!r} has no trained masked-LM head (missing weights "
                    f"{head_missing[:3]}...): pass --top-k 0 with --hidden-layers to store hidden "
                    f"states only"
                )
        else:
            model = AutoModel.from_pretrained(source.path, **kw)
        self.model = model.eval().to(self.device)
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        if k > self.vocab_size:
            raise ValueError(f"--top-k {k} is larger than the vocabulary ({self.vocab_size})")
        self.k = k
        self.hidden_layers = resolve_hidden_layers(hidden_layers, cfg.num_hidden_layers + 1)
        self.hidden_dims = {layer: int(cfg.hidden_size) for layer in self.hidden_layers}
        tok = self.tokenizer
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise ValueError(f"tokenizer of {source.model_id!r} has no [CLS]/[SEP] tokens")
        if k > 0 and mode == "masked" and tok.mask_token_id is None:
            raise ValueError(f"tokenizer of {source.model_id!r} has no [MASK] token")
        self.cls_id, self.sep_id, self.mask_id = (
            tok.cls_token_id,
            tok.sep_token_id,
            tok.mask_token_id,
        )
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.unk_id = tok.unk_token_id
        limit = max_len or getattr(cfg, "max_position_embeddings", 512)
        limit = min(limit, tok.model_max_length) if tok.model_max_length < 1e9 else limit
        self.width = int(limit) - 2
        self.autocast = self.device.type == "cuda"

    # -- record ---------------------------------------------------------------------------------

    def model_hash(self) -> str:
        return model_hash(self.source, self.model)

    def tokenizer_hash(self) -> str:
        if self.kd_tokenizer is not None:
            return self.kd_tokenizer.content_hash()
        return "hf:" + hf_tokenizer_hash(self.tokenizer)

    def options(self) -> dict:
        opts = {
            "mlm_mode": self.mode,
            "window": self.width + 2,
            "window_rule": "stride width/2, position from window with most context on its shorter side",
        }
        if self.mode == "masked" and self.mask_stride:
            opts["mask_stride"] = self.mask_stride  # absent: one masked position per copy
        return opts

    # -- work -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.kd_tokenizer is not None:
            return list(self.kd_tokenizer.encode(text))
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cost(self, n: int) -> int:
        """Padded tokens one utterance of n tokens costs (for balancing ranks)."""
        rows = min(n, self.mask_stride) if self.mask_stride else n
        rows = rows if (self.k and self.mode == "masked") else 0
        return (rows + 1) * (min(n, self.width) + 2)

    def rows(self, utt: int, ids: list[int]) -> list[Row]:
        n = len(ids)
        wins = windows(n, self.width)
        owner = centre_owner(n, wins)
        out: list[Row] = []
        for w, (s, e) in enumerate(wins):
            mine = [p for p in range(s, e) if owner[p] == w]
            plain = [self.cls_id, *ids[s:e], self.sep_id]
            src = [p - s + 1 for p in mine]
            unmasked = Row(utt, plain)
            if self.hidden_layers:
                unmasked.hid_src, unmasked.hid_dst = src, mine
            if self.k and self.mode == "unmasked":
                unmasked.topk_src, unmasked.topk_dst = src, mine
            if unmasked.hid_src or unmasked.topk_src:
                out.append(unmasked)
            if self.k and self.mode == "masked":
                stride = self.mask_stride or len(mine)  # 0: each position its own copy
                for r in range(min(stride, len(mine))):
                    group = mine[r::stride]  # positions `stride` apart, masked together
                    x = list(plain)
                    for p in group:
                        x[p - s + 1] = self.mask_id
                    out.append(Row(utt, x, topk_src=[p - s + 1 for p in group], topk_dst=group))
        return out

    def forward(self, input_ids, attention_mask, topk_index, hid_index):
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
        ):
            if self.k == 0:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
                )
                states = out.hidden_states
                return None, {layer: states[layer][hid_index] for layer in self.hidden_layers}
            base = self.model.base_model
            out = base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=bool(self.hidden_layers),
            )
            hidden = (
                {layer: out.hidden_states[layer][hid_index] for layer in self.hidden_layers}
                if self.hidden_layers
                else {}
            )
            seq = out.last_hidden_state[topk_index]
            head = _mlm_head(self.model)
            logits = head(seq) if seq.shape[0] else seq.new_zeros((0, self.vocab_size))
            return logits, hidden


def _mlm_head(model):
    """The module mapping final hidden states to vocabulary logits (BERT: ``cls``; RoBERTa and
    others: ``lm_head``), applied only at the positions we keep: in masked mode that is one
    position in each row, which saves the head's ``[S, V]`` matmul on all the others."""
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"don't know the masked-LM head of {type(model).__name__} (no .cls/.lm_head)")
