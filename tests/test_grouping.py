"""Grouping: planted clusters recovered, stability by bucket bootstrap, group-count rules, shared ratio."""
import numpy as np
import pytest

from fairseq_gdps.gdps import grouping as G
from fairseq_gdps.gdps.stats import synthetic_statistics


# Tiny tensors: one thread avoids oversubscription stalls on shared cores (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


LANGS = ["l0", "l1", "l2", "l3", "l4", "l5"]
MODULES = {f"encoder.layers.{i}.fc1": 192 for i in range(3)}
PLANTED = "encoder.layers.2.fc1"
TWO = [0, 0, 0, 1, 1, 1]


def test_planted_groups_recovered_and_stable():
    st = synthetic_statistics(MODULES, LANGS, clusters={PLANTED: TWO}, steps=40, signal=0.5, noise=1.0,
                              own=0.05, subspace_dim=0, seed=0)
    res = G.group_languages(st, [PLANTED], resamples=200, seed=0)
    assert res.partition == (("l0", "l1", "l2"), ("l3", "l4", "l5"))
    assert res.groups == [["l0", "l1", "l2"], ["l3", "l4", "l5"]]
    assert "silhouette" in res.info["rule"]
    assert res.chosen_frequency >= 0.9
    assert res.frequencies[0][0] == res.partition
    assert sum(f for _, f in res.frequencies) == pytest.approx(1.0)
    assert res.coassignment[0, 1] >= 0.9 and res.coassignment[0, 4] <= 0.1
    np.testing.assert_allclose(np.diag(res.coassignment), 1.0)
    # an aligned module has no convincing split: one group
    aligned = G.group_languages(st, ["encoder.layers.0.fc1"], resamples=50, seed=0)
    assert aligned.partition == (tuple(LANGS),)
    assert "no convincing split" in aligned.info["rule"]


def test_weak_structure_is_less_stable():
    clear = synthetic_statistics(MODULES, LANGS, clusters={PLANTED: TWO}, steps=40, signal=0.5, noise=1.0,
                                 own=0.05, subspace_dim=0, seed=1)
    weak = synthetic_statistics(MODULES, LANGS, clusters={PLANTED: TWO}, steps=40, signal=0.15, noise=1.0,
                                shared=0.6, own=0.3, subspace_dim=0, seed=1)
    f_clear = G.group_languages(clear, [PLANTED], n_groups=2, resamples=200, seed=0).chosen_frequency
    res_weak = G.group_languages(weak, [PLANTED], n_groups=2, resamples=200, seed=0)
    assert f_clear >= 0.9
    assert res_weak.chosen_frequency < 0.7
    assert len(res_weak.frequencies) >= 3
    # the bootstrap is seeded: same seed, same table
    again = G.group_languages(weak, [PLANTED], n_groups=2, resamples=200, seed=0)
    assert again.frequencies == res_weak.frequencies


def test_group_count_rules():
    D = np.array([[0.0, 0.1, 0.9, 0.95],
                  [0.1, 0.0, 0.85, 0.9],
                  [0.9, 0.85, 0.0, 0.6],
                  [0.95, 0.9, 0.6, 0.0]])
    langs = ["a", "b", "c", "d"]
    assert G.cluster(D, langs)[0] == (("a", "b"), ("c", "d"))
    assert G.cluster(D, langs, n_groups=3)[0] == (("a", "b"), ("c",), ("d",))
    assert G.cluster(D, langs, n_groups=1)[0] == (("a", "b", "c", "d"),)
    assert G.cluster(D, langs, threshold=0.5)[0] == (("a", "b"), ("c",), ("d",))
    assert G.cluster(D, langs, threshold=1.5)[0] == (("a", "b", "c", "d"),)
    # silhouette is scale-free; the absolute gap rule refuses splits of near-identical languages
    part, info = G.cluster(D * 0.05, langs)
    assert part == (("a", "b", "c", "d"),) and info["best_k"] == 2
    assert G.cluster(D * 0.05, langs, min_split_distance=0.0)[0] == (("a", "b"), ("c", "d"))
    # two languages: one group unless forced; one language: trivially one group
    D2 = np.array([[0.0, 1.5], [1.5, 0.0]])
    assert G.cluster(D2, ["x", "y"])[0] == (("x", "y"),)
    assert G.cluster(D2, ["x", "y"], n_groups=2)[0] == (("x",), ("y",))
    assert G.cluster(np.zeros((1, 1)), ["x"])[0] == (("x",),)
    with pytest.raises(ValueError):
        G.cluster(D, langs, n_groups=5)
    with pytest.raises(ValueError):
        G.cluster(D, langs, n_groups=2, threshold=0.5)


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
