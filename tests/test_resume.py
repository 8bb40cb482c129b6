"""Interrupted runs: a stage 1 or stage 2 killed with SIGKILL after a mid-epoch checkpoint
(--save-interval-updates) and resumed from checkpoint_last.pt ends with the statistics and the
model of an uninterrupted run; a kill never leaves a half-written statistics file.

Why exactly equal: the checkpoint holds the model, Adam's state, the update count and the data
position (batch within the epoch); fairseq seeds every update with seed + update number; the
statistics travel in the checkpoint's task state, and a resumed run adds the new steps to them
in the same order an uninterrupted run adds them."""
import os
import signal
import subprocess
import time

import pytest

from gdps_training import (assert_models_equal, assert_statistics_equal, environment, load_checkpoint, num_updates,
                           plan_json, run_all, run_killed_after_checkpoint, split_checkpoint, stage1_args, train_args)

pytestmark = pytest.mark.slow

EVERY = ["--save-interval-updates", "2"]   # 11 batches an epoch: checkpoints at 2, 4, ... are mid-epoch


@pytest.fixture(scope="module")
def stage1(tiny_data, tmp_path_factory):
    """Stage 1 (8 updates, probe every update) uninterrupted, and killed after its checkpoint at
    update 2 (the uninterrupted run goes on beside it); the killed run is looked at, then resumed."""
    from fairseq_gdps.gdps.stats import GradientStatistics

    out = tmp_path_factory.mktemp("resume")
    whole = subprocess.Popen([str(c) for c in stage1_args(tiny_data, out / "whole", 8, *EVERY)], env=environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = run_killed_after_checkpoint(stage1_args(tiny_data, out / "parts", 8, *EVERY), update=2)
        after_kill = {"checkpoint": num_updates(out / "parts" / "checkpoint_last.pt"),
                      "stats_steps": GradientStatistics.load(out / "parts" / "stats.pt").num_steps}
        run_all([stage1_args(tiny_data, out / "parts", 8, *EVERY)])   # resumes from parts/checkpoint_last.pt
    finally:
        assert whole.wait(timeout=300) == 0
    return {"out": out, "killed_at": killed_at, "after_kill": after_kill}


def test_stage1_killed_and_resumed_records_the_statistics_of_an_uninterrupted_run(stage1):
    from fairseq_gdps.gdps.stats import GradientStatistics

    out = stage1["out"]
    # killed mid-run, after a checkpoint; the statistics file it left is whole (it loads), and
    # holds the steps of a checkpoint (written at each validation, before each save)
    assert 2 <= stage1["killed_at"] <= stage1["after_kill"]["checkpoint"] < 8
    assert stage1["after_kill"]["stats_steps"] in (stage1["after_kill"]["checkpoint"], stage1["after_kill"]["checkpoint"] + 2)
    whole = GradientStatistics.load(out / "whole" / "stats.pt")
    parts = GradientStatistics.load(out / "parts" / "stats.pt")
    assert whole.num_steps == 8
    assert_statistics_equal(parts, whole)   # exactly
    assert_models_equal(load_checkpoint(out / "parts" / "checkpoint_last.pt")["model"],
                        load_checkpoint(out / "whole" / "checkpoint_last.pt")["model"])


def test_stage2_resumed_from_a_mid_epoch_checkpoint_ends_with_the_uninterrupted_model(stage1, tiny_data):
    out = stage1["out"]
    plan_json(out / "whole" / "stats.pt", out / "analysis")
    split_checkpoint(out / "whole" / "checkpoint_last.pt", out / "analysis" / "plan.json", out / "split.pt")

    def stage2(save_dir):   # updates 8 -> 14; epoch 1 ends at update 11
        return train_args(tiny_data, out / save_dir, 14, *EVERY, "--gdps-plan", out / "analysis" / "plan.json",
                          "--restore-file", out / "split.pt")
    whole = subprocess.Popen([str(c) for c in stage2("stage2_whole")], env=environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = run_killed_after_checkpoint(stage2("stage2_parts"), update=10)
        resumed_from = num_updates(out / "stage2_parts" / "checkpoint_last.pt")
        assert 10 <= killed_at <= resumed_from < 11   # mid-epoch
        # fairseq resumes from save_dir/checkpoint_last.pt when it exists, not from --restore-file
        run_all([stage2("stage2_parts")])
    finally:
        assert whole.wait(timeout=300) == 0
    parts = load_checkpoint(out / "stage2_parts" / "checkpoint_last.pt")
    whole = load_checkpoint(out / "stage2_whole" / "checkpoint_last.pt")
    assert parts["optimizer_history"][-1]["num_updates"] == whole["optimizer_history"][-1]["num_updates"] == 14
    assert any("private" in k for k in whole["model"])
    assert_models_equal(parts["model"], whole["model"])   # exactly
    assert_models_equal(parts["last_optimizer_state"]["state"], whole["last_optimizer_state"]["state"])


def save_forever(path, first_saved):
    """Save ~32 MB of statistics to ``path`` again and again (the forked writer)."""
    import torch

    from fairseq_gdps.gdps.stats import GradientStatistics

    torch.set_num_threads(1)
    stats = GradientStatistics({"m": 2_000_000}, languages=["a", "b"], subspace_dim=0)
    stats.add_step(0, {"a": {"m": torch.ones(2_000_000)}, "b": {"m": torch.ones(2_000_000)}})
    stats.save(path)
    first_saved.set()
    while True:
        stats.save(path)


def test_a_kill_while_writing_statistics_leaves_a_loadable_file(tmp_path):
    """A writer saving statistics in a loop, killed with SIGKILL at three points of its writes:
    the file is always the last whole one (a direct torch.save to the path would leave it
    truncated)."""
    import multiprocessing

    from fairseq_gdps.gdps.stats import GradientStatistics

    path = tmp_path / "stats.pt"
    fork = multiprocessing.get_context("fork")   # no new interpreter to start
    for delay in (0.0, 0.07, 0.25):
        first_saved = fork.Event()
        writer = fork.Process(target=save_forever, args=(path, first_saved), daemon=True)
        writer.start()
        try:
            assert first_saved.wait(timeout=60)
            time.sleep(delay)
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
        stats = GradientStatistics.load(path)
        assert stats.num_steps == 1 and stats.counts() == {"a": {"m": 1}, "b": {"m": 1}}
