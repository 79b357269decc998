"""SpRAy clustering of all of a class's maps: prototypes, the graph, the eigengap, minorities at scale."""

import numpy as np
import pytest

from audit.scan.cluster import (
    ClusterParams,
    affinity,
    cluster_maps,
    eigengap_k,
    laplacian_eigs,
    map_features,
    min_cluster_size,
    prototypes,
)


def blob(x, y, s=0.12, g=16):
    xs = (np.arange(g) + 0.5) / g
    b = np.exp(-((xs[None, :] - x) ** 2 + (xs[:, None] - y) ** 2) / (2 * s * s))
    return (b / b.sum()).astype(np.float32)


def strategy_maps(n, minority=0.0, seed=0):
    """A class whose maps follow a moving object; a share ``minority`` look at a tight spot in a corner."""
    rng = np.random.default_rng(seed)
    is_min = rng.random(n) < minority
    G = np.empty((n, 16, 16), np.float32)
    for i in range(n):
        if is_min[i]:
            G[i] = blob(0.9 + rng.normal(0, 0.01), 0.1 + rng.normal(0, 0.01), 0.06)
        else:
            G[i] = blob(*rng.uniform(0.2, 0.8, 2))
    return G, is_min


def noisy_copies(G, times, noise=0.05, seed=1):
    rng = np.random.default_rng(seed)
    C = np.repeat(G, times, axis=0) * (1 + noise * rng.standard_normal((len(G) * times,) + G.shape[1:]))
    C = np.maximum(C, 0).astype(np.float32)
    return C / C.sum(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("eig,max_k,parts,expected", [
    ([0, 0.01, 0.5, 0.6], 3, 1, 2),  # one clear gap after 2
    ([0, 0.01, 0.02, 0.9], 3, 1, 3),
    ([0, 0.02, 0.04, 0.06], 3, 1, 1),  # no gap: one cluster
    ([0, 0.02, 0.04, 0.06], 3, 2, 2),  # ... unless the graph has two parts
    ([0, 0.0, 0.0, 0.0, 0.0], 3, 4, 3),  # parts beyond max_k: max_k
    ([0, 0.5], 1, 1, 1),
])
def test_eigengap_table(eig, max_k, parts, expected):
    assert eigengap_k(eig, max_k, 0.1, parts) == expected


@pytest.mark.parametrize("n,min_maps,share,expected", [(200, 8, 0.01, 8), (20000, 8, 0.01, 200),
                                                       (100000, 8, 0.01, 1000), (801, 8, 0.01, 9)])
def test_min_cluster_size_is_absolute_and_relative(n, min_maps, share, expected):
    assert min_cluster_size(n, min_maps, share) == expected


def test_map_features_are_the_hellinger_embedding():
    G, _ = strategy_maps(5)
    ref = np.sqrt(G.astype(np.float64).reshape(5, 8, 2, 8, 2).sum(axis=(2, 4)).reshape(5, 64))
    X = map_features(G)
    assert X.dtype == np.float32 and np.allclose(X, ref, atol=1e-6)
    # Euclidean distance of the embedding = sqrt(2) x Hellinger distance: 0 for equal maps, sqrt 2 disjoint
    assert np.linalg.norm(map_features(blob(0.1, 0.1, 0.03)[None]) - map_features(blob(0.9, 0.9, 0.03)[None])) \
        == pytest.approx(np.sqrt(2), abs=1e-3)


def test_prototypes_merge_copies_and_keep_counts():
    G, _ = strategy_maps(50)
    X = map_features(noisy_copies(G, 20))  # rows 20i .. 20i+19 are copies of map i
    order = np.random.default_rng(0).permutation(len(X))
    P = prototypes(X, 0.1, 2000, order)
    assert P.weights.sum() == 1000 and len(P.assign) == 1000
    # every prototype's centre is the mean of its rows (float64 reference)
    for j in range(len(P.centres)):
        assert np.allclose(P.centres[j], X[P.assign == j].astype(np.float64).mean(axis=0), atol=1e-5)
    # the copies of one map share a prototype (maps that close count as one)
    same = [len(set(P.assign[20 * i:20 * i + 20])) == 1 for i in range(50)]
    assert np.mean(same) >= 0.9
    assert len(P.centres) <= 50


def test_prototypes_cap_sends_the_rest_to_the_nearest():
    X = np.random.default_rng(0).random((3000, 8)).astype(np.float32)
    P = prototypes(X, 0.01, 100)
    assert len(P.centres) == 100 and P.weights.sum() == 3000
    # rows after the cap: nearest leader (the leaders are the first rows that started a prototype)
    leaders = np.array([np.nonzero(P.assign == j)[0][0] for j in range(100)])
    late = np.arange(2000, 3000)
    d = ((X[late, None, :].astype(np.float64) - X[leaders][None]) ** 2).sum(axis=2)
    assert np.array_equal(P.assign[late], d.argmin(axis=1))


def test_sparse_eigensolver_matches_dense():
    X = np.random.default_rng(2).random((800, 6)).astype(np.float32)
    A = affinity(X)
    lam = laplacian_eigs(A, 5)  # 800 > 600 nodes: eigsh
    D = A.toarray().astype(np.float64)
    assert np.allclose(np.diag(D), 1.0)  # every prototype is its own neighbour
    s = 1 / np.sqrt(D.sum(axis=1))
    ref = np.linalg.eigvalsh(np.eye(800) - s[:, None] * D * s[None, :])[:5]
    assert np.allclose(lam, ref, atol=1e-6)


def test_every_part_of_a_large_graph_has_its_zero_eigenvalue():
    # five apart groups of 300 (1500 nodes): a Lanczos solver on the whole graph finds only some of the
    # repeated eigenvalue 0; solved part by part, all five are there, with their indicator vectors
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.random((300, 4)) * 0.5 + 10 * i for i in range(5)]).astype(np.float32)
    lam, vecs = laplacian_eigs(affinity(X), 7, vectors=True)
    assert np.allclose(lam[:5], 0, atol=1e-8) and lam[5] > 0.01
    part = np.repeat(np.arange(5), 300)
    for j in range(5):  # each zero-eigenvector lives on one part
        assert len(set(part[np.abs(vecs[:, j]) > 1e-9])) == 1


