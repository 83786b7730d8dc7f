"""Feature-level augmentation: SpecAugment masks and speed perturbation, in numpy on the CPU side.

Both run inside the data pipeline (DataLoader workers), per utterance, before padding, with a
``numpy.random.Generator`` the pipeline seeds from (seed, epoch, shard, batch), so a resumed run
draws exactly the masks an uninterrupted run would have drawn.

Speed perturbation resamples the *features* in time (linear interpolation between frames), which
works the same for stored and on-the-fly features and costs nothing next to recomputing fbank.
It changes tempo only; waveform speed perturbation (Ko et al. 2015) also shifts pitch and
formants. The frame count changes; token-level targets do not move, because teacher positions are
tokens of the transcript, not frames, so a perturbed utterance keeps its targets as they are.
"""

from __future__ import annotations

import numpy as np


def speed_perturb(feats: np.ndarray, factor: float) -> np.ndarray:
    """Resample ``feats`` [T, F] in time as if the audio were played ``factor`` times faster.

    Returns [round(T / factor), F] float32 (at least 1 frame); factor 1.0 returns the input.
    """
    if factor == 1.0 or feats.shape[0] < 2:
        return feats
    t_in = feats.shape[0]
    t_out = max(1, int(round(t_in / factor)))
    pos = np.linspace(0.0, t_in - 1, t_out, dtype=np.float64)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, t_in - 1)
    w = (pos - lo)[:, None].astype(np.float32)
    return (feats[lo] * (1.0 - w) + feats[hi] * w).astype(np.float32, copy=False)


def spec_augment(
    feats: np.ndarray,
    rng: np.random.Generator,
    num_freq_masks: int = 2,
    freq_mask_width: int = 27,
    num_time_masks: int = 2,
    time_mask_width: int = 50,
    time_mask_max_ratio: float = 1.0,
    fill: float = 0.0,
) -> np.ndarray:
    """Return a copy of ``feats`` [T, F] with frequency and time masks set to ``fill``.

    Each frequency mask covers f ~ U[0, freq_mask_width) channels from f0 ~ U[0, F - f); each
    time mask covers t ~ U[0, min(time_mask_width, ratio * T)) frames. ``fill`` 0.0 is the mean
    after CMVN.
    """
    out = np.array(feats, dtype=np.float32, copy=True)
    n_frames, n_chan = out.shape
    for _ in range(num_freq_masks):
        width = int(rng.integers(0, min(freq_mask_width, n_chan) + 1))
        if width == 0:
            continue
        f0 = int(rng.integers(0, n_chan - width + 1))
        out[:, f0 : f0 + width] = fill
    max_t = min(time_mask_width, int(time_mask_max_ratio * n_frames))
    for _ in range(num_time_masks):
        if max_t < 1:
            break
        width = int(rng.integers(0, max_t + 1))
        if width == 0:
            continue
        t0 = int(rng.integers(0, n_frames - width + 1))
        out[t0 : t0 + width, :] = fill
    return out
