"""Student data pipeline: audio features joined with cached teacher targets by utterance id.

Shape of the pipeline (one :class:`KDDataset`, an ``IterableDataset``):

* **Shards.** Every (DDP rank, DataLoader worker) pair is one shard of ``world_size x workers``.
  A shard owns a disjoint slice of the training utterances each epoch and yields an *endless*
  sequence of batches, epoch after epoch, so DDP ranks never wait for each other at an epoch end
  and training is counted in steps.
* **Reading.** ``reader="random"`` permutes the utterance ids per epoch and reads each one's
  targets with ``cache.get`` (fine for small sets: one chunk read per utterance). ``"stream"``
  hands the shard's slice to ``cache.stream`` (whole-chunk reads, chunk-level shuffling plus a
  shuffle buffer); ``"auto"`` streams from ``data.stream_min_utts`` utterances up.
* **Batches.** Length bucketing: a pool of ``bucket_pool`` utterances is sorted by frame count
  and cut into dynamic batches of at most ``max_frames`` padded frames and ``max_utts``
  utterances; the batches of a pool are then shuffled. Features are read only for batches that
  are emitted.
* **Determinism.** Everything random (permutation, speed factors, SpecAugment masks, batch
  order) is drawn from generators seeded by (seed, epoch, shard, batch), never from process
  state, so a batch is a pure function of its position ``(shard, epoch, index)``. The training
  loop records the position of the last batch it consumed per shard (:class:`DataState`); a
  resumed run restarts every shard there and reproduces the uninterrupted run's batches exactly.

Alignment: the cache holds one position per teacher token of the normalised transcript (no
specials); the student's tokens are the same ids, so ``targets[t].topk_ids[b, i]`` is the teacher
distribution for decoder output ``i`` (predicting token ``i``); the decoder's final eos output has
no teacher position and gets no KD. Speed perturbation changes frame counts only.

Teachers in *other units* (``own_units``: hierarchical KD from a character or phone teacher to a
subword student) are not aligned to the student's tokens at all: their TeacherBatch is padded to
their own longest utterance and carries the teacher's own token ids (``token_ids``, from the
cache index), which an auxiliary decoder is teacher-forced on; cache position ``i`` is that aux
decoder's output ``i``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.cache_format.multi import MultiCache, open_caches  # noqa: F401  (re-exported)
from kdcache.student.config import DataConfig
from kdcache.student.specaug import spec_augment, speed_perturb
from kdcache.torch import (  # noqa: F401  (TeacherBatch, TargetMismatchError: public here too)
    TargetMismatchError,
    TeacherBatch,
    check_tokens,
    collate_targets,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One student batch.

    Attributes:
        utt_ids: B utterance ids.
        feats: [B, T, F] float32 features, zero-padded.
        feat_lens: [B] int64 frame counts.
        tokens: [B, L] int64 token ids (no specials), padded with ``pad_id``.
        token_lens: [B] int64.
        targets: teacher name -> TeacherBatch with L positions.
        position: (shard, epoch, index) of this batch in its shard's sequence (-1s in eval).
        texts: B normalised reference transcripts.
    """

    utt_ids: list[str]
    feats: torch.Tensor
    feat_lens: torch.Tensor
    tokens: torch.Tensor
    token_lens: torch.Tensor
    targets: dict[str, TeacherBatch] = field(default_factory=dict)
    position: tuple[int, int, int] = (-1, -1, -1)
    texts: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        return dataclasses.replace(
            self,
            feats=self.feats.to(device, non_blocking=True),
            feat_lens=self.feat_lens.to(device, non_blocking=True),
            tokens=self.tokens.to(device, non_blocking=True),
            token_lens=self.token_lens.to(device, non_blocking=True),
            targets={k: v.to(device) for k, v in self.targets.items()},
        )

    @property
    def num_frames(self) -> int:
        return int(self.feat_lens.sum())


