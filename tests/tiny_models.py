"""Tiny teacher models built from configs, saved to temporary directories (used by the
test_teachers_* and test_build_* modules through conftest.py's tiny_bert / tiny_llama fixtures
and by import); no hub, no real weights. A helper module, not a test module: tests import it."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = (
    "the a of and to in is was he she it that for on with as his her they at be this "
    "from have or by one had not but what all were when we there can an your which their "
    "said if do will each about how up out them then many some so these would other into "
    "has more two like him see time could no make than first been its who now people my "
    "made over did down only way find use may water long little very after words called "
    "just where most know get through back much go good new write our me man too any day "
    "same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away "
    "again off went old number great tell men say small every found still between name "
    "should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large "
    "often together asked house don't world going want school important until form food "
    "keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times "
    "story boys since white days paper hard near sentence better best across during today "
    "others however sure means knew it's try told young miles sun ways thing whole hear "
    "example heard several change answer room sea against top turned learn point city play "
    "toward five using himself usually"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789'")


def write_vocab(d: Path) -> Path:
    vocab = SPECIALS + LETTERS + ["##" + c for c in LETTERS] + sorted(set(WORDS) - set(LETTERS))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return d / "vocab.txt"


def make_tokenizer(d: Path, *, bos: str | None = None):
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(str(write_vocab(d)), do_lower_case=True)
    if bos is not None:
        tok.add_special_tokens({"bos_token": bos})
    tok.model_max_length = 512
    return tok


def make_bert(d: Path, *, head: bool = True, max_positions: int = 64, seed: int = 0) -> Path:
    """A 2-layer BertForMaskedLM (or BertModel when ``head`` is False) with the toy vocabulary."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tok = make_tokenizer(d)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(seed)
    model = (BertForMaskedLM if head else BertModel)(cfg)
    with torch.no_grad():  # larger logits than the default init: peakier, more realistic targets
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def make_llama(
    d: Path, *, bos: str | None = "[CLS]", max_positions: int = 128, seed: int = 0
) -> Path:
    """A 2-layer LlamaForCausalLM with the toy vocabulary; BOS ``bos`` (None: no BOS token)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(d, bos=bos)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg_path = d / "tokenizer_config.json"
    meta = json.loads(cfg_path.read_text())
    assert (meta.get("bos_token") is not None) == (bos is not None)
    return d


SENTENCES = [
    "the man saw a little boy near the sea",
    "she said that they would come home again",
    "water",
    "what time is it now",
    "people often think about the world and its many parts",
    "two children found a large white house by the river",
    "my father told me a story",
    "every night the sun goes down",
]


def write_manifest(path: Path, texts=SENTENCES, extra: list[dict] | None = None) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"u{i:03d}", "audio": None, "text": t}) + "\n")
        for rec in extra or []:
            f.write(json.dumps(rec) + "\n")
    return path


_MADE: dict[str, Path] = {}


def shared_model(kind: str, tmp_path_factory) -> Path:
    """The session's tiny ``bert`` or ``llama`` directory, made on first use (conftest.py's
    tiny_bert and tiny_llama fixtures return it)."""
    if kind not in _MADE:
        make = {"bert": make_bert, "llama": make_llama}[kind]
        _MADE[kind] = make(tmp_path_factory.mktemp(kind))
    return _MADE[kind]
