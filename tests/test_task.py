"""speech_to_text_gdps: language ids in the batch, and the probe's per-language backward gives the
same gradient as the stock task while recording each language's share of it."""
import copy

import numpy as np

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import fairseq_gdps  # noqa: F401  (registers the task, criterion and models)
from fairseq_gdps.net_input import LANG_ID_KEY

SIZES = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
         "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
         "--decoder-attention-heads", "2", "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


class PlainBackward:
    """The optimizer methods train_step and optimizer_step use (the step leaves the weights)."""

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def build(data, task, arch, criterion, extra=()):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", task, "--arch", arch, "--criterion", criterion,
                                                "--label-smoothing", "0.1", "--seed", "1", *SIZES, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task_obj = tasks.setup_task(cfg.task)
    model = task_obj.build_model(cfg.model)
    return task_obj, model, task_obj.build_criterion(cfg.criterion)


def first_multilingual_batch(task, split="train"):
    task.load_dataset(split)
    itr = task.get_batch_iterator(task.dataset(split), max_tokens=6000, required_batch_size_multiple=1, seed=1)
    for batch in itr.next_epoch_itr(shuffle=False):
        if len(torch.unique(batch["net_input"][LANG_ID_KEY])) >= 3:
            return batch
    pytest.fail("no batch with three languages")


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batches_carry_language_ids(tiny_data):
    task, _, _ = build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy")
    assert task.languages == ["ar", "et", "ga", "sw"]
    task.load_dataset("test")
    dataset = task.dataset("test")
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    manifest_langs = dataset.s2t_dataset.src_langs
    expected = [task.languages.index(manifest_langs[i]) for i in batch["id"].tolist()]
    assert batch["net_input"][LANG_ID_KEY].tolist() == expected


def test_probe_gradient_equals_stock_task_and_is_split_by_language(tiny_data, tmp_path):
    stock_task, stock_model, stock_criterion = build(tiny_data, "speech_to_text", "s2t_transformer_s",
                                                     "label_smoothed_cross_entropy")
    stats_path = tmp_path / "stats.pt"
    gdps_task, gdps_model, gdps_criterion = build(
        tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy_gdps",
        ["--gdps-probe-interval", "1", "--gdps-summed-statistics", "--gdps-stats", str(stats_path),
         "--gdps-track", "encoder.*"])
    gdps_model.load_state_dict(stock_model.state_dict())
    batch = first_multilingual_batch(gdps_task)
    stock_batch = copy.deepcopy(batch)
    del stock_batch["net_input"][LANG_ID_KEY]

    stock_loss, stock_size, stock_log = stock_task.train_step(stock_batch, stock_model, stock_criterion, PlainBackward(), 0)
    gdps_loss, gdps_size, gdps_log = gdps_task.train_step(batch, gdps_model, gdps_criterion, PlainBackward(), 0)
    gdps_task.optimizer_step(PlainBackward(), gdps_model, 0)  # the probe records the update here

    assert gdps_size == stock_size
    assert gdps_log["ntokens"] == stock_log["ntokens"] and gdps_log["nsentences"] == stock_log["nsentences"]
    assert gdps_loss.item() == stock_loss.item()
    stock_grads, gdps_grads = grads(stock_model), grads(gdps_model)
    assert stock_grads.keys() == gdps_grads.keys()
    for name in stock_grads:   # the same computation: bit-identical
        assert torch.equal(gdps_grads[name], stock_grads[name]), name

    # the recorded per-language gradients (per target token) add up to the total (that each is its
    # own utterances' gradient, half by half, is tested in test_probe_exactness.py)
    stats = gdps_task.probe.statistics
    assert stats.module_names == ["encoder.transformer_layers.0.ffn", "encoder.transformer_layers.1.ffn"]
    present = sorted({gdps_task.languages[i] for i in batch["net_input"][LANG_ID_KEY].tolist()})
    layer = gdps_model.encoder.transformer_layers[1]
    total = torch.cat([p.grad.reshape(-1) for p in (*layer.fc1.parameters(), *layer.fc2.parameters())]).double()
    sums = stats.module_sums("encoder.transformer_layers.1.ffn")
    lang_ids = batch["net_input"][LANG_ID_KEY]
    tokens = {lang: batch["target_lengths"][lang_ids == gdps_task.languages.index(lang)].sum().item() for lang in present}
    per_lang = {lang: sums["S"][stats.languages.index(lang)] * tokens[lang] for lang in present}
    assert all(sums["n"][stats.languages.index(lang)] == 1 for lang in present)
    torch.testing.assert_close(sum(per_lang.values()), total, rtol=1e-4, atol=1e-6)  # float32 sums, other order
    # and they differ between languages (each is a real sub-batch gradient, not a copy of the total)
    first, second = present[:2]
    assert not torch.allclose(per_lang[first], per_lang[second])

    gdps_task.begin_valid_epoch(1, gdps_model)   # writes the statistics file, as before a checkpoint
    assert stats_path.is_file()
    assert "gdps_statistics" in gdps_task.state_dict()


