"""Decoding: CTC greedy, attention greedy/beam search (optionally joint with CTC prefix scores,
Watanabe et al. 2017) and CIF greedy. Everything returns token id lists without specials; the
trainer detokenises. Put the model in eval mode first (these functions do not change it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdcache.student.conformer import lengths_to_mask
from kdcache.student.lm import LMFusion
from kdcache.student.model import Student, StudentOutput

NEG_INF = float("-inf")
METHODS = ("ctc_greedy", "attention", "cif_greedy")


@dataclass
class DecodeConfig:
    """How `decode` searches. Unknown keys are rejected by the constructor."""

    method: str = "ctc_greedy"  # ctc_greedy | attention | cif_greedy
    beam_size: int = 4  # attention; 1 = greedy (the batched greedy path is used)
    ctc_weight: float = 0.0  # attention: joint score (1-w) log p_att + w log p_ctc-prefix
    length_norm: bool = True  # attention: rank finished hypotheses by score / (tokens + 1)
    max_len_ratio: float = 1.0  # attention: at most ratio * encoder frames tokens
    pre_beam: int = 0  # attention+CTC: tokens CTC-scored per hypothesis; 0 = 1.5 * beam_size
    lm_weight: float = 0.0  # attention: shallow fusion weight of the external LM given to decode

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig.method {self.method!r} is not one of {METHODS}")
        if self.beam_size < 1 or not 0.0 <= self.ctc_weight <= 1.0 or self.max_len_ratio <= 0:
            raise ValueError(
                "DecodeConfig: beam_size >= 1, 0 <= ctc_weight <= 1, max_len_ratio > 0"
            )


@torch.no_grad()
def decode(
    model: Student,
    feats: Tensor,
    feat_lens: Tensor,
    cfg: DecodeConfig,
    lm: LMFusion | None = None,
) -> list[list[int]]:
    """Encode a batch and decode it with `cfg.method`.

    Args:
        model: a Student in eval mode.
        feats: [B, T, F]; feat_lens: [B].
        cfg: search settings.
        lm: external LM for shallow fusion (attention search, weight `cfg.lm_weight`).

    Returns:
        B token id lists (no blank, bos or eos).
    """
    out = model(feats, feat_lens)
    if cfg.method == "ctc_greedy":
        return ctc_greedy(out.ctc_logits, out.enc_lens, model.cfg.blank_id)
    if cfg.method == "cif_greedy":
        return cif_greedy(model, out)
    use_lm = lm is not None and cfg.lm_weight != 0.0
    if cfg.beam_size == 1 and cfg.ctc_weight == 0.0 and not use_lm:
        return attention_greedy(model, out, cfg.max_len_ratio)
    return attention_beam_search(
        model,
        out,
        beam_size=cfg.beam_size,
        ctc_weight=cfg.ctc_weight,
        length_norm=cfg.length_norm,
        max_len_ratio=cfg.max_len_ratio,
        pre_beam=cfg.pre_beam,
        lm=lm if use_lm else None,
        lm_weight=cfg.lm_weight,
    )


def ctc_greedy(ctc_logits: Tensor, lens: Tensor, blank_id: int) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks (batched).

    Args:
        ctc_logits: [B, T, V] logits or log-probs.
        lens: [B] valid frames.
        blank_id: the blank index.

    Returns:
        B token id lists.
    """
    best = ctc_logits.argmax(-1)  # [B, T]
    keep = best != blank_id
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    keep &= lengths_to_mask(lens, best.shape[1])
    return [best[b][keep[b]].tolist() for b in range(best.shape[0])]


def _banned(model: Student) -> list[int]:
    """Tokens the attention decoder may never emit: blank, and bos when it differs from eos."""
    cfg = model.cfg
    return [cfg.blank_id] + ([cfg.bos_id] if cfg.bos_id != cfg.eos_id else [])


def _max_lens(out: StudentOutput, ratio: float) -> list[int]:
    return [max(1, int(ratio * n)) for n in out.enc_lens.tolist()]


