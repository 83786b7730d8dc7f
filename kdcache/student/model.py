"""The student: a Conformer CTC encoder plus the optional heads the KD recipes attach.

    feats [B,T,80] -> ConformerEncoder -> enc_out [B,T',D] -> ctc            (always)
                                       |-> decoder (attention, teacher-forced)   decoder_layers > 0
                                       |-> cif -> cif_decoder                    use_cif
        intermediate layers (interaed_layers) -> interAED decoders                (training only)
        decoder / cif_decoder / encoder states -> aux KD heads, LRD projections  (training only)
        enc_out -> aux decoders (one per teacher in other units, teacher-forced on
                   that teacher's own tokens; hierarchical KD)                     (training only)
        CIF outputs -> ACD projections                                           (training only)

Everything but the encoder and the CTC head exists for training; `export_ctc()` drops it.
Building blocks live in conformer.py, decoder.py and cif.py; docs/models.md has the picture,
the defaults, parameter counts and the position conventions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.student.cif import Cif, CifDecoder
from kdcache.student.conformer import ConformerEncoder, lengths_to_mask
from kdcache.student.decoder import AttentionDecoder

AUX_KD_SOURCES = ("decoder", "cif", "encoder")
LRD_SOURCES = ("decoder", "cif")


@dataclass
class StudentConfig:
    """Architecture of a student. Every field has a default, so `StudentConfig()` is valid;
    `vocab_size` 0 means "not set yet" (the trainer fills it from the tokenizer) and `Student`
    refuses it. Unknown keys are rejected by the constructor and by `from_dict`."""

    vocab_size: int = 0  # output units incl. blank, bos and eos (one vocabulary for all heads)
    input_dim: int = 80  # feature channels (fbank)
    d_model: int = 144  # width of the encoder and of every decoder
    num_heads: int = 4  # encoder attention heads
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    num_layers: int = 8  # Conformer blocks
    conv_kernel: int = 15  # depthwise conv kernel (odd)
    dropout: float = 0.1
    subsampling: int = 4  # conv2d frame-rate reduction: 2, 4 or 8
    subsampling_channels: int = 0  # conv2d width in the subsampling; 0 = d_model
    # attention decoder (joint CTC/attention; LST, multitask, essence KD attach here)
    decoder_layers: int = 2  # 0 = no attention decoder
    decoder_heads: int = 4
    # interAED (paper 002): aux attention decoders on these encoder layers, dropped at inference
    interaed_layers: list[int] = field(
        default_factory=list
    )  # 1-based; negative counts from the end
    interaed_shared: bool = False  # one decoder for all listed layers
    interaed_decoder_layers: int = 1
    # CIF (paper 004)
    use_cif: bool = False
    cif_threshold: float = 1.0
    cif_tail_threshold: float = 0.5  # inference: fire the leftover if it weighs more
    cif_conv_kernel: int = 3  # weight predictor's Conv1d kernel (odd)
    cif_decoder_layers: int = 2
    cif_autoregressive: bool = True  # paper 004's decoder is autoregressive
    # KD heads (papers 000, 004): name -> output size; names are the cache's teacher names
    aux_kd_heads: dict[str, int] = field(default_factory=dict)  # Linear(state) -> teacher vocab
    aux_kd_source: str = "decoder"  # states the aux heads read: decoder | cif | encoder
    # Hierarchical KD (paper 000) from teachers in other units: name -> that teacher's vocab V_t.
    # Each is a small attention decoder on the final encoder output with its own embedding and
    # output layer over V_t + 2 ids: the teacher's ids, bos = V_t, eos = V_t + 1.
    aux_decoders: dict[str, int] = field(default_factory=dict)
    aux_decoder_layers: int = 1
    acd_proj: dict[str, int] = field(default_factory=dict)  # Linear(CIF output) -> teacher dim
    lrd_proj: dict[str, int] = field(default_factory=dict)  # Linear(state) -> teacher dim
    lrd_source: str = "decoder"  # states the LRD projections read: decoder | cif
    # special ids (the tokenizer's)
    blank_id: int = 0
    bos_id: int = 1  # may equal eos_id
    eos_id: int = 2
    ignore_id: int = -100  # padding value in `decoder_targets`

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"StudentConfig: {msg}")

        check(self.vocab_size >= 0, "vocab_size must be >= 0 (0 = set later)")
        check(self.d_model % self.num_heads == 0, "d_model must be divisible by num_heads")
        check(self.d_model % self.decoder_heads == 0, "d_model must be divisible by decoder_heads")
        check(self.conv_kernel % 2 == 1, "conv_kernel must be odd")
        check(self.cif_conv_kernel % 2 == 1, "cif_conv_kernel must be odd")
        check(self.subsampling in (2, 4, 8), "subsampling must be 2, 4 or 8")
        check(self.subsampling_channels >= 0, "subsampling_channels must be >= 0 (0 = d_model)")
        check(self.num_layers >= 1, "num_layers must be >= 1")
        check(self.decoder_layers >= 0, "decoder_layers must be >= 0")
        check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        for layer in self.interaed_layers:
            check(
                1 <= layer <= self.num_layers or -self.num_layers <= layer <= -1,
                f"interaed_layers entry {layer} is not an encoder layer (1..{self.num_layers})",
            )
        check(
            not self.interaed_layers or self.interaed_decoder_layers >= 1,
            "interaed_decoder_layers must be >= 1",
        )
        check(self.cif_threshold > 0, "cif_threshold must be > 0")
        check(
            self.aux_kd_source in AUX_KD_SOURCES, f"aux_kd_source must be one of {AUX_KD_SOURCES}"
        )
        check(self.lrd_source in LRD_SOURCES, f"lrd_source must be one of {LRD_SOURCES}")
        for what, heads in (
            ("aux_kd_heads", self.aux_kd_heads),
            ("acd_proj", self.acd_proj),
            ("lrd_proj", self.lrd_proj),
            ("aux_decoders", self.aux_decoders),
        ):
            for name, size in heads.items():
                check(bool(name) and "." not in name, f"{what} name {name!r}: empty or has a '.'")
                check(int(size) >= 1, f"{what}[{name!r}] must be >= 1")
        if self.aux_kd_heads:
            check(
                self.aux_kd_source != "decoder" or self.decoder_layers > 0,
                "aux_kd_source 'decoder' needs decoder_layers > 0",
            )
            check(self.aux_kd_source != "cif" or self.use_cif, "aux_kd_source 'cif' needs use_cif")
        if self.lrd_proj:
            check(
                self.lrd_source != "decoder" or self.decoder_layers > 0,
                "lrd_source 'decoder' needs decoder_layers > 0",
            )
            check(self.lrd_source != "cif" or self.use_cif, "lrd_source 'cif' needs use_cif")
        check(not self.acd_proj or self.use_cif, "acd_proj needs use_cif")
        check(
            not self.aux_decoders or self.aux_decoder_layers >= 1, "aux_decoder_layers must be >= 1"
        )
        if self.vocab_size:
            for name in ("blank_id", "bos_id", "eos_id"):
                v = getattr(self, name)
                check(0 <= v < self.vocab_size, f"{name}={v} is outside [0, {self.vocab_size})")
            check(
                self.blank_id not in (self.bos_id, self.eos_id), "blank_id must differ from bos/eos"
            )

    @property
    def interaed_layer_ids(self) -> tuple[int, ...]:
        """interaed_layers resolved to sorted, unique 1-based indices (-1 -> num_layers)."""
        return tuple(
            sorted({x if x > 0 else self.num_layers + 1 + x for x in self.interaed_layers})
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentConfig:
        """Build from a mapping; unknown keys raise ValueError naming them and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"StudentConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ctc_only(self) -> StudentConfig:
        """The same encoder and CTC head with every training-only part switched off (the
        switches reset to their defaults; settings that only matter when a part is on, such as
        cif_threshold, are kept)."""
        return dataclasses.replace(
            self,
            decoder_layers=0,
            interaed_layers=[],
            interaed_shared=False,
            use_cif=False,
            aux_kd_heads={},
            aux_kd_source="decoder",
            acd_proj={},
            lrd_proj={},
            lrd_source="decoder",
            aux_decoders={},
        )

    def without_aux_decoders(self) -> StudentConfig:
        """The same model minus the hierarchical-KD aux decoders (what attention decoding uses)."""
        return dataclasses.replace(self, aux_decoders={})


