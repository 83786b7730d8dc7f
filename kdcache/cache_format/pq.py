"""Product quantisation of hidden states (hidden_codec "pq", docs/format.md).

A vector x of size D is cut into M sub-vectors of D / M values; sub-vector m is stored as the
index (uint8) of its nearest of 256 centroids ``codebooks[m]``. Decoding is a table lookup::

    x_hat[m * s:(m + 1) * s] = codebooks[m, codes[m]]      s = D / M

Codebooks are trained with k-means (faiss, the ``pq`` extra: ``pip install 'kdcache[pq]'``;
docs/performance/cache_io.md has the timing against scikit-learn) on the first
``pq_train_positions`` positions a writer sees; encoding and decoding are numpy only, so reading
a PQ cache needs no faiss.
"""

from __future__ import annotations

import numpy as np

PQ_CENTROIDS = 256
# Positions buffered at the start of a build to train the codebooks (docs/performance/cache_io.md:
# fidelity is flat beyond ~20k positions for D = 384..576).
DEFAULT_PQ_TRAIN_POSITIONS = 20000
# k-means iterations per sub-space (faiss' default is 25; 20 loses < 0.001 cosine).
DEFAULT_PQ_ITERATIONS = 20
# Default sub-spaces: 16 B/position (uint8 codes), the budget; mean cosine >= 0.95 measured
# for MiniLM (D=384) and SmolLM2 (D=576), docs/performance/cache_io.md.
DEFAULT_PQ_SUBSPACES = 16


def check_subspaces(dim: int, m: int) -> str | None:
    """Why M sub-spaces cannot split a D-dim vector, or None."""
    if not 1 <= m <= dim:
        return f"pq_subspaces {m} must be in 1..{dim} (the hidden size)"
    if dim % m:
        divisors = [d for d in (4, 8, 12, 16, 24, 32, 48, 64) if dim % d == 0]
        return f"hidden size {dim} is not divisible by pq_subspaces {m} (divisors: {divisors})"
    return None


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "hidden_codec 'pq' trains its codebooks with faiss: pip install 'kdcache[pq]' "
            "(or pip install faiss-cpu)"
        ) from None
    return faiss


def train_codebooks(
    x: np.ndarray, m: int, *, seed: int = 0, iterations: int = DEFAULT_PQ_ITERATIONS
) -> np.ndarray:
    """k-means codebooks, float32 [M, 256, D / M], for the rows of ``x`` [n, D].

    Deterministic for a given ``x``, ``seed`` and faiss build (single-threaded k-means). With
    fewer than 256 rows the rows themselves are the centroids (repeated cyclically to 256); with
    none, zeros.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    n, dim = x.shape
    why = check_subspaces(dim, m)
    if why:
        raise ValueError(why)
    s = dim // m
    cb = np.zeros((m, PQ_CENTROIDS, s), np.float32)
    if n == 0:
        return cb
    if n < PQ_CENTROIDS:
        rows = x[np.arange(PQ_CENTROIDS) % n]
        return np.ascontiguousarray(rows.reshape(PQ_CENTROIDS, m, s).transpose(1, 0, 2))
    faiss = _faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # reproducible (and the build's other threads keep the CPU)
    try:
        for j in range(m):
            km = faiss.Kmeans(
                s,
                PQ_CENTROIDS,
                niter=iterations,
                seed=seed + j,
                min_points_per_centroid=1,
                max_points_per_centroid=1 << 30,  # use the whole sample, no sub-sampling
            )
            km.train(np.ascontiguousarray(x[:, j * s : (j + 1) * s]))
            cb[j] = km.centroids
    finally:
        faiss.omp_set_num_threads(threads)
    return cb


def encode(x: np.ndarray, codebooks: np.ndarray, block: int = 8192) -> np.ndarray:
    """uint8 codes [n, M]: the nearest centroid (squared L2; lowest index on ties) per
    sub-vector."""
    x = np.asarray(x, dtype=np.float32)
    m, _, s = codebooks.shape
    n = len(x)
    codes = np.empty((n, m), np.uint8)
    norms = np.einsum("mks,mks->mk", codebooks, codebooks)  # [M, 256]
    for a in range(0, n, block):
        xb = x[a : a + block]
        for j in range(m):
            d = norms[j][None, :] - 2.0 * (xb[:, j * s : (j + 1) * s] @ codebooks[j].T)
            codes[a : a + block, j] = np.argmin(d, axis=1)
    return codes


def decode(codes: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """float32 [n, M * s] vectors of uint8 codes [n, M]."""
    m, _, s = codebooks.shape
    codes = np.asarray(codes)
    return codebooks[np.arange(m)[None, :], codes.astype(np.intp)].reshape(len(codes), m * s)
