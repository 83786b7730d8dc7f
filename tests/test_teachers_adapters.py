"""Masked-LM and causal-LM adapters against naive one-sentence-at-a-time references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import SENTENCES, make_bert

from kdcache.teachers.base import run_rows
from kdcache.teachers.causal_lm import CausalLMTeacher
from kdcache.teachers.loading import resolve_model
from kdcache.teachers.masked_lm import MaskedLMTeacher, MissingHeadError

ATOL = 2e-4


def run_all(t, texts, budget=256):
    ids = [t.encode(x) for x in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    got = dict(run_rows(t, [(i, ids[i]) for i in order], budget))
    assert sorted(got) == list(range(len(texts)))
    return ids, got


def masked_reference(
    t: MaskedLMTeacher, ids: list[int], p: int, lo: int = 0, hi: int | None = None
):
    """log-softmax at position p with p masked, model input = [CLS] ids[lo:hi] [SEP]."""
    hi = len(ids) if hi is None else hi
    x = [t.cls_id, *ids[lo:hi], t.sep_id]
    x[p - lo + 1] = t.mask_id
    with torch.no_grad():
        logits = t.model(torch.tensor([x])).logits[0, p - lo + 1]
    return torch.log_softmax(logits / t.temperature, -1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_mode_matches_per_position_reference(tiny_bert, temperature):
    t = MaskedLMTeacher(
        resolve_model(str(tiny_bert)), k=5, temperature=temperature, hidden_layers=(-1, 1)
    )
    assert t.hidden_layers == (2, 1)
    ids, got = run_all(t, SENTENCES[:4])
    for u, toks in enumerate(ids):
        tg = got[u]
        assert tg.topk_ids.shape == (len(toks), 5)
        for p in range(len(toks)):
            ref = masked_reference(t, toks, p)
            top = torch.topk(ref, 5)
            np.testing.assert_array_equal(tg.topk_ids[p], top.indices.numpy())
            np.testing.assert_allclose(tg.topk_logprobs[p], top.values.numpy(), atol=ATOL)
            rest = ref.clone()
            rest[top.indices] = -torch.inf
            np.testing.assert_allclose(
                tg.tail_logmass[p], torch.logsumexp(rest, -1).item(), atol=ATOL
            )
        # Hidden states come from the unmasked sentence, [CLS]/[SEP] dropped.
        with torch.no_grad():
            hs = t.model(
                torch.tensor([[t.cls_id, *toks, t.sep_id]]), output_hidden_states=True
            ).hidden_states
        np.testing.assert_allclose(tg.hidden[2], hs[2][0, 1:-1].numpy(), atol=ATOL)
        np.testing.assert_allclose(tg.hidden[1], hs[1][0, 1:-1].numpy(), atol=ATOL)


def test_mask_stride_masks_positions_stride_apart_together(tiny_bert):
    """--mask-stride 3: position p's distribution comes from the copy in which every position
    q = p mod 3 is masked; 3 rows per sentence instead of one per position."""
    t = MaskedLMTeacher(resolve_model(str(tiny_bert)), k=4, mask_stride=3)
    assert t.options()["mask_stride"] == 3
    ids, got = run_all(t, SENTENCES[:4])
    for u, toks in enumerate(ids):
        assert len(t.rows(u, toks)) == min(3, len(toks))
        for p in range(len(toks)):
            x = [t.cls_id, *toks, t.sep_id]
            for q in range(p % 3, len(toks), 3):
                x[q + 1] = t.mask_id
            with torch.no_grad():
                ref = torch.log_softmax(t.model(torch.tensor([x])).logits[0, p + 1], -1)
            top = torch.topk(ref, 4)
            np.testing.assert_array_equal(got[u].topk_ids[p], top.indices.numpy())
            np.testing.assert_allclose(got[u].topk_logprobs[p], top.values.numpy(), atol=ATOL)
    # Stride 0 is the exact form and leaves the record as it was; 1 would mask everything.
    assert "mask_stride" not in MaskedLMTeacher(resolve_model(str(tiny_bert)), k=4).options()
    with pytest.raises(ValueError, match="--mask-stride 2 applies to --mlm-mode masked only"):
        MaskedLMTeacher(resolve_model(str(tiny_bert)), k=4, mode="unmasked", mask_stride=2)
    with pytest.raises(ValueError, match="must be 0 .* or >= 2"):
        MaskedLMTeacher(resolve_model(str(tiny_bert)), k=4, mask_stride=1)


def test_batching_does_not_change_results(tiny_bert):
    t = MaskedLMTeacher(resolve_model(str(tiny_bert)), k=4, hidden_layers=(-1,))
    _, small = run_all(t, SENTENCES, budget=16)
    _, large = run_all(t, SENTENCES, budget=4096)
    for u in small:
        np.testing.assert_array_equal(small[u].topk_ids, large[u].topk_ids)
        np.testing.assert_allclose(small[u].topk_logprobs, large[u].topk_logprobs, atol=ATOL)
        np.testing.assert_allclose(small[u].hidden[2], large[u].hidden[2], atol=ATOL)


def test_unmasked_mode_is_one_pass(tiny_bert):
    t = MaskedLMTeacher(resolve_model(str(tiny_bert)), k=3, mode="unmasked")
    ids, got = run_all(t, SENTENCES[:3])
    for u, toks in enumerate(ids):
        with torch.no_grad():
            logits = t.model(torch.tensor([[t.cls_id, *toks, t.sep_id]])).logits[0, 1:-1]
        top = torch.topk(torch.log_softmax(logits, -1), 3)
        np.testing.assert_array_equal(got[u].topk_ids, top.indices.numpy())
        np.testing.assert_allclose(got[u].topk_logprobs, top.values.numpy(), atol=ATOL)
    assert len(t.rows(0, ids[0])) == 1


def test_long_sentence_uses_windows(tiny_bert):
    # Window of 10 tokens + [CLS]/[SEP]: a 25-token sentence needs several.
    t = MaskedLMTeacher(resolve_model(str(tiny_bert)), k=3, hidden_layers=(-1,), max_len=12)
    text = " ".join(SENTENCES[4:7])
    ids, got = run_all(t, [text])
    toks = ids[0]
    assert len(toks) > 20
    from kdcache.teachers.base import centre_owner, windows

    wins = windows(len(toks), 10)
    owner = centre_owner(len(toks), wins)
    for p in range(len(toks)):
        lo, hi = wins[owner[p]]
        ref = masked_reference(t, toks, p, lo, hi)
        top = torch.topk(ref, 3)
        np.testing.assert_array_equal(got[0].topk_ids[p], top.indices.numpy())
        np.testing.assert_allclose(got[0].topk_logprobs[p], top.values.numpy(), atol=ATOL)


def test_model_without_head(tmp_path):
    d = make_bert(tmp_path / "nohead", head=False)
    with pytest.raises(MissingHeadError, match="--top-k 0"):
        MaskedLMTeacher(resolve_model(str(d)), k=4)
    t = MaskedLMTeacher(resolve_model(str(d)), k=0, hidden_layers=(-1,))
    ids, got = run_all(t, SENTENCES[:2])
    assert got[0].topk_ids.shape == (len(ids[0]), 0)
    with torch.no_grad():
        hs = t.model(torch.tensor([[t.cls_id, *ids[0], t.sep_id]])).last_hidden_state
    np.testing.assert_allclose(got[0].hidden[2], hs[0, 1:-1].numpy(), atol=ATOL)


def causal_reference(t: CausalLMTeacher, toks: list[int]):
    x = ([t.bos_id] if t.bos_id is not None else []) + toks
    with torch.no_grad():
        out = t.model(torch.tensor([x]), output_hidden_states=True)
    return torch.log_softmax(out.logits[0] / t.temperature, -1), out.hidden_states


def test_causal_lm_matches_full_forward(tiny_llama):
    t = CausalLMTeacher(resolve_model(str(tiny_llama)), k=6, hidden_layers=(-1,))
    assert t.bos_id == t.tokenizer.convert_tokens_to_ids("[CLS]")
    ids, got = run_all(t, SENTENCES)
    for u, toks in enumerate(ids):
        logp, hs = causal_reference(t, toks)
        top = torch.topk(logp[: len(toks)], 6)  # output j predicts token j
        np.testing.assert_array_equal(got[u].topk_ids, top.indices.numpy())
        np.testing.assert_allclose(got[u].topk_logprobs, top.values.numpy(), atol=ATOL)
        np.testing.assert_allclose(got[u].hidden[2], hs[2][0, 1:].numpy(), atol=ATOL)


def test_causal_lm_without_bos_gives_hard_label_at_position_0(tiny_llama):
    t = CausalLMTeacher(resolve_model(str(tiny_llama)), k=4, bos_id=-1)
    assert t.options()["position0"] == "hard_label"
    ids, got = run_all(t, SENTENCES[:3])
    for u, toks in enumerate(ids):
        tg = got[u]
        assert tg.topk_ids[0, 0] == toks[0] and tg.topk_logprobs[0, 0] == 0
        assert np.isneginf(tg.topk_logprobs[0, 1:]).all() and np.isneginf(tg.tail_logmass[0])
        assert len(set(tg.topk_ids[0].tolist())) == 4
        if len(toks) > 1:
            logp, _ = causal_reference(t, toks)
            top = torch.topk(logp[: len(toks) - 1], 4)
            np.testing.assert_array_equal(tg.topk_ids[1:], top.indices.numpy())


def test_causal_lm_windows(tiny_llama):
    t = CausalLMTeacher(resolve_model(str(tiny_llama)), k=3, hidden_layers=(-1,), max_len=8)
    text = " ".join(SENTENCES[4:6])
    ids, got = run_all(t, [text])
    toks = ids[0]
    x = [t.bos_id, *toks]
    from kdcache.teachers.base import left_owner, windows

    wins = windows(len(x), 8)
    owner = left_owner(len(x), wins)
    for j in range(len(toks)):  # output j (predicting token j) from its owner window
        lo, hi = wins[owner[j]]
        with torch.no_grad():
            logits = t.model(torch.tensor([x[lo:hi]])).logits[0, j - lo]
        top = torch.topk(torch.log_softmax(logits, -1), 3)
        np.testing.assert_array_equal(got[0].topk_ids[j], top.indices.numpy())


def test_resolve_hidden_layers_counts_negative_from_the_end():
    from kdcache.teachers.base import resolve_hidden_layers

    assert resolve_hidden_layers([-1, 0, 3, -7], 7) == (6, 0, 3, 0)
    with pytest.raises(ValueError, match="--hidden-layers 7 out of range"):
        resolve_hidden_layers([7], 7)
    with pytest.raises(ValueError, match="--hidden-layers -8 out of range"):
        resolve_hidden_layers([-8], 7)