def test_probe_records_every_conformer_ffn(tiny_data, tmp_path):
    """Conformer macaron FFNs (ffn1/ffn2): fairseq builds their SiLU in place, which would swallow
    the probe's hook on w_1's output; every block must be recorded, and sum to the total."""
    task, model, criterion = build(
        tiny_data, "speech_to_text_gdps", "s2t_conformer_gdps_xs", "label_smoothed_cross_entropy_gdps",
        ["--gdps-probe-interval", "1", "--gdps-summed-statistics", "--gdps-stats", str(tmp_path / "stats.pt"),
         "--encoder-layers", "1",
         "--decoder-layers", "1", "--dropout", "0"])
    batch = first_multilingual_batch(task)
    task.train_step(batch, model, criterion, PlainBackward(), 0)
    task.optimizer_step(PlainBackward(), model, 0)
    stats = task.probe.statistics
    assert stats.module_names == ["encoder.conformer_layers.0.ffn1", "encoder.conformer_layers.0.ffn2",
                                  "decoder.layers.0.ffn"]
    assert stats.same_state.num_probes == 1
    ffn = model.encoder.conformer_layers[0].ffn2
    total = torch.cat([p.grad.reshape(-1) for p in (*ffn.w_1.parameters(), *ffn.w_2.parameters())]).double()
    sums = stats.module_sums("encoder.conformer_layers.0.ffn2")
    lang_ids = batch["net_input"][LANG_ID_KEY]
    recorded = sum(sums["S"][stats.languages.index(lang)]
                   * batch["target_lengths"][lang_ids == task.languages.index(lang)].sum().item()
                   for lang in {task.languages[i] for i in lang_ids.tolist()})
    torch.testing.assert_close(recorded, total, rtol=1e-4, atol=1e-6)


def test_probe_works_with_the_stock_criterion_and_resumes_from_the_task_state(tiny_data, tmp_path):
    """The probe belongs to the task: stock label_smoothed_cross_entropy records the same way, its
    statistics travel in the task's state (a task that loads it goes on adding to them), and a
    stopped probe probes no further update."""
    flags = ["--gdps-probe-interval", "1", "--gdps-stats", str(tmp_path / "stats.pt"), "--gdps-probe-speakers"]
    first, model, criterion = build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s",
                                    "label_smoothed_cross_entropy", flags)
    batch = first_multilingual_batch(first)
    assert len(first.probe.units) > len(first.languages)   # (language, speaker) pairs
    first.train_step(copy.deepcopy(batch), model, criterion, PlainBackward(), 0)
    first.optimizer_step(PlainBackward(), model, 0)
    assert first.probe.statistics.same_state.num_probes == 1
    state = first.state_dict()

    resumed, model, criterion = build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s",
                                      "label_smoothed_cross_entropy", flags)
    resumed.load_dataset("train")
    resumed.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    resumed.train_step(copy.deepcopy(batch), model, criterion, PlainBackward(), 1)
    resumed.optimizer_step(PlainBackward(), model, 1)
    statistics = resumed.probe.statistics
    assert statistics.same_state.num_probes == 2 and statistics.same_state.units == first.probe.units
    assert resumed.state_dict()["gdps_statistics"]["same_state"] is not None

    resumed.probe.stop()
    assert not any(resumed.probe.is_due(u) for u in range(2, 10))
    assert resumed.probe.statistics is statistics


