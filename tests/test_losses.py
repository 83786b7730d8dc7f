"""Distillation losses against dense references built from full distributions.

Every reference here builds the whole teacher distribution over the vocabulary (which the
library never does) and computes the loss the obvious way, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache import losses

torch.set_num_threads(1)
DT = torch.float64
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- fixtures


def make_cache(teacher_logits: torch.Tensor, k: int, build_temperature: float = 1.0):
    """What the teacher stage writes: top-k log-probs at T_b, their ids, the tail log-mass."""
    lp = torch.log_softmax(teacher_logits / build_temperature, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    if k == lp.shape[-1]:
        tail = torch.full(lp.shape[:-1], float("-inf"), dtype=lp.dtype)
    else:
        tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, vals, tail


def make_mask(lengths, L):
    return torch.arange(L).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def case(B=3, L=5, V=11, k=4, seed=0, T_b=1.0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, V, generator=g, dtype=DT) * 2.0
    student = torch.randn(B, L, V, generator=g, dtype=DT) * 2.0
    targets = torch.randint(0, V, (B, L), generator=g)
    ids, vals, tail = make_cache(teacher, k, T_b)
    mask = make_mask(lengths or [L, L - 2, 1][:B], L)
    # padding holds garbage the losses must never look at
    ids = ids.masked_fill(~mask.unsqueeze(-1), -7)
    vals = vals.masked_fill(~mask.unsqueeze(-1), float("nan"))
    tail = tail.masked_fill(~mask, float("nan"))
    targets = targets.masked_fill(~mask, -100)
    return dict(
        teacher=teacher, student=student, targets=targets, ids=ids, vals=vals, tail=tail, mask=mask
    )


def dense_sparse_ce(student, ids, vals, tail, mask, tail_mode, Ts=1.0, kl=False):
    """Reference: dense student probs; rest bin = explicit sum of student probs outside top-k."""
    B, L, V = student.shape
    q = torch.softmax(student / Ts, dim=-1)
    out = torch.zeros(B, L, dtype=DT)
    for b in range(B):
        for t in range(L):
            if not mask[b, t]:
                continue
            p = torch.zeros(V, dtype=DT)
            p[ids[b, t]] = vals[b, t].exp()
            in_top = torch.zeros(V, dtype=torch.bool)
            in_top[ids[b, t]] = True
            if tail_mode == "renormalize":
                p = p / p.sum()
                buckets_p, buckets_q = p[in_top], q[b, t][in_top]
            else:
                p_rest = tail[b, t].exp()
                q_rest = q[b, t][~in_top].sum()
                buckets_p = torch.cat([p[in_top], p_rest.reshape(1)])
                buckets_q = torch.cat([q[b, t][in_top], q_rest.reshape(1)])
                total = buckets_p.sum()
                buckets_p = buckets_p / total
            nz = buckets_p > 0
            if kl:
                out[b, t] = (buckets_p[nz] * (buckets_p[nz].log() - buckets_q[nz].log())).sum()
            else:
                out[b, t] = -(buckets_p[nz] * buckets_q[nz].log()).sum()
    return out


def masked_mean(per_pos, mask):
    return per_pos[mask].mean()


# ---------------------------------------------------------------------------- core sparse CE / KL


@pytest.mark.parametrize("tail", ["rest_bin", "renormalize"])
@pytest.mark.parametrize("k", [4, 11])
@pytest.mark.parametrize("Ts", [1.0, 2.0])
@pytest.mark.parametrize("kl", [False, True])
def test_sparse_ce_and_kl_match_dense_reference(tail, k, Ts, kl):
    c = case(k=k)
    fn = losses.sparse_kd_kl if kl else losses.sparse_kd_ce
    got = fn(
        c["student"],
        c["ids"],
        c["vals"],
        c["tail"],
        c["mask"],
        tail=tail,
        student_temperature=Ts,
        reduction="none",
    )
    ref = dense_sparse_ce(c["student"], c["ids"], c["vals"], c["tail"], c["mask"], tail, Ts, kl=kl)
    torch.testing.assert_close(got, ref, **TOL)
    assert (got[~c["mask"]] == 0).all()
    mean = fn(
        c["student"], c["ids"], c["vals"], c["tail"], c["mask"], tail=tail, student_temperature=Ts
    )
    torch.testing.assert_close(mean, masked_mean(ref, c["mask"]), **TOL)


@pytest.mark.parametrize("tail", ["rest_bin", "renormalize"])
def test_k_equals_vocab_is_the_dense_cross_entropy_float32(tail):
    c = case(k=11)
    student = c["student"].float().requires_grad_(True)
    vals32, tail32 = c["vals"].float(), c["tail"].float()
    assert torch.isneginf(tail32[c["mask"]]).all()
    loss = losses.sparse_kd_ce(student, c["ids"], vals32, tail32, c["mask"], tail=tail)
    p_full = torch.softmax(c["teacher"], dim=-1).float()
    ref = F.cross_entropy(student.detach()[c["mask"]], p_full[c["mask"]])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    kl = losses.sparse_kd_kl(student, c["ids"], vals32, tail32, c["mask"], tail=tail)
    ref_kl = F.kl_div(
        torch.log_softmax(student.detach()[c["mask"]], -1), p_full[c["mask"]], reduction="batchmean"
    )
    torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-5)


def test_zero_tail_mass_with_k_below_vocab_gives_no_nan():
    # teacher puts exactly zero mass outside the top k (e.g. float underflow): tail = -inf, k < V
    c = case(k=4)
    tail = torch.where(c["mask"], torch.tensor(float("-inf"), dtype=DT), c["tail"])
    vals = torch.log_softmax(c["vals"].nan_to_num(0.0), dim=-1)
    student = c["student"].clone().requires_grad_(True)
    for fn in (losses.sparse_kd_ce, losses.sparse_kd_kl):
        loss = fn(student, c["ids"], vals, tail, c["mask"])
        (g,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("tail", ["rest_bin", "renormalize"])
@pytest.mark.parametrize("k", [3, 6])
def test_gradcheck_sparse_ce_and_kl(tail, k):
    c = case(B=2, L=3, V=6, k=k, lengths=[3, 2])
    student = c["student"].clone().requires_grad_(True)
    for fn in (losses.sparse_kd_ce, losses.sparse_kd_kl):
        assert torch.autograd.gradcheck(
            lambda s, fn=fn: fn(
                s, c["ids"], c["vals"], c["tail"], c["mask"], tail=tail, student_temperature=1.5
            ),
            (student,),
        )


@pytest.mark.parametrize("garbage", [1e30, float("nan"), float("inf"), float("-inf")])
def test_padding_content_changes_neither_loss_nor_gradients(garbage):
    c = case(k=4)
    mask = c["mask"]
    y = c["targets"]

    def run(student, ids, vals, tail, targets):
        s = student.clone().requires_grad_(True)
        out = []
        for loss in (
            losses.sparse_kd_ce(s, ids, vals, tail, mask),
            losses.lst_loss(s, targets, ids, vals, tail, mask, label_smoothing=0.1),
            losses.hard_ce(s, targets, mask, label_smoothing=0.1),
        ):
            out.append((loss, *torch.autograd.grad(loss, s)))
        return out

    base = run(c["student"], c["ids"], c["vals"], c["tail"], y)
    pad = ~mask
    student2 = c["student"].masked_fill(pad.unsqueeze(-1), garbage)
    ids2 = c["ids"].masked_fill(pad.unsqueeze(-1), 10**6)
    vals2 = c["vals"].masked_fill(pad.unsqueeze(-1), float("inf"))
    tail2 = c["tail"].masked_fill(pad, 3.0)
    for (loss2, g2), (base_loss, base_g) in zip(
        run(student2, ids2, vals2, tail2, y.masked_fill(pad, 10**6)), base, strict=True
    ):
        torch.testing.assert_close(loss2, base_loss, rtol=0, atol=0)
        torch.testing.assert_close(g2, base_g, rtol=0, atol=0)
        assert (g2[pad] == 0).all()


def test_float16_cache_inputs_and_student_half_precision_upcast():
    c = case(k=4)
    loss16 = losses.sparse_kd_ce(
        c["student"].float(),
        c["ids"].to(torch.int32),
        c["vals"].half(),
        c["tail"].float(),
        c["mask"],
    )
    loss64 = losses.sparse_kd_ce(c["student"], c["ids"], c["vals"], c["tail"], c["mask"])
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16.double(), loss64, rtol=2e-3, atol=2e-3)


def test_reductions_and_empty_batch():
    c = case(k=4)
    args = (c["student"], c["ids"], c["vals"], c["tail"], c["mask"])
    none = losses.sparse_kd_ce(*args, reduction="none")
    torch.testing.assert_close(losses.sparse_kd_ce(*args, reduction="sum"), none.sum())
    per_utt = none.sum(1) / c["mask"].sum(1)
    torch.testing.assert_close(
        losses.sparse_kd_ce(*args, reduction="utterance_mean"), per_utt.mean()
    )
    empty = torch.zeros_like(c["mask"])
    student = c["student"].clone().requires_grad_(True)
    loss = losses.sparse_kd_ce(student, c["ids"], c["vals"], c["tail"], empty)
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()
    with pytest.raises(ValueError, match="reduction"):
        losses.sparse_kd_ce(*args, reduction="avg")


def test_argument_errors_are_explicit():
    c = case(k=4)
    args = (c["student"], c["ids"], c["vals"], c["tail"], c["mask"])
    with pytest.raises(ValueError, match="build_temperature"):
        losses.sparse_kd_ce(*args, teacher_temperature=2.0)
    with pytest.raises(ValueError, match="k == 0"):
        losses.sparse_kd_ce(
            c["student"], c["ids"][..., :0], c["vals"][..., :0], c["tail"], c["mask"]
        )
    with pytest.raises(ValueError, match="tail"):
        losses.sparse_kd_ce(*args, tail="drop")
    with pytest.raises(ValueError, match=r"k = 9"):
        losses.sparse_kd_ce(*args, k=9)
    with pytest.raises(ValueError, match="mask"):
        losses.sparse_kd_ce(c["student"], c["ids"], c["vals"], c["tail"], c["mask"].long())


# ---------------------------------------------------------------------------- temperature, k subsets


@pytest.mark.parametrize("T", [0.5, 3.0])
def test_retempering_renormalized_top_k_is_exact(T):
    c = case(k=4, T_b=1.0)
    lp, rest = losses.teacher_log_probs(
        c["vals"][c["mask"]],
        c["tail"][c["mask"]],
        tail="renormalize",
        temperature=T,
        build_temperature=1.0,
    )
    assert rest is None
    dense = torch.softmax(c["teacher"][c["mask"]] / T, dim=-1)
    top = dense.gather(-1, c["ids"][c["mask"]])
    torch.testing.assert_close(lp.exp(), top / top.sum(-1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_retempering_rest_bin_exact_when_k_is_vocab_and_bias_sign_otherwise():
    c = case(k=11, T_b=2.0)
    lp, rest = losses.teacher_log_probs(
        c["vals"][c["mask"]], c["tail"][c["mask"]], temperature=5.0, build_temperature=2.0
    )
    torch.testing.assert_close(
        lp.exp(), torch.softmax(c["teacher"][c["mask"]] / 5.0, -1).gather(-1, c["ids"][c["mask"]])
    )
    assert (rest.exp() == 0).all()
    c = case(k=3, T_b=1.0)
    for T, sign in (
        (4.0, -1),
        (0.5, +1),
    ):  # softening under-weights the rest bucket, sharpening over-weights
        _, rest = losses.teacher_log_probs(
            c["vals"][c["mask"]], c["tail"][c["mask"]], temperature=T, build_temperature=1.0
        )
        dense = torch.softmax(c["teacher"][c["mask"]] / T, dim=-1)
        true_rest = 1 - dense.gather(-1, c["ids"][c["mask"]]).sum(-1)
        assert (sign * (rest.exp() - true_rest) >= -1e-12).all()


def test_k_subset_equals_a_cache_built_with_smaller_k():
    c = case(k=6)
    small = make_cache(c["teacher"], 3)
    for tail in ("rest_bin", "renormalize"):
        a = losses.sparse_kd_ce(
            c["student"], c["ids"], c["vals"], c["tail"], c["mask"], k=3, tail=tail
        )
        b = losses.sparse_kd_ce(c["student"], small[0], small[1], small[2], c["mask"], tail=tail)
        torch.testing.assert_close(a, b, **TOL)


def test_stored_temperature_equal_to_requested_is_a_no_op():
    c = case(k=4)
    args = (c["student"], c["ids"], c["vals"], c["tail"], c["mask"])
    a = losses.sparse_kd_ce(*args)
    b = losses.sparse_kd_ce(*args, teacher_temperature=2.0, build_temperature=2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- hard CE and the papers' losses


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hard_ce_matches_torch_cross_entropy(eps):
    c = case()
    got = losses.hard_ce(c["student"], c["targets"], c["mask"], label_smoothing=eps)
    ref = F.cross_entropy(c["student"][c["mask"]], c["targets"][c["mask"]], label_smoothing=eps)
    torch.testing.assert_close(got, ref, **TOL)
    with pytest.raises(ValueError, match="targets"):
        losses.hard_ce(c["student"], c["targets"].masked_fill(c["mask"], 99), c["mask"])


@pytest.mark.parametrize("tail", ["rest_bin", "renormalize"])
def test_lst_matches_dense_reference(tail):
    c = case(k=4, T_b=5.0)
    w, eps = 0.1, 0.1
    got = losses.lst_loss(
        c["student"],
        c["targets"],
        c["ids"],
        c["vals"],
        c["tail"],
        c["mask"],
        weight=w,
        label_smoothing=eps,
        tail=tail,
    )
    soft = dense_sparse_ce(c["student"], c["ids"], c["vals"], c["tail"], c["mask"], tail)
    hard = F.cross_entropy(
        c["student"][c["mask"]], c["targets"][c["mask"]], label_smoothing=eps, reduction="none"
    )
    torch.testing.assert_close(got, ((1 - w) * hard + w * soft[c["mask"]]).mean(), **TOL)


def test_lst_is_cross_entropy_with_the_interpolated_target_and_retempers_from_t_b():
    c = case(k=11, T_b=1.0)  # k == V: the teacher is exact at any temperature
    w = 0.3
    got = losses.lst_loss(
        c["student"],
        c["targets"],
        c["ids"],
        c["vals"],
        c["tail"],
        c["mask"],
        weight=w,
        temperature=5.0,
        build_temperature=1.0,
    )
    m = c["mask"]
    target = (1 - w) * F.one_hot(c["targets"][m], 11).to(DT) + w * torch.softmax(
        c["teacher"][m] / 5.0, -1
    )
    torch.testing.assert_close(got, F.cross_entropy(c["student"][m], target), **TOL)


@pytest.mark.parametrize("t2", [False, True])
def test_multitask_kd_matches_dense_reference(t2):
    c = case(k=11, T_b=1.0)
    kd_logits = torch.randn(3, 5, 11, dtype=DT, generator=torch.Generator().manual_seed(5))
    lam, T = 0.4, 2.0
    got = losses.multitask_kd_loss(
        c["student"],
        kd_logits,
        c["targets"],
        c["ids"],
        c["vals"],
        c["tail"],
        c["mask"],
        lam=lam,
        temperature=T,
        build_temperature=1.0,
        t2_scaling=t2,
    )
    m = c["mask"]
    sl = F.cross_entropy(c["student"][m], c["targets"][m], reduction="none")
    p = torch.softmax(c["teacher"][m] / T, -1)
    kl = F.kl_div(torch.log_softmax(kd_logits[m] / T, -1), p, reduction="none").sum(-1)
    ref = (lam * sl + (1 - lam) * (T * T if t2 else 1.0) * kl).mean()
    torch.testing.assert_close(got, ref, **TOL)


def test_hierarchical_kd_is_a_weighted_sum():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0)
    torch.testing.assert_close(losses.hierarchical_kd_loss([(0.5, a), (2.0, b)]), torch.tensor(7.0))
    with pytest.raises(ValueError):
        losses.hierarchical_kd_loss([])
    with pytest.raises(ValueError):
        losses.hierarchical_kd_loss([(-1.0, a)])
    with pytest.raises(ValueError):
        losses.hierarchical_kd_loss([(1.0, torch.ones(2))])


@pytest.mark.parametrize("k", [None, 2])
def test_essence_kd_matches_dense_reference(k):
    c = case(k=5)
    alpha = 0.3
    got = losses.essence_kd_loss(
        c["student"], c["targets"], c["ids"], c["vals"], c["tail"], c["mask"], alpha=alpha, k=k
    )
    kk = 5 if k is None else k
    ids, vals, tail = make_cache(c["teacher"], kk)
    soft = dense_sparse_ce(c["student"], ids, vals, tail, c["mask"], "renormalize")
    m = c["mask"]
    hard = F.cross_entropy(c["student"][m], c["targets"][m], reduction="none")
    torch.testing.assert_close(got, (alpha * hard + (1 - alpha) * soft[m]).mean(), **TOL)


@pytest.mark.parametrize("mix_with", ["label", "uniform"])
def test_interaed_matches_dense_mixed_target(mix_with):
    B, L, V = 2, 6, 13
    c = case(B=B, L=L, V=V, k=10, T_b=1.0, lengths=[6, 4])
    g = torch.Generator().manual_seed(3)
    aux = [torch.randn(B, L, V, dtype=DT, generator=g) for _ in range(2)]
    beta, mix, T, k = 0.7, 0.9, 3.0, 8
    got = losses.interaed_kd_loss(
        aux,
        c["targets"],
        c["ids"],
        c["vals"],
        c["tail"],
        c["mask"],
        k=k,
        temperature=T,
        build_temperature=1.0,
        mix=mix,
        mix_with=mix_with,
        beta=beta,
    )
    m = c["mask"]
    dense_T = torch.softmax(c["teacher"][m] / T, -1)  # the LM's distribution at T = 3
    top = dense_T.topk(k, -1)
    soft = torch.zeros_like(dense_T).scatter(
        -1, top.indices, top.values / top.values.sum(-1, keepdim=True)
    )
    other = (
        F.one_hot(c["targets"][m], V).to(DT)
        if mix_with == "label"
        else torch.full_like(soft, 1.0 / V)
    )
    target = mix * soft + (1 - mix) * other
    ref = sum(F.cross_entropy(a[m], target, reduction="none") for a in aux)
    torch.testing.assert_close(got, (beta * ref).mean(), **TOL)
    with pytest.raises(ValueError):
        losses.interaed_kd_loss(
            aux, c["targets"], c["ids"][..., :4], c["vals"][..., :4], c["tail"], c["mask"], k=8
        )


# ---------------------------------------------------------------------------- HKD: ACD / LRD / quantity


def naive_infonce(student, teacher, mask, tau, neg_idx):
    """Loop over utterances and tokens, as eq. (2) of paper 004 is written."""
    flat_s = [
        student[b, t] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]
    ]
    flat_e = [
        teacher[b, t] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]
    ]
    per_utt, n = [], 0
    for b in range(mask.shape[0]):
        terms = []
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            c = flat_s[n] / flat_s[n].norm()
            e = flat_e[n] / flat_e[n].norm()
            pos = math.exp(float(c @ e) / tau)
            den = pos + sum(
                math.exp(float(c @ (flat_e[j] / flat_e[j].norm())) / tau)
                for j in neg_idx[n].tolist()
            )
            terms.append(-math.log(pos / den))
            n += 1
        if terms:
            per_utt.append(sum(terms) / len(terms))
    return sum(per_utt) / len(per_utt)


def hidden_case(B=3, L=6, D=8, lengths=(6, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, D, generator=g, dtype=DT)
    e = s + 0.5 * torch.randn(B, L, D, generator=g, dtype=DT)
    return s, e, make_mask(list(lengths), L)


def test_infonce_matches_naive_loop():
    s, e, mask = hidden_case()
    n = int(mask.sum())
    neg = losses.sample_negative_indices(n, 5, generator=torch.Generator().manual_seed(1))
    got = losses.acd_infonce_loss(s, e, mask, tau=0.5, negative_indices=neg)
    assert abs(got.item() - naive_infonce(s, e, mask, 0.5, neg)) < 1e-9
    # the sampled path with the same generator draws the same negatives
    got2 = losses.acd_infonce_loss(
        s, e, mask, tau=0.5, num_negatives=5, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(got, got2, rtol=0, atol=0)


def test_negative_sampling_excludes_self_is_distinct_and_shrinks():
    neg = losses.sample_negative_indices(
        50, 20, generator=torch.Generator().manual_seed(0), chunk_rows=7
    )
    assert neg.shape == (50, 20)
    assert not (neg == torch.arange(50).unsqueeze(1)).any()
    assert all(len(set(r.tolist())) == 20 for r in neg)
    assert neg.min() >= 0 and neg.max() < 50
    assert losses.sample_negative_indices(4, 700).shape == (4, 3)
    assert losses.sample_negative_indices(1, 700).shape == (1, 0)
    assert losses.sample_negative_indices(0, 700).shape == (0, 0)
    # every other token is drawn about equally often
    counts = torch.bincount(
        losses.sample_negative_indices(
            200, 10, generator=torch.Generator().manual_seed(2)
        ).flatten(),
        minlength=200,
    )
    assert counts.min() > 0 and counts.float().std() / counts.float().mean() < 0.5


def test_infonce_fast_negative_logits_match_plain():
    g = torch.Generator().manual_seed(4)
    c, e = torch.randn(37, 5, generator=g, dtype=DT), torch.randn(37, 5, generator=g, dtype=DT)
    neg = losses.sample_negative_indices(37, 9, generator=g)
    torch.testing.assert_close(
        losses._negative_logits(c, e, neg, chunk_rows=8), losses._negative_logits_plain(c, e, neg)
    )


def test_infonce_edge_cases_padding_and_gradients():
    s, e, mask = hidden_case()
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert losses.acd_infonce_loss(s, e, one).item() == 0.0
    # padding content is irrelevant
    neg = losses.sample_negative_indices(
        int(mask.sum()), 4, generator=torch.Generator().manual_seed(0)
    )
    s2 = s.masked_fill(~mask.unsqueeze(-1), float("nan"))
    e2 = e.masked_fill(~mask.unsqueeze(-1), 1e9)
    a = losses.acd_infonce_loss(s, e, mask, negative_indices=neg)
    b = losses.acd_infonce_loss(s2, e2, mask, negative_indices=neg)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # gradients: finite, also at tau = 0.02 with near-duplicate vectors
    s3 = s.clone().requires_grad_(True)
    loss = losses.acd_infonce_loss(s3, s.detach(), mask, tau=0.02, num_negatives=700)
    loss.backward()
    assert torch.isfinite(s3.grad).all() and torch.isfinite(loss)
    small = s[:, :2, :3].clone().requires_grad_(True)
    m2 = make_mask([2, 1, 2], 2)
    n2 = losses.sample_negative_indices(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(
        lambda x: losses.acd_infonce_loss(x, e[:, :2, :3], m2, tau=0.3, negative_indices=n2),
        (small,),
    )


def test_mse_cosine_and_lrd_match_loops():
    s, e, mask = hidden_case()
    per_utt_mse, per_utt_cos = [], []
    for b in range(3):
        n = int(mask[b].sum())
        per_utt_mse.append(sum(((s[b, t] - e[b, t]) ** 2).sum() for t in range(n)) / n)
        per_utt_cos.append(
            sum(1 - F.cosine_similarity(s[b, t], e[b, t], dim=0) for t in range(n)) / n
        )
    ref_mse = 0.01 * sum(per_utt_mse) / 3
    ref_cos = 10.0 * sum(per_utt_cos) / 3
    torch.testing.assert_close(losses.acd_mse_loss(s, e, mask), ref_mse, **TOL)
    torch.testing.assert_close(losses.lrd_loss(s, e, mask), ref_mse, **TOL)
    torch.testing.assert_close(losses.acd_cosine_loss(s, e, mask), ref_cos, **TOL)
    torch.testing.assert_close(losses.lrd_loss(s, e, mask, kind="cosine"), ref_cos, **TOL)
    torch.testing.assert_close(losses.lrd_loss(s, e, mask, scale=1.0), ref_mse / 0.01, **TOL)
    with pytest.raises(ValueError, match="differ"):
        losses.lrd_loss(s, e[..., :4], mask)
    with pytest.raises(ValueError, match="kind"):
        losses.lrd_loss(s, e, mask, kind="l1")


def test_cif_quantity_loss():
    a = torch.tensor([3.5, 7.0, 1.0], requires_grad=True)
    n = torch.tensor([4, 7, 3])
    torch.testing.assert_close(losses.cif_quantity_loss(a, n), torch.tensor(2.5 / 3))
    torch.testing.assert_close(losses.cif_quantity_loss(a, n, reduction="sum"), torch.tensor(2.5))
    torch.testing.assert_close(
        losses.cif_quantity_loss(a, n, reduction="none"), torch.tensor([0.5, 0.0, 2.0])
    )
    losses.cif_quantity_loss(a, n).backward()
    torch.testing.assert_close(a.grad, torch.tensor([-1.0, 0.0, -1.0]) / 3)
    # per target token (14 in the batch): the gradient per weight shrinks with the units
    b = a.detach().clone().requires_grad_(True)
    q = losses.cif_quantity_loss(b, n, reduction="token_mean")
    torch.testing.assert_close(q, torch.tensor(2.5 / 14))
    q.backward()
    torch.testing.assert_close(b.grad, torch.tensor([-1.0, 0.0, -1.0]) / 14)
    with pytest.raises(ValueError, match="token_mean"):
        losses.cif_quantity_loss(a, n, reduction="tokens")


# ---------------------------------------------------------------------------- properties


@st.composite
def sparse_cases(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 4))
    V = draw(st.integers(2, 9))
    k = draw(st.integers(1, V))
    seed = draw(st.integers(0, 10_000))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    lengths = [draw(st.integers(0, L)) for _ in range(B)]
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, L, V, generator=g, dtype=DT) * scale
    student = torch.randn(B, L, V, generator=g, dtype=DT) * scale
    ids, vals, tail = make_cache(teacher, k)
    return student, ids, vals, tail, make_mask(lengths, L), g


@settings(max_examples=40, deadline=None)
@given(
    sparse_cases(), st.sampled_from(["rest_bin", "renormalize"]), st.sampled_from([0.5, 1.0, 3.0])
)
def test_property_kl_nonnegative_and_ce_at_least_kl(c, tail, Ts):
    student, ids, vals, tail_lm, mask, _ = c
    kl = losses.sparse_kd_kl(
        student, ids, vals, tail_lm, mask, tail=tail, student_temperature=Ts, reduction="none"
    )
    ce = losses.sparse_kd_ce(
        student, ids, vals, tail_lm, mask, tail=tail, student_temperature=Ts, reduction="none"
    )
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
    assert (kl >= -1e-9).all()
    assert (ce - kl >= -1e-9).all()  # the difference is the teacher entropy
    # KL of the teacher with itself is zero: a student whose logits are the teacher's log-probs
    if ids.shape[-1] == student.shape[-1]:
        self_logits = torch.zeros_like(student).scatter(-1, ids, vals)
        kl0 = losses.sparse_kd_kl(
            self_logits, ids, vals, tail_lm, mask, tail=tail, reduction="none"
        )
        assert kl0.abs().max() < 1e-9


@settings(max_examples=30, deadline=None)
@given(sparse_cases(), st.sampled_from(["rest_bin", "renormalize"]))
def test_property_loss_invariant_to_padding_content(c, tail):
    student, ids, vals, tail_lm, mask, g = c
    pad = ~mask
    a = losses.sparse_kd_ce(student, ids, vals, tail_lm, mask, tail=tail)
    student2 = torch.where(
        pad.unsqueeze(-1), torch.randn(student.shape, generator=g, dtype=DT) * 1e6, student
    )
    ids2 = torch.where(pad.unsqueeze(-1), torch.full_like(ids, -3), ids)
    vals2 = torch.where(pad.unsqueeze(-1), torch.full_like(vals, float("nan")), vals)
    tail2 = torch.where(pad, torch.full_like(tail_lm, float("inf")), tail_lm)
    b = losses.sparse_kd_ce(student2, ids2, vals2, tail2, mask, tail=tail)
    assert torch.equal(a, b)


def test_teacher_mask_positions_without_a_teacher_target():
    """An <eos>-like last position has a label but no teacher target; its cache slot is garbage."""
    c = case(k=4, lengths=[5, 3, 2])
    m = c["mask"]
    lengths = m.sum(1)
    last = F.one_hot(lengths - 1, m.shape[1]).bool() & m
    tmask = m & ~last
    ids = c["ids"].masked_fill(last.unsqueeze(-1), 10**6)
    vals = c["vals"].masked_fill(last.unsqueeze(-1), float("nan"))
    tail = c["tail"].masked_fill(last, float("nan"))
    s, y = c["student"], c["targets"]
    hard = torch.zeros_like(s[..., 0])
    hard[m] = F.cross_entropy(s[m], y[m], reduction="none")
    full = dict(reduction="none")
    with_t = dict(reduction="none", teacher_mask=tmask)

    lst_ref = losses.lst_loss(s, y, c["ids"], c["vals"], c["tail"], m, **full)
    lst = losses.lst_loss(s, y, ids, vals, tail, m, **with_t)
    torch.testing.assert_close(lst[tmask], lst_ref[tmask], rtol=0, atol=0)
    torch.testing.assert_close(lst[last], hard[last], **TOL)  # the one-hot target, full weight

    ess_ref = losses.essence_kd_loss(s, y, c["ids"], c["vals"], c["tail"], m, alpha=0.3, **full)
    ess = losses.essence_kd_loss(s, y, ids, vals, tail, m, alpha=0.3, **with_t)
    torch.testing.assert_close(ess[tmask], ess_ref[tmask], rtol=0, atol=0)
    torch.testing.assert_close(ess[last], 0.3 * hard[last], **TOL)  # multi-task: CE term only

    kd_logits = s.flip(-1)
    mt_ref = losses.multitask_kd_loss(
        s, kd_logits, y, c["ids"], c["vals"], c["tail"], m, lam=0.4, **full
    )
    mt = losses.multitask_kd_loss(s, kd_logits, y, ids, vals, tail, m, lam=0.4, **with_t)
    torch.testing.assert_close(mt[tmask], mt_ref[tmask], rtol=0, atol=0)
    torch.testing.assert_close(mt[last], 0.4 * hard[last], **TOL)

    for mix_with in ("label", "uniform"):
        ia_ref = losses.interaed_kd_loss(
            [s], y, c["ids"], c["vals"], c["tail"], m, k=3, mix_with=mix_with, **full
        )
        ia = losses.interaed_kd_loss([s], y, ids, vals, tail, m, k=3, mix_with=mix_with, **with_t)
        torch.testing.assert_close(ia[tmask], ia_ref[tmask], rtol=0, atol=0)
        torch.testing.assert_close(ia[last], hard[last], **TOL)

    # gradients stay finite although the teacher slots hold NaN / out-of-range ids
    s2 = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(losses.lst_loss(s2, y, ids, vals, tail, m, teacher_mask=tmask), s2)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="teacher_mask"):
        losses.lst_loss(s, y, ids, vals, tail, m, teacher_mask=tmask.long())


def test_student_logit_at_minus_inf_where_the_teacher_has_no_mass():
    c = case(k=11)
    teacher = c["teacher"].clone()
    teacher[..., 0] = float("-inf")  # e.g. a blank the LM never predicts
    ids, vals, tail = make_cache(teacher, 11)
    student = c["student"].clone()
    student[..., 0] = float("-inf")  # and the student suppresses it
    student.requires_grad_(True)
    for fn in (losses.sparse_kd_ce, losses.sparse_kd_kl):
        for tail_mode in ("rest_bin", "renormalize"):
            loss = fn(student, ids, vals, tail, c["mask"], tail=tail_mode)
            (g,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            # reference: drop id 0 (the last column: its teacher log-prob is -inf) from both sides
            assert (ids[c["mask"]][:, -1] == 0).all()
            ref = dense_sparse_ce(
                c["student"][..., 1:],
                ids[..., :-1] - 1,
                vals[..., :-1],
                tail,
                c["mask"],
                tail_mode,
                kl=fn is losses.sparse_kd_kl,
            )
            assert abs(loss.item() - masked_mean(ref, c["mask"]).item()) < 1e-9


def test_infonce_is_computed_in_float32_under_autocast():
    s, _, mask = hidden_case(D=64)
    e = torch.randn(
        s.shape, generator=torch.Generator().manual_seed(9)
    )  # unrelated: loss well above 0
    s = s.float()
    neg = losses.sample_negative_indices(
        int(mask.sum()), 8, generator=torch.Generator().manual_seed(0)
    )
    ref = losses.acd_infonce_loss(s, e, mask, negative_indices=neg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.acd_infonce_loss(s, e, mask, negative_indices=neg)
    assert ref > 1.0 and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- fused rest bin


def dense_student_reference(logits64, ids, temperature):
    """float64, the obvious way: log-softmax, gather, and the rest as a masked logsumexp."""
    z = logits64 / temperature
    lse = torch.logsumexp(z, dim=-1)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True)
    lse_rest = torch.logsumexp(z.masked_fill(in_top, float("-inf")), dim=-1)
    return z.gather(-1, ids) - lse.unsqueeze(-1), lse_rest - lse, lse


def student_rows(N=12, V=50, k=5, seed=0, T=1.0):
    """Random rows, plus peaked rows: top-k mass > 1 - 1e-7 (where log1p(-sum) cancels) and
    beyond float32 range (rest < 1e-40 of the max: the rows the fused pass redoes exactly),
    and a row of tied logits."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=DT) * 2.0 * T  # z / T: the same rows at any T
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    for row, boost in ((1, 28.0), (2, 22.0), (3, 120.0)):  # rest ~ 1e-10, 1e-8, 1e-51 at T
        z[row].scatter_add_(-1, ids[row], torch.full((k,), boost * T, dtype=DT))
    z[4] = torch.randint(0, 3, (V,), generator=g).to(DT)  # ties, across the top-k boundary
    return z, ids


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("rest", [True, False])
def test_fused_rest_bin_values_and_gradients_match_float64_dense(k, T, rest):
    z64, ids = student_rows(k=k, T=T)
    logits = z64.float().requires_grad_(True)
    ref_logits = logits.detach().double().requires_grad_(True)
    lq, lq_rest, z, lse = losses.student_log_probs(logits, ids, temperature=T, rest=rest)
    r_lq, r_rest, r_lse = dense_student_reference(ref_logits, ids, T)
    assert lq.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(lq.double(), r_lq, **TOL)
    torch.testing.assert_close(lse.double(), r_lse, **TOL)
    if not rest or k == 50:
        assert lq_rest is None
    else:
        assert lq_rest.dtype == torch.float32
        # the cancellation case is really there: top-k mass above 1 - 1e-7 in rows 1-3
        assert (r_rest[1:4] < math.log(1e-7)).all() and r_rest[3] < -100.0
        torch.testing.assert_close(lq_rest.double(), r_rest, rtol=1e-6, atol=1e-5)
    # gradients of a random combination of every output (z too: callers use it)
    g = torch.Generator().manual_seed(1)
    w_top, w_rest, w_lse = (torch.randn(s, generator=g, dtype=DT) for s in (lq.shape, (12,), (12,)))
    w_z = torch.randn(z.shape, generator=g, dtype=DT)

    def combo(lq, lq_rest, z, lse):
        out = (w_top * lq).sum() + (w_lse * lse).sum() + (w_z * z).sum() * 1e-2
        return out if lq_rest is None else out + (w_rest * lq_rest).sum()

    (grad,) = torch.autograd.grad(combo(lq.double(), None if lq_rest is None else lq_rest.double(),
                                        z.double(), lse.double()), logits)  # fmt: skip
    (ref,) = torch.autograd.grad(
        combo(r_lq, None if lq_rest is None else r_rest, ref_logits / T, r_lse), ref_logits
    )
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref, **TOL)


