"""Metrics of the summed-statistics diagnostic: noise correction, Gaussian conflict, CCA, subspace
alignment, ranking; and the diagnostic itself."""
import numpy as np
import pytest
import torch

from fairseq_gdps.gdps import metrics as M
from fairseq_gdps.gdps.stats import GradientStatistics, synthetic_statistics


# Tiny tensors: one thread avoids oversubscription stalls on shared cores (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


LANGS = ["l0", "l1", "l2", "l3", "l4", "l5"]
MODULES = {f"encoder.layers.{i}.fc{j}": 192 for i in range(3) for j in (1, 2)}
PLANTED = "encoder.layers.1.fc2"


@pytest.fixture(scope="module")
def planted():
    return synthetic_statistics(MODULES, LANGS, clusters={PLANTED: [0, 0, 0, 1, 1, 1]}, steps=40,
                                signal=0.5, noise=1.0, own=0.05, subspace_dim=16, seed=3)


def test_planted_conflicting_module_ranks_first(planted):
    mm = M.compute_all(planted, subspace_rank=4)
    ranking = M.rank_modules(mm)
    assert ranking[0] == PLANTED
    top, second = mm[ranking[0]].conflict_score, mm[ranking[1]].conflict_score
    assert top > 5 * second
    rho = mm[PLANTED].corrected_cos
    within = [rho[i, j] for i in range(6) for j in range(6) if i != j and (i < 3) == (j < 3)]
    across = [rho[i, j] for i in range(3) for j in range(3, 6)]
    assert min(within) > 0.85 and max(np.abs(across)) < 0.3
    for m in MODULES:
        if m != PLANTED:
            assert mm[m].divergence_mean < 0.06 and mm[m].conflict_rate == 0.0
    # self-similarity ~ signal^2 / (signal^2 + noise^2) = 0.2
    np.testing.assert_allclose(mm[PLANTED].self_cos, 0.2, atol=0.05)
    # conflict score formula
    x = mm[PLANTED]
    assert x.conflict_score == pytest.approx(x.divergence_mean * (0.5 + 0.5 * (1 - x.alignment)))
    # per-step conflict: across-cluster pairs disagree more often than within-cluster ones
    p = x.step_conflict_prob
    assert np.mean([p[i, j] for i in range(3) for j in range(3, 6)]) > np.mean([p[0, 1], p[0, 2], p[3, 4], p[4, 5]]) + 0.2


def test_noise_correction_undoes_noise_bias():
    """Same expected direction, very noisy steps: raw cosine of means is far below 1, corrected is ~1."""
    st = synthetic_statistics({"m": 400}, ["a", "b"], steps=30, signal=0.3, noise=1.0, seed=1, subspace_dim=0)
    s = st.module_sums("m")
    raw = M.raw_cosine(s["n"], s["S"])[0, 1]
    rho = M.corrected_cosine(s["n"], s["S"], s["Q"])[0][0, 1]
    assert raw < 0.8
    assert rho == pytest.approx(1.0, abs=0.12)
    mm = M.module_metrics(st, "m")
    assert np.isnan(mm.alignment) and mm.conflict_score == pytest.approx(mm.divergence_mean)


def test_corrected_cosine_falls_back_when_no_signal():
    # language b's two steps (1, 1) and (-1, -0.5) nearly cancel: m_b = (0.25 - 3.25) / 2 < 0, so
    # its pairs use the raw cosine of the means and are flagged
    n = np.array([2.0, 2.0])
    S = np.array([[2.0, 2.0], [0.0, 0.5]])
    Q = np.array([4.0, 3.25])
    rho, unclipped, valid = M.corrected_cosine(n, S, Q)
    assert valid[0, 0] and not valid[1, 1] and not valid[0, 1]
    assert np.isnan(unclipped[0, 1])
    assert rho[0, 1] == pytest.approx(1 / np.sqrt(2)) == M.raw_cosine(n, S)[0, 1]
    assert rho[1, 1] == 1.0


def test_gaussian_negative_probability_matches_monte_carlo():
    rng = np.random.default_rng(0)
    r = 16  # the normal approximation of the quadratic form tightens as r grows
    A = rng.normal(size=(2 * r, 2 * r))
    C = A @ A.T / (2 * r)
    mu = rng.normal(size=2 * r) * 0.3
    z = rng.multivariate_normal(mu, C, size=100000)
    x, y = z[:, :r], z[:, r:]
    mc = float(np.mean(np.einsum("ta,ta->t", x, y) < 0))
    n = 100.0  # exact moments, given as sums over n steps
    M2 = (C + np.outer(mu, mu)) * n
    p = M.gaussian_negative_prob(n, n * mu[:r], n * mu[r:], M2[:r, :r], M2[r:, r:], M2[:r, r:])
    assert p == pytest.approx(mc, abs=0.02)


def test_ridge_cca_detects_shared_fluctuations():
    rng = np.random.default_rng(1)
    T, r = 2000, 6
    x = rng.normal(size=(T, r))
    y_corr = x @ rng.normal(size=(r, r)) + 0.3 * rng.normal(size=(T, r))
    y_ind = rng.normal(size=(T, r))

    def cca(a, b):
        return M.ridge_cca(T, a.sum(0), b.sum(0), a.T @ a, b.T @ b, a.T @ b, ridge=0.01)

    assert cca(x, y_corr).mean() > 0.85
    assert cca(x, y_ind).mean() < 0.1


def test_subspace_alignment_shared_vs_distinct_noise_subspaces():
    """Languages whose step-to-step variation lives in the same low-rank subspace are aligned."""
    d, k, steps = 48, 3, 60
    g = torch.Generator().manual_seed(4)
    U = {name: torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0] for name in ("A", "B", "C")}
    basis = {"a1": "A", "a2": "A", "b": "B", "c": "C"}
    st = GradientStatistics({"m": d}, languages=list(basis), subspace_dim=12)
    for t in range(steps):
        st.add_step(t, {l: {"m": 5 * U[u] @ torch.randn(k, generator=g, dtype=torch.float64)
                            + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)} for l, u in basis.items()})
    mm = M.module_metrics(st, "m", subspace_rank=k)
    a = mm.subspace_alignment
    assert a[0, 1] > 0.9                       # a1, a2 share a subspace
    assert a[0, 2] < 0.6 and a[2, 3] < 0.6     # distinct subspaces near chance (k / r = 0.25)
    assert mm.subspace_alignment_chance == pytest.approx(k / 12)


def test_summed_diagnostic_ranks_the_planted_module_and_needs_the_summed_statistics(planted):
    from fairseq_gdps.gdps import summed_diagnostics as SD

    d = SD.diagnose(planted, LANGS[:4], SD.Settings(subspace_rank=4, alignment_weight=0.0))
    assert d.ranking[0] == PLANTED and d.languages == LANGS[:4] and set(d.metrics) == set(MODULES)
    x = d.metrics[PLANTED]
    assert x.languages == LANGS[:4] and x.conflict_score == pytest.approx(x.divergence_mean)   # w = 0
    assert d.clipped["pairs"] == len(MODULES) * 6 and not d.mostly_clipped and d.notes == []
    one_step = synthetic_statistics({"m": 50}, ["a", "b"], steps=1, subspace_dim=0)
    assert "fewer than 2 steps" in SD.diagnose(one_step, ["a", "b"]).notes[0]
    alone = synthetic_statistics({"m": 50}, ["a", "b"], steps=2, subspace_dim=0, summed=False)
    with pytest.raises(ValueError, match="--gdps-summed-statistics"):
        SD.diagnose(alone, ["a", "b"])
