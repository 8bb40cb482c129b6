"""The same-state estimator (gdps/same_state.py) and the conflict decision (gdps/conflict.py) on
planted statistics: drift shared by the languages of a step, duplicated languages, a pair that
agrees on its inputs and disagrees on its outputs, speakers that dominate a block."""
import numpy as np
import pytest
import torch

from fairseq_gdps.gdps import conflict as C
from fairseq_gdps.gdps import metrics as M
from fairseq_gdps.gdps import same_state as SS
from fairseq_gdps.gdps.stats import GradientStatistics

pytestmark = pytest.mark.usefixtures("one_thread")

D = 1500


def _unit(v):
    return v / np.linalg.norm(v)


def record(means_per_step, units, unit_languages, blocks, noise, seed=0, tokens=(5.0, 7.0), summed=True):
    """Statistics of probes whose half-gradients are ``means_per_step[t][block][unit] + noise``."""
    rng = np.random.default_rng(seed)
    stats = GradientStatistics({b: D for b in blocks}, probe_units=units, probe_unit_languages=unit_languages,
                               subspace_dim=0, summed=summed)
    for t, means in enumerate(means_per_step):
        rows = {}
        for b in blocks:
            Y = np.stack([means[b][u] + noise * rng.standard_normal(D) for u in range(len(units)) for _ in range(2)])
            rows[b] = torch.from_numpy(Y)
        stats.add_probe(t, torch.tensor(list(tokens) * len(units)), rows)
    return stats