def test_fused_rest_bin_bfloat16_logits_compute_in_float32():
    z64, ids = student_rows(T=2.0)
    logits = z64.bfloat16().requires_grad_(True)
    ref_logits = logits.detach().double().requires_grad_(True)
    lq, lq_rest, z, lse = losses.student_log_probs(logits, ids, temperature=2.0)
    assert lq.dtype == lq_rest.dtype == lse.dtype == z.dtype == torch.float32
    r_lq, r_rest, r_lse = dense_student_reference(ref_logits, ids, 2.0)
    torch.testing.assert_close(lq.double(), r_lq, **TOL)
    torch.testing.assert_close(lq_rest.double(), r_rest, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse.double(), r_lse, **TOL)
    (grad,) = torch.autograd.grad(lq_rest.sum() - lq.sum(), logits)
    (ref,) = torch.autograd.grad(r_rest.sum() - r_lq.sum(), ref_logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref, rtol=1e-2, atol=1e-2)


def test_fused_rest_bin_gradcheck_float64_including_a_row_beyond_float64_range():
    z, ids = student_rows(N=5, V=9, k=3, seed=3)
    # float64 redoes a row exactly once its rest is below ~1e-290 of the max
    z[0].scatter_add_(-1, ids[0], torch.full((3,), 800.0, dtype=DT))

    def outputs(x, T):
        lq, lq_rest, _, lse = losses.student_log_probs(x, ids, temperature=T)
        return lq, lq_rest, lse

    for T in (1.0, 1.7):
        assert torch.autograd.gradcheck(
            lambda x, T=T: outputs(x, T), (z.clone().requires_grad_(True),)
        )


