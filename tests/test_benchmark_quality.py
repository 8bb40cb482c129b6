"""benchmarks/quality.py and quality_records.py: the pure helpers, records and the report made from them,
and the tiny setting end to end (every system, records, resume, report from the records alone)."""
import argparse
import json
import shutil

import pytest

from benchmarks import quality
from benchmarks import quality_records as records


def test_random_partition_keeps_sizes_and_differs_from_the_plan():
    plan = [["ar", "et", "sw"], ["ga"]]
    for seed in range(5):
        groups = quality.random_partition(plan, seed)
        assert sorted(len(g) for g in groups) == [1, 3]
        assert sorted(l for g in groups for l in g) == ["ar", "et", "ga", "sw"]
        assert {frozenset(g) for g in groups} != {frozenset(g) for g in plan}
    assert quality.random_partition(plan, 3) == quality.random_partition(plan, 3)
    # one group: no other partition exists, so the plan's comes back
    assert quality.random_partition([["a", "b"]], 1) == [["a", "b"]]


def test_reused_run_is_the_source_run_finished(tmp_path):
    gdps = tmp_path / "gdps"
    (gdps / "stage2").mkdir(parents=True)
    (gdps / "decode").mkdir()
    (gdps / "stage2" / "checkpoint_best.pt").write_bytes(b"weights")
    (gdps / "decode" / "test.txt").write_text("H-0\t-0.1\thello\n")
    (gdps / "train.log").write_text("log\n")
    (gdps / "scores.json").write_text('{"average": {"bleu": 1.0}}\n')
    out = tmp_path / "random_groups"
    split = {"modules": ["decoder.layers.1.ffn"], "groups": [["ar", "et"]], "shared_ratio": 0.75}
    quality.Benchmark.reuse_run(gdps, out, split, why="one group")
    assert (out / "scores.json").read_text() == (gdps / "scores.json").read_text()
    assert (out / "decode" / "test.txt").read_text() == (gdps / "decode" / "test.txt").read_text()
    assert (out / "stage2" / "checkpoint_best.pt").stat().st_ino == (gdps / "stage2" / "checkpoint_best.pt").stat().st_ino
    assert json.loads((out / "split.json").read_text()) == split
    assert (out / "reused_from.txt").read_text().splitlines() == [str(gdps), "one group"]


def test_conflict_condition_uses_shared_speakers(tmp_path, monkeypatch):
    """The conflict corpus is made with --conflict-speakers shared; one made with own xx voices
    (before the condition changed) is refused, not reused."""
    corpus = tmp_path / "work" / "conflict" / "corpus"
    quality.Benchmark.check_conflict_corpus(corpus)  # nothing there yet: fine
    corpus.mkdir(parents=True)
    (corpus / "corpus.json").write_text(json.dumps({"settings": {"conflict_speakers": "shared"}}))
    quality.Benchmark.check_conflict_corpus(corpus)
    for old in ({"settings": {"conflict_speakers": "own"}}, {"settings": {}}):  # {}: made before the flag existed
        (corpus / "corpus.json").write_text(json.dumps(old))
        with pytest.raises(SystemExit, match="--conflict-speakers own.*--conflict-speakers shared"):
            quality.Benchmark.check_conflict_corpus(corpus)
    # the corpus command of the conflict condition
    calls = []
    args = argparse.Namespace(work=tmp_path / "w2", threads=1, data=None)
    bench = quality.Benchmark(args, {"utterances": 12, "vocab": None})
    monkeypatch.setattr(bench, "sh", lambda cmd, log: calls.append([str(c) for c in cmd]))
    bench.data_dir("conflict")
    make = calls[0]
    assert make[0] == "gdps-make-corpus"
    assert make[make.index("--conflict-language") + 1] == "xx:et"
    assert make[make.index("--conflict-speakers") + 1] == "shared"


def test_parameter_count_over_seeds_shows_a_range_when_seeds_differ():
    assert records._params([2_140_000, 2_140_000]) == "2.14M"
    assert records._params([2_140_000, 2_310_000, 2_180_000]) == "2.14-2.31M"
    assert records._params([]) == "-"


