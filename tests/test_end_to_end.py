"""End to end on a tiny synthesised corpus: stock fairseq training with the plugin loaded, decoding
of every test utterance, per-language scores."""
import csv
import json

import pytest

from conftest import BIN, REPO, run

pytestmark = pytest.mark.slow  # every test here runs fairseq-train / fairseq-generate

TINY_MODEL = ["--arch", "s2t_transformer_s", "--encoder-layers", "1", "--decoder-layers", "1",
              "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
              "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]


def manifest_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def train_tiny_baseline(data, save_dir, updates=4):
    run([BIN / "fairseq-train", data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text",
         "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev", *TINY_MODEL,
         "--optimizer", "adam", "--lr", "1e-3", "--criterion", "label_smoothed_cross_entropy",
         "--label-smoothing", "0.1", "--max-tokens", "4000", "--required-batch-size-multiple", "1",
         "--max-update", str(updates), "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints",
         "--seed", "1", "--log-format", "simple"])


def test_baseline_trains_decodes_and_scores_every_test_utterance(tiny_data, tmp_path):
    out = tmp_path / "baseline"
    train_tiny_baseline(tiny_data, out / "checkpoints")
    assert (out / "checkpoints" / "checkpoint_last.pt").is_file()
    run(["bash", REPO / "examples/speech_to_text_gdps/decode_and_score.sh", tiny_data, out, "--", "--beam", "1"])
    scores = json.loads((out / "scores.json").read_text())
    languages = {row["src_lang"] for row in manifest_rows(tiny_data / "test.tsv")}
    assert set(scores["languages"]) == languages == {"ar", "et", "ga", "sw"}
    n_test = len(manifest_rows(tiny_data / "test.tsv"))
    assert scores["pooled"]["n"] == n_test
    for lang in languages:
        assert scores["languages"][lang]["n"] == len(manifest_rows(tiny_data / f"test_{lang}.tsv"))


def test_stock_generate_drops_partial_batch_without_multiple_1(tiny_data, tmp_path):
    """Why every decode passes --required-batch-size-multiple 1: fairseq-fixed drops the last
    partial batch otherwise. Uses a manifest whose size is not a multiple of 8 (default multiple)."""
    rows = manifest_rows(tiny_data / "test.tsv")
    rows = rows[: len(rows) - 1] if len(rows) % 8 == 0 else rows
    assert len(rows) > 8
    with open(tiny_data / "test_not_multiple_of_8.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        writer.writeheader(), writer.writerows(rows)
    try:
        train_tiny_baseline(tiny_data, tmp_path / "ckpt", updates=1)
        common = [BIN / "fairseq-generate", tiny_data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text",
                  "--config-yaml", "config.yaml", "--gen-subset", "test_not_multiple_of_8",
                  "--path", tmp_path / "ckpt" / "checkpoint_last.pt",
                  "--beam", "1", "--max-len-b", "5", "--max-tokens", "100000", "--num-workers", "0"]
        hyps_default = run(common).stdout.count("\nD-")
        hyps_fixed = run(common + ["--required-batch-size-multiple", "1"]).stdout.count("\nD-")
    finally:
        (tiny_data / "test_not_multiple_of_8.tsv").unlink()
    assert hyps_fixed == len(rows)
    assert hyps_default == len(rows) - len(rows) % 8


TINY_RECIPE = ["--max-update", "8", "--stage1-updates", "4", "--analyze-args", "--groups 2 --resamples 20", "--",
               "--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
               "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--max-tokens", "4000"]


def test_gdps_recipe_in_one_run_end_to_end(tiny_data, tmp_path):
    """run_gdps.sh by default: one fairseq-train probes, analyses and splits, then decode and score."""
    import torch

    out = tmp_path / "gdps"
    printed = run(["bash", REPO / "examples/speech_to_text_gdps/run_gdps.sh", tiny_data, out, *TINY_RECIPE]).stdout
    assert "GDPS single run: split at update 4" in printed and "groups: " in printed
    plan = json.loads((out / "checkpoints" / "gdps_analysis" / "plan.json").read_text())
    assert len(plan["groups"]) == 2 and plan["modules"]
    state = torch.load(out / "checkpoints" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert any("private" in k for k in state["model"]) and state["optimizer_history"][-1]["num_updates"] == 8
    assert not (out / "stage1").exists() and not (out / "stage2").exists()
    scores = json.loads((out / "scores.json").read_text())
    assert scores["pooled"]["n"] == len(manifest_rows(tiny_data / "test.tsv"))


def test_gdps_two_stage_recipe_end_to_end(tiny_data, tmp_path):
    """run_gdps.sh --two-stage: probe, analysis, split, decode, score on the tiny corpus."""
    out = tmp_path / "gdps"
    run(["bash", REPO / "examples/speech_to_text_gdps/run_gdps.sh", tiny_data, out, "--two-stage", *TINY_RECIPE])
    plan = json.loads((out / "analysis" / "plan.json").read_text())
    assert len(plan["groups"]) == 2
    assert sorted(lang for group in plan["groups"] for lang in group) == ["ar", "et", "ga", "sw"]
    assert plan["modules"] and all(m in plan["scores"] for m in plan["modules"])
    for png in ("similarity.png", "dendrogram.png", "layer_profile.png"):
        assert (out / "analysis" / png).stat().st_size > 1000
    # stage 2 is the split model, built from its own checkpoint by fairseq-generate
    import torch
    state = torch.load(out / "stage2" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    split_keys = [k for k in state["model"] if "private" in k]
    assert split_keys, "stage-2 checkpoint holds no private (per-group) parameters"
    # stage 2 continued stage 1's update count (the learning-rate schedule and data position with it)
    assert state["optimizer_history"][-1]["num_updates"] == 8

    # Adam's moments went through the split like the weights: shared units keep theirs, every
    # group's private copy of a unit starts with that unit's moments
    stage1 = torch.load(out / "stage1" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    init = torch.load(out / "stage2_init.pt", map_location="cpu", weights_only=False)
    assert init["optimizer_history"][-1]["num_updates"] == 4
    block = plan["modules"][0]
    layer = block[: -len(".ffn")]
    from fairseq import checkpoint_utils

    from fairseq_gdps.models.optimizer_state import optimized_parameter_names as trainable_names

    def names(path):   # parameter order of the optimizer state = the trainer's parameter order
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
        return trainable_names(models[0])

    def moments(ckpt, names, name):
        return ckpt["last_optimizer_state"]["state"][names.index(name)]["exp_avg"]
    stage1_names, init_names = names(out / "stage1" / "checkpoint_last.pt"), names(out / "stage2_init.pt")
    unit_order = init["model"][f"{block}.unit_order"]
    n_shared = init["model"][f"{block}.fc1_shared_weight"].shape[0]
    fc1_moments = moments(stage1, stage1_names, f"{layer}.fc1.weight")
    assert torch.equal(moments(init, init_names, f"{block}.fc1_shared_weight"), fc1_moments[unit_order[:n_shared]])
    private = moments(init, init_names, f"{block}.fc1_private_weight")
    for group in range(len(plan["groups"])):
        assert torch.equal(private[group], fc1_moments[unit_order[n_shared:]])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["pooled"]["n"] == len(manifest_rows(tiny_data / "test.tsv"))


def test_probe_statistics_survive_an_interrupted_run(tiny_data, tmp_path):
    """Stopping stage 1 and resuming it (fairseq's checkpoint_last.pt) gives the statistics of an
    uninterrupted run over the same updates."""
    import torch

    from fairseq_gdps.gdps.stats import GradientStatistics

    def stage1(save_dir, max_update):
        run([BIN / "fairseq-train", tiny_data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text_gdps",
             "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev",
             "--arch", "s2t_transformer_gdps_s", *TINY_MODEL[2:], "--optimizer", "adam", "--lr", "1e-3",
             "--criterion", "label_smoothed_cross_entropy_gdps", "--gdps-probe-interval", "1",
             "--gdps-summed-statistics", "--gdps-stats", save_dir / "stats.pt", "--label-smoothing", "0.1",
             "--max-tokens", "3000",
             "--required-batch-size-multiple", "1", "--max-update", str(max_update), "--num-workers", "0",
             "--save-dir", save_dir, "--no-epoch-checkpoints", "--seed", "1", "--log-format", "simple"])

    stage1(tmp_path / "whole", 6)
    stage1(tmp_path / "parts", 3)
    stage1(tmp_path / "parts", 6)   # resumes from parts/checkpoint_last.pt
    whole = GradientStatistics.load(tmp_path / "whole" / "stats.pt")
    parts = GradientStatistics.load(tmp_path / "parts" / "stats.pt")
    assert whole.num_steps == parts.num_steps == 6
    assert whole.counts() == parts.counts()
    for module in whole.module_names:
        for key, value in whole.module_sums(module).items():
            torch.testing.assert_close(parts.module_sums(module)[key], value, rtol=1e-5, atol=1e-9, msg=f"{module} {key}")