def test_fused_rest_bin_repeated_ids_and_empty_rest():
    z, ids = student_rows(N=5, V=9, k=3, seed=4)
    ids[:, 2] = ids[:, 0]  # a repeated id counts once, as in the masked form
    logits = z.clone().requires_grad_(True)
    ref_logits = z.clone().requires_grad_(True)
    got = losses.student_log_probs(logits, ids, temperature=1.3)
    ref = losses._student_log_probs_masked(ref_logits, ids, temperature=1.3)
    for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:], strict=True):
        torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(got[0].sum() + got[1].sum() + got[3].sum(), logits)
    (gb,) = torch.autograd.grad(ref[0].sum() + ref[1].sum() + ref[3].sum(), ref_logits)
    torch.testing.assert_close(ga, gb)
    # every non-top-k logit at -inf: rest -inf, and finite gradients for the other outputs
    z2 = torch.full((2, 6), float("-inf"), dtype=DT)
    z2[:, :2] = torch.tensor([[1.0, 2.0], [0.0, -3.0]], dtype=DT)
    x = z2.clone().requires_grad_(True)
    lq, lq_rest, _, lse = losses.student_log_probs(x, torch.tensor([[0, 1], [1, 0]]))
    assert torch.isneginf(lq_rest).all()
    (g,) = torch.autograd.grad(lq.sum() + lse.sum() + 0.0 * lq_rest.clamp(min=-1e30).sum(), x)
    ref = torch.softmax(z2, -1) * -1.0 + torch.tensor([[1.0, 1.0, 0, 0, 0, 0]] * 2, dtype=DT)
    torch.testing.assert_close(g, ref)