@dataclass
class StudentOutput:
    """What `Student.forward` computed. Parts a config does not enable are None or empty.

    V is vocab_size, L = targets.shape[1], U the number of CIF outputs (L when training).
    Masks are bool, True at valid positions.
    """

    enc_out: Tensor  # [B, T', D] final encoder output
    enc_lens: Tensor  # [B]
    enc_mask: Tensor  # [B, T']
    ctc_logits: Tensor  # [B, T', V] (raw logits; log_softmax them for the CTC loss)
    enc_layers: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, T', D] (interAED)
    # attention decoder: position i < L predicts y_{i+1}, position target_lens[b] predicts eos
    dec_logits: Tensor | None = None  # [B, L+1, V]
    dec_states: Tensor | None = None  # [B, L+1, D] pre-output states
    dec_mask: Tensor | None = None  # [B, L+1], True for positions 0..target_lens[b]
    interaed_logits: dict[int, Tensor] = field(default_factory=dict)  # layer -> [B, L+1, V]
    # CIF: output i is aligned with y_{i+1}; U = targets.shape[1] when training
    cif_out: Tensor | None = None  # [B, U, D] float32
    cif_lens: Tensor | None = None  # [B]
    cif_mask: Tensor | None = None  # [B, U]
    alphas: Tensor | None = None  # [B, T'] unscaled CIF weights
    alpha_sum: Tensor | None = None  # [B] unscaled sum, for the quantity loss
    cif_logits: Tensor | None = None  # [B, L, V] (training only)
    cif_states: Tensor | None = None  # [B, L, D] pre-output states of the CIF decoder
    # KD heads (training only): positions as the source they read (dec: L+1, cif: L, enc: T')
    aux_kd_logits: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, *, V_name]
    acd_proj: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, L, D_name]
    lrd_proj: dict[str, Tensor] = field(default_factory=dict)  # name -> [B, L(+1), D_name]
    # aux decoders (training only): name -> [B, L_t+1, V_t+2]; output i < L_t predicts the
    # teacher's token i (cache position i), output L_t predicts eos (= V_t + 1)
    aux_dec_logits: dict[str, Tensor] = field(default_factory=dict)