def test_no_probe_between_intervals_and_stock_model_rejected(tiny_data, tmp_path):
    task, model, criterion = build(
        tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy_gdps",
        ["--gdps-probe-interval", "10", "--gdps-stats", str(tmp_path / "s.pt")])
    assert [u for u in range(25) if task.probe.is_due(u)] == [0, 10, 20]
    with pytest.raises(ValueError, match="does not take"):
        build(tiny_data, "speech_to_text_gdps", "s2t_transformer_s", "label_smoothed_cross_entropy")
    with pytest.raises(ValueError, match="needs --gdps-stats"):
        build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy_gdps",
              ["--gdps-probe-interval", "1"])


def test_language_sampling_temperature():
    from fairseq_gdps.tasks.speech_to_text_gdps import language_sampling_weights

    lang_ids = np.array([0] * 80 + [1] * 20)
    def language_probability(temperature):
        w = language_sampling_weights(lang_ids, ["a", "b"], temperature)
        return w[lang_ids == 0].sum(), w[lang_ids == 1].sum()

    assert language_probability(1.0) == pytest.approx((0.8, 0.2))
    assert language_probability(1e6) == pytest.approx((0.5, 0.5), abs=1e-4)
    p_a, p_b = language_probability(2.0)   # (0.8^0.5, 0.2^0.5) normalised = (2/3, 1/3)
    assert (p_a, p_b) == pytest.approx((2 / 3, 1 / 3))
    w = language_sampling_weights(lang_ids, ["a", "b"], 2.0)
    assert np.allclose(w[:80], w[0]) and np.allclose(w[80:], w[80])   # uniform within a language
    with pytest.raises(ValueError, match="temperature must be positive"):
        language_sampling_weights(lang_ids, ["a", "b"], 0.0)


def test_temperature_resampled_train_set_keeps_language_ids(tiny_data):
    task, _, _ = build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy",
                       ["--gdps-lang-temperature", "5"])
    task.load_dataset("train")
    dataset = task.dataset("train")
    assert dataset.dataset is not dataset.s2t_dataset      # a resampling of the manifest
    items = [dataset[i] for i in range(len(dataset))]
    batch = dataset.collater(items)
    langs = dataset.s2t_dataset.src_langs
    assert batch["net_input"][LANG_ID_KEY].tolist() == [task.languages.index(langs[i]) for i in batch["id"].tolist()]


class ScalingStep(PlainBackward):
    """An optimizer whose step scales every gradient in place (as fairseq's trainer scales and
    clips ``.grad`` in place before the update), after the probe captured the shares."""

    def __init__(self, model):
        self.model = model

    def step(self):
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


def test_summed_statistics_are_opt_in_and_leave_the_gram_matrices_unchanged(tiny_data, tmp_path):
    """By default the probe records the same-state records alone (none of the summed statistics'
    buffers is even allocated, and the capture keeps no shares: each layer's are reduced to their
    Gram matrix inside the backward pass); --gdps-summed-statistics adds them (the capture keeps
    the shares, read after the optimizer step) and records the same Gram matrices, bit for bit."""
    built = {}
    for name, extra in (("summed", ["--gdps-summed-statistics"]), ("default", [])):
        built[name] = build(tiny_data, "speech_to_text_gdps", "s2t_transformer_gdps_s", "label_smoothed_cross_entropy_gdps",
                            ["--gdps-probe-interval", "1", "--gdps-stats", str(tmp_path / f"{name}.pt"), *extra])
    built["default"][1].load_state_dict(built["summed"][1].state_dict())
    batch = first_multilingual_batch(built["summed"][0])
    built["default"][0].load_dataset("train")
    keeps_shares = {}
    for name, (task, model, crit) in built.items():
        add = task.probe.add_micro_batch

        def spy(capture, *args, name=name, add=add):
            keeps_shares[name] = capture.keep_shares
            return add(capture, *args)

        task.probe.add_micro_batch = spy
        for update in range(2):
            model.zero_grad(set_to_none=True)   # as fairseq's trainer does when an update begins
            step = ScalingStep(model)
            task.train_step(copy.deepcopy(batch), model, crit, step, update)
            task.optimizer_step(step, model, update)
    full, alone = built["summed"][0].probe.statistics, built["default"][0].probe.statistics
    assert keeps_shares == {"summed": True, "default": False}
    assert full.summed and not alone.summed
    assert full.num_steps == alone.num_steps == 2
    assert set(alone.to_tensors()) == {"steps", "skipped"}
    for f, a in zip(full.same_state.arrays(), alone.same_state.arrays()):
        assert np.array_equal(f, a)