def _record(system, seed, hyps, refs, condition="natural", accuracy=80.0, setting="learned"):
    """A hand-made record scored for real (sacrebleu) on the given hypotheses."""
    from fairseq_gdps.cli.score import score_languages

    scores = score_languages({lang: [(hyps[lang][i], refs[lang][i]) for i in sorted(refs[lang])] for lang in refs})
    return records.make_record(
        setting_name=setting, run_setting={"max_update": 10}, condition=condition, seed=seed, system=system,
        scores=scores, hypotheses=hyps, references_sha256=records.sha256_of(refs),
        dev_curve=[{"num_updates": 5, "loss": 3.0, "accuracy": 60.0}, {"num_updates": 10, "loss": 2.0, "accuracy": accuracy}],
        params=1000, split=None, plan=None, wall_seconds=12.0, versions={}, machine={}, threads=1)


REFS = {"a": {str(i): f"the {n} cats sat on {n + 1} mats today" for i, n in enumerate(range(40))},
        "b": {str(100 + i): f"we walked {n} kilometres in {n + 2} hours" for i, n in enumerate(range(40))}}


def _degrade(refs, every):
    """Hypotheses equal to the references except every ``every``-th one, which is garbled."""
    return {lang: {i: ("zz yy xx" if k % every == 0 else r) for k, (i, r) in enumerate(sorted(rs.items()))}
            for lang, rs in refs.items()}


def _write(root, record):
    records.write_json(records.record_path(root, record["condition"], record["seed"], record["system"]), record)


def test_records_aggregate_into_comparisons_that_say_what_they_support(tmp_path):
    root = tmp_path / "quality" / "learned"
    records.write_json(records.references_path(root, "natural"),
                       {"format": 1, "condition": "natural", "sha256": records.sha256_of(REFS), "references": REFS})
    for seed in (1, 2, 3):
        _write(root, _record("baseline", seed, _degrade(REFS, 2), REFS))     # half the sentences wrong
        _write(root, _record("tagged", seed, _degrade(REFS, 2), REFS))       # the same output: no difference
        _write(root, _record("gdps", seed, _degrade(REFS, 10), REFS))        # a tenth wrong: clearly better
    found, refs = records.load_records(root, "learned", {"max_update": 10})
    assert len(found) == 9
    cache = {}
    out = records.aggregate(found, refs, 200, cache, records.LEARNED_CRITERION)["natural"]
    assert out["passed_seeds"] == [1, 2, 3]
    assert out["comparisons"]["gdps|tagged"]["sentence"].endswith("above in 3 of 3 seeds, p < 0.05 in every one.")
    one_seed = records.comparison_sentence("gdps", "tagged", out["comparisons"]["gdps|tagged"]["per_seed"][:1])
    assert one_seed.endswith("(fewer than 3 seeds: a direction, not yet a finding).")
    assert "above in 3 of 3" in out["comparisons"]["gdps|tagged"]["sentence"]
    assert out["comparisons"]["tagged|baseline"]["sentence"].endswith("no significant difference in any seed.")
    assert "baseline|tagged" not in out["comparisons"]  # the stock baseline is compared with nothing, the others with it
    assert out["systems"]["gdps"]["average_bleu"][0] > out["systems"]["tagged"]["average_bleu"][0] + 10
    # baseline and tagged gave the same hypotheses in every seed: one bootstrap per distinct pair of outputs
    assert len(cache) == 2
    # a seed whose baseline has not learned the content is left out of every mean, and said so
    _write(root, _record("baseline", 2, _degrade(REFS, 2), REFS, accuracy=68.0))
    found, refs = records.load_records(root, "learned", {"max_update": 10})
    out = records.aggregate(found, refs, 200, cache, records.LEARNED_CRITERION)
    assert out["natural"]["passed_seeds"] == [1, 3]
    assert out["natural"]["systems"]["gdps"]["seeds"] == [1, 3]
    assert "final dev accuracy 68.0 < 75" in out["natural"]["learned"][2]["why_not"]
    meta = {"setting": "learned", "run_setting": {"max_update": 10, "stage1": 5, "probe_interval": 1}, "seeds": [1, 2, 3],
            "conditions": ["natural"], "bootstrap": 200, "criterion": records.LEARNED_CRITERION, "records_dir": "x",
            "planned": 12, "recorded": 9, "missing": ["natural/seed1/full_split"], "plot": None}
    text = records.to_markdown(out, meta)
    assert "**9 of 12 runs recorded** — PARTIAL: still to run natural seed 1: full_split." in text
    assert "| 2 |" in text and "**no**: final dev accuracy 68.0 < 75" in text


