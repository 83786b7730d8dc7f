"""CacheWriter.add_many: the same caches, errors and messages as calling add() per utterance
(the checks run on a whole batch; a failing batch is re-added one utterance at a time)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures.make_cache_fixtures import make_record, make_utt, make_utts
from test_cache_writer import _replace, _unsorted_mixed, bad_inputs
from test_cache_writer_pool import _check_independent, _digest

from kdcache.cache_format import CacheWriter


def _stream(rec, seed=0):
    """Unsorted and float32 rows, float64 rows, zero-length and over-long utterances."""
    utts = make_utts(rec, 50, max_len=14, seed=seed)
    utts[7] = make_utt(rec, "long", 45, 3)
    utts[8] = make_utt(rec, "empty", 0, 4)
    utts[20] = make_utt(rec, "empty2", 0, 5)
    return utts, _unsorted_mixed(rec, utts)


def _write(path, rec, items, batch: int | None, **kw):
    """Add items (UttTargets) one at a time or in batches; returns the errors raised, in order
    (a batch that raises is retried from the utterance after the failing one, like a loop of
    add() that catches each error)."""
    errors = []
    with CacheWriter(path, rec, fsync=False, **kw) as w:
        if batch is None:
            for u in items:
                try:
                    w.add(u)
                except ValueError as e:
                    errors.append(str(e))
        else:
            i = 0
            while i < len(items):
                part = items[i : i + batch]
                n_before = len(w._session)
                try:
                    w.add_many(part)
                    i += len(part)
                except ValueError as e:
                    errors.append(str(e))
                    # The utterances before the bad one were added; go on after it.
                    i += len(w._session) - n_before + 1
    return errors


@pytest.mark.parametrize("batch", [1, 3, 16, 1000])
@pytest.mark.parametrize("kw", [{}, {"vocab_size": 70000}, {"k": 1}, {"keepbits": 10}])
def test_add_many_same_bytes_as_add(tmp_path, batch, kw):
    rec = make_record(
        "a", **{"vocab_size": 700, "k": 8, "keepbits": 7, "chunk_positions": 16, **kw}
    )
    plain, utts = _stream(rec)
    ref, new = tmp_path / "ref.kdc", tmp_path / "new.kdc"
    _write(ref, rec, utts, None, shard_positions=60)
    _write(new, rec, utts, batch, shard_positions=60)
    assert _digest(new) == _digest(ref)
    _check_independent(new, rec, plain)


def test_add_many_bad_inputs_same_errors(tmp_path):
    """Bad utterances anywhere in a batch: the same messages, in the same order, and the same
    cache as add() one at a time."""
    rec = make_record("a", vocab_size=100, k=4, chunk_positions=8)
    with_hidden = make_record("a", vocab_size=100, k=4, hidden=(1,), chunk_positions=8)
    good = make_utt(with_hidden, "new", 5, 1)
    bads = [  # (this record has no hidden layers: hidden inputs are tested below)
        _replace(u, utt_id=f"bad-{what}" if what != "duplicate id" else u.utt_id, hidden={})
        for what, (u, _) in bad_inputs(with_hidden, good).items()
        if not what.startswith("hidden")
    ]
    utts = make_utts(rec, 40, max_len=9, seed=2)
    items = []
    for j, u in enumerate(utts):
        items.append(u)
        if j % 3 == 1:
            items.append(bads[(j // 3) % len(bads)])
    items.append(utts[0])  # already added in this session
    items += [_replace(good, utt_id="twice"), _replace(good, utt_id="twice")]
    ref, new = tmp_path / "ref.kdc", tmp_path / "new.kdc"
    want = _write(ref, rec, items, None, shard_positions=30)
    assert len(want) >= len(bads)
    for batch in (4, 64):
        got = _write(new, rec, items, batch, shard_positions=30)
        assert got == want
        assert _digest(new) == _digest(ref)
        import shutil

        shutil.rmtree(new)


def test_add_many_falls_back_for_hidden_and_mass_edge(tmp_path):
    """Records with hidden states go through add(); a mass error just over the tolerance is
    refused with add()'s message."""
    rec = make_record("a", vocab_size=300, k=4, hidden=(1,), chunk_positions=8)
    utts = make_utts(rec, 12, max_len=9, seed=1)
    ref, new = tmp_path / "ref.kdc", tmp_path / "new.kdc"
    _write(ref, rec, utts, None)
    _write(new, rec, utts, 5)
    assert _digest(new) == _digest(ref)

    rec = make_record("b", vocab_size=300, k=4, chunk_positions=8)
    u = make_utt(rec, "edge", 6, 2)
    lp = u.topk_logprobs.copy()
    lp[3] += np.log1p(0.0201 / np.exp(lp[3]).sum())  # mass 1.0201 at position 3
    bad = _replace(u, topk_logprobs=lp)
    with CacheWriter(tmp_path / "m.kdc", rec, fsync=False) as w:
        with pytest.raises(ValueError, match="probability mass at position 3"):
            w.add_many([make_utt(rec, "ok", 4, 3), bad, make_utt(rec, "after", 4, 4)])
        assert w._session == {"ok"}
