"""Student data pipeline: batching, sharding, determinism, resume position, alignment, augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdcache.data.text import normalize_text
from kdcache.student.config import DataConfig, SpecAugConfig
from kdcache.student.data import DataState, KDDataset, cut_batches, make_loader
from kdcache.student.specaug import spec_augment, speed_perturb


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from kdcache.student.toy import make_toy_corpus

    return make_toy_corpus(tmp_path_factory.mktemp("toy"), num_utts=24, seed=1)


def _dataset(toy, **kw) -> KDDataset:
    from kdcache.data.features import open_features
    from kdcache.data.manifest import load_manifest
    from kdcache.data.tokenizer import Tokenizer

    tok = Tokenizer.load(toy.tokenizer)
    utts = load_manifest(toy.manifest)
    texts = {u.id: normalize_text(u.text) for u in utts}
    tokens = {u: np.asarray(tok.encode(t)) for u, t in texts.items()}
    store = open_features(toy.features)
    cfg = kw.pop("cfg", DataConfig(max_frames=300, bucket_pool=8))
    args = dict(
        utt_ids=list(texts), tokens=tokens, num_frames={u: store.num_frames(u) for u in texts},
        features=str(toy.features), cache=str(toy.cache), teachers=["lm"],
        hidden_layers={"lm": [6]}, cfg=cfg, pad_id=tok.pad_id, seed=3,
        temperatures={"lm": 5.0}, texts=texts,
    )  # fmt: skip
    args.update(kw)
    return KDDataset(**args)


def _epoch_ids(ds: KDDataset, shard: int, epoch: int = 0) -> list[str]:
    out = []
    for b in ds.shard_batches(shard):
        if b.position[1] != epoch:
            break
        out.extend(b.utt_ids)
    return out


def test_cut_batches_respects_limits():
    lengths = [3, 5, 5, 8, 9, 20, 50]
    ids = [str(i) for i in range(len(lengths))]
    cuts = cut_batches(ids, lengths, max_frames=20, max_utts=2)
    assert sorted(i for c in cuts for i in c) == list(range(len(lengths)))
    for c in cuts:
        assert len(c) <= 2
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 20
    assert [6] in cuts  # longer than max_frames: alone


def test_spec_augment_and_speed_perturb():
    x = np.random.default_rng(0).standard_normal((100, 80)).astype(np.float32) + 5
    a = spec_augment(x, np.random.default_rng(1), time_mask_width=20, freq_mask_width=10)
    b = spec_augment(x, np.random.default_rng(1), time_mask_width=20, freq_mask_width=10)
    assert np.array_equal(a, b)
    assert (a == 0).any() and a.shape == x.shape
    assert np.array_equal(x[0] + 0, x[0])  # input untouched
    assert speed_perturb(x, 1.1).shape == (91, 80)
    assert speed_perturb(x, 0.9).shape == (111, 80)
    assert speed_perturb(x, 1.0) is x
    y = speed_perturb(x, 0.5)
    assert np.allclose(y[0], x[0]) and np.allclose(y[-1], x[-1])


@pytest.mark.parametrize("reader", ["random", "stream"])
def test_epoch_covers_every_utterance_once(toy, reader):
    ds = _dataset(toy, reader=reader)
    ids = _epoch_ids(ds, 0)
    assert sorted(ids) == sorted(toy.utt_ids)


def test_shards_are_disjoint_and_cover(toy):
    ds = _dataset(toy, world_size=2, cfg=DataConfig(max_frames=300, bucket_pool=4, num_workers=2))
    per_rank = [[_epoch_ids(_dataset(toy, rank=r, world_size=2,
                                     cfg=DataConfig(max_frames=300, bucket_pool=4, num_workers=2)), s)
                 for s in (2 * r, 2 * r + 1)] for r in range(2)]  # fmt: skip
    flat = [u for rank in per_rank for shard in rank for u in shard]
    assert sorted(flat) == sorted(toy.utt_ids)
    assert ds.num_shards == 4


def test_batches_are_a_function_of_position(toy):
    cfg = DataConfig(max_frames=300, bucket_pool=8, speed_perturb=[0.9, 1.0, 1.1])
    a = list(itertools.islice(_dataset(toy, cfg=cfg).shard_batches(0), 12))
    b = list(itertools.islice(_dataset(toy, cfg=cfg).shard_batches(0), 12))
    for x, y in zip(a, b, strict=True):
        assert x.utt_ids == y.utt_ids and x.position == y.position
        assert np.array_equal(x.feats.numpy(), y.feats.numpy())
    epochs = {x.position[1] for x in a}
    assert len(epochs) >= 2  # endless: crosses the epoch boundary
    e0 = [u for x in a if x.position[1] == 0 for u in x.utt_ids]
    e1 = [u for x in a if x.position[1] == 1 for u in x.utt_ids]
    assert e0[: len(e1)] != e1  # reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_continues_the_sequence(toy, workers):
    cfg = DataConfig(max_frames=300, bucket_pool=8, num_workers=workers)
    full = list(itertools.islice(iter(make_loader(_dataset(toy, cfg=cfg))), 11))
    state = DataState(num_workers=workers)
    for b in full[:5]:
        state.advance(b)
    state = DataState.from_dict(state.to_dict())  # as stored in a checkpoint
    rest = list(itertools.islice(iter(make_loader(_dataset(toy, cfg=cfg, state=state))), 6))
    assert [b.position for b in rest] == [b.position for b in full[5:]]
    assert [b.utt_ids for b in rest] == [b.utt_ids for b in full[5:]]
    with pytest.raises(ValueError, match="num_workers"):
        _dataset(toy, cfg=DataConfig(num_workers=1), state=state if workers != 1 else None)


def test_targets_align_with_tokens(toy):
    b = next(iter(_dataset(toy).shard_batches(0)))
    t = b.targets["lm"]
    bsz, length = b.tokens.shape
    assert t.topk_ids.shape[:2] == (bsz, length) and t.topk_ids.shape[2] == 4
    tok_mask = np.arange(length)[None] < b.token_lens.numpy()[:, None]
    assert np.array_equal(t.mask.numpy(), tok_mask)
    # The toy teacher puts its top-1 on the reference token: position i <-> token i.
    assert np.array_equal(t.topk_ids[..., 0].numpy()[tok_mask], b.tokens.numpy()[tok_mask])
    assert t.hidden[6].shape == (bsz, length, 16)
    assert np.isfinite(t.topk_logprobs.numpy()).all()  # padding holds finite log-probs
    assert t.temperature == 5.0
    assert (b.feat_lens.numpy() <= b.feats.shape[1]).all()


def test_specaug_only_in_training(toy):
    on = DataConfig(max_frames=300, bucket_pool=8, specaug=SpecAugConfig(enabled=True))
    b_train = next(iter(_dataset(toy, cfg=on).shard_batches(0)))
    b_eval = next(iter(_dataset(toy, cfg=on, train=False).shard_batches(0)))
    assert b_train.feats.shape[2] == b_eval.feats.shape[2] == 80