def test_records_of_another_setting_or_edited_hypotheses_are_refused(tmp_path):
    root = tmp_path / "quality" / "learned"
    records.write_json(records.references_path(root, "natural"),
                       {"format": 1, "condition": "natural", "sha256": records.sha256_of(REFS), "references": REFS})
    good = _record("baseline", 1, _degrade(REFS, 2), REFS)
    _write(root, good)
    with pytest.raises(records.RecordError, match=r"seed1/baseline\.json: made with setting learned"):
        records.load_records(root, "learned", {"max_update": 20})
    edited = dict(good, hypotheses=_degrade(REFS, 3))
    _write(root, edited)
    with pytest.raises(records.RecordError, match="do not match their recorded hash"):
        records.load_records(root, "learned", {"max_update": 10})
    _write(root, dict(good, references_sha256="0" * 64))
    with pytest.raises(records.RecordError, match="other test references"):
        records.load_records(root, "learned", {"max_update": 10})


def test_conflict_targets_are_checked_per_language():
    per_seed = [{"delta_average": 1.5, "delta_languages": {"xx": 4.0, "et": 0.2, "ar": -0.7}, "pooled_delta": 1.5,
                 "pooled_p": 0.01, "languages_p": {}}]
    lines = records._targets("conflict", {"gdps|tagged": {"per_seed": per_seed}})
    assert lines[0].startswith("GDPS - tagged baseline, average BLEU: +1.50") and lines[0].count("met") == 1
    assert "on xx: +4.00" in lines[1] and lines[1].endswith("met")
    assert lines[2] == "Lowest other language against the tagged baseline: ar -0.70 (target >= -0.5): NOT met"
    # GDPS against the controls of its own size: met only when GDPS is not below them
    equal = {"gdps|tagged": {"per_seed": per_seed},
             "gdps|full_split_matched": {"per_seed": [dict(per_seed[0], delta_average=-0.3)]},
             "gdps|random_groups": {"per_seed": [dict(per_seed[0], delta_average=0.0)]}}
    lines = records._targets("conflict", equal)
    assert "GDPS - full_split_matched (same size), average BLEU: -0.30 (target >= +0.0): NOT met (1 seeds)" in lines
    assert "GDPS - random_groups (same size), average BLEU: +0.00 (target >= +0.0): met (1 seeds)" in lines
    natural = records._targets("natural", {"gdps|tagged": {"per_seed": per_seed}})
    assert natural[1] == "Lowest language against the tagged baseline: ar -0.70 (target >= -0.5): NOT met"


@pytest.mark.parametrize("groups, ratio, languages", [(2, 0.0, 5), (2, 0.5, 4), (3, 0.25, 4), (4, 0.0, 4), (1, 0.0, 4)])
def test_size_matched_full_split_has_the_plans_width(groups, ratio, languages):
    def width(g, r):   # split block width in units of the unsplit block
        return r + g * (1 - r)

    matched = quality.size_matched_shared_ratio(groups, ratio, languages)
    if groups == languages:
        assert matched == pytest.approx(ratio)
    if groups == 1:
        assert matched == 1.0  # nothing private
    assert width(languages, matched) == pytest.approx(width(groups, ratio))
    assert 0.0 <= matched <= 1.0 and (matched >= ratio)  # a block per language is narrower, so more is shared


def test_size_matched_full_split_refuses_impossible_plans():
    with pytest.raises(ValueError, match="groups"):
        quality.size_matched_shared_ratio(5, 0.0, 4)
    with pytest.raises(ValueError, match="shared ratio"):
        quality.size_matched_shared_ratio(2, 1.5, 4)


