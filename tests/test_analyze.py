"""Plan validation and files; gdps-analyze end to end on a planted statistics file."""
import json

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
PLANTED = "encoder.transformer_layers.2.fc2"


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
    st = synthetic_statistics(MODULES, LANGS, clusters={PLANTED: [1, 0, 1, 1, 0, 1]}, steps=40, signal=0.5,
                              noise=1.0, own=0.05, shared=0.3, subspace_dim=16, seed=7,
                              model_signature="toy")
    path = tmp_path_factory.mktemp("stats") / "stats.pt"
    st.save(path)
    return path


def test_cli_end_to_end(stats_file, tmp_path, capsys):
    """Statistics without same-state records (as recorded before them): the summed estimator
    decides, and the report says so."""
    out = tmp_path / "a"
    assert main([str(stats_file), "--out", str(out), "--resamples", "60"]) == 0
    printed = capsys.readouterr().out
    assert "groups: {aeb, est, gle, l5} / {bem, l4}" in printed
    for name in ("plan.json", "report.md", "similarity.png", "dendrogram.png", "layer_profile.png", "stability.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("similarity.png", "dendrogram.png", "layer_profile.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = Plan.load(out / "plan.json", model_module_names=list(MODULES), languages=LANGS)
    assert plan.modules == [PLANTED]                       # top1: the planted module only
    assert plan.groups == [["aeb", "est", "gle", "l5"], ["bem", "l4"]]
    # cross-group corrected cosine ~ shared = 0.3 -> quantised to 0.25 or 0.375
    assert plan.shared_ratio in (0.25, 0.375)
    assert set(plan.scores) == set(MODULES) and plan.scores[PLANTED]["rank"] == 1
    prov = plan.provenance
    assert prov["stats_file"] == str(stats_file) and len(prov["stats_sha256"]) == 64
    assert prov["grouping"]["chosen_frequency"] >= 0.9 and "timestamp" not in json.dumps(prov)
    assert prov["grouping"]["source"] == "similarity" and prov["ratio"]["rule"] == "similarity"
    assert prov["stats"]["model_signature"] == "toy"
    report = (out / "report.md").read_text()
    assert report.count("no same-state probe records") == 1 and prov["estimator"] == "summed (drift-prone)"
    for needle in ("## Modules ranked by the summed estimator", f"| 1 | `{PLANTED}`", "## Language grouping",
                   "bootstrap resamples", "## Shared ratio", "![similarity](similarity.png)"):
        assert needle in report
    # identical inputs -> identical plan bytes
    out2 = tmp_path / "b"
    assert main([str(stats_file), "--out", str(out2), "--resamples", "60"]) == 0
    assert (out / "plan.json").read_bytes() == (out2 / "plan.json").read_bytes()


def test_cli_options_and_errors(stats_file, tmp_path, capsys):
    out = tmp_path / "k"
    assert main([str(stats_file), "--out", str(out), "--select", "topk", "--top-k", "2", "--groups", "3",
                 "--resamples", "0", "--ratio-min", "0.125", "--ratio-max", "0.875", "--ratio-step", "0.25"]) == 0
    plan = Plan.load(out / "plan.json")
    assert len(plan.modules) == 2 and plan.modules[0] == PLANTED and len(plan.groups) == 3
    assert plan.shared_ratio in (0.125, 0.375, 0.625, 0.875)
    out = tmp_path / "m"
    assert main([str(stats_file), "--out", str(out), "--modules", "decoder.layers.1.fc2", "--resamples", "20"]) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.modules == ["decoder.layers.1.fc2"] and plan.groups == [LANGS]  # aligned module: one group
    assert main([str(stats_file), "--out", str(tmp_path / "x"), "--modules", "encoder.nope"]) == 1
    assert "encoder.nope" in capsys.readouterr().err
    assert main([str(stats_file), "--out", str(tmp_path / "y"), "--expect-signature", "other"]) == 1
    assert "signature" in capsys.readouterr().err
    assert main([str(stats_file), "--out", str(tmp_path / "z"), "--ratio-max", "1.0"]) == 2
    with pytest.raises(SystemExit):
        main([str(stats_file), "--out", str(tmp_path / "w"), "--groups", "2", "--distance-threshold", "0.3"])


def test_steps_that_share_a_component_within_a_step_are_flagged(stats_file, tmp_path, capsys):
    """Languages measured at the same update share the model's state. Here their true mean
    gradients are unrelated (cosine ~0), but every step adds one noise component common to all
    languages: it enters the cross-language sums (same step) and not the self estimates (distinct
    steps), so the corrected cosines come out beyond +1. The analysis must say that its ranking
    is then not measured conflict; on independent steps (the planted file) it must not."""
    import torch
    from fairseq_gdps.gdps.report import analyze, report_markdown
    from fairseq_gdps.gdps.stats import GradientStatistics

    gen = torch.Generator().manual_seed(3)
    sizes, langs, steps = {"a.ffn": 1024, "b.ffn": 1024}, ["x", "y", "z"], 40
    means = {(l, m): 0.1 * torch.randn(d, generator=gen, dtype=torch.float64) for l in langs for m, d in sizes.items()}
    shared_noise = GradientStatistics(sizes, languages=langs, subspace_dim=8, seed=1)
    for t in range(steps):
        common = {m: torch.randn(d, generator=gen, dtype=torch.float64) for m, d in sizes.items()}
        shared_noise.add_step(t, {l: {m: means[l, m] + common[m] for m in sizes} for l in langs})
    flagged = analyze(shared_noise, resamples=0)
    clipped = flagged.plan().provenance["corrected_cosines_clipped"]
    assert clipped == {"clipped": 6, "pairs": 6}   # 3 pairs x 2 modules, all beyond +1
    report = report_markdown(flagged)
    assert "**WARNING: in 6 of 6 language pairs" in report and "do not reflect measured conflict" in report
    shared_noise.save(tmp_path / "shared_noise.pt")   # gdps-analyze says it too
    assert main([str(tmp_path / "shared_noise.pt"), "--out", str(tmp_path / "out"), "--resamples", "0"]) == 0
    assert "WARNING: in 6 of 6 language pairs" in capsys.readouterr().err

    planted = analyze(GradientStatistics.load(stats_file), resamples=0)
    assert "in 6 of" not in report_markdown(planted) and "no same-state probe records" in planted.estimator_warning
    counted = planted.plan().provenance["corrected_cosines_clipped"]
    assert counted["pairs"] == len(MODULES) * 15 and counted["clipped"] < counted["pairs"] / 2