def collate(
    utt_ids: list[str],
    feats: list[np.ndarray],
    tokens: list[np.ndarray],
    targets: list[dict[str, Any]],
    pad_id: int,
    temperatures: dict[str, float],
    hidden_layers: dict[str, Sequence[int]],
    texts: list[str] | None = None,
    position: tuple[int, int, int] = (-1, -1, -1),
    own_units: Sequence[str] = (),
    frame_units: Sequence[str] = (),
) -> Batch:
    """Pad per-utterance arrays into a :class:`Batch` (targets: one dict[teacher, UttTargets]
    per utterance, or empty dicts when training without a cache). Teachers in ``own_units`` are
    padded to their own longest utterance and carry their token ids."""
    b = len(utt_ids)
    feat_lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
    n_mel = feats[0].shape[1]
    x = torch.zeros(b, int(feat_lens.max()), n_mel, dtype=torch.float32)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
    token_lens = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    max_tok = max(1, int(token_lens.max()))
    y = torch.full((b, max_tok), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        y[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
    out = collate_targets(
        targets,
        length=max_tok,
        temperatures=temperatures,
        hidden_layers=hidden_layers,
        own_units=own_units,
        frame_units=frame_units,
    )
    return Batch(
        utt_ids=list(utt_ids),
        feats=x,
        feat_lens=feat_lens,
        tokens=y,
        token_lens=token_lens,
        targets=out,
        position=position,
        texts=list(texts or []),
    )


# --------------------------------------------------------------------------------------------
# Data position (what a checkpoint stores)


@dataclass
class DataState:
    """Where each shard of one rank stands: the next (epoch, index) to produce.

    ``consumed`` counts batches the loop has consumed on this rank; DataLoader workers are served
    round-robin, so it also says which worker's batch comes next after a resume.
    """

    num_workers: int = 0
    consumed: int = 0
    shards: dict[int, tuple[int, int]] = field(default_factory=dict)

    def advance(self, batch: Batch) -> None:
        shard, epoch, index = batch.position
        self.shards[shard] = (epoch, index + 1)
        self.consumed += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "consumed": self.consumed,
            "shards": {str(k): list(v) for k, v in self.shards.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        return cls(
            num_workers=int(d["num_workers"]),
            consumed=int(d["consumed"]),
            shards={int(k): (int(v[0]), int(v[1])) for k, v in d["shards"].items()},
        )


# --------------------------------------------------------------------------------------------
# Dataset


def _features_open(path: str):
    from kdcache.data.features import open_features

    return open_features(path)


def _cache_open(path: str | Sequence[str]):
    return open_caches(path)


def cut_batches(
    ids: Sequence[str], lengths: Sequence[int], max_frames: int, max_utts: int
) -> list[list[int]]:
    """Greedy dynamic batching of items already sorted by length: indices into ``ids``.

    A batch grows while (size x longest) <= max_frames and size <= max_utts; an item longer
    than max_frames still gets a batch of its own.
    """
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in range(len(ids)):
        n = int(lengths[i])
        if cur and ((len(cur) + 1) * max(longest, n) > max_frames or len(cur) >= max_utts):
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def length_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (ties by index) and cut by :func:`cut_batches` so that each
    group's padded size (size x longest) stays within ``budget``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cuts = cut_batches(order, [lengths[i] for i in order], budget, max(len(order), 1))
    return [[order[j] for j in cut] for cut in cuts]


class KDDataset(IterableDataset):
    """Endless stream of training :class:`Batch` es for one DDP rank (see the module docstring).

    Args:
        utt_ids: Training utterance ids (any order; sorted internally for determinism).
        tokens: utt id -> student token ids [L] of the normalised transcript.
        num_frames: utt id -> feature frame count.
        features: Path of the feature store (opened in each worker).
        cache: Path of the KD cache (or a list of paths: :class:`MultiCache`), or None to train
            without one.
        teachers: Cache teachers to read.
        hidden_layers: teacher -> stored layers to read (empty: no hidden states).
        cfg: The ``data`` section.
        pad_id: Token padding value.
        seed: Run seed.
        rank, world_size: DDP position.
        reader: "random" or "stream" (resolved, not "auto").
        state: Where to restart (from a checkpoint), or None for the beginning.
        train: Apply augmentation (speed perturbation, SpecAugment).
        temperatures: teacher -> build temperature (copied into TeacherBatch).
        own_units: teachers whose units differ from the student's (hierarchical KD): not aligned
            to the student's tokens; their batches carry the teacher's own token ids.
    """

    def __init__(
        self,
        utt_ids: Sequence[str],
        tokens: dict[str, np.ndarray],
        num_frames: dict[str, int],
        features: str,
        cache: str | Sequence[str] | None,
        teachers: Sequence[str],
        hidden_layers: dict[str, Sequence[int]],
        cfg: DataConfig,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        reader: str = "random",
        state: DataState | None = None,
        train: bool = True,
        temperatures: dict[str, float] | None = None,
        texts: dict[str, str] | None = None,
        own_units: Sequence[str] = (),
        frame_units: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.own_units = list(own_units)
        self.frame_units = list(frame_units)
        self.utt_ids = sorted(utt_ids)
        self.tokens = tokens
        self.num_frames = num_frames
        self.features_path = features
        self.cache_path = cache
        self.teachers = list(teachers) if cache else []
        self.hidden_layers = {t: list(v) for t, v in hidden_layers.items()}
        self.cfg = cfg
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.reader = reader if cache else "random"
        self.num_workers = max(1, cfg.num_workers)
        self.state = state or DataState(num_workers=cfg.num_workers)
        if self.state.num_workers != cfg.num_workers:
            raise ValueError(
                f"resume: the checkpoint was written with data.num_workers="
                f"{self.state.num_workers}; resume with the same value (got {cfg.num_workers})"
            )
        self.train = train
        self.temperatures = dict(temperatures or {})
        self.texts = texts or {}
        self._features = None
        self._cache = None

    # ---- per-worker resources

    @property
    def features(self):
        if self._features is None:
            self._features = _features_open(self.features_path)
        return self._features

    @property
    def cache(self):
        if self._cache is None and self.cache_path:
            self._cache = _cache_open(self.cache_path)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_features"] = None  # reopened in each worker
        d["_cache"] = None
        return d

    # ---- sharding

    def shard_of_worker(self, worker_id: int) -> int:
        # Workers are served round-robin from worker 0; after a resume the next batch must come
        # from the shard that was next in the uninterrupted run, so rotate the assignment.
        rotate = self.state.consumed % self.num_workers
        return self.rank * self.num_workers + (worker_id + rotate) % self.num_workers

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        shard = self.shard_of_worker(worker_id)
        yield from self.shard_batches(shard)

    def shard_batches(self, shard: int) -> Iterator[Batch]:
        """The endless batch sequence of one shard, from its saved position on."""
        start_epoch, start_index = self.state.shards.get(shard, (0, 0))
        epoch = start_epoch
        while True:
            produced = 0
            for index, plan in enumerate(self._plan_epoch(shard, epoch)):
                produced += 1
                if epoch == start_epoch and index < start_index:
                    continue  # already consumed before the checkpoint: skip without reading
                yield self._load(plan, (shard, epoch, index))
            if produced == 0:
                raise RuntimeError(
                    f"data shard {shard} of {self.num_shards} got no utterances: "
                    f"{len(self.utt_ids)} training utterances are too few for "
                    f"{self.world_size} rank(s) x {self.num_workers} worker(s)"
                )
            epoch += 1

    # ---- planning: which utterances go into which batch (lengths only, nothing read)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _length(self, utt_id: str, factor: float) -> int:
        n = self.num_frames[utt_id]
        return n if factor == 1.0 else max(1, int(round(n / factor)))

    def _plan_pool(
        self, pool: list[tuple[str, dict | None]], rng: np.random.Generator
    ) -> list[list[tuple[str, float, dict | None]]]:
        speeds = self.cfg.speed_perturb if self.train else []
        factors = [float(rng.choice(speeds)) if speeds else 1.0 for _ in pool]
        items = [(u, f, t) for (u, t), f in zip(pool, factors, strict=True)]
        items.sort(key=lambda it: (self._length(it[0], it[1]), it[0]))
        lengths = [self._length(u, f) for u, f, _ in items]
        cuts = cut_batches(
            [u for u, _, _ in items], lengths, self.cfg.max_frames, self.cfg.max_utts
        )
        order = rng.permutation(len(cuts)) if self.train else np.arange(len(cuts))
        return [[items[i] for i in cuts[j]] for j in order]

    def _plan_epoch(self, shard: int, epoch: int) -> Iterator[list[tuple[str, float, dict | None]]]:
        pool_size = max(1, self.cfg.bucket_pool)
        rng = self._rng(1, epoch, shard)
        pool: list[tuple[str, dict | None]] = []
        for item in self._source(shard, epoch):
            pool.append(item)
            if len(pool) >= pool_size:
                yield from self._plan_pool(pool, rng)
                pool = []
        if pool:
            yield from self._plan_pool(pool, rng)

    def _source(self, shard: int, epoch: int) -> Iterator[tuple[str, dict | None]]:
        """(utt id, targets or None) of this shard's slice, in this epoch's order."""
        if self.reader == "stream":
            mine = self.utt_ids  # the cache slices by (rank, world_size) itself
            stream = self.cache.stream(
                teachers=self.teachers,
                hidden=any(self.hidden_layers.get(t) for t in self.teachers),
                shuffle=self.train,
                seed=self.seed * 1000003 + epoch,
                shuffle_buffer=self.cfg.shuffle_buffer if self.train else 0,
                rank=shard,
                world_size=self.num_shards,
                utt_ids=mine,
            )
            for targets in stream:
                utt_id = next(iter(targets.values())).utt_id
                yield utt_id, targets
            return
        perm = (
            self._rng(0, epoch).permutation(len(self.utt_ids))
            if self.train
            else range(len(self.utt_ids))
        )
        for i in list(perm)[shard :: self.num_shards]:
            yield self.utt_ids[i], None

    # ---- loading: features + targets of one planned batch

    def _load(
        self, plan: list[tuple[str, float, dict | None]], position: tuple[int, int, int]
    ) -> Batch:
        rng = self._rng(2, *position)
        store = self.features
        mean = getattr(store, "mean", None) if self.cfg.cmvn else None
        std = getattr(store, "std", None) if self.cfg.cmvn else None
        spec = self.cfg.specaug
        ids, feats, toks, tgts, texts = [], [], [], [], []
        for utt_id, factor, targets in plan:
            x = np.asarray(store[utt_id], dtype=np.float32)
            if mean is not None and std is not None:
                x = (x - np.asarray(mean, dtype=np.float32)) / np.maximum(
                    np.asarray(std, dtype=np.float32), 1e-5
                )
            x = speed_perturb(x, factor)
            if self.train and spec.enabled:
                x = spec_augment(
                    x,
                    rng,
                    num_freq_masks=spec.num_freq_masks,
                    freq_mask_width=spec.freq_mask_width,
                    num_time_masks=spec.num_time_masks,
                    time_mask_width=spec.time_mask_width,
                    time_mask_max_ratio=spec.time_mask_max_ratio,
                )
            if self.teachers and targets is None:
                targets = {
                    t: self.cache.get(utt_id, t, hidden=bool(self.hidden_layers.get(t)))
                    for t in self.teachers
                }
            tokens = self.tokens[utt_id]
            if targets:
                check_alignment(utt_id, tokens, targets, self.own_units, self.frame_units)
            ids.append(utt_id)
            feats.append(x)
            toks.append(tokens)
            tgts.append(targets or {})
            texts.append(self.texts.get(utt_id, ""))
        return collate(
            ids,
            feats,
            toks,
            tgts if self.teachers else [],
            self.pad_id,
            self.temperatures,
            self.hidden_layers,
            texts=texts,
            position=position,
            own_units=self.own_units,
            frame_units=self.frame_units,
        )


def check_alignment(
    utt_id: str,
    tokens: np.ndarray,
    targets: dict[str, Any],
    own_units: Sequence[str] = (),
    frame_units: Sequence[str] = (),
) -> None:
    """Raise :class:`TargetMismatchError` when a teacher's positions are not the student's tokens.

    Teachers in ``own_units`` are checked against themselves instead: their token ids must be
    stored, one per position (the aux decoder is teacher-forced on them). Teachers in
    ``frame_units`` (frame-level targets) are checked against the encoder's frame count by the
    loss, which knows it.
    """
    for name, t in targets.items():
        if name in frame_units:
            continue  # frames, not tokens: the loss checks them against the encoder's frames
        if name in own_units:
            check_own_tokens(utt_id, name, t)
        else:
            check_tokens(utt_id, tokens, {name: t})


def check_own_tokens(utt_id: str, name: str, t: Any) -> None:
    """A teacher in other units needs its own token ids, one per stored position."""
    n = t.topk_ids.shape[0]
    if t.token_ids is None:
        raise TargetMismatchError(
            f"utterance {utt_id!r}: teacher {name!r} (units other than the student's) has no "
            f"token_ids in the cache; its aux decoder is teacher-forced on them: rebuild the "
            f"cache with a token-level teacher that records token_ids"
        )
    if len(t.token_ids) != n:
        raise TargetMismatchError(
            f"utterance {utt_id!r}: teacher {name!r} has {len(t.token_ids)} token_ids for {n} "
            f"positions"
        )


def init_worker_threads(threads: int, worker_id: int = 0) -> None:
    """A DataLoader worker's thread counts (its ``worker_init_fn``): ``data.worker_threads``
    torch intra-op threads (torch's worker loop sets 1 before this runs; workers next to a
    training process that already uses every core should not add pools of their own), and Blosc
    decoding on the calling thread, without its own pool."""
    from numcodecs import blosc

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    blosc.use_threads = False
    blosc.set_nthreads(1)


def make_loader(dataset: KDDataset) -> DataLoader:
    """A DataLoader over ``dataset`` (batches are already built: batch_size=None)."""
    cfg = dataset.cfg
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kwargs = {
            "prefetch_factor": cfg.prefetch_factor,
            "persistent_workers": False,
            "worker_init_fn": functools.partial(init_worker_threads, cfg.worker_threads),
        }
    # A private generator: creating the iterator draws a base seed from it, and drawing from the
    # global RNG instead would shift dropout after a resume. Batches never use worker seeds.
    return DataLoader(
        dataset,
        batch_size=None,
        generator=torch.Generator().manual_seed(0),
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )


def eval_batches(
    utt_ids: Sequence[str],
    tokens: dict[str, np.ndarray],
    texts: dict[str, str],
    features,
    max_frames: int,
    max_utts: int,
    pad_id: int,
    cmvn: bool = True,
) -> Iterator[Batch]:
    """Finite, unshuffled, unaugmented batches sorted by length (for decoding)."""
    ids = sorted(utt_ids, key=lambda u: (features.num_frames(u), u))
    lengths = [features.num_frames(u) for u in ids]
    mean = getattr(features, "mean", None) if cmvn else None
    std = getattr(features, "std", None) if cmvn else None
    for cut in cut_batches(ids, lengths, max_frames, max_utts):
        feats = []
        for i in cut:
            x = np.asarray(features[ids[i]], dtype=np.float32)
            if mean is not None and std is not None:
                x = (x - np.asarray(mean, dtype=np.float32)) / np.maximum(
                    np.asarray(std, dtype=np.float32), 1e-5
                )
            feats.append(x)
        sel = [ids[i] for i in cut]
        yield collate(
            sel,
            feats,
            [tokens[u] for u in sel],
            [],
            pad_id,
            {},
            {},
            texts=[texts[u] for u in sel],
        )
