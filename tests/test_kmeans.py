import torch

from sketchtune.kmeans import exact_kmeans_1d, lloyd_kmeans_1d


def test_kmeans_recovers_separated_clusters():
    centers = torch.tensor([-3.0, 0.0, 2.0, 5.0])
    g = torch.Generator().manual_seed(0)
    points = (centers.repeat_interleave(25) + 0.01 * torch.randn(100, generator=g))[None]
    found = lloyd_kmeans_1d(points, torch.ones(1, 100), 4)
    torch.testing.assert_close(found[0], centers, atol=0.01, rtol=0)


def test_kmeans_weights_pull_the_centroid():
    points = torch.tensor([[0.0, 1.0]])
    found = lloyd_kmeans_1d(points, torch.tensor([[3.0, 1.0]]), 1)
    torch.testing.assert_close(found, torch.tensor([[0.25]]))


def _kmeans_objective(points, weights, centroids):
    dist = (points[:, :, None] - centroids[:, None, :]) ** 2
    return (weights * dist.min(-1).values).sum(1)


def test_exact_kmeans_matches_brute_force():
    from itertools import combinations

    g = torch.Generator().manual_seed(4)
    points = torch.randn(3, 7, generator=g, dtype=torch.float64)
    weights = torch.rand(3, 7, generator=g, dtype=torch.float64) + 0.1
    found = exact_kmeans_1d(points, weights, 3)
    for row in range(3):
        order = points[row].argsort()
        x, w = points[row][order], weights[row][order]
        best = float("inf")
        for a, b in combinations(range(1, 7), 2):  # contiguous partitions of the sorted points
            parts = [(0, a), (a, b), (b, 7)]
            cost = sum(
                (w[i:j] * (x[i:j] - (w[i:j] * x[i:j]).sum() / w[i:j].sum()) ** 2).sum()
                for i, j in parts
            )
            best = min(best, float(cost))
        got = _kmeans_objective(points[row : row + 1], weights[row : row + 1], found[row : row + 1])
        assert abs(float(got) - best) < 1e-9


def test_exact_beats_lloyd():
    g = torch.Generator().manual_seed(6)
    points = torch.randn(64, 144, generator=g)
    weights = torch.rand(64, 144, generator=g) ** 4 + 0.01
    lloyd = _kmeans_objective(points, weights, lloyd_kmeans_1d(points, weights, 16))
    exact = _kmeans_objective(points, weights, exact_kmeans_1d(points, weights, 16))
    # The exact solver is never worse, and on such rows much better than Lloyd's local optimum.
    assert (exact <= lloyd * (1 + 1e-5)).all()
    assert exact.sum() < 0.7 * lloyd.sum()


def test_both_solvers_recover_separated_clusters():
    centers = torch.tensor([-3.0, 0.0, 2.0, 5.0])
    points = centers.repeat_interleave(3)[None]
    for solver in (exact_kmeans_1d, lloyd_kmeans_1d):
        torch.testing.assert_close(solver(points, torch.ones(1, 12), 4)[0], centers)


def test_more_clusters_than_distinct_points():
    found = exact_kmeans_1d(torch.tensor([[1.0, 1.0, 2.0]]), torch.ones(1, 3), 4)
    assert set(found[0].tolist()) == {1.0, 2.0}


def test_exact_kmeans_broadcast_weights_equal_expanded_copies():
    # A (1, n) row is handed to numba once; it must give the bits a full (N, n) copy gives.
    g = torch.Generator().manual_seed(7)
    points = torch.randn(50, 33, generator=g)
    row = torch.rand(1, 33, generator=g) + 0.05
    expected = exact_kmeans_1d(points, row.expand(50, 33).contiguous(), 8)
    for weights in (row, row[0], row.expand(50, 33)):
        assert torch.equal(exact_kmeans_1d(points, weights, 8), expected)
    ones = exact_kmeans_1d(points, torch.ones(50, 33), 8)
    assert torch.equal(exact_kmeans_1d(points, torch.ones(1, 1), 8), ones)