@pytest.mark.slow
def test_tiny_benchmark_records_every_system_resumes_and_reports_from_records(tiny_data, tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--setting", "tiny", "--work", str(work), "--results", str(results), "--data", f"natural={tiny_data}"]
    assert quality.main(args) == 0
    root = results / "quality" / "tiny"
    found, refs = records.load_records(root, "tiny", {k: quality.SETTINGS["tiny"][k] for k in quality.RUN_DEFINING})
    by_system = {r["system"]: r for r in found}
    # bilingual is opt-in; the oracle runs only where a conflict is planted
    natural_systems = set(quality.DEFAULT_SYSTEMS) - {"oracle"}
    assert set(by_system) == natural_systems
    languages = sorted(refs["natural"]["references"])
    for r in found:
        assert sorted(r["hypotheses"]) == languages and r["wall_seconds"] > 0 and r["versions"]["torch"]
        # no machine paths in the records (``path`` is where load_records found the file)
        assert "/" + str(tmp_path).strip("/") not in json.dumps({k: v for k, v in r.items() if k != "path"})
        assert [p["num_updates"] for p in r["dev_curve"]][-1] <= 6
    # the tagged baseline is GDPS's stage 1 continued unsplit: the same size as GDPS's stage-1 model
    # (the language embedding on top of the stock network), smaller than any split
    assert by_system["baseline"]["params"] < by_system["tagged"]["params"] <= by_system["gdps"]["params"]
    assert by_system["tagged"]["split"] is None
    assert by_system["gdps"]["plan"]["provenance"]["estimator"] == "same-state"
    assert "stats_file" not in by_system["gdps"]["plan"]["provenance"]  # no machine paths in the records
    assert by_system["full_split"]["split"]["groups"] == [[l] for l in languages]
    assert len(by_system["param_diff"]["split"]["groups"]) == 2
    # the size-matched full split: a block per language at exactly GDPS's size (one group: GDPS's own run)
    matched = by_system["full_split_matched"]
    if len(by_system["gdps"]["plan"]["groups"]) > 1:
        assert matched["split"]["groups"] == [[l] for l in languages]
        assert abs(matched["params"] - by_system["gdps"]["params"]) <= 8 * len(languages)  # rounding of units
        assert matched["params"] < by_system["full_split"]["params"]
    else:
        assert matched["hypotheses_sha256"] == by_system["gdps"]["hypotheses_sha256"] and "nothing is private" in matched["notes"]
    # the opt-in diagnostic: GDPS's groups with the similarity rule's shared ratio (a plan that
    # already has that ratio makes it GDPS's own run, reused)
    assert quality.main(args + ["--systems", "gdps", "gdps_similarity_ratio"]) == 0
    sim = json.loads((root / "natural" / "seed1" / "gdps_similarity_ratio.json").read_text())
    ratio = by_system["gdps"]["plan"]["provenance"]["ratio"]
    assert sim["split"]["groups"] == by_system["gdps"]["plan"]["groups"]
    assert sim["split"]["shared_ratio"] == ratio["similarity_rule"]
    if ratio["rule"] == "similarity":
        assert sim["hypotheses_sha256"] == by_system["gdps"]["hypotheses_sha256"] and "reused from gdps" in sim["notes"]
    report = json.loads((results / "quality.json").read_text())
    assert report["meta"]["recorded"] == report["meta"]["planned"] == len(natural_systems) + 1
    comparisons = report["results"]["natural"]["comparisons"]
    assert {"gdps|tagged", "gdps|full_split_matched", "gdps|random_groups"} <= set(comparisons)
    text = (results / "quality.md").read_text()
    assert "**8 of 8 runs recorded**" in text and "PARTIAL" not in text
    # the report comes from the records alone: without the run folders it is the same
    shutil.rmtree(work)
    assert quality.main(args + ["--report-only"]) == 0
    assert (results / "quality.md").read_text() == text
    # a second call finds every run recorded and starts none (no work folder is made again)
    assert quality.main(args) == 0
    assert not (work / "natural" / "seed1").exists()
    # a run whose record is lost is run again, and only that one; the report says what was left
    (root / "natural" / "seed1" / "baseline.json").unlink()
    assert quality.main(args + ["--report-only"]) == 0
    assert "PARTIAL: still to run natural seed 1: baseline (about" in (results / "quality.md").read_text()
    assert quality.main(args + ["--systems", "baseline", "gdps"]) == 0
    assert (root / "natural" / "seed1" / "baseline.json").is_file() and not (work / "natural" / "seed1" / "gdps").exists()
    # a call restricted to part of the run set still reports the whole set
    assert "**8 of 8 runs recorded**" in (results / "quality.md").read_text()
    # runs of another budget never mix into a records folder
    (root / "setting.json").write_text(json.dumps({"max_update": 8}))
    with pytest.raises(SystemExit, match=r"setting\.json holds runs made with another setting"):
        quality.main(args)


def test_a_run_held_by_another_live_process_is_not_restarted(tmp_path):
    import os
    import subprocess

    lock = tmp_path / "natural" / "seed1" / "gdps.running"
    assert quality.running_elsewhere(lock) is None          # no lock
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getpid()}\n")
    assert quality.running_elsewhere(lock) is None          # this process's own
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f"{other.pid}\n")
        assert quality.running_elsewhere(lock) == other.pid
    finally:
        other.kill()
        other.wait()
    assert quality.running_elsewhere(lock) is None          # stale: its process has ended
    lock.write_text("not a pid\n")
    assert quality.running_elsewhere(lock) is None