def test_drift_shared_by_a_step_biases_the_summed_estimator_not_the_same_state_one():
    """A component common to every language of a step (the model state of that update) enters
    the summed cross term and not its self term: the old estimator exceeds 1; the same-state
    ratio recovers the true cosine of the probed states."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal(D)
    mu = {"aa": base, "bb": base.copy(),
          "cc": 0.3 * base + np.sqrt(1 - 0.09) * _unit(rng.standard_normal(D)) * np.linalg.norm(base)}
    langs = list(mu)
    steps = []
    for t in range(20):
        # part of every language's expected gradient at this step's parameters, and independent
        # from step to step (the state moves): same-step products carry it, distinct steps do not
        drift = 2.5 * rng.standard_normal(D)
        steps.append({"m": [mu[l] + drift for l in langs]})
    stats = record(steps, langs, langs, ["m"], noise=2.0)
    sums = stats.module_sums("m")
    _, old, _ = M.corrected_cosine(sums["n"].numpy(), sums["S"].numpy(), sums["Q"].numpy())
    assert old[0, 1] > 1.2 and old[0, 2] > 0.5       # the drift inflates every cross term (0.3 without it)
    _, tokens, grams = stats.same_state.arrays()
    self_, cross, both, weight = SS.probe_terms(tokens, grams)
    rho, n_pairs = SS.ratio_of_sums(self_, cross, both, weight)
    # truth: the same ratio of sums over the noise-free means of the probed states, same weights
    true = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            num = sum(w * steps[t]["m"][i] @ steps[t]["m"][j] for t, w in enumerate(weight[:, 0]))
            di = sum(w * steps[t]["m"][i] @ steps[t]["m"][i] for t, w in enumerate(weight[:, 0]))
            dj = sum(w * steps[t]["m"][j] @ steps[t]["m"][j] for t, w in enumerate(weight[:, 0]))
            true[i, j] = num / np.sqrt(di * dj)
    assert np.abs(rho[0] - true).max() < 0.05, (rho[0], true)
    assert np.all(n_pairs == 20) and np.abs(rho).max() < 1.02


def test_duplicate_halves_agree_and_bootstrap_intervals_cover_them():
    rng = np.random.default_rng(2)
    base, other = rng.standard_normal(D), rng.standard_normal(D)
    steps = [{"m": [base, base, other]} for _ in range(60)]
    stats = record(steps, ["aa", "bb", "cc"], ["aa", "bb", "cc"], ["m"], noise=3.0)
    _, tokens, grams = stats.same_state.arrays()
    terms = SS.probe_terms(tokens, grams)
    rho, _ = SS.ratio_of_sums(*terms)
    boot, _ = SS.ratio_of_sums(*terms, counts=SS.bootstrap_counts(60, 300, seed=0))
    lo, hi = SS.interval(boot[:, 0], 0.9)
    true = base @ other / np.linalg.norm(base) / np.linalg.norm(other)
    assert rho[0, 0, 1] > 0.9 and lo[0, 1] < 1.0 < hi[0, 1] + 0.02
    assert abs(rho[0, 0, 2] - true) < 0.06 and lo[0, 2] - 0.03 < true < hi[0, 2] + 0.03


def test_aggregated_units_equal_the_grams_of_the_aggregated_halves():
    rng = np.random.default_rng(3)
    P, U = 4, 5
    Y = rng.standard_normal((P, 2 * U, 30))
    tokens = rng.integers(0, 4, (P, 2 * U)).astype(float)
    grams = np.einsum("prd,psd->prs", Y, Y)[:, None]
    groups = [0, 0, 1, 2, 2]
    agg_tokens, agg = SS.aggregate_units(tokens, grams, groups, 3)
    for p in range(P):
        for g in range(3):
            for h in range(2):
                rows = [2 * u + h for u in range(U) if groups[u] == g]
                assert agg_tokens[p, 2 * g + h] == tokens[p, rows].sum()
        direct = np.stack([
            (tokens[p, [2 * u + h for u in range(U) if groups[u] == g], None]
             * Y[p, [2 * u + h for u in range(U) if groups[u] == g]]).sum(0)
            / max(tokens[p, [2 * u + h for u in range(U) if groups[u] == g]].sum(), 1e-300)
            for g in range(3) for h in range(2)])
        np.testing.assert_allclose(agg[p, 0], direct @ direct.T, rtol=1e-10, atol=1e-10)


def test_records_round_trip_merge_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    steps = [{"m": [rng.standard_normal(D) for _ in range(2)]} for _ in range(5)]
    stats = record(steps, ["aa", "bb"], ["aa", "bb"], ["m"], noise=1.0)
    stats.save(tmp_path / "s.pt")
    back = GradientStatistics.load(tmp_path / "s.pt")
    for a, b in zip(stats.same_state.arrays(), back.same_state.arrays()):
        np.testing.assert_array_equal(a, b)
    later = record(steps[:2], ["aa", "bb"], ["aa", "bb"], ["m"], noise=1.0, seed=9)
    back.merge_(later)
    assert back.same_state.num_probes == 7 and back.num_steps == 7
    assert list(back.same_state.arrays()[0]) == sorted([0, 1, 2, 3, 4, 0, 1])
    assert back.same_state.nbytes() == 7 * (8 * (4 + 16) + 16)
    with pytest.raises(ValueError, match="cannot merge"):
        back.merge_(GradientStatistics({"m": D}, subspace_dim=0))
    with pytest.raises(ValueError, match="expected 4 token counts"):
        stats.add_probe(9, torch.ones(3), {"m": torch.zeros(4, D)})
    with pytest.raises(ValueError, match=r"expected \(4, 1500\)"):
        stats.add_probe(9, torch.ones(4), {"m": torch.zeros(3, D)})
    with pytest.raises(ValueError, match="no probe units"):
        GradientStatistics({"m": D}).add_probe(0, torch.ones(2), {"m": torch.zeros(2, D)})
    # a probe's prepared rows live in buffers the next probe reuses: one probe at a time
    overtaken = stats.begin_probe(20, torch.ones(4))
    overtaken.add_block("m", torch.ones(4, D))
    stats.add_probe(21, torch.ones(4), {"m": torch.ones(4, D)})
    with pytest.raises(RuntimeError, match="overtaken by another probe"):
        overtaken.finish()


def planted_model(steps=80, seed=5, speakers=False, summed=True):
    """Blocks enc.0, enc.1 (reference) and dec.0, dec.1: et and xx sound alike (share enc
    gradients) but mean different things in dec.0; sw and sw2 are one language split in two;
    ar is unrelated. With ``speakers``, each language has two speaker units whose encoder
    gradients are dominated by the voice: every language's first speaker has one voice, its
    second speaker another (as espeak-ng variants sound alike across languages)."""
    rng = np.random.default_rng(seed)
    langs = ["ar", "et", "xx", "sw", "sw2"]
    content = {"ar": rng.standard_normal(D), "et": rng.standard_normal(D), "sw": rng.standard_normal(D)}
    content.update(xx=content["et"], sw2=content["sw"])
    meaning = {"ar": rng.standard_normal(D), "et": rng.standard_normal(D), "sw": rng.standard_normal(D)}
    meaning.update(sw2=meaning["sw"], xx=rng.standard_normal(D))     # xx: other meanings
    template = 1.2 * rng.standard_normal(D)                            # shared by every language
    voices = {k: 3.0 * rng.standard_normal(D) for k in ("v1", "v2")}
    voice_of = {l: ("v1", "v2") for l in langs}
    units, unit_langs, vecs = [], [], []
    for l in langs:
        for k in (range(2) if speakers else [None]):
            units.append(f"{l}@{voice_of[l][k]}" if speakers else l)
            unit_langs.append(l)
            v = voices[voice_of[l][k]] if speakers else 0.0
            vecs.append({"encoder.layers.0.ffn": content[l] + v, "encoder.layers.1.ffn": content[l] + 0.5 * v,
                         "decoder.layers.0.ffn": template + meaning[l], "decoder.layers.1.ffn": template + 0.9 * content[l]})
    blocks = list(vecs[0])
    per_step = [{b: [v[b] for v in vecs] for b in blocks} for _ in range(steps)]
    return record(per_step, units, unit_langs, blocks, noise=2.5, seed=seed, summed=summed), langs


def test_conflict_found_where_inputs_agree_and_outputs_do_not():
    stats, langs = planted_model()
    ca = C.analyse(stats.same_state, resamples=200, seed=0)
    assert ca.reference_blocks == ["encoder.layers.0.ffn", "encoder.layers.1.ffn"]
    assert ca.candidates[0] == "decoder.layers.0.ffn" and ca.separation["separated"]
    e = ca.estimates["decoder.layers.0.ffn"]
    i = {l: k for k, l in enumerate(langs)}
    assert e.rho[i["sw"], i["sw2"]] > 0.9 and e.conflict[i["et"], i["xx"]] > 0.3
    grouping = C.group(ca, ["decoder.layers.0.ffn"])
    # et and xx apart, the others together (which of the two joins them is a tie here)
    assert len(grouping.partition) == 2 and any({"ar", "sw", "sw2"} <= set(g) for g in grouping.partition)
    assert grouping.chosen_frequency > 0.8 and grouping.coassignment[i["et"], i["xx"]] == 0
    # plain similarity would put the conflicting pair together: they are each other's nearest
    ref = np.mean([ca.estimates[b].rho for b in ca.reference_blocks], axis=0)
    others = [j for j in range(len(langs)) if j != i["et"]]
    assert others[int(np.argmax(ref[i["et"], others]))] == i["xx"]


def test_duplicate_halves_stay_together_when_noise_lowers_their_point_estimate():
    """The duplicate rule is the complement of the edge rule (1 inside the similarity interval at
    the distinctness level in every block), without a point threshold: a planted run gave two
    halves of one language rho 0.85-0.87 in the decoder FFNs with intervals reaching above 1, and
    one half had a noise edge the other lacked."""
    stats, langs = planted_model()
    ca = C.analyse(stats.same_state, resamples=200, seed=0)
    i = {l: k for k, l in enumerate(langs)}
    sw, sw2, et = i["sw"], i["sw2"], i["et"]
    assert C.indistinguishable(ca)[sw, sw2] and not C.indistinguishable(ca)[et, i["xx"]]
    e = ca.estimates["decoder.layers.0.ffn"]
    for a, b in ((sw, sw2), (sw2, sw)):          # a low point estimate whose interval still holds 1
        e.rho[a, b], e.distinct_interval[0][a, b], e.distinct_interval[1][a, b] = 0.85, 0.70, 1.04
    for a, b in ((sw, et), (et, sw)):            # a noise edge of sw alone, where inputs agree
        e.conflict[a, b], e.conflict_interval[0][a, b], e.distinct_interval[1][a, b] = 0.3, 0.05, 0.8
        ca.reference[a, b] = 0.8
    same = C.indistinguishable(ca)
    assert same[sw, sw2]
    partition = C.group(ca, ["decoder.layers.0.ffn"]).partition
    assert any({"sw", "sw2"} <= set(g) for g in partition), partition
    assert not any({"sw", "et"} <= set(g) or {"sw2", "et"} <= set(g) for g in partition), partition
    # an interval below 1 in one block is enough to tell the halves apart: then the edge splits them
    e.distinct_interval[1][sw, sw2] = e.distinct_interval[1][sw2, sw] = 0.95
    assert not C.indistinguishable(ca)[sw, sw2]
    partition = C.group(ca, ["decoder.layers.0.ffn"]).partition
    assert not any({"sw", "sw2"} <= set(g) for g in partition), partition


def test_languages_told_apart_are_not_merged_through_a_third():
    """Indistinguishability is not transitive: A~C and B~C with A and B told apart must not make
    A and B one language (and drop the conflict edge between them)."""
    same = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=bool)       # A~C, B~C, A and B apart
    rho = np.array([[1.0, 0.5, 0.9], [0.5, 1.0, 0.8], [0.9, 0.8, 1.0]])
    sets = C.one_language_sets(same, rho)
    assert sets[0, 2] and not sets[0, 1] and not sets[1, 2]                 # C joins A, the closer
    assert C.one_language_sets(np.ones((3, 3), dtype=bool), rho).all()      # all alike: one set
    # on an analysis: et~sw2 and sw~sw2 in every block, et and sw told apart with a conflict edge
    stats, langs = planted_model()
    ca = C.analyse(stats.same_state, resamples=200, seed=0)
    i = {l: k for k, l in enumerate(langs)}
    et, sw, sw2 = i["et"], i["sw"], i["sw2"]
    for e in ca.estimates.values():
        for a, b in ((et, sw2), (sw2, et)):
            e.distinct_interval[0][a, b], e.distinct_interval[1][a, b] = 0.8, 1.1
    e = ca.estimates["decoder.layers.0.ffn"]
    for a, b in ((sw, et), (et, sw)):
        e.conflict[a, b], e.conflict_interval[0][a, b], e.distinct_interval[1][a, b] = 0.3, 0.05, 0.8
        ca.reference[a, b] = 0.8
    same = C.indistinguishable(ca)
    assert same[et, sw2] and same[sw, sw2] and not same[et, sw]
    partition = C.group(ca, ["decoder.layers.0.ffn"]).partition
    assert any({"sw", "sw2"} <= set(g) for g in partition), partition
    assert not any({"sw", "et"} <= set(g) for g in partition), partition


def test_telling_languages_apart_takes_the_stricter_family_level():
    """Whether two units are measurably two languages is read from the similarity interval at the
    distinctness level (by default the interval level over the family of blocks), not from the
    plain interval: two halves of one language are told apart if any block's interval misses 1."""
    stats, langs = planted_model()
    blocks = len(stats.same_state.blocks)
    ca = C.analyse(stats.same_state, resamples=1000, seed=0)
    assert ca.level == 0.9 and ca.distinct_level == pytest.approx(1 - 0.1 / blocks)
    assert C.default_distinct_level(0.9, 6) == pytest.approx(0.98333, abs=1e-5)
    b = "decoder.layers.0.ffn"
    e = ca.estimates[b]
    boot = ca.rho_boot(b)
    assert np.allclose(e.distinct_interval[1], np.nanquantile(boot, 1 - (1 - ca.distinct_level) / 2, axis=0),
                       equal_nan=True)
    # the stricter interval is wider, on both sides, for every pair
    iu = np.triu_indices(len(langs), 1)
    assert np.all(e.distinct_interval[1][iu] >= e.rho_interval[1][iu])
    assert np.all(e.distinct_interval[0][iu] <= e.rho_interval[0][iu])
    # a pair whose plain interval ends below 1 but whose stricter one holds 1 is one language
    i = {l: k for k, l in enumerate(langs)}
    sw, sw2 = i["sw"], i["sw2"]
    for a, c in ((sw, sw2), (sw2, sw)):
        e.rho_interval[1][a, c], e.distinct_interval[1][a, c] = 0.93, 1.01
    assert C.indistinguishable(ca)[sw, sw2]
    # an explicit level is used as given
    assert C.analyse(stats.same_state, resamples=100, seed=0, distinct_level=0.95).distinct_level == 0.95