@torch.no_grad()
def attention_greedy(
    model: Student, out: StudentOutput, max_len_ratio: float = 1.0
) -> list[list[int]]:
    """Batched greedy decoding with the attention decoder.

    Args:
        model: a Student with an attention decoder.
        out: `model(feats, feat_lens)` (the encoder output is reused).
        max_len_ratio: at most this many tokens per encoder frame.

    Returns:
        B token id lists, each cut at its first eos or at its maximum length.
    """
    assert model.decoder is not None, "the model has no attention decoder"
    cfg = model.cfg
    max_lens = _max_lens(out, max_len_ratio)
    b = out.enc_out.shape[0]
    tokens = torch.full((b, 1), cfg.bos_id, dtype=torch.long, device=out.enc_out.device)
    done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
    banned = _banned(model)
    for _ in range(max(max_lens)):
        logits, _ = model.decoder(tokens, out.enc_out, out.enc_mask)
        logp = logits[:, -1].float()
        logp[:, banned] = NEG_INF
        nxt = logp.argmax(-1).masked_fill(done, cfg.eos_id)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == cfg.eos_id
        if bool(done.all()):
            break
    hyps = []
    for i, row in enumerate(tokens[:, 1:].tolist()):
        row = row[: max_lens[i]]
        hyps.append(row[: row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return hyps


class CTCPrefixScorer:
    """CTC prefix probabilities for one utterance (Watanabe et al. 2017, Algorithm 2).

    For a prefix g the state holds r_t^n(g), r_t^b(g): log-probabilities of the first t frames
    emitting g and ending in a non-blank / blank. The prefix score of h = g + c is
    psi(h) = log sum over all label sequences that start with h of P_ctc(sequence | x);
    for c = eos it is log P_ctc(g | x) (exactly g).
    """

    def __init__(self, logp: Tensor, blank_id: int, eos_id: int) -> None:
        """Args: logp [T, V] CTC log-probabilities of the valid frames (kept in float64: the
        frame recursion is evaluated in closed form with cumulative sums)."""
        self.x = logp.double()
        self.blank, self.eos = blank_id, eos_id

    def initial_state(self) -> Tensor:
        """State of the empty prefix: [T, 2] (r^n, r^b)."""
        r = torch.full((self.x.shape[0], 2), NEG_INF, dtype=self.x.dtype, device=self.x.device)
        r[:, 1] = torch.cumsum(self.x[:, self.blank], 0)
        return r

    def score(
        self, state: Tensor, last: Tensor, prefix_len: int, cand: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Prefix scores of each hypothesis extended by each candidate.

        Args:
            state: [N, T, 2] states of N prefixes g, all of length `prefix_len`.
            last: [N] last token of each g (-1 for the empty prefix).
            prefix_len: tokens in each g.
            cand: [N, C] candidate next tokens.

        Returns:
            psi: [N, C] log prefix scores of g + c (-inf for blank).
            new_state: [N, C, T, 2] states of g + c.
        """
        x = self.x
        t_max = x.shape[0]
        xs = x[:, cand]  # [T, N, C]
        r_n, r_b = state[..., 0].T, state[..., 1].T  # [T, N]
        # phi_t: probability of g up to frame t such that c can start a new label at t+1
        phi = torch.logaddexp(r_n, r_b)[:, :, None].expand_as(xs)
        phi = torch.where((cand == last[:, None])[None], r_b[:, :, None], phi)
        new = torch.full((*xs.shape, 2), NEG_INF, dtype=x.dtype, device=x.device)
        if prefix_len == 0:
            new[0, ..., 0] = xs[0]
        # h = g + c needs len(g) + 1 frames, so r(h) is -inf before frame len(g): start there.
        # The recursion over frames t >= start,
        #   r_n[t] = x_c[t] + logaddexp(r_n[t-1], phi[t-1])
        #   r_b[t] = x_blank[t] + logaddexp(r_n[t-1], r_b[t-1]),
        # is linear in probabilities, so each has a closed form with cumulative sums:
        #   r[t] = S[t] + logaddexp(r[start-1], logcumsumexp_{s=start..t}(in[s] - S[s-1]))
        # with S[t] = sum_{s=start..t} of the per-frame factor (S[start-1] = 0). In float64
        # (the scorer's dtype) the large offsets cancel to ~1e-12.
        start = max(1, prefix_len)
        if start < t_max:
            xc = xs[start:]  # [T', N, C]
            a = torch.cumsum(xc, 0)
            a_prev = torch.cat([torch.zeros_like(a[:1]), a[:-1]], 0)
            r_n0 = new[start - 1, ..., 0]
            acc = torch.logcumsumexp(phi[start - 1 : t_max - 1] - a_prev, 0)
            rn = a + torch.logaddexp(r_n0[None], acc)
            new[start:, ..., 0] = rn
            xb = x[start:, self.blank][:, None, None].expand_as(xc)
            b = torch.cumsum(xb, 0)
            b_prev = torch.cat([torch.zeros_like(b[:1]), b[:-1]], 0)
            rn_prev = torch.cat([r_n0[None], rn[:-1]], 0)
            acc_b = torch.logcumsumexp(rn_prev - b_prev, 0)
            new[start:, ..., 1] = b + torch.logaddexp(new[start - 1, ..., 1][None], acc_b)
        psi = torch.logsumexp(torch.cat([new[:1, ..., 0], phi[:-1] + xs[1:]], 0), 0)
        full = torch.logaddexp(r_n[-1], r_b[-1])  # [N]: exactly g
        psi = torch.where(cand == self.eos, full[:, None].expand_as(psi), psi)
        psi = psi.masked_fill(cand == self.blank, NEG_INF)
        return psi, new.permute(1, 2, 0, 3)


def beam_search(
    step_fn: Callable[[Tensor], Tensor],
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    max_len: int,
    length_norm: bool = True,
    banned: Sequence[int] = (),
    ctc_scorer: CTCPrefixScorer | None = None,
    ctc_weight: float = 0.0,
    pre_beam: int = 0,
    lm_fn: Callable[[Tensor], Tensor] | None = None,
    lm_weight: float = 0.0,
) -> list[int]:
    """Beam search for one utterance over any next-token scorer.

    Each step expands the live hypotheses, keeps the `beam_size` best (hypothesis, token) pairs;
    pairs ending in eos are finished and leave the beam. The search stops when no hypothesis is
    live, when `beam_size` hypotheses have finished, or after `max_len` tokens (the last step may
    only emit eos). The best finished hypothesis wins, by score / (tokens + 1) with
    length_norm, else by score.

    Args:
        step_fn: prefixes [N, i+1] (bos first) -> next-token log-probs [N, V].
        bos_id, eos_id: specials.
        beam_size: hypotheses kept per step.
        max_len: most tokens before eos.
        length_norm: see above.
        banned: tokens never emitted (blank; bos if it differs from eos).
        ctc_scorer: joint CTC/attention scoring when given with ctc_weight > 0 (on the CPU).
        ctc_weight: w in (1 - w) log p_att + w (psi(h) - psi(g)).
        pre_beam: tokens CTC-scored per hypothesis (the best by attention (+ LM) score);
            0 = all when ctc_weight == 1, else max(beam_size, 1.5 * beam_size).
        lm_fn: shallow fusion: prefixes -> external LM next-token log-probs [N, V]; adds
            lm_weight * log p_lm to every token's score (with or without CTC).
        lm_weight: beta above.

    Returns:
        The best hypothesis' tokens, without bos and eos.
    """
    use_ctc = ctc_scorer is not None and ctc_weight > 0
    use_lm = lm_fn is not None and lm_weight != 0.0
    hyps = torch.tensor([[bos_id]], dtype=torch.long)
    scores = torch.zeros(1)
    if use_ctc:
        ctc_state, ctc_psi = ctc_scorer.initial_state()[None], torch.zeros(1)
        last = torch.full((1,), -1, dtype=torch.long)
    ended: list[tuple[float, list[int]]] = []
    for i in range(max_len + 1):
        logp = step_fn(hyps).float().cpu()
        n, v = logp.shape
        logp[:, list(banned)] = NEG_INF
        if i == max_len:
            logp[:, torch.arange(v) != eos_id] = NEG_INF
        lm = lm_weight * lm_fn(hyps).float().cpu() if use_lm else None
        if use_ctc:
            k = pre_beam or (v if ctc_weight >= 1.0 else max(beam_size, int(1.5 * beam_size)))
            pre = (
                logp
                if lm is None
                else ((1 - ctc_weight) * logp + lm).masked_fill(logp == NEG_INF, NEG_INF)
            )
            cand = pre.topk(min(k, v), dim=1).indices  # [N, C]
            psi, new_state = ctc_scorer.score(ctc_state, last, i, cand)
            att = logp.gather(1, cand)
            joint_c = ((1 - ctc_weight) * att + ctc_weight * (psi - ctc_psi[:, None])).to(att.dtype)
            if lm is not None:
                joint_c = joint_c + lm.gather(1, cand)
            joint_c = joint_c.masked_fill(att == NEG_INF, NEG_INF)
            joint = torch.full_like(logp, NEG_INF).scatter(1, cand, joint_c)
            slot = torch.full((n, v), -1, dtype=torch.long).scatter(
                1, cand, torch.arange(cand.shape[1]).expand_as(cand).contiguous()
            )
        else:
            joint = logp if lm is None else logp + lm
        total = (scores[:, None] + joint).view(-1)
        n_ok = int(torch.isfinite(total).sum())
        if n_ok == 0:
            break
        top = total.topk(min(beam_size, n_ok))
        src, tok, keep_scores = [], [], []
        for s, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            h, c = divmod(idx, v)
            if c == eos_id:
                ended.append((s / (i + 1) if length_norm else s, hyps[h, 1:].tolist()))
            else:
                src.append(h)
                tok.append(c)
                keep_scores.append(s)
        if not src or len(ended) >= beam_size:
            break
        src_t, tok_t = torch.tensor(src), torch.tensor(tok)
        hyps = torch.cat([hyps[src_t], tok_t[:, None]], 1)
        scores = torch.tensor(keep_scores)
        if use_ctc:
            pos = slot[src_t, tok_t]
            ctc_state = new_state[src_t, pos]
            ctc_psi = psi[src_t, pos]
            last = tok_t
    if not ended:  # everything was banned: return the best live prefix
        return hyps[int(scores.argmax()), 1:].tolist()
    return max(ended, key=lambda e: e[0])[1]


@torch.no_grad()
def attention_beam_search(
    model: Student,
    out: StudentOutput,
    beam_size: int = 4,
    ctc_weight: float = 0.0,
    length_norm: bool = True,
    max_len_ratio: float = 1.0,
    pre_beam: int = 0,
    lm: LMFusion | None = None,
    lm_weight: float = 0.0,
) -> list[list[int]]:
    """Beam search with the attention decoder, one utterance at a time (hypotheses batched).

    The decoder keeps every layer's keys/values (`AttentionDecoder.incremental`): each step
    computes only the newest position, and the encoder output is projected once per utterance.

    Args:
        model: a Student with an attention decoder.
        out: `model(feats, feat_lens)`.
        beam_size, ctc_weight, length_norm, pre_beam: see `beam_search`.
        max_len_ratio: at most this many tokens per encoder frame.
        lm, lm_weight: shallow fusion with an external LM in the student's units.

    Returns:
        B token id lists.
    """
    assert model.decoder is not None, "the model has no attention decoder"
    cfg = model.cfg
    hyps = []
    for b, max_len in enumerate(_max_lens(out, max_len_ratio)):
        t = int(out.enc_lens[b])
        mem = out.enc_out[b : b + 1, :t]
        mem_mask = out.enc_mask[b : b + 1, :t]

        inc = model.decoder.incremental(mem, mem_mask)

        def step(prefixes: Tensor, inc=inc, device=mem.device) -> Tensor:
            return inc.step(prefixes.to(device)).float().log_softmax(-1)

        scorer = None
        if ctc_weight > 0:
            # on the CPU: small float64 tensors, a few dozen ops per step (closed form over frames)
            logp = out.ctc_logits[b, :t].float().log_softmax(-1).cpu()
            scorer = CTCPrefixScorer(logp, cfg.blank_id, cfg.eos_id)
        hyps.append(
            beam_search(
                step,
                bos_id=cfg.bos_id,
                eos_id=cfg.eos_id,
                beam_size=beam_size,
                max_len=max_len,
                length_norm=length_norm,
                banned=_banned(model),
                ctc_scorer=scorer,
                ctc_weight=ctc_weight,
                pre_beam=pre_beam,
                lm_fn=lm.scorer(cfg.eos_id).step if lm is not None else None,
                lm_weight=lm_weight,
            )
        )
    return hyps


@torch.no_grad()
def cif_greedy(model: Student, out: StudentOutput) -> list[list[int]]:
    """Greedy decoding of the CIF decoder: one token per CIF output (batched).

    The autoregressive decoder runs one step per CIF position, feeding back its argmax; the
    non-autoregressive one runs once.

    Args:
        model: a Student with use_cif.
        out: `model(feats, feat_lens)` (inference path: unscaled CIF, tail handling).

    Returns:
        B token id lists of length cif_lens[b].
    """
    assert model.cif_decoder is not None, "the model has no CIF decoder"
    cif_out, cif_mask, lens = out.cif_out, out.cif_mask, out.cif_lens.tolist()
    b, u = cif_mask.shape
    if u == 0:
        return [[] for _ in range(b)]
    if not model.cfg.cif_autoregressive:
        logits, _ = model.cif_decoder(cif_out, cif_mask)
        best = logits.argmax(-1).tolist()
    else:
        prev = torch.full((b, 1), model.cfg.bos_id, dtype=torch.long, device=cif_out.device)
        for i in range(u):
            logits, _ = model.cif_decoder(cif_out[:, : i + 1], cif_mask[:, : i + 1], prev)
            prev = torch.cat([prev, logits[:, -1].argmax(-1, keepdim=True)], 1)
        best = prev[:, 1:].tolist()
    return [row[:n] for row, n in zip(best, lens, strict=True)]
