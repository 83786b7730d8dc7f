"""Decoding: CTC greedy, CTC prefix scores, beam search against brute force, a memorised set."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.student.decode import (
    CTCPrefixScorer,
    DecodeConfig,
    attention_beam_search,
    attention_greedy,
    beam_search,
    cif_greedy,
    ctc_greedy,
    decode,
)
from kdcache.student.model import Student, StudentConfig, decoder_inputs, decoder_targets

torch.set_num_threads(1)


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    paths = torch.tensor([[0, 3, 3, 0, 3, 4, 4, 0, 5], [2, 2, 0, 2, 1, 1, 1, 7, 7]])
    logits = F.one_hot(paths, 8).float()
    lens = torch.tensor([9, 6])  # second: frames 2 2 _ 2 1 1 | cut
    assert ctc_greedy(logits, lens, blank_id=0) == [[3, 3, 4, 5], [2, 2, 1]]
    assert ctc_greedy(logits, torch.tensor([0, 1]), blank_id=0) == [[], [2]]


# ---------------------------------------------------------------------------------------------
# CTC prefix scores vs enumeration of all paths


def collapse(path, blank):
    out, prev = [], None
    for p in path:
        if p != prev and p != blank:
            out.append(p)
        prev = p
    return out


def brute_force(logp, blank):
    """{label sequence: log P_ctc} over all V^T paths."""
    t_max, v = logp.shape
    probs: dict[tuple, float] = {}
    for path in itertools.product(range(v), repeat=t_max):
        lp = sum(float(logp[t, p]) for t, p in enumerate(path))
        key = tuple(collapse(path, blank))
        probs[key] = probs.get(key, 0.0) + math.exp(lp)
    return probs


def test_ctc_prefix_scores_match_brute_force():
    torch.manual_seed(0)
    t_max, blank, eos = 5, 0, 3  # tokens 1, 2; eos 3 is also a CTC class here
    logp = torch.randn(t_max, 4).mul(2).log_softmax(-1).double()
    probs = brute_force(logp, blank)
    scorer = CTCPrefixScorer(logp, blank, eos)
    cand = torch.tensor([[1, 2, eos, blank]])
    # walk every prefix g up to length 3 over {1, 2}, scoring g + c from g's state
    frontier = [((), scorer.initial_state()[None], -1)]
    for depth in range(4):
        nxt = []
        for g, state, last in frontier:
            psi, new = scorer.score(state, torch.tensor([last]), depth, cand)
            for j, c in enumerate(cand[0].tolist()):
                if c == blank:
                    assert psi[0, j] == float("-inf")
                    continue
                if c == eos:  # exactly g
                    want = probs.get(g, 0.0)
                else:  # every sequence starting with g + c
                    h = g + (c,)
                    want = sum(p for s, p in probs.items() if s[: len(h)] == h)
                    nxt.append((h, new[:, j], c))
                got = math.exp(float(psi[0, j]))
                assert got == pytest.approx(want, rel=1e-5, abs=1e-12), (g, c)
        frontier = nxt


# ---------------------------------------------------------------------------------------------
# beam search on a scorer with known scores

BOS, EOS, BLANK, V = 1, 2, 0, 5  # tokens 3, 4


def table_step(seed: int):
    """A next-token distribution that is a fixed random function of the prefix."""

    def step(prefixes: torch.Tensor) -> torch.Tensor:
        rows = []
        for p in prefixes.tolist():
            g = torch.Generator().manual_seed(hash((seed, tuple(p))) % (2**31))
            rows.append(torch.randn(V, generator=g).mul(1.5).log_softmax(-1))
        return torch.stack(rows)

    return step


def all_sequences(max_len):
    for n in range(max_len + 1):
        yield from itertools.product((3, 4), repeat=n)


def sequence_score(step, seq, length_norm):
    prefix = [BOS]
    total = 0.0
    for tok in list(seq) + [EOS]:
        logp = step(torch.tensor([prefix]))[0]
        total += float(logp[tok])
        prefix.append(tok)
    return total / (len(seq) + 1) if length_norm else total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_norm", [True, False])
def test_exhaustive_beam_finds_brute_force_best(seed, length_norm):
    step, max_len = table_step(seed), 4
    best = max(all_sequences(max_len), key=lambda s: sequence_score(step, s, length_norm))
    got = beam_search(
        step,
        bos_id=BOS,
        eos_id=EOS,
        beam_size=64,
        max_len=max_len,
        length_norm=length_norm,
        banned=(BLANK, BOS),
    )
    assert tuple(got) == best


def test_beam_beats_greedy_where_greedy_is_wrong():
    # first token: 3 (p .6) or 4 (p .4); after 3 everything is uniform (3, 4, eos: 1/3 each),
    # after 4 eos has p .99. Best: [4] (log .4 + log .99) over greedy's [3] (log .6 + log 1/3).
    def step(prefixes):
        rows = []
        for p in prefixes.tolist():
            probs = torch.full((V,), 1e-9)
            if len(p) == 1:
                probs[3], probs[4] = 0.6, 0.4
            elif p[-1] == 4:
                probs[EOS], probs[3] = 0.99, 0.01
            else:
                probs[3] = probs[4] = probs[EOS] = 1 / 3
            rows.append(probs.log())
        return torch.stack(rows)

    kw = dict(bos_id=BOS, eos_id=EOS, max_len=3, length_norm=False, banned=(BLANK, BOS))
    assert beam_search(step, beam_size=1, **kw)[:1] == [3]
    assert beam_search(step, beam_size=2, **kw) == [4]


def test_joint_ctc_only_search_finds_most_probable_ctc_labelling():
    torch.manual_seed(3)
    logp = torch.randn(5, V).mul(2).log_softmax(-1)
    logp[:, BOS] = -30.0  # bos never appears as a CTC label
    logp = logp.log_softmax(-1)
    probs = brute_force(logp.double(), BLANK)
    max_len = 3
    candidates = [s for s in all_sequences(max_len)]
    best = max(candidates, key=lambda s: probs.get(s, 0.0))
    uniform = lambda p: torch.full((p.shape[0], V), -math.log(V))  # noqa: E731
    got = beam_search(
        uniform,
        bos_id=BOS,
        eos_id=EOS,
        beam_size=64,
        max_len=max_len,
        length_norm=False,
        banned=(BLANK, BOS),
        ctc_scorer=CTCPrefixScorer(logp, BLANK, EOS),
        ctc_weight=1.0,
    )
    assert tuple(got) == best


# ---------------------------------------------------------------------------------------------
# on real (tiny) models


def tiny(**kw):
    base = dict(
        vocab_size=8,
        input_dim=16,
        d_model=32,
        num_heads=2,
        ff_mult=2,
        num_layers=2,
        conv_kernel=5,
        dropout=0.0,
        decoder_layers=1,
        decoder_heads=2,
        cif_decoder_layers=1,
    )
    base.update(kw)
    return StudentConfig(**base)


def test_beam_one_equals_batched_greedy():
    torch.manual_seed(0)
    m = Student(tiny()).eval()
    feats, lens = torch.randn(3, 40, 16), torch.tensor([40, 31, 22])
    with torch.no_grad():
        out = m(feats, lens)
    greedy = attention_greedy(m, out, max_len_ratio=0.5)
    beam = attention_beam_search(m, out, beam_size=1, max_len_ratio=0.5)
    assert beam == greedy
    assert (
        decode(m, feats, lens, DecodeConfig(method="attention", beam_size=1, max_len_ratio=0.5))
        == greedy
    )


def test_memorised_sequences_are_decoded_by_every_method():
    """Train a tiny model to map 3 fixed inputs to 3 sequences; every decoder must return them."""
    torch.manual_seed(0)
    cfg = tiny(use_cif=True)
    m = Student(cfg)
    seqs = [[3, 4, 5, 6], [7, 3, 3], [5, 6, 7, 4, 4]]
    feats = torch.randn(3, 48, 16)
    lens = torch.tensor([48, 40, 44])
    tlens = torch.tensor([len(s) for s in seqs])
    targets = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], True, -100)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    dec_y = decoder_targets(targets, tlens, cfg.eos_id)
    for _ in range(60):
        o = m.train()(feats, lens, targets, tlens)
        ctc = F.ctc_loss(
            o.ctc_logits.log_softmax(-1).transpose(0, 1),
            targets.clamp(min=0),
            o.enc_lens,
            tlens,
            blank=cfg.blank_id,
            zero_infinity=True,
        )
        att = F.cross_entropy(o.dec_logits.transpose(1, 2), dec_y, ignore_index=-100)
        cif = F.cross_entropy(o.cif_logits.transpose(1, 2), targets, ignore_index=-100)
        qua = (o.alpha_sum - tlens).abs().mean()
        loss = ctc + att + cif + qua
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(feats, lens)
    assert ctc_greedy(out.ctc_logits, out.enc_lens, cfg.blank_id) == seqs
    assert attention_beam_search(m, out, beam_size=3) == seqs
    assert attention_beam_search(m, out, beam_size=3, ctc_weight=0.5) == seqs
    assert cif_greedy(m, out) == seqs
    assert decode(m, feats, lens, DecodeConfig(method="cif_greedy")) == seqs


def test_decoder_inputs_feed_the_tokens_the_decoder_predicts():
    # position i reads y_i (bos for i = 0) and is trained on y_{i+1}: shifting by one
    targets, tlens = torch.tensor([[5, 6, 7]]), torch.tensor([3])
    inp = decoder_inputs(targets, tlens, 1, 2)
    out = decoder_targets(targets, tlens, 2)
    assert inp[0, 1:].tolist() == out[0, :-1].tolist()


@pytest.mark.parametrize("ar", [True, False])
def test_cif_greedy_handles_utterances_without_fires(ar):
    m = Student(tiny(use_cif=True, decoder_layers=0, cif_autoregressive=ar)).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 40, 16), torch.tensor([40, 30]))
        cif_out = torch.randn(2, 3, 32)
        cif_lens = torch.tensor([0, 2])
        mask = torch.arange(3)[None] < cif_lens[:, None]
        out = dataclasses.replace(out, cif_out=cif_out, cif_lens=cif_lens, cif_mask=mask)
        hyps = cif_greedy(m, out)
        assert [len(h) for h in hyps] == [0, 2]
        empty = dataclasses.replace(
            out,
            cif_out=cif_out[:, :0],
            cif_lens=torch.zeros(2, dtype=torch.long),
            cif_mask=mask[:, :0],
        )
        assert cif_greedy(m, empty) == [[], []]


def _score_by_frames(scorer: CTCPrefixScorer, state, last, prefix_len, cand):
    """The frame recursion written as a loop (the definition): the reference for the closed form."""
    x = scorer.x
    t_max = x.shape[0]
    xs = x[:, cand]
    r_n, r_b = state[..., 0].T, state[..., 1].T
    phi = torch.logaddexp(r_n, r_b)[:, :, None].expand_as(xs)
    phi = torch.where((cand == last[:, None])[None], r_b[:, :, None], phi)
    new = torch.full((*xs.shape, 2), float("-inf"), dtype=x.dtype)
    if prefix_len == 0:
        new[0, ..., 0] = xs[0]
    for t in range(max(1, prefix_len), t_max):
        new[t, ..., 0] = torch.logaddexp(new[t - 1, ..., 0], phi[t - 1]) + xs[t]
        new[t, ..., 1] = (
            torch.logaddexp(new[t - 1, ..., 0], new[t - 1, ..., 1]) + x[t, scorer.blank]
        )
    psi = torch.logsumexp(torch.cat([new[:1, ..., 0], phi[:-1] + xs[1:]], 0), 0)
    full = torch.logaddexp(r_n[-1], r_b[-1])
    psi = torch.where(cand == scorer.eos, full[:, None].expand_as(psi), psi)
    psi = psi.masked_fill(cand == scorer.blank, float("-inf"))
    return psi, new.permute(1, 2, 0, 3)


@pytest.mark.parametrize("t_max", [1, 2, 7, 120])
def test_ctc_prefix_closed_form_equals_the_frame_loop(t_max):
    """Long utterances (peaked, realistic posteriors) and prefixes longer than the frames."""
    torch.manual_seed(t_max)
    v, blank, eos = 9, 0, 8
    logp = torch.randn(t_max, v).mul(4).log_softmax(-1)
    scorer = CTCPrefixScorer(logp, blank, eos)
    state = scorer.initial_state()[None].expand(3, -1, -1).clone()
    last = torch.tensor([-1, -1, -1])
    for depth in range(min(t_max + 2, 12)):
        cand = torch.stack([torch.randperm(v)[:5] for _ in range(3)])
        cand[0, 0] = last[0].clamp(min=1)  # a repeat of the last token
        cand[1, 1] = eos
        cand[2, 2] = blank
        psi, new = scorer.score(state, last, depth, cand)
        ref_psi, ref_new = _score_by_frames(scorer, state, last, depth, cand)
        fin = torch.isfinite(ref_new)
        assert torch.equal(fin, torch.isfinite(new)) and torch.equal(
            torch.isfinite(psi), torch.isfinite(ref_psi)
        )
        torch.testing.assert_close(new[fin], ref_new[fin], rtol=1e-9, atol=1e-9)
        ok = torch.isfinite(ref_psi)
        torch.testing.assert_close(psi[ok], ref_psi[ok], rtol=1e-9, atol=1e-9)
        pick = torch.tensor([3, 4, 0])  # follow some non-special candidate per hypothesis
        state = new[torch.arange(3), pick]
        last = cand[torch.arange(3), pick]


def test_incremental_decoder_equals_the_full_pass():
    """Cached keys/values give the full teacher-forced pass's last-position logits, also when a
    beam reorders, repeats and drops hypotheses between calls."""
    from kdcache.student.decoder import AttentionDecoder

    torch.manual_seed(0)
    dec = AttentionDecoder(
        vocab_size=11, d_model=32, num_heads=4, num_layers=2, ff_mult=2, dropout=0.3
    )
    dec.eval()
    mem = torch.randn(1, 17, 32)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, 13:] = False
    inc = dec.incremental(mem, mask)

    def full(prefixes):
        n = prefixes.shape[0]
        return dec(prefixes, mem.expand(n, -1, -1), mask.expand(n, -1))[0][:, -1]

    prefixes = torch.tensor([[1]])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(9):
            torch.testing.assert_close(inc.step(prefixes), full(prefixes), rtol=1e-5, atol=1e-5)
            n = prefixes.shape[0]
            keep = torch.randint(0, n, (min(4, n + 2),), generator=g)  # repeats and drops rows
            nxt = torch.randint(2, 11, (len(keep), 1), generator=g)
            prefixes = torch.cat([prefixes[keep], nxt], 1)
        # an unknown parent (not from the last call) falls back to a full rebuild
        odd = torch.randint(2, 11, (2, prefixes.shape[1]), generator=g)
        odd[:, 0] = 1
        torch.testing.assert_close(inc.step(odd), full(odd), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# shallow fusion with an external LM


@pytest.mark.parametrize("length_norm", [True, False])
def test_fused_exhaustive_beam_finds_the_best_summed_score(length_norm):
    """Decoder + beta * LM: an exhaustive beam returns the sequence with the best fused score."""
    att, lm, beta, max_len = table_step(1), table_step(7), 0.6, 4

    def fused(s):
        return sequence_score(att, s, length_norm) + beta * sequence_score(lm, s, length_norm)

    best = max(all_sequences(max_len), key=fused)
    plain = max(all_sequences(max_len), key=lambda s: sequence_score(att, s, length_norm))
    assert best != plain  # the LM must matter in this example
    kw = dict(bos_id=BOS, eos_id=EOS, beam_size=64, max_len=max_len, length_norm=length_norm,
              banned=(BLANK, BOS))  # fmt: skip
    assert tuple(beam_search(att, lm_fn=lm, lm_weight=beta, **kw)) == best
    assert tuple(beam_search(att, lm_fn=lm, lm_weight=0.0, **kw)) == plain


def test_fused_joint_ctc_beam_finds_the_best_three_way_score():
    """(1 - w) log p_att + w log P_ctc + beta log p_lm, searched exhaustively, equals brute force
    over all labellings (the CTC term from enumerating every path)."""
    torch.manual_seed(3)
    t_max, w, beta, max_len = 5, 0.4, 0.5, 4
    logp = torch.randn(t_max, V).mul(2).log_softmax(-1).double()
    probs = brute_force(logp, BLANK)
    att, lm = table_step(1), table_step(5)

    def score(s, b=beta):
        p = probs.get(tuple(s), 0.0)
        ctc = math.log(p) if p > 0 else float("-inf")
        return (1 - w) * sequence_score(att, s, False) + w * ctc + b * sequence_score(lm, s, False)

    best = max(all_sequences(max_len), key=score)
    assert best != max(all_sequences(max_len), key=lambda s: score(s, 0.0))  # the LM matters
    got = beam_search(att, bos_id=BOS, eos_id=EOS, beam_size=64, max_len=max_len,
                      length_norm=False, banned=(BLANK, BOS), ctc_scorer=CTCPrefixScorer(
                          logp, BLANK, EOS), ctc_weight=w, pre_beam=V, lm_fn=lm,
                      lm_weight=beta)  # fmt: skip
    assert tuple(got) == best


def _tiny_lm(vocab=11, bos=3, eos=2):
    from kdcache.teachers.lstm_lm import LSTMConfig, build_model

    cfg = LSTMConfig(vocab_size=vocab, bos_id=bos, eos_id=eos, layers=2, hidden=16, dropout=0.3)
    return build_model(cfg).eval(), cfg


def test_incremental_lm_equals_the_full_pass():
    """The per-hypothesis LSTM state gives the LM's full pass over [lm bos] + prefix[1:], under
    reordered, repeated and dropped hypotheses; the student's bos is replaced by the LM's."""
    from kdcache.student.lm import LMFusion

    model, cfg = _tiny_lm()
    inc = LMFusion(model, bos_id=cfg.bos_id, eos_id=cfg.eos_id).scorer(2)

    def full(prefixes):
        ids = prefixes.clone()
        ids[:, 0] = cfg.bos_id
        return model(ids)[0][:, -1].log_softmax(-1)

    prefixes = torch.tensor([[1]])  # the student's bos (1) differs from the LM's (3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(9):
            torch.testing.assert_close(inc.step(prefixes), full(prefixes), rtol=1e-5, atol=1e-5)
            n = prefixes.shape[0]
            keep = torch.randint(0, n, (min(4, n + 2),), generator=g)
            nxt = torch.randint(3, 11, (len(keep), 1), generator=g)
            prefixes = torch.cat([prefixes[keep], nxt], 1)
        odd = torch.randint(3, 11, (2, prefixes.shape[1]), generator=g)
        odd[:, 0] = 1
        torch.testing.assert_close(inc.step(odd), full(odd), rtol=1e-5, atol=1e-5)


def test_lm_without_eos_says_nothing_about_eos():
    from kdcache.student.lm import LMFusion

    model, cfg = _tiny_lm(eos=-1)
    inc = LMFusion(model, bos_id=cfg.bos_id, eos_id=-1).scorer(2)
    out = inc.step(torch.tensor([[1, 5], [1, 6]]))
    assert (out[:, 2] == 0).all() and (out[:, 5] < 0).all()


def test_fusion_with_a_zero_weight_changes_nothing_and_a_strong_lm_wins():
    """Through attention_beam_search on a real Student: beta = 0 gives the unfused hypotheses; an
    LM that puts all its mass on one continuation makes a large beta emit exactly it."""
    from kdcache.student.lm import LMFusion

    torch.manual_seed(0)
    m = Student(tiny()).eval()
    v = m.cfg.vocab_size
    feats, lens = torch.randn(2, 40, 16), torch.tensor([40, 33])
    with torch.no_grad():
        out = m(feats, lens)
    model, cfg = _tiny_lm(vocab=v, bos=m.cfg.bos_id, eos=m.cfg.eos_id)
    fusion = LMFusion(model, bos_id=cfg.bos_id, eos_id=cfg.eos_id)
    plain = attention_beam_search(m, out, beam_size=3, max_len_ratio=0.5)
    assert attention_beam_search(m, out, beam_size=3, max_len_ratio=0.5, lm=fusion,
                                 lm_weight=0.0) == plain  # fmt: skip
    with torch.no_grad():  # an LM that always says "token 4"
        model.out.weight.zero_()  # tied to the embedding: inputs now carry no information...
        for p in model.rnns.parameters():
            p.zero_()
        model.out.bias.fill_(-30.0)
        model.out.bias[4] = 0.0
    forced = attention_beam_search(m, out, beam_size=3, max_len_ratio=0.5, lm=fusion,
                                   lm_weight=50.0)  # fmt: skip
    assert all(set(h) == {4} for h in forced) and forced != plain