def decoder_inputs(targets: Tensor, target_lens: Tensor, bos_id: int, eos_id: int) -> Tensor:
    """Teacher-forcing input `[bos, y_1, ..., y_L]`.

    Args:
        targets: [B, L] token ids without specials, padded with anything (e.g. -100).
        target_lens: [B].

    Returns:
        [B, L+1] ids; padding replaced by eos so that every entry is a valid embedding index.
    """
    valid = lengths_to_mask(target_lens, targets.shape[1])
    y = targets.masked_fill(~valid, eos_id)
    return torch.cat([torch.full_like(y[:, :1], bos_id), y], 1)


def decoder_targets(
    targets: Tensor, target_lens: Tensor, eos_id: int, ignore_id: int = -100
) -> Tensor:
    """Decoder labels `[y_1, ..., y_L, eos]`, padded with ignore_id, matching `dec_logits`.

    Args:
        targets: [B, L] token ids without specials, padded with anything.
        target_lens: [B].

    Returns:
        [B, L+1]: y at positions < target_lens[b], eos at target_lens[b], ignore_id after.
    """
    b, length = targets.shape
    pos = torch.arange(length + 1, device=targets.device)[None, :]
    out = torch.cat([targets, targets.new_full((b, 1), ignore_id)], 1)
    out = out.masked_fill(pos == target_lens[:, None], eos_id)
    return out.masked_fill(pos > target_lens[:, None], ignore_id)


