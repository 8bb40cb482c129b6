"""Plan validation and files; gdps-analyze end to end on a planted statistics file."""
import json
import os

import pytest

from fairseq_gdps.cli.analyze import main
from fairseq_gdps.gdps.plan import Plan, PlanError
from fairseq_gdps.gdps.report import parse_layer
from fairseq_gdps.gdps.stats import synthetic_statistics


# Tiny tensors: one thread avoids oversubscription stalls on shared cores (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


LANGS = ["aeb", "bem", "est", "gle", "l4", "l5"]
MODULES = {**{f"encoder.transformer_layers.{i}.fc{j}": 128 for i in range(4) for j in (1, 2)},
           "decoder.layers.0.fc1": 96, "decoder.layers.1.fc2": 96}
PLANTED = "decoder.layers.1.fc2"


def good_plan(**kw):
    d = dict(modules=["encoder.layers.3.fc1"], groups=[["bem"], ["aeb", "est", "gle"]], shared_ratio=0.5)
    d.update(kw)
    return Plan(**d)


def test_plan_validation_errors():
    p = good_plan().validate(model_module_names=["encoder.layers.3.fc1", "x"], languages=["aeb", "bem", "est", "gle"])
    assert p.language_to_group == {"bem": 0, "aeb": 1, "est": 1, "gle": 1}
    assert p.group_of("est") == 1
    with pytest.raises(PlanError, match="model has no module.*encoder.layers.3.fc1"):
        good_plan().validate(model_module_names=["encoder.layers.2.fc1"])
    with pytest.raises(PlanError, match=r"\['swa'\].*no group"):
        good_plan().validate(languages=["aeb", "bem", "est", "gle", "swa"])
    with pytest.raises(PlanError, match=r"\['gle'\] are missing from the data"):
        good_plan().validate(languages=["aeb", "bem", "est"])
    good_plan(shared_ratio=0.0).validate()  # no shared units (groups from conflict edges)
    for bad in (1.0, 1.2, -0.1, float("nan")):
        with pytest.raises(PlanError, match="shared_ratio"):
            good_plan(shared_ratio=bad).validate()
    with pytest.raises(PlanError, match="overlap"):
        good_plan(groups=[["bem", "est"], ["aeb", "est", "gle"]]).validate()
    with pytest.raises(PlanError, match="non-empty"):
        good_plan(groups=[["bem"], []]).validate()
    with pytest.raises(PlanError, match="does not match"):
        good_plan(language_to_group={"bem": 1, "aeb": 0, "est": 1, "gle": 1}).validate()
    with pytest.raises(PlanError, match="no module"):
        good_plan(modules=[]).validate()
    with pytest.raises(PlanError, match="not in the plan"):
        good_plan().group_of("swa")


