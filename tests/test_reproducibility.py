"""Same seed and data, same machine (CPU): two GDPS runs side by side write byte-identical
statistics and plan.json, and end stage 2 with identical models.

The runs use what draws random numbers: dropout, temperature-based language resampling and the
probe's count-sketch, all seeded (fairseq seeds every update with seed + update number; the
sketches' hashes are derived from the seed and the block name, not from Python's hash())."""
import pytest

from gdps_training import (assert_models_equal, assert_statistics_equal, load_checkpoint, plan_json, run_all,
                           split_checkpoint, stage1_args, train_args)

pytestmark = pytest.mark.slow

RANDOM = ["--dropout", "0.1", "--gdps-lang-temperature", "2"]


def test_same_seed_same_statistics_plan_and_stage2_model(tiny_data, tmp_path):
    from fairseq_gdps.gdps.stats import GradientStatistics

    runs = [tmp_path / "a", tmp_path / "b"]
    run_all([stage1_args(tiny_data, run, 4, *RANDOM, "--gdps-sketch-dim", "512") for run in runs])
    first, second = (GradientStatistics.load(run / "stats.pt") for run in runs)
    assert first.num_steps == 4 and first.sketch_dim == 512
    assert_statistics_equal(second, first)
    assert (runs[0] / "stats.pt").read_bytes() == (runs[1] / "stats.pt").read_bytes()

    plans = [plan_json(run / "stats.pt", run / "analysis") for run in runs]
    assert plans[0] == plans[1]   # byte for byte (it names the statistics file's sha256 too)

    for run in runs:
        split_checkpoint(run / "checkpoint_last.pt", run / "analysis" / "plan.json", run / "split.pt")
    run_all([train_args(tiny_data, run / "stage2", 7, *RANDOM, "--gdps-plan", run / "analysis" / "plan.json",
                        "--restore-file", run / "split.pt") for run in runs])
    first, second = (load_checkpoint(run / "stage2" / "checkpoint_last.pt") for run in runs)
    assert first["optimizer_history"][-1]["num_updates"] == 7
    assert_models_equal(second["model"], first["model"])
    assert_models_equal(second["last_optimizer_state"]["state"], first["last_optimizer_state"]["state"])
