"""benchmarks/quality.py: the pure helpers, and the tiny setting end to end (every system, resume)."""
import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


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


def test_updates_to_reach():
    curve = [{"num_updates": 100, "loss": 5.0}, {"num_updates": 200, "loss": 4.0}, {"num_updates": 300, "loss": 3.5}]
    assert quality.updates_to_reach(curve, 4.0) == 200
    assert quality.updates_to_reach(curve, 3.0) is None


def test_parameter_count_over_seeds_shows_a_range_when_seeds_differ():
    assert quality._params([2_140_000, 2_140_000]) == "2.14M"
    assert quality._params([2_140_000, 2_310_000, 2_180_000]) == "2.14-2.31M"
    assert quality._params([]) == "-"


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
    quality.Benchmark.reuse_run(gdps, out, split)
    assert (out / "scores.json").read_text() == (gdps / "scores.json").read_text()
    assert (out / "decode" / "test.txt").read_text() == (gdps / "decode" / "test.txt").read_text()
    assert (out / "stage2" / "checkpoint_best.pt").stat().st_ino == (gdps / "stage2" / "checkpoint_best.pt").stat().st_ino
    assert json.loads((out / "split.json").read_text()) == split
    assert (out / "reused_from.txt").read_text().strip() == str(gdps)


def test_estimator_check_of_an_older_plan_is_computed_from_its_statistics(tmp_path):
    from fairseq_gdps.gdps.stats import synthetic_statistics

    stats = synthetic_statistics({"m1": 32, "m2": 32}, ["a", "b", "c"], steps=20, subspace_dim=8, seed=2)
    stats.save(tmp_path / "stats.pt")
    check = quality.clipped_corrected_cosines(tmp_path / "stats.pt")
    assert check["pairs"] == 6 and 0 <= check["clipped"] <= 6
    assert quality.clipped_corrected_cosines(tmp_path / "missing.pt") is None


def test_run_time_span_from_the_runs_wall_seconds(tmp_path):
    import os
    assert quality.run_time_span(tmp_path) is None
    for name, seconds, end in (("a", 100, 1000), ("b", 300, 1100), ("c/d", 50, 1500)):
        f = tmp_path / name / "wall_seconds.txt"
        f.parent.mkdir(parents=True)
        f.write_text(f"{seconds}.0\n")
        os.utime(f, (end, end))
    # runs a (900-1000), b (800-1100), d (1450-1500): first start 800, last finish 1500
    assert quality.run_time_span(tmp_path) == {"runs": 3, "first_start_to_last_finish_seconds": 700,
                                               "summed_run_seconds": 450}


def test_conflict_condition_uses_shared_speakers(tmp_path, monkeypatch):
    """The conflict corpus is made with --conflict-speakers shared; one made with own xx voices
    (before the condition changed) is refused, not reused."""
    corpus = tmp_path / "work" / "conflict" / "corpus"
    assert quality.conflict_speakers_of(tmp_path / "work") is None
    quality.Benchmark.check_conflict_corpus(corpus)  # nothing there yet: fine
    corpus.mkdir(parents=True)
    (corpus / "corpus.json").write_text(json.dumps({"settings": {"conflict_speakers": "shared"}}))
    quality.Benchmark.check_conflict_corpus(corpus)
    assert quality.conflict_speakers_of(tmp_path / "work") == "shared"
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


@pytest.mark.slow
def test_tiny_benchmark_runs_every_system_and_resumes(tiny_data, tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["--setting", "tiny", "--work", str(work), "--results", str(results), "--data", f"natural={tiny_data}"]
    assert quality.main(args) == 0
    report = json.loads((results / "quality.json").read_text())
    systems = report["results"]["natural"]["systems"]
    assert set(systems) == set(quality.SYSTEMS)
    assert report["meta"]["finished"] == report["meta"]["planned"] == len(quality.SYSTEMS)
    seed1 = report["results"]["natural"]["seeds"]["1"]
    languages = sorted(seed1["baseline"]["bleu"])
    # the split systems hold more parameters than the shared model; the full split the most
    assert seed1["baseline"]["params"] < seed1["gdps"]["params"] <= seed1["full_split"]["params"]
    assert 0 <= seed1["gdps"]["split"]["stability"] <= 1   # a frequency over bootstrap resamples
    clipped = seed1["gdps"]["split"]["clipped"]   # the analysis' estimator check, from the plan
    assert clipped["pairs"] > 0 and 0 <= clipped["clipped"] <= clipped["pairs"]
    assert seed1["full_split"]["split"]["groups"] == [[l] for l in languages]
    assert seed1["full_split"]["split"]["shared_ratio"] == 0.0
    assert len(seed1["param_diff"]["split"]["groups"]) == 2
    assert sorted(len(g) for g in seed1["random_groups"]["split"]["groups"]) == \
        sorted(len(g) for g in seed1["gdps"]["split"]["groups"])
    # random_groups is GDPS's own run, reused, exactly when no other partition of the plan's sizes exists
    plan_groups = seed1["gdps"]["split"]["groups"]
    only_partition = len(plan_groups) == 1 or all(len(g) == 1 for g in plan_groups)
    assert (work / "natural" / "seed1" / "random_groups" / "reused_from.txt").is_file() == only_partition
    # bilingual: one model per language, together the multilingual update budget
    assert seed1["bilingual"]["params"] == pytest.approx(len(languages) * seed1["baseline"]["params"], rel=0.01)
    for system in quality.SYSTEMS[1:]:
        assert 0 <= seed1[system]["pooled_bleu_p"] <= 1
    assert (results / "quality_dev_loss.png").stat().st_size > 1000
    table = (results / "quality.md").read_text()
    assert "| param_diff | 1 |" in table and "6 of 6 runs finished" in table
    assert "chrF per language" in table and "from the first run's start to the last run's finish (" in table
    # a second call finds every run finished and starts none
    finished_at = {p: p.stat().st_mtime for p in work.rglob("wall_seconds.txt")}
    assert quality.main(args) == 0
    again = json.loads((results / "quality.json").read_text())["meta"]
    assert set(again["status"].values()) == {"done"}
    assert {p: p.stat().st_mtime for p in work.rglob("wall_seconds.txt")} == finished_at
    # an unfinished run (no scores.json) is started again from its beginning, the others are kept
    (work / "natural" / "seed1" / "random_groups" / "scores.json").unlink()
    kept = (work / "natural" / "seed1" / "baseline" / "scores.json").stat().st_mtime
    assert quality.main(args) == 0
    assert (work / "natural" / "seed1" / "random_groups" / "scores.json").is_file()
    assert (work / "natural" / "seed1" / "baseline" / "scores.json").stat().st_mtime == kept
    # runs of another budget never mix into a work folder
    with pytest.raises(SystemExit, match=r"setting\.json holds runs made with another setting \(max_update 6 -> 8"):
        quality.main(args + ["--max-update", "8"])