def test_shuffled_labels_give_no_grouping():
    stats, langs = planted_model()
    rec = stats.same_state
    _, tokens, grams = rec.arrays()
    # labels shuffled afresh for every half of every probe: a label's halves come from any language
    # (each language's half still used once, so every term pairs disjoint utterances)
    shuffled = SS.SameStateRecords(rec.units, rec.unit_languages, rec.blocks)
    rng = np.random.default_rng(0)
    for p in range(len(tokens)):
        perm = [rng.permutation(len(langs)) for _ in range(2)]
        rows = [2 * int(perm[h][u]) + h for u in range(len(langs)) for h in range(2)]
        shuffled.add(p, torch.from_numpy(tokens[p]), torch.from_numpy(grams[p][:, rows][:, :, rows]))
    ca = C.analyse(shuffled, resamples=100)
    grouping = C.group(ca, ca.candidates[:1])
    # noisy agreement (a label's halves differ from probe to probe) but no stable grouping
    assert len(grouping.partition) == 1 or grouping.chosen_frequency < 0.5, grouping


def test_speaker_dominated_blocks_are_not_identifiable():
    stats, langs = planted_model(speakers=True)
    ca = C.analyse(stats.same_state, resamples=200, seed=0)
    assert ca.unit_level
    enc = ca.estimates["encoder.layers.0.ffn"].identifiability
    dec = ca.estimates["decoder.layers.0.ffn"].identifiability
    assert enc["not_identifiable"] and dec["identifiable"], (enc, dec)
    assert dec["within_language"] > 0.9 and dec["cross_language"] < 0.75
    assert ca.candidates[0] == "decoder.layers.0.ffn"
    partition = C.group(ca, ["decoder.layers.0.ffn"]).partition
    assert not any({"et", "xx"} <= set(g) for g in partition) and any({"sw", "sw2"} <= set(g) for g in partition)