def _every_caller(s, aux, y, ids, vals, tail, m, tmask):
    """Each loss of the module that reads student logits, at settings that exercise the rest
    bin, temperatures != 1, label smoothing, teacher masks and the uniform mix."""
    common = (ids, vals, tail, m)
    out = {}
    for eps in (0.0, 0.1):
        out[f"hard_ce eps={eps}"] = losses.hard_ce(s, y, m, label_smoothing=eps)
        out[f"lst eps={eps}"] = losses.lst_loss(
            s, y, *common, label_smoothing=eps, build_temperature=1.0, teacher_mask=tmask
        )
    for tail_mode in ("rest_bin", "renormalize"):
        for fn in (losses.sparse_kd_ce, losses.sparse_kd_kl):
            out[f"{fn.__name__} {tail_mode}"] = fn(
                s, *common, tail=tail_mode, k=3, student_temperature=2.0,
                teacher_temperature=2.0, build_temperature=1.0,
            )  # fmt: skip
    out["multitask"] = losses.multitask_kd_loss(
        s, aux, y, *common, lam=0.3, temperature=2.0, build_temperature=1.0, teacher_mask=tmask
    )
    out["essence"] = losses.essence_kd_loss(s, y, *common, alpha=0.4, k=3, teacher_mask=tmask)
    for mix_with in ("label", "uniform"):
        out[f"interaed {mix_with}"] = losses.interaed_kd_loss(
            [s, aux], y, *common, k=3, build_temperature=1.0, mix_with=mix_with,
            teacher_mask=tmask,
        )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[6, 6, 6], [6, 4, 2], [6, 1, 1]])
