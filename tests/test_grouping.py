"""Grouping: forced groups by average linkage, canonical partitions, the shared ratio, bootstrap frequencies."""
from collections import Counter

import numpy as np
import pytest

from fairseq_gdps.gdps import grouping as G


def test_forced_groups_by_average_linkage():
    D = np.array([[0.0, 0.1, 0.9, 0.95],
                  [0.1, 0.0, 0.85, 0.9],
                  [0.9, 0.85, 0.0, 0.6],
                  [0.95, 0.9, 0.6, 0.0]])
    langs = ["a", "b", "c", "d"]
    assert G.cluster(D, langs, n_groups=2)[0] == (("a", "b"), ("c", "d"))
    assert G.cluster(D, langs, n_groups=3)[0] == (("a", "b"), ("c",), ("d",))
    assert G.cluster(D, langs, n_groups=1)[0] == (("a", "b", "c", "d"),)
    part, info = G.cluster(D, langs, n_groups=2)
    assert info["rule"] == "forced 2 groups" and info["linkage"].shape == (3, 4)
    assert G.cluster(np.zeros((1, 1)), ["x"], n_groups=1) == ((("x",),), {"linkage": None, "rule": "single language"})
    with pytest.raises(ValueError, match="cannot make 5 groups of 4"):
        G.cluster(D, langs, n_groups=5)
    # the distance of a similarity: symmetric, zero diagonal, an unknown similarity as 0
    rho = np.array([[1.0, 0.5, np.nan], [0.3, 1.0, -2.0], [np.nan, -2.0, 1.0]])
    np.testing.assert_allclose(G.to_distance(rho), [[0, 0.6, 1], [0.6, 0, 2], [1, 2, 0]])


def test_canonical_partition_order():
    assert G.canonical([2, 1, 2, 3], ["c", "a", "b", "d"]) == (("c", "b"), ("a",), ("d",))


def test_shared_ratio_quantised_and_clipped():
    langs = ["a", "b", "c"]
    part = (("a", "b"), ("c",))

    def rho_with(x):
        r = np.full((3, 3), 0.9)
        r[:2, 2] = r[2, :2] = x
        np.fill_diagonal(r, 1.0)
        return r

    assert G.shared_ratio(rho_with(0.5), part, langs) == (0.5, pytest.approx(0.5))
    assert G.shared_ratio(rho_with(0.44), part, langs)[0] == 0.5       # nearest step of 0.125
    assert G.shared_ratio(rho_with(0.40), part, langs)[0] == 0.375
    assert G.shared_ratio(rho_with(-0.3), part, langs)[0] == 0.25      # clipped low
    assert G.shared_ratio(rho_with(0.99), part, langs)[0] == 0.75      # clipped high
    assert G.shared_ratio(rho_with(0.6), part, langs, 0.1, 0.9, 0.2)[0] == pytest.approx(0.5)
    # a single group uses every pair
    assert G.shared_ratio(rho_with(0.5), (("a", "b", "c"),), langs)[1] == pytest.approx((0.9 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError):
        G.shared_ratio(rho_with(0.5), part, langs, 0.0, 0.75)
    with pytest.raises(ValueError):
        G.shared_ratio(rho_with(0.5), part, langs, 0.25, 1.0)


def test_partition_frequencies_and_coassignment():
    langs = ["a", "b", "c"]
    one, two = (("a", "b", "c"),), (("a", "b"), ("c",))
    freqs, chosen, co = G.partition_frequencies(Counter({two: 3, one: 1}), two, langs)
    assert freqs == [(two, 0.75), (one, 0.25)] and chosen == 0.75
    np.testing.assert_allclose(co, [[1, 1, 0.25], [1, 1, 0.25], [0.25, 0.25, 1]])