def test_gdps_analyze_decides_from_the_same_state_records(tmp_path, capsys):
    import json

    from fairseq_gdps.cli.analyze import main
    from fairseq_gdps.gdps.plan import Plan

    stats, langs = planted_model(speakers=True)
    stats.save(tmp_path / "stats.pt")
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "a"), "--resamples", "100"]) == 0
    printed = capsys.readouterr()
    assert "estimator: same-state" in printed.out and "WARNING" not in printed.err
    plan = Plan.load(tmp_path / "a" / "plan.json", languages=langs)
    assert plan.modules == ["decoder.layers.0.ffn"]
    assert not any({"et", "xx"} <= set(g) for g in plan.groups) and any({"sw", "sw2"} <= set(g) for g in plan.groups)
    prov = plan.provenance
    assert prov["estimator"] == "same-state" and prov["same_state"]["probes"] == 80
    assert prov["same_state"]["reference_blocks"] == ["encoder.layers.0.ffn", "encoder.layers.1.ffn"]
    assert plan.scores["encoder.layers.0.ffn"]["identifiable"] == "no"
    assert plan.scores["decoder.layers.0.ffn"]["same_state_rank"] == 1
    report = (tmp_path / "a" / "report.md").read_text()
    for needle in ("## Same-state analysis (what decides)", "**separated**", "| **no** |",
                   "## Summed-statistics diagnostic (does not decide)", "conflict edges",
                   "the groups come from conflict edges (see above), not from clustering this distance"):
        assert needle in report, needle
    assert "average linkage" not in report
    # measurably two languages: the 90% level over the 4 blocks; 100 resamples leave thin tails there
    assert prov["same_state"]["distinct_level"] == pytest.approx(0.975) and prov["settings"]["distinct_level"] is None
    assert "at level 0.975 lies below 1" in report and "raise --resamples to about 800" in report
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "d"), "--resamples", "200",
                 "--distinct-level", "0.95"]) == 0
    strict = Plan.load(tmp_path / "d" / "plan.json", languages=langs).provenance
    assert strict["same_state"]["distinct_level"] == 0.95 and strict["settings"]["distinct_level"] == 0.95
    report_d = (tmp_path / "d" / "report.md").read_text()
    assert "at level 0.95 lies below 1 there; a pair" in report_d and "raise --resamples" not in report_d
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "x"), "--distinct-level", "1"]) == 2
    assert "--distinct-level must lie in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # groups from conflict edges share nothing of the split block (what is shared carries the
    # conflict again); 'similarity' restores the similarity rule, whose value the plan keeps
    assert plan.shared_ratio == 0.0 and prov["ratio"]["rule"] == "conflict" and prov["grouping"]["source"] == "conflict"
    assert "The groups come from conflict edges" in report and "**0** of the" in report
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "sim"), "--resamples", "0",
                 "--conflict-shared-ratio", "similarity"]) == 0
    sim = Plan.load(tmp_path / "sim" / "plan.json", languages=langs)
    assert sim.groups == plan.groups and sim.provenance["ratio"]["rule"] == "similarity"
    assert 0.25 <= sim.shared_ratio <= 0.75 and sim.shared_ratio == prov["ratio"]["similarity_rule"]
    for bad in ("1", "-0.5", "half"):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "x"), "--conflict-shared-ratio", bad])
        assert "--conflict-shared-ratio" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a window with a single probe: nothing to decide from, and the error says what to do
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "b"), "--resamples", "0",
                 "--window-start", "79"]) == 1
    assert "1 same-state probe(s) in the window [79, None), at least 2 needed: widen the window" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main([str(tmp_path / "stats.pt"), "--out", str(tmp_path / "b"), "--resamples", "0",
                 "--window-start", "78"]) == 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["provenance"]["same_state"]["probes"] == 2


