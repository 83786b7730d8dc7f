"""topk_targets against a float64 dense reference, windows and batching helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.teachers.base import Row, batch_rows, centre_owner, left_owner, windows
from kdcache.teachers.topk import dense_reference, topk_targets


@pytest.mark.parametrize("k", [1, 3, 16, 50])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_topk_matches_dense_reference(k, temperature):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(20, 50, generator=g) * 5
    ids, lp, tail = topk_targets(logits, k, temperature)
    rids, rlp, rtail = dense_reference(logits, k, temperature)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=1e-5)
    if k == 50:
        assert torch.isinf(tail).all() and (tail < 0).all()
    else:
        torch.testing.assert_close(tail.double(), rtail, rtol=1e-5, atol=1e-6)
    # Mass adds up to one (the writer checks this too).
    mass = lp.double().exp().sum(-1) + tail.double().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-5)


def test_tail_is_accurate_when_topk_holds_almost_everything():
    # A peaked distribution: top-1 has mass 1 - 1e-9. log1p(-sum(exp(topk))) in float32 gives
    # -inf or garbage here; the masked log-sum-exp keeps full relative precision.
    logits = torch.tensor([[30.0, 10.0, 9.0, 8.0, 0.0, -5.0]])
    _, _, tail = topk_targets(logits, 1)
    _, _, rtail = dense_reference(logits, 1)
    assert torch.isfinite(tail).all()
    assert abs(tail.item() - rtail.item()) < 1e-5 * abs(rtail.item())
    naive = torch.log1p(-torch.topk(torch.log_softmax(logits, -1), 1).values.exp().sum(-1))
    assert not torch.isfinite(naive).all() or abs(naive.item() - rtail.item()) > 1e-3


@pytest.mark.parametrize("n_peaked", [1, 7, 20])
def test_mixed_peaked_and_flat_rows(n_peaked):
    # Peaked rows (tail < 1% of the mass) take the exact path; gathered when few, in place when many.
    g = torch.Generator().manual_seed(n_peaked)
    logits = torch.randn(20, 300, generator=g)
    logits[:n_peaked, 0] += 25.0
    ids, lp, tail = topk_targets(logits, 8)
    rids, rlp, rtail = dense_reference(logits, 8)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=1e-5)
    torch.testing.assert_close(tail.double(), rtail, rtol=1e-5, atol=0)


def test_ties_at_the_kth_value_count_in_the_tail():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    ids, lp, tail = topk_targets(logits, 2)
    mass = lp.double().exp().sum(-1) + tail.double().exp()
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    _, rlp, rtail = dense_reference(logits, 2)
    torch.testing.assert_close(tail.double(), rtail, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.double(), rlp, rtol=0, atol=1e-6)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="vocabulary"):
        topk_targets(torch.zeros(2, 5), 6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), width=st.integers(2, 40))
def test_windows_cover_and_owners_are_valid(n, width):
    wins = windows(n, width)
    assert all(0 <= s < e <= max(n, 1) and e - s <= width for s, e in wins) or n == 0
    covered = set()
    for s, e in wins:
        covered.update(range(s, e))
    assert covered == set(range(n))
    for owner in (centre_owner(n, wins), left_owner(n, wins)):
        for p in range(n):
            s, e = wins[owner[p]]
            assert s <= p < e
    # Bidirectional owner: with stride width//2, at least about width//4 context on the shorter
    # side, unless the position is near a sequence end.
    co = centre_owner(n, wins)
    for p in range(n):
        s, e = wins[co[p]]
        assert min(p - s, e - 1 - p) >= min(p, n - 1 - p, width // 4 - 1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), width=st.integers(2, 30))
def test_window_rules_are_exactly_what_docs_teachers_says(n, width):
    """docs/teachers.md, "Long inputs": starts at multiples of width // 2 while the window ends
    before the sequence, then one window aligned to the end; the bidirectional owner maximises
    min(left, right) with ties to the earliest window; the left-to-right owner is the earliest
    window holding the position."""
    wins = windows(n, width)
    if n <= width:
        assert wins == [(0, n)]
    else:
        stride = width // 2
        k = 0
        while k * stride + width < n:
            k += 1
        assert wins == [(i * stride, i * stride + width) for i in range(k)] + [(n - width, n)]
    co, lo = centre_owner(n, wins), left_owner(n, wins)
    for p in range(n):
        holding = [w for w, (s, e) in enumerate(wins) if s <= p < e]
        ctx = [min(p - wins[w][0], wins[w][1] - 1 - p) for w in holding]
        assert co[p] == holding[ctx.index(max(ctx))]  # index() = the earliest of the ties
        assert lo[p] == holding[0]


def test_batch_rows_respects_budget():
    rows = [Row(0, [1] * n) for n in (10, 9, 9, 5, 5, 5, 5, 30)]
    batches = list(batch_rows(rows, 20))
    assert [len(b) for b in batches] == [2, 2, 3, 1]
    assert sum(len(b) for b in batches) == len(rows)
    for b in batches:
        assert len(b) == 1 or len(b) * max(len(r.input_ids) for r in b) <= 20


def test_dense_reference_sanity():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    ids, lp, tail = dense_reference(logits, 2)
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(tail.exp().numpy(), [0.2])
