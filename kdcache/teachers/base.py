"""What every teacher adapter shares: work rows, windows over long inputs, token-budget batches,
and the loop that turns a model's outputs into per-utterance targets.

An adapter (masked_lm, causal_lm, lstm_lm) only says how an utterance becomes model input *rows*
and which output position of a row fills which position of the utterance; it runs one padded
batch of rows. :func:`run_rows` does the rest the same way for all of them: batches by length
under a token budget, top-k on the device, scatter into per-utterance buffers, and yields an
utterance as soon as all its positions are filled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class BuildError(ValueError):
    """A build that cannot start or go on; the message says which input or option is wrong."""


@dataclass
class Row:
    """One model input sequence and where its outputs go.

    Attributes:
        utt: Index of the utterance (in the caller's list) the row belongs to.
        input_ids: Model input, specials included.
        topk_src: Row positions whose output distribution is stored ...
        topk_dst: ... at these utterance positions.
        hid_src: Row positions whose hidden states are stored ...
        hid_dst: ... at these utterance positions.
        fixed: Utterance positions whose top-k the adapter fills itself (no model output), as
            ``{position: token_id}``: a hard label (causal LM position 0 without a BOS token).
    """

    utt: int
    input_ids: list[int]
    topk_src: list[int] = field(default_factory=list)
    topk_dst: list[int] = field(default_factory=list)
    hid_src: list[int] = field(default_factory=list)
    hid_dst: list[int] = field(default_factory=list)
    fixed: dict[int, int] = field(default_factory=dict)


@dataclass
class Targets:
    """One utterance's targets from one teacher, on the host.

    Attributes:
        topk_ids: ``[T, k]`` int64.
        topk_logprobs: ``[T, k]`` float32, descending along k.
        tail_logmass: ``[T]`` float32.
        hidden: layer -> ``[T, D]`` float32.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    hidden: dict[int, np.ndarray]


class Adapter(Protocol):
    """What :func:`run_rows` needs from a teacher."""

    k: int
    temperature: float
    vocab_size: int
    hidden_layers: tuple[int, ...]
    hidden_dims: dict[int, int]
    pad_id: int

    def rows(self, utt: int, token_ids: list[int]) -> list[Row]: ...

    def forward(self, input_ids, attention_mask, topk_index, hid_index):
        """Run one padded batch.

        Args:
            input_ids: ``[B, S]`` long on the device; attention_mask ``[B, S]``.
            topk_index: ``(b, s)`` long tensors, ``[P]`` each: positions whose logits are needed.
            hid_index: ``(b, s)`` long tensors, ``[H]`` each: positions whose hidden states are needed.

        Returns:
            ``(logits [P, V] or None, {layer: [H, D]})`` on the device.
        """
        ...


def resolve_hidden_layers(hidden_layers: Iterable[int], n_states: int) -> tuple[int, ...]:
    """Map ``--hidden-layers`` (negative counts from the end) to indices 0..n_states-1.

    Index 0 is the embedding output and n_states-1 the last layer, as in transformers'
    ``output_hidden_states``. Raises ValueError naming the option for an index out of range.
    """
    layers = []
    for layer in hidden_layers:
        if not -n_states <= layer < n_states:
            raise ValueError(
                f"--hidden-layers {layer} out of range: the model has {n_states} hidden states "
                f"(0 = embeddings .. {n_states - 1} = last layer, or -1)"
            )
        layers.append(layer % n_states)
    return tuple(layers)


def windows(n: int, width: int) -> list[tuple[int, int]]:
    """Overlapping windows ``[start, end)`` covering ``range(n)``, each at most ``width`` long.

    Stride is ``width // 2``; the last window is aligned to the end. Consecutive windows overlap
    by at least half a window, so every position has about ``width // 4`` or more tokens of
    context on *each* side in its best window (:func:`centre_owner`), and ``width // 2`` or more
    on its left in the earliest window holding it (:func:`left_owner`); fewer only near the ends
    of the sequence itself.
    """
    if width < 2:
        raise ValueError(f"window width must be >= 2, got {width}")
    if n <= width:
        return [(0, n)]
    stride = width // 2
    out = []
    s = 0
    while s + width < n:
        out.append((s, s + width))
        s += stride
    out.append((n - width, n))
    return out


def centre_owner(n: int, wins: list[tuple[int, int]]) -> np.ndarray:
    """For each position, the window where it has the most context on its *worse* side
    (``max over windows of min(left, right)``): the choice for bidirectional models."""
    owner = np.zeros(n, dtype=np.int64)
    best = np.full(n, -1, dtype=np.int64)
    pos = np.arange(n)
    for w, (s, e) in enumerate(wins):
        inside = (pos >= s) & (pos < e)
        ctx = np.minimum(pos - s, e - 1 - pos)
        better = inside & (ctx > best)
        owner[better] = w
        best[better] = ctx[better]
    return owner


def left_owner(n: int, wins: list[tuple[int, int]]) -> np.ndarray:
    """For each position, the window where it has the most left context (the earliest window
    containing it): the choice for left-to-right models."""
    owner = np.full(n, -1, dtype=np.int64)
    for w, (s, e) in reversed(list(enumerate(wins))):
        owner[s:e] = w
    return owner


def batch_rows(rows: Iterable[Row], budget: int) -> Iterator[list[Row]]:
    """Greedy batches of consecutive rows whose padded size ``len(batch) * max_len`` stays within
    ``budget`` tokens (a single longer row still forms its own batch). Feed rows sorted by length
    (descending is best: the largest batch runs first, so an out-of-memory shows at once)."""
    batch: list[Row] = []
    longest = 0
    for r in rows:
        n = len(r.input_ids)
        if batch and (len(batch) + 1) * max(longest, n) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(r)
        longest = max(longest, n)
    if batch:
        yield batch


def pad_batch(batch: list[Row], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``input_ids [B, S]`` int64 and ``attention_mask [B, S]`` int64."""
    width = max(len(r.input_ids) for r in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for i, r in enumerate(batch):
        ids[i, : len(r.input_ids)] = r.input_ids
        mask[i, : len(r.input_ids)] = 1
    return ids, mask


@dataclass
class Sampler:
    """Sampled targets instead of top-k (:func:`kdcache.teachers.topk.sampled_targets`).

    Attributes:
        samples: Draws per position (N).
        uniforms: ``utt index -> [T, N]`` uniforms of that utterance (``spec.sample_uniforms``
            keyed by its id, so the draws do not depend on batching, rank or resume).
    """

    samples: int
    uniforms: Callable[[int, int], np.ndarray]  # (utt index, T) -> [T, N] float64


class _Buffer:
    """Targets of one utterance being filled; knows how many positions are still missing."""

    def __init__(self, n: int, k: int, hidden_dims: dict[int, int]):
        self.uniforms: np.ndarray | None = None  # [n, N] when sampling
        self.labels: np.ndarray | None = None  # [n] the utterance's tokens when scoring
        self.ids = np.zeros((n, k), dtype=np.int64)
        self.lp = np.zeros((n, k), dtype=np.float32)
        self.tail = np.zeros(n, dtype=np.float32)
        self.hidden = {
            layer: np.zeros((n, d), dtype=np.float32) for layer, d in hidden_dims.items()
        }
        self.missing = n * (1 if k else 0) + n * len(hidden_dims)

    def targets(self) -> Targets:
        return Targets(self.ids, self.lp, self.tail, self.hidden)


def hard_label(token: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A hard label as one stored top-k row: ids ``[token, then the lowest other ids]`` (distinct,
    and inside any vocabulary of at least k ids that holds ``token``) and log-probs
    ``[0, -inf, ...]``; its tail is ``-inf``."""
    ids = np.array([token, *[i for i in range(k + 1) if i != token][: k - 1]], dtype=np.int64)
    lp = np.full(k, -np.inf, dtype=np.float32)
    lp[0] = 0.0
    return ids, lp


def _fill_fixed(
    buf: _Buffer, fixed: dict[int, int], k: int, vocab: int, unscored: bool = False
) -> None:
    """Hard-label top-k at the given positions: the token with log-prob 0, then -inf fillers
    (``unscored``: the token with NaN scores, for :func:`run_rows` ``labels=True``)."""
    for pos, tok in fixed.items():
        if unscored:
            buf.ids[pos], buf.lp[pos], buf.tail[pos] = tok, np.nan, np.nan
        else:
            buf.ids[pos], buf.lp[pos] = hard_label(tok, k)
            buf.tail[pos] = -np.inf
        buf.missing -= 1


def run_rows(
    adapter: Adapter,
    utts: Iterable[tuple[int, list[int]]],
    budget: int,
    *,
    bare: bool = False,
    topk_chunk: int = 1024,
    sampler: Sampler | None = None,
    labels: bool = False,
) -> Iterator[tuple[int, Targets]]:
    """Run a teacher over utterances and yield ``(utt, Targets)`` as each one completes.

    Args:
        adapter: The teacher.
        utts: ``(utt index, token ids)`` pairs, best sorted by length (descending).
        budget: Token budget of one padded batch.
        bare: Only run the model forward (benchmark baseline): nothing is computed after it and
            nothing is yielded.
        topk_chunk: Positions per log-softmax/top-k call (bounds the ``[P, V]`` float32 buffer;
            a quarter of it when sampling, whose buffers are float64/int64).
        sampler: Store sampled targets (the adapter's ``k`` is then the width, min(N, V)).
        labels: Score the utterances' own tokens instead (``kdcache score``; needs ``k == 1``):
            position i's ``topk_ids`` holds token i, ``topk_logprobs`` its log-probability at
            temperature 1 and ``tail_logmass`` the position's largest log-probability (so the
            token is the teacher's top-1 where the two are equal); positions the adapter fills
            with a hard label itself (a causal LM's first token without a BOS) are NaN there:
            the model did not predict them.

    Zero-length utterances are yielded at once with empty arrays.
    """
    import torch

    k, hidden_dims = adapter.k, adapter.hidden_dims
    if labels and (k != 1 or sampler is not None):
        raise ValueError("labels=True scores one token a position: needs k == 1, no sampler")
    buffers: dict[int, _Buffer] = {}
    device = adapter.device

    def gen_rows() -> Iterator[Row]:
        for utt, ids in utts:
            buf = _Buffer(len(ids), k, hidden_dims)
            if sampler is not None and k:
                buf.uniforms = sampler.uniforms(utt, len(ids))
            buffers[utt] = buf
            if labels:
                buf.labels = np.asarray(ids, dtype=np.int64)
            rows = adapter.rows(utt, ids) if ids else []
            for r in rows:
                if r.fixed and k:
                    _fill_fixed(buf, r.fixed, k, adapter.vocab_size, unscored=labels)
            if buf.missing == 0:
                continue
            yield from rows

    def ready() -> Iterator[tuple[int, Targets]]:
        done = [u for u, b in buffers.items() if b.missing == 0]
        for u in done:
            yield u, buffers.pop(u).targets()

    from kdcache.teachers.topk import label_scores, sampled_targets, topk_targets

    for batch in batch_rows(gen_rows(), budget):
        if not bare:
            yield from ready()
        ids_np, mask_np = pad_batch(batch, adapter.pad_id)
        tb, ts, tu, td = [], [], [], []
        hb, hs, hu, hd = [], [], [], []
        for i, r in enumerate(batch):
            if k:
                tb += [i] * len(r.topk_src)
                ts += r.topk_src
                tu += [r.utt] * len(r.topk_dst)
                td += r.topk_dst
            if hidden_dims:
                hb += [i] * len(r.hid_src)
                hs += r.hid_src
                hu += [r.utt] * len(r.hid_dst)
                hd += r.hid_dst
        input_ids = torch.from_numpy(ids_np).to(device)
        mask = torch.from_numpy(mask_np).to(device)
        topk_index = (
            torch.tensor(tb, dtype=torch.long, device=device),
            torch.tensor(ts, dtype=torch.long, device=device),
        )
        hid_index = (
            torch.tensor(hb, dtype=torch.long, device=device),
            torch.tensor(hs, dtype=torch.long, device=device),
        )
        logits, hidden = adapter.forward(input_ids, mask, topk_index, hid_index)
        if bare:
            if device.type == "cuda":
                torch.cuda.synchronize()
            continue
        if k and tb and sampler is not None:
            uni = torch.from_numpy(
                np.stack([buffers[u].uniforms[d] for u, d in zip(tu, td, strict=True)])
            )
            step = max(1, topk_chunk // 4)
            parts = [
                sampled_targets(
                    logits[i : i + step], k, uni[i : i + step].to(logits.device),
                    adapter.temperature,
                )
                for i in range(0, logits.shape[0], step)
            ]  # fmt: skip
        elif k and tb and labels:
            lab = torch.from_numpy(
                np.array([buffers[u].labels[d] for u, d in zip(tu, td, strict=True)])
            ).to(logits.device)
            parts = [
                label_scores(logits[i : i + topk_chunk], lab[i : i + topk_chunk])
                for i in range(0, logits.shape[0], topk_chunk)
            ]
        elif k and tb:
            parts = [
                topk_targets(logits[i : i + topk_chunk], k, adapter.temperature)
                for i in range(0, logits.shape[0], topk_chunk)
            ]
        if k and tb:
            ids_t = torch.cat([p[0] for p in parts]).cpu().numpy()
            lp_t = torch.cat([p[1] for p in parts]).cpu().numpy()
            tail_t = torch.cat([p[2] for p in parts]).cpu().numpy()
            tu_a, td_a = np.asarray(tu), np.asarray(td)
            for u in np.unique(tu_a):
                sel = tu_a == u
                buf = buffers[int(u)]
                buf.ids[td_a[sel]] = ids_t[sel]
                buf.lp[td_a[sel]] = lp_t[sel]
                buf.tail[td_a[sel]] = tail_t[sel]
                buf.missing -= int(sel.sum())
        if hidden_dims and hb:
            hu_a, hd_a = np.asarray(hu), np.asarray(hd)
            host = {layer: h.float().cpu().numpy() for layer, h in hidden.items()}
            for u in np.unique(hu_a):
                sel = hu_a == u
                buf = buffers[int(u)]
                for layer, h in host.items():
                    buf.hidden[layer][hd_a[sel]] = h[sel]
                buf.missing -= int(sel.sum()) * len(host)
    if not bare:
        yield from ready()
        if buffers:  # an adapter left positions unfilled: a bug, never silently wrong targets
            u = next(iter(buffers))
            raise RuntimeError(
                f"teacher left {buffers[u].missing} outputs of utterance #{u} unfilled"
            )
