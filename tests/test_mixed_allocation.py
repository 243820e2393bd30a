"""`mixing.allocate`: one candidate per layer under a total bit budget
(multiple-choice knapsack: Lagrangian relaxation, then a greedy fill), against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from sketchtune.mixing import allocate


def brute_force(losses, bits, budget):
    """The least summed loss of any choice within the budget."""
    best = float("inf")
    for choice in itertools.product(*(range(len(c)) for c in losses)):
        if sum(bits[i][j] for i, j in enumerate(choice)) <= budget:
            best = min(best, sum(losses[i][j] for i, j in enumerate(choice)))
    return best


def instance(rng: random.Random):
    """Layers whose candidates trade bits for loss as sketches do (more bits, less loss, with
    some dominated candidates mixed in), each layer on its own loss scale."""
    layers = rng.randint(2, 6)
    losses, bits = [], []
    for _ in range(layers):
        count, scale = rng.randint(1, 5), 10 ** rng.uniform(-3, 1)
        costs = sorted(rng.sample(range(10, 60), count))
        losses.append([scale * rng.uniform(0.1, 1) / (c / 10) ** rng.uniform(0.5, 3)
                       + (scale * rng.uniform(0, 2) if rng.random() < 0.2 else 0)
                       for c in costs])
        bits.append(costs)
    low = sum(min(b) for b in bits)
    high = sum(max(b) for b in bits)
    return losses, bits, rng.uniform(low, high + 5)


def chosen_totals(allocation, losses, bits):
    return (sum(losses[i][j] for i, j in enumerate(allocation.choice)),
            sum(bits[i][j] for i, j in enumerate(allocation.choice)))


def test_random_instances_fit_the_budget_and_match_brute_force():
    rng = random.Random(23)
    exact = 0
    trials = 400
    for _ in range(trials):
        losses, bits, budget = instance(rng)
        allocation = allocate(losses, bits, budget)
        optimum = brute_force(losses, bits, budget)
        loss, used = chosen_totals(allocation, losses, bits)
        assert used <= budget
        assert allocation.bits == pytest.approx(used) and allocation.loss == pytest.approx(loss)
        assert loss >= optimum - 1e-9
        # Lagrangian bounds: the dual value, and the Lagrangian choice's own gap, bracket the
        # optimum; the greedy fill only ever improves on the Lagrangian choice
        assert allocation.lower_bound <= optimum + 1e-9 * max(1.0, abs(optimum))
        slack = budget - allocation.lagrangian_bits
        assert allocation.lagrangian_bits <= budget
        assert allocation.lagrangian_loss - allocation.lam * slack <= optimum + 1e-9
        assert loss <= allocation.lagrangian_loss + 1e-12
        exact += loss <= optimum * (1 + 1e-9) + 1e-12
    # not a guarantee of the method (the knapsack is NP-hard), but it should rarely miss
    assert exact >= 0.9 * trials, f"optimal on {exact} of {trials}"


def test_tight_budget_takes_the_cheapest_and_below_it_refuses():
    losses = [[5.0, 1.0], [4.0, 2.0, 0.5]]
    bits = [[10, 20], [10, 15, 30]]
    allocation = allocate(losses, bits, 20)
    assert allocation.choice == (0, 0) and allocation.bits == 20
    with pytest.raises(ValueError):
        allocate(losses, bits, 19)


def test_ample_budget_takes_each_layers_least_loss():
    losses = [[5.0, 1.0, 3.0], [4.0, 2.0, 0.5]]
    bits = [[10, 20, 30], [10, 15, 30]]
    allocation = allocate(losses, bits, 1000)
    assert allocation.choice == (1, 2) and allocation.lam == 0.0
    assert allocation.loss == pytest.approx(1.5)


def test_greedy_fill_spends_what_the_lagrangian_choice_leaves():
    # upgrades saving 5 per 10 bits (layer 1), 9 per 20 (layer 0), 4.4 per 10 (layer 2), 20
    # bits to spend: the smallest multiplier that fits takes layer 1's only (10 bits), as layer
    # 0's comes next and needs 20; the fill then adds layer 2's, which the optimum also takes
    losses = [[10.0, 1.0], [10.0, 5.0], [10.0, 5.6]]
    bits = [[10, 30], [10, 20], [10, 20]]
    allocation = allocate(losses, bits, 50)
    assert allocation.lagrangian_bits == 40 and allocation.lagrangian_loss == pytest.approx(25)
    assert allocation.choice == (0, 1, 1) and allocation.bits == 50
    assert allocation.loss == pytest.approx(brute_force(losses, bits, 50))


def test_layers_with_many_orders_of_magnitude_apart():
    # as the real layer losses (1e-4 for an o_proj, 1 for a down_proj): the small layer's
    # upgrade is worthless, the big one's is worth its bits
    losses = [[2e-4, 1e-4], [3.0, 1.0]]
    bits = [[100, 200], [100, 200]]
    allocation = allocate(losses, bits, 300)
    assert allocation.choice == (0, 1)
