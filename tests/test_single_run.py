"""GDPS in one fairseq-train (--gdps-split-at-update N): the same plan and, bit for bit, the same
model and optimizer state as the two-stage pipeline (stage 1 to N, gdps-analyze,
gdps-split-checkpoint, stage 2 from it); a run killed before or after the switch and resumed ends
as the uninterrupted run; fairseq-generate and gdps-export take its checkpoint; an analysis that
keeps one group leaves the run unsplit; flags that cannot work are refused at start-up.

Why bit for bit: the switch splits the live model with the code that builds a split model from the
stage-1 weights (``split_in_place``), maps the live optimizer state as gdps-split-checkpoint maps
the saved one, and fairseq's resume restores everything else exactly (test_resume.py); with
dropout 0 nothing else draws random numbers."""
import json

import pytest
import torch

from conftest import BIN, REPO, run
from gdps_training import (assert_models_equal, assert_statistics_equal, build_trainer, data_parallel, load_checkpoint,
                           num_updates, run_all, run_killed_after_checkpoint, split_checkpoint, train_args)

SWITCH, MAX_UPDATE = 4, 8
EVERY = ["--save-interval-updates", "2"]   # mid-epoch checkpoints at 2, 4, 6 (11 batches an epoch)
ANALYSIS = ["--groups", "2", "--resamples", "20"]   # a split of the tiny run, decided the same way in both forms


def probe_args(save_dir):
    # the summed statistics too: the statistics are compared whole
    return ["--gdps-probe-interval", "1", "--gdps-summed-statistics", "--gdps-stats", save_dir / "stats.pt"]


def single_run(data, save_dir, max_update=MAX_UPDATE, switch=SWITCH, analysis=ANALYSIS):
    return train_args(data, save_dir, max_update, *probe_args(save_dir), "--gdps-split-at-update", str(switch),
                      f"--gdps-analyze-args={' '.join(analysis)}", *EVERY)


