"""Spectral clustering of all of a class's heatmaps (SpRAy, Lapuschkin et al. 2019), at any scale.

A class's maps, pooled to 8 x 8 energy distributions and embedded by their
square roots (Euclidean distance = Hellinger distance, 0..sqrt 2), are
clustered in four steps:

1. :func:`prototypes`: every map joins the first *prototype* within
   ``merge_radius`` of it (maps closer than that are the same map up to
   noise), else starts one; at most ``max_prototypes`` are started, later
   maps join the nearest.  A prototype's weight is its number of maps.
   Copies of a map (the same picture twice, video frames, 100 noisy copies
   of a data set) thereby become one weighted node instead of a clique that
   a k-nearest-neighbour graph would cut off from the rest: the graph, and
   so the clusters, are the same for 200 maps and for 100 copies of each.
2. :func:`affinity`: a symmetric k-nearest-neighbour graph of the
   prototypes (scikit-learn ``NearestNeighbors``; k = sqrt(m) clipped to
   5..15), Gaussian weights with the median neighbour distance as width,
   weights below ``floor`` (``Config.edge_floor``) dropped, and every prototype its own
   neighbour (weight 1), so that a tight group of maps far from the rest is
   a part of its own, even a single prototype.
3. :func:`laplacian_eigs` and :func:`eigengap_k`: the smallest eigenvalues
   of the normalised Laplacian, part by part (``scipy.sparse.linalg.eigsh``
   on the normalised adjacency of parts above 600 prototypes): the number
   of clusters is the largest eigengap, but never fewer than the graph's
   (nearly) disconnected parts.  Parts with too few maps to be judged
   (stray outliers) are set aside first and later join the cluster of their
   nearest prototype, so they neither take a cluster's place nor an
   eigenvector.
4. k-means (weighted by the prototypes' maps) on the row-normalised
   eigenvectors (Ng, Jordan and Weiss 2001); every map gets its prototype's
   cluster; cluster 0 is the largest.

Memory: the (n, 64) float32 features (256 bytes a map), an (n,) int32
assignment, and the prototypes' graph (at most ``max_prototypes`` nodes).
Time: one pass over the maps against at most ``max_prototypes`` prototypes
(a matrix product per batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audit.scan.config import Config

_BATCH = 4096


@dataclass(frozen=True)
class ClusterParams:
    """How a class's maps are clustered (docs/scan.md, "Clusters").

    ``min_size``: the fewest maps a cluster needs to be judged (the absolute
    and relative minimums of :func:`min_cluster_size`, combined by the
    caller); a disconnected part with fewer maps joins its nearest cluster.
    """

    max_k: int = 6  # most clusters per class
    min_eigengap: float = 0.1  # a smaller largest eigengap: one cluster
    min_size: int = 8
    merge_radius: float = 0.1  # Hellinger distance below which two maps count as one
    max_prototypes: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class Prototypes:
    """Maps merged into weighted prototypes: ``centres`` (m, d), ``weights`` (m,), ``assign`` (n,)."""

    centres: np.ndarray
    weights: np.ndarray
    assign: np.ndarray


@dataclass(frozen=True)
class Clustering:
    """``labels`` (n,): the cluster of each map, 0 = the largest; ``k`` clusters; ``eigvals``:
    the smallest Laplacian eigenvalues (empty when not computed); ``n_prototypes``."""

    labels: np.ndarray
    k: int
    eigvals: np.ndarray
    n_prototypes: int

    def sizes(self) -> np.ndarray:
        """Maps per cluster."""
        return np.bincount(self.labels, minlength=self.k)


def min_cluster_size(n: int, min_maps: int, min_share: float) -> int:
    """The fewest maps a cluster of a class of ``n`` maps needs: ``max(min_maps, ceil(min_share * n))``."""
    return max(int(min_maps), int(math.ceil(min_share * n)))


def map_features(grids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Clustering features: Hellinger embedding (sqrt) of maps sum-pooled by 2, (n, (g/2)^2) float32.

    Converted in chunks, so float16 grids never exist as a float32 copy.
    """
    n, s, _ = grids.shape
    out = np.empty((n, (s // 2) ** 2), np.float32)
    for a in range(0, n, chunk):
        g = np.asarray(grids[a:a + chunk], np.float32)
        p = g.reshape(len(g), s // 2, 2, s // 2, 2).sum(axis=(2, 4))
        out[a:a + chunk] = np.sqrt(np.maximum(p.reshape(len(g), -1), 0.0))
    return out


def _sq_dist(X: np.ndarray, C: np.ndarray, c2: np.ndarray) -> np.ndarray:
    d = (X * X).sum(axis=1)[:, None] - 2.0 * (X @ C.T) + c2[None, :]
    return np.maximum(d, 0.0)


def _new_leaders(X: np.ndarray, todo: np.ndarray, r2: float, room: int) -> tuple[list, dict]:
    """Greedy leaders among the rows ``todo`` of ``X``: each takes the remaining rows within the radius."""
    leaders, members = [], {}
    todo = np.asarray(todo)
    while len(todo) and len(leaders) < room:
        first = int(todo[0])
        near = ((X[todo] - X[first]) ** 2).sum(axis=1) <= r2
        leaders.append(first)
        members[first] = todo[near]
        todo = todo[~near]
    return leaders, members


def prototypes(X: np.ndarray, radius: float, max_m: int, order: np.ndarray | None = None) -> Prototypes:
    """Merge the rows of ``X`` into at most ``max_m`` weighted prototypes (leader clustering).

    Args:
        X: (n, d) features.
        radius: a row within this distance of a prototype's leader joins it.
        max_m: the most prototypes; once reached, every further row joins
            its nearest leader.
        order: the order in which rows are visited (default: as given);
            pass a fixed pseudo-random order so that no part of the data is
            favoured.

    Returns:
        :class:`Prototypes`: the mean of each prototype's rows, its number
        of rows, and each row's prototype.
    """
    X = np.asarray(X, np.float32)
    n, d = X.shape
    order = np.arange(n) if order is None else np.asarray(order)
    assign = np.full(n, -1, np.int32)
    L = np.zeros((max(1, min(max_m, n)), d), np.float32)  # the leaders, L[:m]
    m = 0
    r2 = radius * radius
    for s in range(0, n, _BATCH):
        idx = order[s:s + _BATCH]
        B = X[idx]
        todo = np.arange(len(idx))
        if m:
            d2 = _sq_dist(B, L[:m], (L[:m] ** 2).sum(axis=1))
            j = d2.argmin(axis=1)
            hit = d2[np.arange(len(idx)), j] <= r2
            assign[idx[hit]] = j[hit]
            todo = todo[~hit]
        leaders, members = _new_leaders(B, todo, r2, len(L) - m)
        for li in leaders:
            assign[idx[members[li]]] = m
            L[m] = B[li]
            m += 1
        left = idx[assign[idx] < 0]
        if len(left):  # no room for more leaders: the nearest one
            assign[left] = _sq_dist(X[left], L[:m], (L[:m] ** 2).sum(axis=1)).argmin(axis=1)
    return _prototype_means(X, assign, m)


def _prototype_means(X: np.ndarray, assign: np.ndarray, m: int) -> Prototypes:
    from scipy.sparse import csr_matrix

    n = len(X)
    S = csr_matrix((np.ones(n, np.float32), (assign, np.arange(n))), shape=(m, n))
    w = np.asarray(S.sum(axis=1)).ravel()
    centres = np.asarray(S @ X) / np.maximum(w, 1)[:, None]
    return Prototypes(centres.astype(np.float32), w.astype(np.int64), assign)


def affinity(C: np.ndarray, n_neighbors: int | None = None, floor: float = Config.edge_floor):
    """Symmetric k-nearest-neighbour affinity of the rows of ``C`` (sparse CSR, diagonal 1).

    Gaussian weights ``exp(-(d / sigma)^2)`` with ``sigma`` the median
    distance to the neighbours; weights below ``floor`` dropped.
    """
    from scipy.sparse import identity
    from sklearn.neighbors import NearestNeighbors

    m = len(C)
    if m == 1:
        return identity(1, format="csr")
    k = n_neighbors or int(np.clip(round(math.sqrt(m)), 5, 15))
    k = min(k, m - 1)
    G = NearestNeighbors(n_neighbors=k).fit(C).kneighbors_graph(C, mode="distance")
    d = G.data
    med = float(np.median(d)) if len(d) else 0.0
    sigma = med if med > 0 else 1.0
    G.data = np.exp(-((d / sigma) ** 2))
    G.data[G.data < floor] = 0.0
    A = G.maximum(G.T).tocsr()
    A.setdiag(1.0)
    A.eliminate_zeros()
    return A


def _part_eigs(A, k: int):
    """Smallest ``k`` eigenpairs of the normalised Laplacian of a connected graph ``A`` (ascending)."""
    from scipy.sparse import diags

    m = A.shape[0]
    k = min(k, m)
    deg = np.asarray(A.sum(axis=1)).ravel()
    dinv = diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    N = (dinv @ A @ dinv).tocsr()
    if m <= 600 or k >= m - 1:
        from scipy.linalg import eigh

        vals, vecs = eigh(N.toarray(), subset_by_index=[m - k, m - 1])
    else:
        from scipy.sparse.linalg import eigsh

        vals, vecs = eigsh(N, k=k, which="LA", tol=1e-8, v0=np.sqrt(deg) / np.linalg.norm(np.sqrt(deg)))
    order = np.argsort(-vals)
    return np.clip(1.0 - vals[order], 0.0, 2.0), vecs[:, order]


def laplacian_eigs(A, k: int, vectors: bool = False):
    """The ``k`` smallest eigenvalues (ascending) of the normalised Laplacian of ``A``, and the vectors.

    The graph's connected parts are solved one by one (the spectrum of a
    graph is the union of its parts'; a Lanczos solver on the whole graph
    misses some of the repeated eigenvalue 0 of several parts): dense
    ``eigh`` up to 600 nodes, else ``scipy.sparse.linalg.eigsh`` on the
    normalised adjacency ``D^-1/2 A D^-1/2`` (its largest eigenvalues are
    ``1 - lambda``).
    """
    from scipy.sparse.csgraph import connected_components

    m = A.shape[0]
    k = min(k, m)
    n_parts, comp = connected_components(A, directed=False)
    lams, vecs = [], []
    for p in range(n_parts):
        idx = np.nonzero(comp == p)[0]
        lam, v = _part_eigs(A[idx][:, idx], k)
        full = np.zeros((m, len(lam)))
        full[idx] = v
        lams.append(lam)
        vecs.append(full)
    lam = np.concatenate(lams)
    order = np.argsort(lam, kind="stable")[:k]
    return (lam[order], np.concatenate(vecs, axis=1)[:, order]) if vectors else lam[order]


def eigengap_k(eigvals, max_k: int, min_gap: float = 0.1, parts: int = 1,
               near_zero: float = Config.near_zero) -> int:
    """Number of clusters from the smallest Laplacian eigenvalues (ascending).

    The eigengap heuristic: ``k = argmax_{1 <= k <= max_k} (lambda_k -
    lambda_{k-1})`` (0-based), or 1 when that largest gap is below
    ``min_gap``; but never fewer than ``parts``, the graph's (nearly)
    disconnected parts (each has an eigenvalue of (nearly) 0, below
    ``near_zero`` (``Config.near_zero``): a tight minority strategy is one even
    when the rest of the class varies so smoothly that no large gap stands
    out), and never more than ``max_k``.
    """
    lam = np.sort(np.asarray(eigvals, np.float64))
    parts = max(parts, int((lam[:max_k] < near_zero).sum()))
    top = int(min(max_k, len(lam) - 1))
    if top < 2:
        return max(1, min(parts, max_k))
    gaps = np.diff(lam[:top + 1])  # gaps[k-1] = lambda_k - lambda_{k-1}
    k = int(np.argmax(gaps)) + 1
    if gaps[k - 1] < min_gap:
        k = 1
    return int(min(max(k, parts), max_k))


def _big_parts(A, weights: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """Prototypes in parts of the graph with at least ``min_size`` maps, and the number of such parts."""
    from scipy.sparse.csgraph import connected_components

    n_parts, comp = connected_components(A, directed=False)
    mass = np.bincount(comp, weights=weights, minlength=n_parts)
    big = mass >= min_size
    if not big.any():  # nothing big enough: keep the heaviest part
        big[int(np.argmax(mass))] = True
    return big[comp], int(big.sum())


def _kmeans(emb: np.ndarray, weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norm > 0, norm, 1.0)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb, sample_weight=weights)


def _by_size(labels: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Labels renumbered by mass (0 = the heaviest), clusters left empty dropped; and their number."""
    mass = np.bincount(labels, weights=weights, minlength=k)
    order = np.argsort(-mass, kind="stable")
    order = order[mass[order] > 0]
    remap = np.full(k, -1, np.int32)
    remap[order] = np.arange(len(order))
    return remap[labels], len(order)


def cluster_prototypes(P: Prototypes, params: ClusterParams) -> tuple[np.ndarray, int, np.ndarray]:
    """Cluster labels (m,) of the prototypes, the number of clusters, the eigenvalues."""
    m, w, n = len(P.centres), P.weights, int(P.weights.sum())
    max_k = int(min(params.max_k, n // max(1, params.min_size)))
    if m < 2 or max_k < 2:
        return np.zeros(m, np.int32), 1, np.zeros(0)
    A = affinity(P.centres)
    keep, parts = _big_parts(A, w, params.min_size)
    idx = np.nonzero(keep)[0]
    if len(idx) < 2:
        return np.zeros(m, np.int32), 1, np.zeros(0)
    Ak = A[idx][:, idx]
    lam, vecs = laplacian_eigs(Ak, max_k + 1, vectors=True)
    k = min(eigengap_k(lam, max_k, params.min_eigengap, parts), len(idx))
    labels = np.zeros(m, np.int32)
    if k > 1:
        labels[idx] = _kmeans(vecs[:, :k], w[idx], k, params.seed)
    if len(idx) < m:  # stray parts join the cluster of their nearest kept prototype
        from sklearn.neighbors import NearestNeighbors

        stray = np.nonzero(~keep)[0]
        near = NearestNeighbors(n_neighbors=1).fit(P.centres[idx]).kneighbors(P.centres[stray])[1][:, 0]
        labels[stray] = labels[idx[near]]
    labels, k = _by_size(labels, w, k)
    return labels, k, lam


def cluster_maps(X: np.ndarray, params: ClusterParams = ClusterParams(), order=None) -> Clustering:
    """SpRAy clustering of feature rows ``X`` (n, d), all of them.

    Args:
        X: (n, d) features, e.g. :func:`map_features` of a class's grids.
        params: :class:`ClusterParams`.
        order: the order in which maps found prototypes (default as given);
            the scan passes an order fixed by the image ids.

    Returns:
        :class:`Clustering`; one cluster when there are fewer than twice
        ``params.min_size`` maps.
    """
    X = np.asarray(X, np.float32)
    n = len(X)
    if n < 2 * params.min_size:
        return Clustering(np.zeros(n, np.int32), 1, np.zeros(0), 0)
    P = prototypes(X, params.merge_radius, params.max_prototypes, order)
    labels, k, lam = cluster_prototypes(P, params)
    return Clustering(labels[P.assign].astype(np.int32), k, lam, len(P.centres))
