"""Spectral clustering of a class's heatmaps (SpRAy, Lapuschkin et al. 2019).

Downsampled normalised maps, a k-nearest-neighbour affinity graph, the number
of clusters from the eigengap of its normalised Laplacian, spectral
clustering; so that a strategy used by a minority of the class still shows up
as a cluster of its own.
"""

from __future__ import annotations

import math

import numpy as np

from audit.scan.config import DEFAULT, Config
from audit.scan.grids import pool2


def eigengap_k(eigvals, max_k: int, min_gap: float = DEFAULT.min_eigengap, zero: float = 1e-3) -> int:
    """Number of clusters from the smallest Laplacian eigenvalues.

    The eigengap heuristic: ``k = argmax_{1 <= k <= max_k} (lambda_k -
    lambda_{k-1})`` (0-based ascending eigenvalues), or 1 when that largest
    gap is below ``min_gap``; but never fewer than the number of (near-)zero
    eigenvalues (``< zero``), i.e. the (almost) disconnected parts of the
    affinity graph.  That matters when a minority strategy forms a tight
    group of its own while the rest of the class varies continuously (its
    spectrum rises slowly, so no single large gap stands out).
    """
    lam = np.sort(np.asarray(eigvals, np.float64))
    max_k = int(min(max_k, len(lam) - 1))
    if max_k < 2:
        return 1
    gaps = np.diff(lam[:max_k + 1])  # gaps[k-1] = lambda_k - lambda_{k-1}
    k = int(np.argmax(gaps)) + 1
    if gaps[k - 1] < min_gap:
        k = 1
    parts = int((lam[:max_k] < zero).sum())
    return max(k, parts)


def affinity(X: np.ndarray, n_neighbors: int | None = None):
    """Symmetric k-nearest-neighbour affinity with Gaussian weights (sparse CSR)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = n_neighbors or int(np.clip(round(math.sqrt(n)), 5, 15))
    k = min(k, n - 1)
    nn = NearestNeighbors(n_neighbors=k).fit(X)
    G = nn.kneighbors_graph(X, mode="distance")
    d = G.data
    sigma = float(np.median(d)) if len(d) and np.median(d) > 0 else 1.0
    G.data = np.exp(-((d / sigma) ** 2))
    A = G.maximum(G.T).tocsr()
    A.setdiag(0)
    A.eliminate_zeros()
    return A


def laplacian_eigvals(A, k: int) -> np.ndarray:
    """The ``k`` smallest eigenvalues of the normalised Laplacian of ``A``."""
    from scipy.sparse.csgraph import laplacian

    n = A.shape[0]
    L = laplacian(A, normed=True)
    k = min(k, n)
    if n <= 600:
        from scipy.linalg import eigh

        return eigh(L.toarray(), eigvals_only=True, subset_by_index=[0, k - 1])
    from scipy.sparse import identity
    from scipy.sparse.linalg import eigsh

    # largest eigenvalues of I - L (the normalised adjacency) = smallest of L
    vals = eigsh(identity(n) - L, k=k, which="LA", return_eigenvectors=False, tol=1e-6,
                 v0=np.ones(n) / math.sqrt(n))
    return np.sort(1.0 - vals)


def cluster_maps(X: np.ndarray, cfg: Config = DEFAULT, seed: int = 0):
    """SpRAy clustering of feature rows ``X`` (n, d): labels (n,) sorted by size, k, eigenvalues."""
    n = len(X)
    if n < 2 * cfg.min_cluster:
        return np.zeros(n, int), 1, np.zeros(0)
    A = affinity(X)
    lam = laplacian_eigvals(A, cfg.max_k + 1)
    k = eigengap_k(lam, min(cfg.max_k, n // cfg.min_cluster), cfg.min_eigengap)
    if k == 1:
        return np.zeros(n, int), 1, lam
    import warnings

    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():  # disconnected parts are expected: they are the clusters
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="cluster_qr",
                                    random_state=seed).fit_predict(A)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    remap = np.empty(k, int)
    remap[order] = np.arange(k)
    return remap[labels], k, lam


def map_features(grids: np.ndarray) -> np.ndarray:
    """Clustering features: Hellinger embedding (sqrt) of maps pooled to grid/2."""
    p = pool2(np.asarray(grids, np.float64))
    return np.sqrt(p.reshape(len(p), -1))
