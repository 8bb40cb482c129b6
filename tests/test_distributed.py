"""fairseq's own data parallelism (CPU, gloo, two fairseq-train workers): the probe's statistics,
the plan and both stages' models equal those of one process with --update-freq 2, which is the
exact single-process equivalent (it takes the same batches into each update: worker r of W gets
batches r, r+W, ...; --update-freq W groups batches kW..kW+W-1).

Why exactly equal, not only close: with dropout 0 each batch's forward and backward is the same
computation in both set-ups; fairseq's legacy_ddp halves every gradient before the all-reduce and
the trainer doubles it after, both exact in floating point; the sum of two numbers does not
depend on the order; and the probe's float64 per-language sums are all-reduced the same way."""
import json

import pytest
import torch

from gdps_training import (assert_models_equal, assert_statistics_equal, data_parallel, load_checkpoint,
                           num_updates, plan_json, run_all, split_checkpoint, stage1_args, train_args)

STAGE1_UPDATES = 6   # one epoch: the last update has a single batch (a padding batch on worker 1)
STAGE2_UPDATES = 8


def test_update_sums_of_two_workers_equal_one_process_accumulating_both_micro_batches():
    """PerLanguageUpdate: the element-wise sum of two workers' buffers (what all_reduce does) is
    the buffer of one process that added both micro-batches; per-token gradients divide summed
    gradients by summed tokens, not average the workers' per-token means."""
    from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate

    gen = torch.Generator().manual_seed(0)
    sizes = {"enc": 6, "dec": 4}
    micro_batches = [  # (per-language gradient sums, target tokens of languages 0..2)
        ({0: {"enc": torch.randn(2, 3, generator=gen), "dec": torch.randn(4, generator=gen)},
          2: {"enc": torch.randn(2, 3, generator=gen), "dec": torch.randn(4, generator=gen)}}, torch.tensor([30., 0., 10.])),
        ({0: {"enc": torch.randn(2, 3, generator=gen), "dec": torch.randn(4, generator=gen)}}, torch.tensor([10., 0., 0.])),
    ]
    one = PerLanguageUpdate(sizes, 3)
    workers = [PerLanguageUpdate(sizes, 3) for _ in micro_batches]
    for (grads, tokens), worker in zip(micro_batches, workers):
        one.add(grads, tokens)
        worker.add(grads, tokens)
    assert torch.equal(workers[0].buffer + workers[1].buffer, one.buffer)
    tokens, grads = one.per_token_halves()
    assert tokens.tolist() == [40, 0, 10]   # language 1 has no tokens in this update
    assert not grads["enc"][1].any() and not grads["dec"][1].any()
    (first, _), (second, _) = micro_batches
    expected = (first[0]["enc"].double() + second[0]["enc"].double()).reshape(-1) / 40   # summed in float64
    torch.testing.assert_close(grads["enc"][0], expected, rtol=1e-12, atol=0)
    mean_of_means = (first[0]["enc"].double() / 30 + second[0]["enc"].double() / 10).reshape(-1) / 2
    assert not torch.allclose(grads["enc"][0], mean_of_means)
    torch.testing.assert_close(grads["dec"][2], first[2]["dec"].double() / 10, rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def stage1(tiny_data, tmp_path_factory):
    """Stage 1 (probe every update) twice, side by side: one process with --update-freq 2, and
    two data-parallel workers."""
    out = tmp_path_factory.mktemp("distributed")
    single, workers = out / "single", out / "workers"
    logs = run_all([stage1_args(tiny_data, single, STAGE1_UPDATES, "--update-freq", "2"),
                    *data_parallel(stage1_args(tiny_data, workers, STAGE1_UPDATES))])
    return {"out": out, "single": single, "workers": workers, "worker0_log": logs[1]}


@pytest.mark.slow
def test_two_workers_record_what_one_process_records_with_update_freq_2(stage1):
    from fairseq_gdps.gdps.stats import GradientStatistics

    single = GradientStatistics.load(stage1["single"] / "stats.pt")
    workers = GradientStatistics.load(stage1["workers"] / "stats.pt")
    # one step per update (each of 2 micro-batches / workers), not one per micro-batch
    assert single.num_steps == workers.num_steps == STAGE1_UPDATES
    # block names of the model, not of fairseq's data-parallel wrapper ("module.module....")
    assert workers.module_names == ["encoder.transformer_layers.0.ffn", "decoder.layers.0.ffn"]
    # every language's gradients summed over both workers: each worker alone sees only its half
    # of an update's utterances. To float32 rounding: the one process records an update that has a
    # single micro-batch (a short epoch's last) block by block from the float32 shares, the workers
    # always from the float64 buffer
    assert_statistics_equal(workers, single, scale_tolerance=1e-6)
    # the models are the same too (training itself is unchanged by the probe)
    assert_models_equal(load_checkpoint(stage1["workers"] / "checkpoint_last.pt")["model"],
                        load_checkpoint(stage1["single"] / "checkpoint_last.pt")["model"])
    assert "all_reduce of the per-language gradients took" in stage1["worker0_log"]
    # and gdps-analyze makes the same plan of them: the same decision, every number to rounding
    single_plan = json.loads(plan_json(stage1["single"] / "stats.pt", stage1["single"] / "analysis"))
    workers_plan = json.loads(plan_json(stage1["workers"] / "stats.pt", stage1["workers"] / "analysis"))
    assert single_plan["modules"] and workers_plan["modules"] == single_plan["modules"]
    assert workers_plan["groups"] == single_plan["groups"]
    # (the statistics files' hashes differ with their rounding)
    workers_plan["provenance"].pop("stats_sha256"), single_plan["provenance"].pop("stats_sha256")
    assert_same_numbers(workers_plan, single_plan)


def assert_same_numbers(actual, expected, where="plan"):
    """The same JSON structure, strings and integers equal, floats within 1e-6 relative."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), where
        for key in expected:
            assert_same_numbers(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_same_numbers(a, e, f"{where}[{k}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert actual == expected, where


@pytest.mark.slow
def test_stage2_split_model_trains_under_data_parallelism(stage1, tiny_data):
    """run_gdps.sh's stage 2 (gdps-split-checkpoint, then fairseq-train --restore-file) with two
    workers: the split model's updates equal one process's with --update-freq 2."""
    out = stage1["out"]
    plan = stage1["single"] / "analysis" / "plan.json"
    if not plan.is_file():
        plan_json(stage1["single"] / "stats.pt", stage1["single"] / "analysis")
    for run_name in ("single", "workers"):
        split_checkpoint(stage1[run_name] / "checkpoint_last.pt", plan, out / f"{run_name}_split.pt")

    def stage2(run_name):
        return train_args(tiny_data, out / f"{run_name}_stage2", STAGE2_UPDATES, "--gdps-plan", plan,
                          "--restore-file", out / f"{run_name}_split.pt")
    run_all([[*stage2("single"), "--update-freq", "2"], *data_parallel(stage2("workers"))])

    single = load_checkpoint(out / "single_stage2" / "checkpoint_last.pt")["model"]
    workers = load_checkpoint(out / "workers_stage2" / "checkpoint_last.pt")["model"]
    assert num_updates(out / "workers_stage2" / "checkpoint_last.pt") == STAGE2_UPDATES
    assert_models_equal(workers, single)
    # the split block's private (per-group) units were trained, by both workers together
    start = load_checkpoint(out / "workers_split.pt")["model"]
    private = [k for k in workers if "private" in k]
    assert private and any(not torch.equal(workers[k], start[k]) for k in private)