class Student(nn.Module):
    """Conformer CTC encoder with the optional decoders and KD heads of `StudentConfig`.

    Parameter names: `encoder.*`, `ctc.*` (the deployable CTC model), `decoder.*`,
    `interaed.<i>.*`, `cif.*`, `cif_decoder.*`, `aux_kd_heads.<name>.*`, `acd_proj.<name>.*`,
    `lrd_proj.<name>.*`, `aux_decoders.<name>.*`.
    """

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("StudentConfig.vocab_size is not set (it comes from the tokenizer)")
        self.cfg = cfg
        d, v = cfg.d_model, cfg.vocab_size
        self.encoder = ConformerEncoder(
            cfg.input_dim,
            d,
            cfg.num_heads,
            cfg.ff_mult,
            cfg.num_layers,
            cfg.conv_kernel,
            cfg.dropout,
            cfg.subsampling,
            cfg.subsampling_channels,
        )
        self.ctc = nn.Linear(d, v)

        def attention_decoder(layers: int) -> AttentionDecoder:
            return AttentionDecoder(v, d, cfg.decoder_heads, layers, cfg.ff_mult, cfg.dropout)

        self.decoder = attention_decoder(cfg.decoder_layers) if cfg.decoder_layers else None
        n_inter = len(cfg.interaed_layer_ids)
        if cfg.interaed_shared and n_inter:
            n_inter = 1
        self.interaed = nn.ModuleList(
            attention_decoder(cfg.interaed_decoder_layers) for _ in range(n_inter)
        )
        self.cif = self.cif_decoder = None
        if cfg.use_cif:
            self.cif = Cif(
                d, cfg.cif_conv_kernel, cfg.dropout, cfg.cif_threshold, cfg.cif_tail_threshold
            )
            self.cif_decoder = CifDecoder(
                v,
                d,
                cfg.decoder_heads,
                cfg.cif_decoder_layers,
                cfg.ff_mult,
                cfg.dropout,
                cfg.cif_autoregressive,
            )
        self.aux_kd_heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in cfg.aux_kd_heads.items()})
        self.acd_proj = nn.ModuleDict({k: nn.Linear(d, n) for k, n in cfg.acd_proj.items()})
        self.lrd_proj = nn.ModuleDict({k: nn.Linear(d, n) for k, n in cfg.lrd_proj.items()})
        # Built last, so that the other parameters are initialised exactly as without them.
        self.aux_decoders = nn.ModuleDict({
            k: AttentionDecoder(n + 2, d, cfg.decoder_heads, cfg.aux_decoder_layers, cfg.ff_mult,
                                cfg.dropout)
            for k, n in cfg.aux_decoders.items()
        })  # fmt: skip

    def interaed_decoder(self, layer: int) -> AttentionDecoder:
        """The auxiliary decoder attached to encoder layer `layer` (1-based, resolved)."""
        ids = self.cfg.interaed_layer_ids
        return self.interaed[0 if self.cfg.interaed_shared else ids.index(layer)]

    def forward(
        self,
        feats: Tensor,
        feat_lens: Tensor,
        targets: Tensor | None = None,
        target_lens: Tensor | None = None,
        aux_tokens: dict[str, tuple[Tensor, Tensor]] | None = None,
    ) -> StudentOutput:
        """Run the encoder, the CTC head and, with targets, every enabled training head.

        Without targets (inference) only the encoder, CTC and CIF integration (unscaled, tail
        fired above cif_tail_threshold) run, plus encoder-sourced aux heads; decode.py does the
        rest. With targets, the decoders are teacher-forced and CIF is scaled to target_lens.

        Args:
            feats: [B, T, input_dim] features, padded.
            feat_lens: [B] valid frames (>= 7 at subsampling 4).
            targets: [B, L] token ids without bos/eos/blank, padded with anything.
            target_lens: [B] tokens per utterance.
            aux_tokens: aux decoder name -> (teacher token ids [B, L_t] without specials,
                padded with anything; lengths [B]); the aux decoders run only on these.

        Returns:
            StudentOutput (shapes documented on the class).
        """
        cfg = self.cfg
        training_heads = targets is not None
        if training_heads and target_lens is None:
            raise ValueError("targets given without target_lens")
        inter = cfg.interaed_layer_ids if training_heads else ()
        enc_out, enc_lens, enc_layers = self.encoder(feats, feat_lens, inter)
        enc_mask = lengths_to_mask(enc_lens, enc_out.shape[1])
        out = StudentOutput(
            enc_out=enc_out,
            enc_lens=enc_lens,
            enc_mask=enc_mask,
            ctc_logits=self.ctc(enc_out),
            enc_layers=enc_layers,
        )
        states: dict[str, Tensor] = {"encoder": enc_out}

        if training_heads:
            dec_in = decoder_inputs(targets, target_lens, cfg.bos_id, cfg.eos_id)
            if self.decoder is not None:
                out.dec_logits, out.dec_states = self.decoder(dec_in, enc_out, enc_mask)
                out.dec_mask = lengths_to_mask(target_lens + 1, dec_in.shape[1])
                states["decoder"] = out.dec_states
            for layer in inter:
                logits, _ = self.interaed_decoder(layer)(dec_in, enc_layers[layer], enc_mask)
                out.interaed_logits[layer] = logits

        if self.cif is not None:
            out.cif_out, out.cif_lens, out.alphas, out.alpha_sum = self.cif(
                enc_out, enc_mask, target_lens if training_heads else None
            )
            if training_heads and out.cif_out.shape[1] < targets.shape[1]:  # targets padded wider
                out.cif_out = F.pad(out.cif_out, (0, 0, 0, targets.shape[1] - out.cif_out.shape[1]))
            out.cif_mask = lengths_to_mask(out.cif_lens, out.cif_out.shape[1])
            if training_heads:
                prev = dec_in[:, : out.cif_out.shape[1]]  # [bos, y_1, ..., y_{L-1}]
                out.cif_logits, out.cif_states = self.cif_decoder(out.cif_out, out.cif_mask, prev)
                states["cif"] = out.cif_states
                out.acd_proj = {k: p(out.cif_out) for k, p in self.acd_proj.items()}

        if cfg.aux_kd_source in states:
            src = states[cfg.aux_kd_source]
            out.aux_kd_logits = {k: h(src) for k, h in self.aux_kd_heads.items()}
        if cfg.lrd_source in states:
            out.lrd_proj = {k: p(states[cfg.lrd_source]) for k, p in self.lrd_proj.items()}
        for name, (tok, lens) in (aux_tokens or {}).items():
            v_t = cfg.aux_decoders[name]
            dec_in = decoder_inputs(tok, lens, v_t, v_t + 1)
            out.aux_dec_logits[name], _ = self.aux_decoders[name](dec_in, enc_out, enc_mask)
        return out

    def export_ctc(self) -> tuple[StudentConfig, dict[str, Tensor]]:
        """The deployable CTC model: its config and a state dict with exactly its parameters.

        `Student(cfg).load_state_dict(state, strict=True)` works for the returned pair; the
        decoders, interAED, CIF, KD heads and aux decoders are dropped (they only served training).
        """
        keep = ("encoder.", "ctc.")
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(keep)}
        return self.cfg.ctc_only(), state


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in module.parameters())