def test_every_caller_gives_the_masked_forms_values_and_gradients(dtype, lengths, monkeypatch):
    # lengths: no padding, some (the fused pass works on every row and zeroes the padding),
    # mostly padding (it copies the valid rows out)
    c = case(B=3, L=6, V=40, k=6, lengths=lengths)
    s = c["student"].clone()
    s[0, 0].scatter_add_(-1, c["ids"][0, 0], torch.full((6,), 30.0, dtype=DT))  # rest ~ 1e-12
    s[0, 1].scatter_add_(-1, c["ids"][0, 1], torch.full((6,), 150.0, dtype=DT))  # underflows
    aux = s.flip(-1)
    tmask = c["mask"].clone()
    tmask[1, 3] = False
    got, ref = {}, {}
    for masked, out in ((False, got), (True, ref)):
        monkeypatch.setattr(losses, "_MASKED_REFERENCE", masked)
        x, xa = (t.to(dtype).requires_grad_(True) for t in (s, aux))
        for name, loss in _every_caller(
            x, xa, c["targets"], c["ids"], c["vals"], c["tail"], c["mask"], tmask
        ).items():
            out[name] = (loss, *torch.autograd.grad(loss, (x, xa), allow_unused=True))
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for name, (loss, g, ga) in got.items():
        r_loss, r_g, r_ga = ref[name]
        assert loss.dtype == r_loss.dtype and g.dtype == dtype, name
        torch.testing.assert_close(loss, r_loss, **TOL, msg=name)
        torch.testing.assert_close(g, r_g, **tol, msg=name)
        if r_ga is None:
            assert ga is None, name
        else:
            torch.testing.assert_close(ga, r_ga, **tol, msg=name)


def test_gradcheck_losses_with_hard_labels_and_label_smoothing():
    c = case(B=2, L=3, V=7, k=3, lengths=[3, 2])
    y, ids, vals, tail, m = c["targets"], c["ids"], c["vals"], c["tail"], c["mask"]
    tmask = m.clone()
    tmask[0, 1] = False
    fns = [
        lambda s: losses.hard_ce(s, y, m, label_smoothing=0.3),
        lambda s: losses.lst_loss(
            s,
            y,
            ids,
            vals,
            tail,
            m,
            weight=0.4,
            label_smoothing=0.2,
            build_temperature=1.0,
            teacher_mask=tmask,
        ),
        lambda s: losses.essence_kd_loss(s, y, ids, vals, tail, m, alpha=0.3, k=2),
        lambda s: losses.interaed_kd_loss(
            [s, s * 0.5], y, ids, vals, tail, m, k=2, build_temperature=1.0, mix_with="uniform"
        ),
    ]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (c["student"].clone().requires_grad_(True),))