def test_plan_files(tmp_path):
    p = good_plan(scores={"encoder.layers.3.fc1": {"conflict_score": 0.123456789012345, "x": float("nan")}})
    path = tmp_path / "plan.json"
    p.save(path)
    text = path.read_text()
    assert text == p.dumps() and text.endswith("\n")
    d = json.loads(text)
    assert list(d) == sorted(d) and d["version"] == 1 and d["kind"] == "gdps-plan"
    assert d["scores"]["encoder.layers.3.fc1"] == {"conflict_score": 0.123456789, "x": None}
    back = Plan.load(path, model_module_names=["encoder.layers.3.fc1"], languages=["aeb", "bem", "est", "gle"])
    assert back.groups == p.groups and back.shared_ratio == 0.5 and back.modules == p.modules
    d["version"] = 7
    (tmp_path / "v7.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"v7\.json.*version 7"):
        Plan.load(tmp_path / "v7.json")
    d["version"] = 1
    d["shared_ratio"] = 1.5
    (tmp_path / "r.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match=r"r\.json.*shared_ratio"):
        Plan.load(tmp_path / "r.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match=r"bad\.json.*JSON"):
        Plan.load(tmp_path / "bad.json")


def test_parse_layer():
    assert parse_layer("encoder.conformer_layers.11.ffn2") == ("encoder.conformer_layers.*.ffn2", 11)
    assert parse_layer("encoder.transformer_layers.3.fc1") == ("encoder.transformer_layers.*.fc1", 3)
    assert parse_layer("decoder.layers.1.fc2") == ("decoder.layers.*.fc2", 1)
    assert parse_layer("adapter_out") is None


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    """Probes of 6 languages: the encoder blocks (the reference) agree for every pair, the planted
    decoder block has two clusters; the summed statistics are kept as well."""
    st = synthetic_statistics(MODULES, LANGS, clusters={PLANTED: [1, 0, 1, 1, 0, 1]}, steps=40, signal=0.5,
                              noise=1.0, own=0.05, shared=0.3, subspace_dim=16, seed=7,
                              model_signature="toy")
    path = tmp_path_factory.mktemp("stats") / "stats.pt"
    st.save(path)
    return path


def test_cli_end_to_end(stats_file, tmp_path, capsys):
    """The planted clusters conflict in the planted block and agree on the inputs: that block is
    split, the clusters are put apart and share nothing; the summed statistics get their
    diagnostic section, which decides nothing."""
    out = tmp_path / "a"
    assert main([str(stats_file), "--out", str(out), "--resamples", "60"]) == 0
    printed = capsys.readouterr()
    assert "groups: {aeb, est, gle, l5} / {bem, l4}" in printed.out and "estimator: same-state" in printed.out
    assert printed.err == ""
    for name in ("plan.json", "report.md", "similarity.png", "dendrogram.png", "layer_profile.png", "stability.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("similarity.png", "dendrogram.png", "layer_profile.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = Plan.load(out / "plan.json", model_module_names=list(MODULES), languages=LANGS)
    assert plan.modules == [PLANTED]                       # top1: the planted block only
    assert plan.groups == [["aeb", "est", "gle", "l5"], ["bem", "l4"]]
    assert plan.shared_ratio == 0.0                        # groups from conflict edges share nothing
    assert set(plan.scores) == set(MODULES) and plan.scores[PLANTED]["rank"] == 1
    assert plan.scores[PLANTED]["same_state_rank"] == 1 and "conflict_score" not in plan.scores[PLANTED]
    prov = plan.provenance
    assert prov["stats_file"] == os.path.relpath(stats_file, out) and len(prov["stats_sha256"]) == 64
    assert prov["grouping"]["chosen_frequency"] >= 0.9 and "timestamp" not in json.dumps(prov)
    assert prov["grouping"]["source"] == "conflict" and prov["ratio"]["rule"] == "conflict"
    # cross-group similarity ~ shared = 0.3: the similarity rule would have kept 0.25 or 0.375
    assert prov["ratio"]["similarity_rule"] in (0.25, 0.375)
    assert prov["stats"]["model_signature"] == "toy" and prov["stats"]["summed"] is True
    assert prov["estimator"] == "same-state" and prov["same_state"]["probes"] == 40
    report = (out / "report.md").read_text()
    for needle in ("## Same-state analysis (what decides)", f"| 1 | `{PLANTED}`", "## Language grouping",
                   "bootstrap resamples of the probed batches", "## Shared ratio",
                   "## Summed-statistics diagnostic (does not decide)", "Nothing in this section enters the decision",
                   "noise-corrected cosines beyond +-1: 0 of 150", "![similarity](similarity.png)"):
        assert needle in report, needle
    # the diagnostic comes after everything the decision rests on
    assert report.index("## Summed-statistics diagnostic") > report.index("## Shared ratio")
    decision = report[report.index("## Decision"):report.index("## Summed-statistics diagnostic")]
    for label in ("noise-corrected", "bucket", "summed"):
        assert label not in decision, label
    # identical inputs -> identical plan bytes
    out2 = tmp_path / "b"
    assert main([str(stats_file), "--out", str(out2), "--resamples", "60"]) == 0
    assert (out / "plan.json").read_bytes() == (out2 / "plan.json").read_bytes()
    # without the diagnostic: the same plan, and the report says the diagnostic was not computed
    out3 = tmp_path / "c"
    assert main([str(stats_file), "--out", str(out3), "--resamples", "60", "--no-summed-diagnostic"]) == 0
    assert (out3 / "plan.json").read_bytes() == (out / "plan.json").read_bytes()
    report3 = (out3 / "report.md").read_text()
    assert "diagnostic was not computed" in report3 and "## Summed-statistics diagnostic" not in report3


def test_cli_options_and_errors(stats_file, tmp_path, capsys):
    out = tmp_path / "k"
    assert main([str(stats_file), "--out", str(out), "--select", "topk", "--top-k", "2", "--groups", "3",
                 "--resamples", "0", "--ratio-min", "0.125", "--ratio-max", "0.875", "--ratio-step", "0.25"]) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.modules == [PLANTED, "decoder.layers.0.fc1"] and len(plan.groups) == 3
    assert plan.shared_ratio in (0.125, 0.375, 0.625, 0.875) and plan.provenance["ratio"]["rule"] == "similarity"
    out = tmp_path / "m"
    assert main([str(stats_file), "--out", str(out), "--modules", "decoder.layers.0.fc1", "--resamples", "20"]) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.modules == ["decoder.layers.0.fc1"] and plan.groups == [LANGS]  # no conflict there: one group
    assert main([str(stats_file), "--out", str(tmp_path / "x"), "--modules", "encoder.nope"]) == 1
    assert "encoder.nope" in capsys.readouterr().err
    assert main([str(stats_file), "--out", str(tmp_path / "y"), "--expect-signature", "other"]) == 1
    assert "signature" in capsys.readouterr().err
    assert main([str(stats_file), "--out", str(tmp_path / "z"), "--ratio-max", "1.0"]) == 2
    with pytest.raises(SystemExit):
        main([str(stats_file), "--out", str(tmp_path / "w"), "--groups", "2", "--distance-threshold", "0.3"])
    # a window without probes is refused, saying what to do
    assert main([str(stats_file), "--out", str(tmp_path / "v"), "--window-start", "1000"]) == 1
    err = capsys.readouterr().err
    assert f"{stats_file}: 0 same-state probe(s) in the window [1000, None)" in err and "--window-start" in err
    assert not (tmp_path / "v").exists()


def test_flags_of_the_summed_estimator_keep_their_meaning_or_say_they_no_longer_apply(stats_file, tmp_path, capsys):
    """--distance-threshold was the same-state conflict threshold: it still is, with a warning
    naming --conflict-tau; the summed clustering's rules no longer apply and are ignored with a
    warning; the diagnostic's own settings reach the diagnostic."""
    assert main([str(stats_file), "--out", str(tmp_path / "tau"), "--resamples", "0", "--conflict-tau", "0.9"]) == 0
    assert main([str(stats_file), "--out", str(tmp_path / "thr"), "--resamples", "0", "--distance-threshold", "0.9"]) == 0
    err = capsys.readouterr().err
    assert "--distance-threshold is deprecated" in err and "--conflict-tau 0.9" in err
    tau, thr = (Plan.load(tmp_path / d / "plan.json") for d in ("tau", "thr"))
    assert tau.groups == thr.groups == [LANGS]             # no conflict above 0.9: one group
    assert thr.provenance["settings"]["conflict_tau"] == 0.9
    reference = Plan.load(tmp_path / "tau" / "plan.json").dumps()
    for flag in ("--silhouette-min", "--min-split-distance"):
        assert main([str(stats_file), "--out", str(tmp_path / flag), "--resamples", "0", "--conflict-tau", "0.9",
                     flag, "0.3"]) == 0
        assert f"warning: {flag} no longer applies" in capsys.readouterr().err
        assert Plan.load(tmp_path / flag / "plan.json").dumps() == reference
    assert main([str(stats_file), "--out", str(tmp_path / "w"), "--resamples", "0", "--alignment-weight", "0"]) == 0
    assert "w = 0; divergence" in (tmp_path / "w" / "report.md").read_text()
    assert main([str(stats_file), "--out", str(tmp_path / "w2"), "--alignment-weight", "2"]) == 2


def test_statistics_without_same_state_records_are_refused(tmp_path, capsys):
    """Statistics without same-state probe records (an older stage 1's) are not analysed: the
    error names the file and says how to record them again."""
    import torch

    from fairseq_gdps.gdps.report import analyze
    from fairseq_gdps.gdps.stats import GradientStatistics

    old = GradientStatistics({"encoder.a.ffn": 64, "decoder.b.ffn": 64}, languages=["x", "y"], subspace_dim=0)
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        old.add_step(t, {l: {m: torch.randn(64, generator=gen) for m in old.module_names} for l in old.languages})
    path = tmp_path / "old_stats.pt"
    old.save(path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: these gradient statistics hold no same-state probe records" in err
    assert "--gdps-probe-interval" in err and "--gdps-stats" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="old_stats.pt: these gradient statistics hold no same-state probe records"):
        analyze(GradientStatistics.load(path), str(path))


def test_steps_that_share_a_component_flag_the_diagnostic_not_the_decision(tmp_path, capsys):
    """Languages probed at one update share the model's state. Here their true mean gradients are
    unrelated, but every probe adds a component common to all languages (the state of that
    update): it enters the summed cross-language sums (same step) and not their self terms
    (distinct steps), so the summed corrected cosines come out beyond +1. The diagnostic must say
    that it then means nothing; the decision, taken at one state per probe, is unaffected."""
    import torch

    from fairseq_gdps.gdps.report import analyze, report_markdown
    from fairseq_gdps.gdps.stats import GradientStatistics

    gen = torch.Generator().manual_seed(3)
    sizes, langs, steps = {"a.ffn": 1024, "b.ffn": 1024}, ["x", "y", "z"], 40
    # rows 2u and 2u + 1: the two halves of language u, around the language's mean
    means = {m: 0.1 * torch.randn(len(langs), d, generator=gen, dtype=torch.float64).repeat_interleave(2, 0)
             for m, d in sizes.items()}
    shared_drift = GradientStatistics(sizes, languages=langs, probe_units=langs, subspace_dim=8, seed=1)
    for t in range(steps):
        rows = {m: means[m] + torch.randn(d, generator=gen, dtype=torch.float64)
                + 0.05 * torch.randn(2 * len(langs), d, generator=gen, dtype=torch.float64) for m, d in sizes.items()}
        shared_drift.add_probe(t, torch.ones(2 * len(langs)), rows)
    flagged = analyze(shared_drift, resamples=0)
    assert flagged.summed.clipped == {"clipped": 6, "pairs": 6}   # 3 pairs x 2 modules, all beyond +1
    assert flagged.summed.mostly_clipped
    report = report_markdown(flagged)
    assert "beyond +-1: 6 of 6 language pairs" in report and "this ranking mean nothing" in report
    shared_drift.save(tmp_path / "shared_drift.pt")   # no warning from gdps-analyze: the decision stands
    assert main([str(tmp_path / "shared_drift.pt"), "--out", str(tmp_path / "out"), "--resamples", "0"]) == 0
    assert capsys.readouterr().err == ""