def test_one_strategy_is_one_cluster():
    G, _ = strategy_maps(400)
    c = cluster_maps(map_features(G))
    assert c.k == 1 and (c.labels == 0).all()


def test_minority_of_two_percent_of_twenty_thousand_is_its_own_cluster():
    G, is_min = strategy_maps(20000, minority=0.02)
    n = len(G)
    params = ClusterParams(min_size=min_cluster_size(n, 8, 0.01))
    c = cluster_maps(map_features(G), params)
    assert c.k == 2
    sizes = c.sizes()
    assert sizes[1] == is_min.sum() and sizes[1] >= params.min_size
    assert (c.labels[is_min] == 1).all() and (c.labels[~is_min] == 0).all()


def test_copies_give_the_same_clusters():
    G, is_min = strategy_maps(200, minority=0.1, seed=3)
    a = cluster_maps(map_features(G))
    C = noisy_copies(G, 100)
    b = cluster_maps(map_features(C), order=np.random.default_rng(0).permutation(len(C)))
    assert a.k == b.k == 2
    assert np.array_equal(np.repeat(a.labels, 100), b.labels)
    assert (a.labels[is_min] == 1).all()


def test_stray_outliers_are_no_cluster():
    G, _ = strategy_maps(300)
    odd = np.stack([blob(0.02, 0.98, 0.02), blob(0.98, 0.98, 0.02), blob(0.02, 0.02, 0.02)])
    c = cluster_maps(map_features(np.concatenate([G, odd])))
    assert c.k == 1 and (c.labels == 0).all()


def test_too_few_maps_is_one_cluster():
    G, _ = strategy_maps(15, minority=0.5)
    c = cluster_maps(map_features(G))
    assert c.k == 1 and len(c.labels) == 15
