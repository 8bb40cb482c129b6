"""The split of an FFN into shared + per-group private units, and the PartitionedFFN module."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_gdps.gdps.split import (
    choose_shared_units,
    dense_group_weights,
    n_shared_units,
    split_ffn_weights,
    unit_scores,
)
from fairseq_gdps.modules.partitioned_ffn import PartitionedFFN, route

D, H = 12, 20


def dense_ffn(x, w1, b1, w2, b2, act=F.relu):
    return F.linear(act(F.linear(x, w1, b1)), w2, b2)


@pytest.fixture
def ffn_weights():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(H, D, generator=g), torch.randn(H, generator=g),
            torch.randn(D, H, generator=g), torch.randn(D, generator=g))


def test_n_shared_units():
    assert n_shared_units(512, 0.5) == 256
    assert n_shared_units(10, 0.0) == 0 and n_shared_units(10, 1.0) == 10
    assert n_shared_units(10, 0.26) == 3
    with pytest.raises(ValueError):
        n_shared_units(10, 1.5)


def test_energy_scores_rank_units():
    w1 = torch.ones(4, 3)
    w2 = torch.ones(3, 4)
    w2[:, 2] *= 10  # unit 2 writes most to the output
    w1[1] *= 5  # unit 1 has the largest input weights
    s = unit_scores(w1, w2, "energy")
    assert list(np.argsort(-s)[:2]) == [2, 1]
    # with activation statistics the activation energy replaces the fc1 norm
    s = unit_scores(w1, w2, "energy", act_energy=[0.0, 0.0, 0.0, 400.0])
    assert np.argmax(s) == 3
    assert np.isclose(s[3], 20.0 * np.sqrt(3))  # sqrt(E[a^2]) * ||fc2[:, h]||


def test_svd_scores_follow_dominant_subspace():
    # two units write along e0 strongly, one along e1 weakly: the top direction holds > 90%
    w2 = torch.zeros(3, 3)
    w2[0, 0], w2[0, 1], w2[1, 2] = 10.0, 9.0, 1.0
    w1 = torch.ones(3, 2)
    s = unit_scores(w1, w2, "svd", svd_energy=0.9)
    assert s[2] == pytest.approx(0.0, abs=1e-9) and s[0] > s[1] > 0
    # keeping all directions, svd energy equals the squared energy score
    s_all = unit_scores(w1, w2, "svd", svd_energy=1.0)
    np.testing.assert_allclose(s_all, unit_scores(w1, w2, "energy") ** 2, rtol=1e-9, atol=1e-9)


def test_random_scores_are_seeded():
    w1, w2 = torch.randn(H, D), torch.randn(D, H)
    a = unit_scores(w1, w2, "random", seed=3)
    assert np.array_equal(a, unit_scores(w1, w2, "random", seed=3))
    assert not np.array_equal(a, unit_scores(w1, w2, "random", seed=4))
    with pytest.raises(ValueError):
        unit_scores(w1, w2, "nope")


def test_choose_shared_units_partition():
    shared, private = choose_shared_units([0.1, 5.0, 3.0, 3.0, 0.0], 2)
    assert list(shared) == [1, 2] and list(private) == [0, 3, 4]  # tie 2/3 -> lower index


@pytest.mark.parametrize("method", ["energy", "svd", "random"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_split_is_function_preserving(ffn_weights, method, ratio):
    w1, b1, w2, b2 = ffn_weights
    groups = 3
    sw = split_ffn_weights(w1, b1, w2, b2, groups, ratio, method=method)
    s = n_shared_units(H, ratio)
    assert sw.n_shared == s and sw.n_private == H - s and sw.n_groups == groups
    assert sorted(sw.unit_order.tolist()) == list(range(H))
    x = torch.randn(7, 3, D)
    ref = dense_ffn(x, w1, b1, w2, b2)
    for g in range(groups):
        fw1, fb1, fw2, fb2 = dense_group_weights(sw, g)
        assert torch.equal(fw1, w1) and torch.equal(fb1, b1) and torch.equal(fw2, w2) and torch.equal(fb2, b2)
    m = PartitionedFFN.from_split(sw).eval()
    for g in range(groups):
        out = m(x, torch.full((3,), g, dtype=torch.long))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    mixed = torch.tensor([2, 0, 1])
    torch.testing.assert_close(m(x, mixed), ref, atol=1e-5, rtol=1e-5)


def test_energy_keeps_strongest_units_shared(ffn_weights):
    w1, b1, w2, b2 = ffn_weights
    sw = split_ffn_weights(w1, b1, w2, b2, 2, 0.25, method="energy")
    score = (w1.norm(dim=1) * w2.norm(dim=0)).numpy()
    top = set(np.argsort(-score)[: n_shared_units(H, 0.25)].tolist())
    assert set(sw.unit_order[: sw.n_shared].tolist()) == top


def test_explicit_shared_units(ffn_weights):
    w1, b1, w2, b2 = ffn_weights
    sw = split_ffn_weights(w1, b1, w2, b2, 2, 0.5, shared_units=[3, 1])
    assert sw.unit_order[:2].tolist() == [1, 3] and sw.n_private == H - 2


def test_routing_and_gradients_are_per_group(ffn_weights):
    w1, b1, w2, b2 = ffn_weights
    m = PartitionedFFN.from_split(split_ffn_weights(w1, b1, w2, b2, 2, 0.5))
    with torch.no_grad():
        m.fc1_private_weight[1].mul_(2.0)  # group 1 now differs
    x = torch.randn(5, 4, D)
    g = torch.tensor([0, 1, 1, 0])
    out = m(x, g)
    for b in range(4):
        alone = m(x[:, b: b + 1], g[b: b + 1])
        torch.testing.assert_close(out[:, b: b + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, 0], m(x[:, :1], torch.tensor([1]))[:, 0])
    m.zero_grad()
    m(x, torch.zeros(4, dtype=torch.long)).sum().backward()
    assert m.fc1_private_weight.grad[1].abs().sum() == 0 and m.fc2_private_weight.grad[1].abs().sum() == 0
    assert m.fc1_private_weight.grad[0].abs().sum() > 0 and m.fc1_shared_weight.grad.abs().sum() > 0


def test_route_context_and_missing_ids():
    m = PartitionedFFN(D, 4, 4, 2)
    x = torch.randn(3, 2, D)
    with pytest.raises(RuntimeError):
        m(x)
    g = torch.tensor([1, 0])
    with route([m], g):
        out = m(x)
    torch.testing.assert_close(out, m(x, g))
    with pytest.raises(RuntimeError):
        m(x)  # cleared after the context
    with pytest.raises(ValueError):
        m(x, torch.tensor([0, 2]))  # group out of range


def test_to_dense_matches_module_after_update(ffn_weights):
    w1, b1, w2, b2 = ffn_weights
    m = PartitionedFFN.from_split(split_ffn_weights(w1, b1, w2, b2, 2, 0.4, method="svd"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 2, D)
    for g in range(2):
        fw1, fb1, fw2, fb2 = m.to_dense(g)
        assert fw1.shape == (H, D) and fw2.shape == (D, H)
        ref = dense_ffn(x, fw1, fb1, fw2, fb2)
        torch.testing.assert_close(m(x, torch.full((2,), g)), ref, atol=1e-5, rtol=1e-5)


def test_modules_for_dropout_and_layernorm_are_used():
    ln = nn.LayerNorm(D)
    m = PartitionedFFN(D, 3, 5, 2, activation_fn=nn.SiLU(), activation_dropout=0.5, dropout=nn.Dropout(0.5),
                       layer_norm=ln)
    assert m.layer_norm is ln and "layer_norm.weight" in m.state_dict()
    m.eval()
    x = torch.randn(4, 2, D)
    w1, b1, w2, b2 = m.to_dense(1)
    ref = dense_ffn(ln(x), w1, b1, w2, b2, act=F.silu)
    torch.testing.assert_close(m(x, torch.ones(2, dtype=torch.long)), ref, atol=1e-5, rtol=1e-5)
    m.train()
    assert not torch.allclose(m(x, torch.ones(2, dtype=torch.long)), ref)
