"""GradientStatistics: sums against direct computation, sketches, merge, files and their versions, non-finite steps."""
import math

import numpy as np
import pytest
import torch

from fairseq_gdps.gdps import metrics as M
from fairseq_gdps.gdps.stats import CountSketch, GradientStatistics


# Tiny tensors: one thread avoids oversubscription stalls on shared cores (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


SIZES = {"enc.0.fc1": 40, "enc.0.fc2": 24}
LANGS = ["aa", "bb", "cc"]


def planted_steps(steps=12, seed=0, absent=None):
    """[(step, {lang: {module: tensor}})]; ``absent[t]`` lists languages missing at step t."""
    g = torch.Generator().manual_seed(seed)
    means = {(l, m): torch.randn(d, generator=g) * (i + 1) for i, l in enumerate(LANGS) for m, d in SIZES.items()}
    out = []
    for t in range(steps):
        present = [l for l in LANGS if not (absent and l in absent.get(t, ()))]
        out.append((t, {l: {m: (means[l, m] + torch.randn(d, generator=g)).reshape(-1, 4 if d % 4 == 0 else 1)
                             for m, d in SIZES.items()} for l in present}))
    return out


def record(steps, **kw):
    st = GradientStatistics(SIZES, **kw)
    for t, grads in steps:
        st.add_step(t, grads)
    return st