def test_the_conflict_pairs_agreement_is_read_from_the_plan():
    plan = {"provenance": {"same_state": {"languages": ["ar", "et", "xx"],
                                          "rho": {"decoder.layers.0.ffn": [[1, .2, .3], [.2, 1, .55], [.3, .55, 1]],
                                                  "encoder.transformer_layers.2.ffn": [[1, .1, .1], [.1, 1, .8], [.1, .8, 1]]}}}}
    assert records._pair_rho(plan, "et", "xx") == {"decoder.layers.0.ffn": .55, "encoder.transformer_layers.2.ffn": .8}
    assert records._pair_rho(plan, "et", "ga") == {}
    assert records._pair_rho({"provenance": {}}, "et", "xx") == {}
    assert [records._short_block(b) for b in plan["provenance"]["same_state"]["rho"]] == ["dec0", "enc2"]


def test_the_report_says_whether_the_conflict_pair_was_put_apart():
    """Either language of the conflicting pair alone resolves the conflict: the report says
    "apart" for both, and says which one was alone."""
    refs = {lang: {f"{lang}{i}": f"in {n} days" for i, n in enumerate(range(12))}
            for lang in ("ar", "et", "ga", "sw", "xx")}
    plans = {1: [["ar", "ga", "sw", "xx"], ["et"]], 2: [["ar", "et", "ga", "sw"], ["xx"]], 3: [["ar", "et", "ga", "sw", "xx"]]}
    found = []
    for seed, groups in plans.items():
        for system in ("baseline", "tagged", "gdps"):
            r = _record(system, seed, refs, refs, condition="conflict")
            if system == "gdps":
                r["plan"] = {"modules": ["decoder.layers.0.ffn"], "groups": groups, "shared_ratio": 0.375}
            found.append(r)
    out = records.aggregate(found, {"conflict": {"references": refs}}, 10, {},
                            {"min_average_bleu": 0.0, "min_final_dev_accuracy": 0.0})
    assert [out["conflict"]["choices"][s]["conflict_pair_apart"] for s in (1, 2, 3)] == [True, True, False]
    meta = {"setting": "learned", "run_setting": {"max_update": 10, "stage1": 5, "probe_interval": 1}, "seeds": [1, 2, 3],
            "conditions": ["conflict"], "bootstrap": 10, "criterion": records.LEARNED_CRITERION, "records_dir": "x",
            "planned": 9, "recorded": 9, "missing": [], "plot": None}
    text = records.to_markdown(out, meta)
    assert "- seed 1: split decoder.layers.0.ffn, groups {ar, ga, sw, xx} / {et}, shared ratio 0.375; `et` and `xx` apart" in text
    assert "`et` and `xx` apart (`xx` alone)" in text
    assert "- seed 3: one group" in text and "`et` and `xx` in one group" in text