def optimizer_moments(path):
    state = load_checkpoint(path)["last_optimizer_state"]["state"]
    return {(i, k): v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The single run, and the two-stage pipeline on the same data and flags."""
    from fairseq_gdps.gdps.analysis_command import main as analyze

    out = tmp_path_factory.mktemp("single_run")
    stage1 = train_args(tiny_data, out / "stage1", SWITCH, *probe_args(out / "stage1"), *EVERY)
    logs = run_all([single_run(tiny_data, out / "single"), stage1])
    # the two-stage analysis where the single run writes its own, so that the plans' relative paths agree
    assert analyze([str(out / "stage1" / "stats.pt"), "--out", str(out / "stage1" / "gdps_analysis"), *ANALYSIS]) == 0
    plan = out / "stage1" / "gdps_analysis" / "plan.json"
    split_checkpoint(out / "stage1" / "checkpoint_last.pt", plan, out / "split.pt")
    run_all([train_args(tiny_data, out / "stage2", MAX_UPDATE, "--gdps-plan", plan, "--restore-file", out / "split.pt",
                        *EVERY)])
    return {"out": out, "single_log": logs[0]}


@pytest.mark.slow
def test_single_run_equals_the_two_stage_pipeline(runs):
    out = runs["out"]
    single_plan = (out / "single" / "gdps_analysis" / "plan.json").read_text()
    assert single_plan == (out / "stage1" / "gdps_analysis" / "plan.json").read_text()
    plan = json.loads(single_plan)
    assert len(plan["groups"]) == 2 and plan["modules"]
    assert "GDPS single run: split at update 4" in runs["single_log"]
    # the run's report says what the run did with the plan
    assert "After update 4, the run split" in (out / "single" / "gdps_analysis" / "report.md").read_text()

    single, two_stage = out / "single" / "checkpoint_last.pt", out / "stage2" / "checkpoint_last.pt"
    assert num_updates(single) == num_updates(two_stage) == MAX_UPDATE
    assert_models_equal(load_checkpoint(single)["model"], load_checkpoint(two_stage)["model"])   # bit for bit
    assert_models_equal(optimizer_moments(single), optimizer_moments(two_stage))
    # the checkpoint carries the split as a two-stage one does: in its model args, and the decision
    state = load_checkpoint(single)
    assert state["cfg"]["model"].gdps_split_modules == ",".join(plan["modules"])
    assert state["cfg"]["model"].gdps_groups == ";".join(",".join(g) for g in plan["groups"])
    assert state["task_state"]["gdps_split_switch"]["update"] == SWITCH
    assert any("private" in k for k in state["model"])


@pytest.mark.slow
def test_a_run_killed_before_or_after_the_switch_resumes_to_the_uninterrupted_run(runs, tiny_data):
    from fairseq_gdps.gdps.stats import GradientStatistics

    out = runs["out"]
    whole = load_checkpoint(out / "single" / "checkpoint_last.pt")
    for name, kill_after in (("killed_before", 2), ("killed_after", 6)):
        args = single_run(tiny_data, out / name)
        run_killed_after_checkpoint(args, kill_after)
        left = load_checkpoint(out / name / "checkpoint_last.pt")
        switched = "gdps_split_switch" in left["task_state"]
        # the kill left a checkpoint on the side of the switch this case is about
        assert switched == (name == "killed_after"), (name, left["optimizer_history"][-1]["num_updates"])
        run_all([args])   # resumes from checkpoint_last.pt
        resumed = load_checkpoint(out / name / "checkpoint_last.pt")
        assert resumed["optimizer_history"][-1]["num_updates"] == MAX_UPDATE
        assert_models_equal(resumed["model"], whole["model"])
        assert_models_equal(optimizer_moments(out / name / "checkpoint_last.pt"),
                            optimizer_moments(out / "single" / "checkpoint_last.pt"))
        assert resumed["task_state"]["gdps_split_switch"] == whole["task_state"]["gdps_split_switch"]
        assert_statistics_equal(GradientStatistics.load(out / name / "stats.pt"),
                                GradientStatistics.load(out / "single" / "stats.pt"))


@pytest.mark.slow
def test_the_single_run_checkpoint_decodes_and_exports(runs, tiny_data):
    out = runs["out"]
    checkpoint = out / "single" / "checkpoint_last.pt"
    decoded = run([BIN / "fairseq-generate", tiny_data, "--user-dir", REPO / "fairseq_gdps", "--task",
                   "speech_to_text_gdps", "--config-yaml", "config.yaml", "--gen-subset", "test", "--path", checkpoint,
                   "--beam", "1", "--max-len-b", "5", "--max-tokens", "100000", "--num-workers", "0",
                   "--required-batch-size-multiple", "1", "--cpu"]).stdout
    rows = len((tiny_data / "test.tsv").read_text().splitlines()) - 1
    assert sum(line.startswith("D-") for line in decoded.splitlines()) == rows
    run([BIN / "gdps-export", checkpoint, "--language", "ar", "--out", out / "export_ar.pt"])
    exported = load_checkpoint(out / "export_ar.pt")
    assert not any("private" in k for k in exported["model"])


@pytest.mark.slow
def test_an_analysis_that_keeps_one_group_leaves_the_run_unsplit(tiny_data, tmp_path):
    save_dir = tmp_path / "unsplit"
    log = run_all([single_run(tiny_data, save_dir, max_update=5, switch=3, analysis=["--groups", "1"])])[0]
    assert "no conflict to split at update 3: training goes on unsplit" in log
    assert "went on unsplit" in (save_dir / "gdps_analysis" / "report.md").read_text()
    state = load_checkpoint(save_dir / "checkpoint_last.pt")
    assert state["task_state"]["gdps_split_switch"] == {"update": 3, "plan": None}
    assert not any("private" in k for k in state["model"]) and not state["cfg"]["model"].gdps_split_modules


PROBE = ["--gdps-probe-interval", "1", "--gdps-stats", "stats.pt"]
CRITERION = ["--criterion", "label_smoothed_cross_entropy"]


@pytest.mark.parametrize("flags, message", [
    (["--gdps-split-at-update", "4"], "needs the probe before it: --gdps-probe-interval"),
    ([*PROBE, "--gdps-split-at-update", "4", "--gdps-probe-start", "4"], "no probed update before the switch"),
    ([*PROBE, "--gdps-split-at-update", "4", "--max-update", "4"], "must lie before --max-update 4"),
    ([*PROBE, "--gdps-split-at-update", "4", "--gdps-split-modules", "decoder.layers.0.ffn", "--gdps-groups",
      "ar,et;ga,sw"], "leave out --gdps-split-modules, --gdps-groups"),
    ([*PROBE, "--gdps-split-at-update", "4", "--gdps-analyze-args", "--groups 0"], "--groups must be >= 1"),
    ([*PROBE, "--gdps-split-at-update", "4", "--gdps-analyze-args=--no-such-flag"], "not valid gdps-analyze flags"),
    ([*PROBE, "--gdps-split-at-update", "4", "--gdps-analyze-args", "--out elsewhere"], "leave out --out"),
    ([*PROBE, "--gdps-split-at-update", "4", "--store-ema"], "cannot be combined with --store-ema"),
])
def test_flags_that_cannot_work_are_refused_at_start_up(tiny_data, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_trainer(tiny_data, *CRITERION, "--save-dir", tmp_path, *flags)


def test_data_parallel_fairseq_train_is_refused_before_the_first_update(tiny_data, tmp_path, monkeypatch):
    """fairseq-train's Trainer cannot wrap the split model anew: with several workers the switch
    needs gdps-train's, which hands the task its re-wrapper."""
    from fairseq_gdps.cli.train import GdpsTrainer

    monkeypatch.chdir(tmp_path)
    flags = [*CRITERION, "--save-dir", tmp_path, *PROBE, "--gdps-split-at-update", "4", "--distributed-world-size", "2"]
    task, trainer = build_trainer(tiny_data, *flags)
    with pytest.raises(ValueError, match="--distributed-world-size 2 needs gdps-train"):
        task.begin_epoch(1, trainer.get_model())
    GdpsTrainer(trainer.cfg, task, trainer.get_model(), trainer.get_criterion())
    task.begin_epoch(1, trainer.get_model())   # gdps-train's Trainer: accepted


@pytest.mark.slow
def test_two_workers_under_gdps_train_equal_one_process_with_update_freq_2(runs, tiny_data):
    """gdps-train with two gloo workers: the first worker decides the plan and broadcasts it, every
    worker splits alike, the model is wrapped anew, and the run equals one fairseq-train process
    with --update-freq 2 (the exact single-process equivalent, test_distributed.py) bit for bit."""
    out = runs["out"]
    single = single_run(tiny_data, out / "freq2")
    workers = single_run(tiny_data, out / "workers")
    workers[0] = BIN / "gdps-train"
    logs = run_all([[*single, "--update-freq", "2"], *data_parallel(workers)])
    # (fairseq logs warnings only on the workers after the first)
    assert "GDPS single run: split at update 4" in logs[0] and "GDPS single run: split at update 4" in logs[1]
    # gdps-train logs as fairseq-train does (its format and level), whatever its imports set up
    assert " | INFO | fairseq_cli.train | done training in " in logs[1] and "DEBUG" not in logs[1]
    plan = json.loads((out / "workers" / "gdps_analysis" / "plan.json").read_text())
    assert plan["groups"] == json.loads((out / "freq2" / "gdps_analysis" / "plan.json").read_text())["groups"]
    assert "After update 4, the run split" in (out / "workers" / "gdps_analysis" / "report.md").read_text()
    assert num_updates(out / "workers" / "checkpoint_last.pt") == MAX_UPDATE
    workers_state, single_state = load_checkpoint(out / "workers" / "checkpoint_last.pt"), \
        load_checkpoint(out / "freq2" / "checkpoint_last.pt")
    assert any("private" in k for k in workers_state["model"])
    assert_models_equal(workers_state["model"], single_state["model"])
    assert_models_equal(optimizer_moments(out / "workers" / "checkpoint_last.pt"),
                        optimizer_moments(out / "freq2" / "checkpoint_last.pt"))
    # the private units were trained after the switch by both workers together: not the switch's copy
    at_switch = load_checkpoint(out / "workers" / "checkpoint_1_4.pt")["model"]
    private = [k for k in at_switch if "private" in k]
    assert private and any(not torch.equal(workers_state["model"][k], at_switch[k]) for k in private)


def test_a_run_without_the_flag_is_not_resumed_past_its_update(tiny_data, tmp_path, monkeypatch):
    """A stage-1 checkpoint past N, resumed with the flag added, is refused: the switch cannot
    happen at N any more."""
    monkeypatch.chdir(tmp_path)
    task, trainer = build_trainer(tiny_data, *CRITERION, "--save-dir", tmp_path, *PROBE)
    trainer.set_num_updates(5)
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(str(tmp_path / "checkpoint_last.pt"), {})
    with pytest.raises(ValueError, match=r"at update 5, past --gdps-split-at-update 4, and records no switch"):
        build_trainer(tiny_data, *CRITERION, "--save-dir", tmp_path, *PROBE, "--gdps-split-at-update", "4")