def test_sums_self_and_cross_similarity_match_direct_computation():
    steps = planted_steps(absent={3: ["bb"], 7: ["cc", "aa"]})
    st = record(steps, subspace_dim=8)
    assert st.languages == LANGS
    for m in SIZES:
        vecs = {l: [grads[l][m].double().reshape(-1).numpy() for _, grads in steps if l in grads] for l in LANGS}
        s = st.module_sums(m)
        n = np.array([len(vecs[l]) for l in LANGS], dtype=float)
        np.testing.assert_array_equal(s["n"].numpy(), n)
        np.testing.assert_allclose(s["S"].numpy(), np.stack([np.sum(vecs[l], 0) for l in LANGS]), rtol=1e-10)
        Q = np.array([sum(v @ v for v in vecs[l]) for l in LANGS])
        np.testing.assert_allclose(s["Q"].numpy(), Q, rtol=1e-10)
        np.testing.assert_allclose(s["Q_exact"].numpy(), Q, rtol=1e-10)
        # self inner product = mean over distinct step pairs; self cosine = that / mean squared norm
        direct_m = np.array([np.mean([a @ b for i, a in enumerate(vecs[l]) for j, b in enumerate(vecs[l]) if i != j])
                             for l in LANGS])
        m_est = M.self_inner(s["n"], s["S"], s["Q"])
        np.testing.assert_allclose(m_est, direct_m, rtol=1e-9)
        np.testing.assert_allclose(M.self_cosine(s["n"], s["S"], s["Q"]), direct_m / (Q / n), rtol=1e-9)
        mu = np.stack([np.mean(vecs[l], 0) for l in LANGS])
        rho, unclipped, valid = M.corrected_cosine(s["n"], s["S"], s["Q"])
        assert valid.all()
        for i in range(3):
            for j in range(3):
                if i != j:
                    assert unclipped[i, j] == pytest.approx(mu[i] @ mu[j] / math.sqrt(direct_m[i] * direct_m[j]), rel=1e-9)
                    raw = mu[i] @ mu[j] / np.linalg.norm(mu[i]) / np.linalg.norm(mu[j])
                    assert M.raw_cosine(s["n"], s["S"])[i, j] == pytest.approx(raw, rel=1e-9)
        # projected moments: P = G (aux space == full space here), pairs only over joint steps
        P = st._projections(m)[2].numpy()
        mom = st.subspace_moments(m)
        for i, li in enumerate(LANGS):
            for j, lj in enumerate(LANGS):
                joint = [(grads[li][m].double().reshape(-1).numpy(), grads[lj][m].double().reshape(-1).numpy())
                         for _, grads in steps if li in grads and lj in grads]
                assert mom["pair_n"][i, j] == len(joint)
                np.testing.assert_allclose(mom["first"][i, j].numpy(), sum(P @ a for a, _ in joint), rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(mom["second"][i, j].numpy(),
                                           sum(np.outer(P @ a, P @ a) for a, _ in joint), rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(mom["cross"][i, j].numpy(),
                                           sum(np.outer(P @ a, P @ b) for a, b in joint), rtol=1e-9, atol=1e-9)
    assert st.num_steps == len(steps)


def test_bucket_sums_add_up_to_totals():
    steps = planted_steps(steps=30)
    st = record(steps, num_buckets=5)
    for m in SIZES:
        b, s = st.bucket_sums(m), st.module_sums(m)
        np.testing.assert_allclose(b["S"].sum(0).numpy(), s["S"].numpy(), rtol=1e-10)
        np.testing.assert_allclose(b["Q"].sum(0).numpy(), s["Q"].numpy(), rtol=1e-10)
        np.testing.assert_array_equal(b["n"].sum(0).numpy(), s["n"].numpy())
        assert (b["n"] > 0).sum() >= 4 * 3  # steps spread over the buckets
    counts = np.bincount([st.bucket_of(t) for t, _ in steps], minlength=5)
    np.testing.assert_array_equal(st.bucket_sums("enc.0.fc1")["n"][:, 0].numpy(), counts)


def test_countsketch_preserves_inner_products():
    g = torch.Generator().manual_seed(1)
    d, k = 20000, 4096
    x = torch.randn(d, generator=g, dtype=torch.float64)
    y = 0.6 * x + 0.8 * torch.randn(d, generator=g, dtype=torch.float64)
    cs = CountSketch(d, k, seed=5)
    X = cs(torch.stack([x, y]))
    assert X.shape == (2, k)
    bound = math.sqrt((x.norm() ** 2 * y.norm() ** 2 + (x @ y) ** 2) / k)  # one standard deviation
    assert abs(X[0] @ X[1] - x @ y) < 4 * bound
    assert abs(X[0] @ X[0] / (x @ x) - 1) < 0.15
    # unbiased: averaged over independent sketches the error shrinks
    est = []
    for s in range(40):
        Xs = CountSketch(d, 256, seed=s)(torch.stack([x, y]))
        est.append(float(Xs[0] @ Xs[1]))
    assert abs(np.mean(est) - float(x @ y)) < 4 * math.sqrt((x.norm() ** 2 * y.norm() ** 2 + (x @ y) ** 2) / 256 / 40)
    # sketched statistics: self-similarity and corrected cosine close to the exact ones
    sizes = {"big": 6000}
    gen = torch.Generator().manual_seed(2)
    mu = {l: torch.randn(6000, generator=gen) for l in ("aa", "bb")}
    mu["bb"] = 0.5 * mu["aa"] + math.sqrt(0.75) * mu["bb"]
    exact = GradientStatistics(sizes, subspace_dim=0)
    sk = GradientStatistics(sizes, sketch_dim=2048, subspace_dim=0, aux_dim=512)
    for t in range(20):
        grads = {l: {"big": mu[l] + 2 * torch.randn(6000, generator=gen)} for l in mu}
        exact.add_step(t, grads)
        sk.add_step(t, grads)
    assert sk.module_sums("big")["S"].shape == (2, 2048)
    assert sk.bucket_sums("big")["S"].shape == (16, 2, 512)
    e, s = exact.module_sums("big"), sk.module_sums("big")
    np.testing.assert_allclose(s["Q_exact"].numpy(), e["Q_exact"].numpy(), rtol=1e-9)
    np.testing.assert_allclose(M.self_cosine(s["n"], s["S"], s["Q"]), M.self_cosine(e["n"], e["S"], e["Q"]), atol=0.05)
    rho_e = M.corrected_cosine(e["n"], e["S"], e["Q"])[0][0, 1]
    rho_s = M.corrected_cosine(s["n"], s["S"], s["Q"])[0][0, 1]
    assert rho_e == pytest.approx(0.5, abs=0.1)
    assert rho_s == pytest.approx(rho_e, abs=0.1)


def _assert_same(a, b):
    assert a.languages == b.languages
    ta, tb = a.to_tensors(), b.to_tensors()
    assert list(ta) == list(tb)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-12, atol=1e-9)


def test_merge_equals_recording_everything_in_one_object():
    steps = planted_steps(steps=16)
    whole = record(steps, subspace_dim=6, num_buckets=4)
    first = record(steps[:9], subspace_dim=6, num_buckets=4)
    # the second worker saw the languages in another order: merge matches them by name
    second = GradientStatistics(SIZES, languages=["cc", "aa", "bb"], subspace_dim=6, num_buckets=4)
    for t, grads in steps[9:]:
        second.add_step(t, grads)
    first.merge_(second)
    _assert_same(first, whole)
    with pytest.raises(ValueError, match="settings"):
        whole.merge_(GradientStatistics(SIZES, subspace_dim=6, num_buckets=4, seed=1))
    with pytest.raises(ValueError, match="settings"):
        whole.merge_(GradientStatistics({"enc.0.fc1": 40}, subspace_dim=6, num_buckets=4))


def test_memory_does_not_grow_with_steps():
    short = record(planted_steps(steps=3), sketch_dim=16)
    long = record(planted_steps(steps=60), sketch_dim=16)
    assert [tuple(x.shape) for x in short.to_tensors().values()] == [tuple(x.shape) for x in long.to_tensors().values()]
    assert long.module_sums("enc.0.fc1")["S"].shape == (3, 16)  # sketched below d = 40
    assert long.module_sums("enc.0.fc2")["S"].shape == (3, 16)


def test_save_load_round_trip_and_errors(tmp_path):
    st = record(planted_steps(steps=8), subspace_dim=4, model_signature="s2t_transformer:abc")
    path = tmp_path / "stats.pt"
    st.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.pt"]  # no temporary left behind
    back = GradientStatistics.load(path, expect_signature="s2t_transformer:abc")
    _assert_same(back, st)
    assert back.settings() == st.settings() and back.model_signature == st.model_signature
    assert back.num_steps == 8
    with pytest.raises(ValueError, match=r"stats\.pt.*signature"):
        GradientStatistics.load(path, expect_signature="other-model")
    d = st.state_dict()
    d["format_version"] = 99
    torch.save(d, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match=r"v99\.pt.*version 99"):
        GradientStatistics.load(tmp_path / "v99.pt")
    d = st.state_dict()
    d["kind"] = "something-else"
    torch.save(d, tmp_path / "kind.pt")
    with pytest.raises(ValueError, match=r"kind\.pt.*not GDPS gradient statistics"):
        GradientStatistics.load(tmp_path / "kind.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        GradientStatistics.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("summed", [True, False])
def test_the_format_version_is_a_version_and_the_summed_field_says_what_a_file_keeps(tmp_path, summed):
    """Files say whether they keep the summed statistics in a field of its own, under one version;
    the files of earlier versions load with what they keep: version 3 for the same-state records
    alone, version 2 for the summed statistics as well (with the field, or without it from before
    the summed statistics became optional)."""
    units = {"probe_units": LANGS, "summed": summed}
    st = GradientStatistics(SIZES, subspace_dim=2, **units)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        st.add_probe(t, torch.ones(2 * len(LANGS)), {m: torch.randn(2 * len(LANGS), d, generator=gen) for m, d in SIZES.items()})
    d = st.state_dict()
    assert d["format_version"] == 4 and d["summed"] is summed
    earlier = [({**d, "format_version": 3 if not summed else 2}, summed)]
    if summed:
        earlier.append(({k: v for k, v in d.items() if k != "summed"} | {"format_version": 2}, True))
    for k, (written, keeps) in enumerate([(d, summed)] + earlier):
        torch.save(written, tmp_path / f"s{k}.pt")
        back = GradientStatistics.load(tmp_path / f"s{k}.pt")
        assert back.summed is keeps and back.same_state.num_probes == 3
        _assert_same(back, st)
    torch.save({**d, "summed": "yes"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: malformed gradient statistics \(summed must be true or false"):
        GradientStatistics.load(tmp_path / "bad.pt")


def test_nonfinite_gradient_skips_only_that_language():
    steps = planted_steps(steps=6)
    clean = record(steps)
    st = GradientStatistics(SIZES)
    for t, grads in steps:
        st.add_step(t, grads)
    bad = {l: {m: g.clone() for m, g in mods.items()} for l, mods in steps[0][1].items()}
    bad["bb"]["enc.0.fc2"][0, 0] = float("nan")
    bad["cc"]["enc.0.fc1"][1, 1] = float("inf")
    assert sorted(st.add_step(99, bad)) == ["bb", "cc"]
    assert st.skipped_nonfinite == {"aa": 0, "bb": 1, "cc": 1}
    counts = st.counts()
    assert counts["aa"] == {m: 7 for m in SIZES}
    assert counts["bb"] == {m: 6 for m in SIZES} and counts["cc"] == {m: 6 for m in SIZES}
    for m in SIZES:
        s, c = st.module_sums(m), clean.module_sums(m)
        assert torch.isfinite(s["S"]).all() and torch.isfinite(s["Q"]).all()
        torch.testing.assert_close(s["S"][1:], c["S"][1:])
        torch.testing.assert_close(s["S"][0], c["S"][0] + steps[0][1]["aa"][m].double().reshape(-1))
    for t in st.to_tensors().values():
        assert torch.isfinite(t).all()


def test_languages_on_first_sight_and_input_errors():
    st = GradientStatistics(SIZES, languages=["aa"], subspace_dim=3)
    g = {m: torch.ones(d) for m, d in SIZES.items()}
    st.add_step(0, {"aa": g})
    st.add_step(1, {"zz": g, "aa": g})
    assert st.languages == ["aa", "zz"]
    assert st.counts()["zz"]["enc.0.fc1"] == 1 and st.counts()["aa"]["enc.0.fc1"] == 2
    assert st.subspace_moments("enc.0.fc1")["pair_n"].tolist() == [[2, 1], [1, 1]]
    with pytest.raises(ValueError, match="untracked"):
        st.add_step(2, {"aa": {"nope": torch.ones(3)}})
    with pytest.raises(ValueError, match="expected 40"):
        st.add_step(2, {"aa": {"enc.0.fc1": torch.ones(41)}})