def test_same_state_records_alone_decide_as_with_the_summed_statistics(tmp_path, capsys):
    """Statistics of the same-state records alone (stage 1 without --gdps-summed-statistics): the
    same records and decision as with the summed statistics, no summed-statistics diagnostic, and a
    file that round-trips and refuses what needs the summed part."""
    from fairseq_gdps.cli.analyze import main
    from fairseq_gdps.gdps.plan import Plan

    full, langs = planted_model()
    alone, _ = planted_model(summed=False)
    for f, a in zip(full.same_state.arrays(), alone.same_state.arrays()):
        np.testing.assert_array_equal(f, a)
    assert alone.num_steps == full.num_steps == 80
    assert set(alone.to_tensors()) == {"steps", "skipped"}   # no summed buffers at all
    plans = {}
    for name, stats in (("full", full), ("alone", alone)):
        stats.save(tmp_path / f"{name}.pt")
        assert main([str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / name), "--resamples", "50"]) == 0
        plans[name] = Plan.load(tmp_path / name / "plan.json", languages=langs)
    assert "estimator: same-state" in capsys.readouterr().out
    assert plans["alone"].modules == plans["full"].modules == ["decoder.layers.0.ffn"]
    assert plans["alone"].groups == plans["full"].groups
    assert plans["alone"].shared_ratio == plans["full"].shared_ratio
    report = (tmp_path / "alone" / "report.md").read_text()
    assert "summed statistics: not recorded (stage 1 without --gdps-summed-statistics), so no diagnostic" in report
    assert "## Summed-statistics diagnostic" not in report and "noise-corrected" not in report
    assert "## Same-state analysis (what decides)" in report
    assert "## Summed-statistics diagnostic (does not decide)" in (tmp_path / "full" / "report.md").read_text()
    back = GradientStatistics.load(tmp_path / "alone.pt")
    assert not back.summed and back.num_steps == 80 and back.same_state.num_probes == 80
    with pytest.raises(ValueError, match="same-state records alone"):
        back.counts()
    with pytest.raises(ValueError, match="same-state records alone"):
        back.add_step(0, {"ar": {"encoder.layers.0.ffn": torch.zeros(D)}})
    with pytest.raises(ValueError, match="cannot merge"):
        back.merge_(full)
    # a probe with a non-finite half is not kept; its language counts as skipped
    R = 2 * len(back.same_state.units)
    rows = {b: torch.ones(R, D, dtype=torch.float64) for b in back.module_names}
    rows["decoder.layers.0.ffn"][2, 5] = float("inf")   # unit 1's first half: et
    assert back.add_probe(500, torch.ones(R), rows) == ["et"]
    assert back.num_steps == back.same_state.num_probes == 80 and back.skipped_nonfinite["et"] == 1