def test_gdps_share_of_the_oracle_gain_is_checked_on_planted_conditions():
    def seed(s, delta):
        return {"seed": s, "delta_average": delta, "delta_languages": {"xx": delta, "ar": 0.0}, "pooled_delta": delta,
                "pooled_p": 0.01, "languages_p": {}}

    comparisons = {"gdps|tagged": {"per_seed": [seed(1, 2.0), seed(2, 4.0)]},
                   "oracle|tagged": {"per_seed": [seed(1, 4.0), seed(2, 6.0)]}}
    for condition in ("conflict", "conflict_units"):
        lines = records._targets(condition, comparisons)
        assert ("GDPS's gain over the tagged baseline as a share of the oracle split's: +3.00 of +5.00 = 60% "
                "(target >= 70%, 2 seeds): NOT met") in lines
    nothing = dict(comparisons, **{"oracle|tagged": {"per_seed": [seed(1, -1.0)]}})
    assert any(line.endswith("the oracle gains nothing here") for line in records._targets("conflict", nothing))
    assert not any("oracle" in line for line in records._targets("natural", comparisons))


def test_the_oracle_runs_only_where_a_conflict_is_planted(tmp_path):
    args = argparse.Namespace(work=tmp_path, threads=1, data=None)
    bench = quality.Benchmark(args, dict(quality.SETTINGS["learned"]))
    data = tmp_path / "data"
    data.mkdir()
    for lang in ("ar", "et", "xx"):
        (data / f"test_{lang}.tsv").write_text("id\n")
    for condition in quality.CONDITIONS:
        names = [j.name.split("/")[-1] for j in bench.jobs_for(condition, 1, data)]
        assert ("oracle" in names) == (condition in records.PLANTED_CONDITIONS)
    assert "--conflict-remap" in quality.CONDITIONS["conflict_units"]


def test_a_control_that_is_gdps_own_run_is_recorded_from_gdps_record(tmp_path):
    """With GDPS's run folder gone (recorded in another sitting), a control that would be GDPS's own
    run is recorded from GDPS's record; a control that is a run of its own is not."""
    args = argparse.Namespace(work=tmp_path / "work", results=tmp_path / "results", setting="learned", threads=1, data=None)
    bench = quality.Benchmark(args, dict(quality.SETTINGS["learned"]))
    one_group = {"modules": ["decoder.layers.1.ffn"], "groups": [["ar", "et", "ga", "sw"]], "shared_ratio": 0.0,
                 "provenance": {"ratio": {"rule": "conflict"}}}
    gdps = {"system": "gdps", "seed": 1, "condition": "natural", "plan": one_group, "hypotheses_sha256": "abc",
            "split": None, "notes": None, "language_information": "x"}
    path = records.record_path(bench.records_root, "natural", 1, "gdps")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(gdps))

    def job(system):
        return quality.Job(f"natural/seed1/{system}", tmp_path / "work" / system, lambda: None, deps=["natural/seed1/gdps"])

    assert bench.record_reused_from_gdps_record(job("full_split_matched"))
    derived = json.loads(records.record_path(bench.records_root, "natural", 1, "full_split_matched").read_text())
    assert derived["system"] == "full_split_matched" and derived["hypotheses_sha256"] == "abc"
    assert derived["notes"] == "reused from gdps: one group: at the plan's width nothing is private"
    assert derived["split"]["groups"] == one_group["groups"] and derived["plan"] is None
    assert not bench.record_reused_from_gdps_record(job("full_split"))   # a run of its own
    assert not records.record_path(bench.records_root, "natural", 1, "full_split").exists()
    assert quality.reuse_reason("random_groups", one_group, 1) == quality.SAME_PARTITION
    two_groups = dict(one_group, groups=[["ar", "et"], ["ga", "sw"]])
    assert quality.reuse_reason("full_split_matched", two_groups, 1) is None
