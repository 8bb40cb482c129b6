"""The probe is exact on the real model (issue 11, point 8).

* Probing does not change training: fairseq Trainers with the recipes' optimiser (Adam, weight
  decay, clip-norm), dropout 0.1 and every FFN tracked (decoder FFNs included) end several updates
  with bit-identical gradients (every update), weights and optimiser state, probed on every
  update or not probed at all, with --update-freq 1 (the default probe, whose capture keeps only
  each layer's Gram matrix, and with the summed statistics, whose capture keeps the shares) and 2;
  the comparison is shown to see a one-ulp gradient difference and a different dropout seed.
* Each probe half's share is its utterances' own gradient: on ``s2t_transformer_gdps`` (dropout
  0), every row the probe captures equals the gradient of the loss restricted to that
  half's utterances of the same padded batch, the rows add up to the stock gradient, and what the
  statistics record (the halves' token counts and Gram matrices, each language's per-token step)
  follows from those gradients.
"""
import pytest
import torch

import fairseq_gdps.tasks.gradient_probe as probe_module
from fairseq_gdps.net_input import LANG_ID_KEY
from fairseq_gdps.tasks.gradient_probe import probe_halves
from gdps_training import build_trainer, train_batches

pytestmark = pytest.mark.usefixtures("one_thread")

DROPOUT = ["--dropout", "0.1", "--attention-dropout", "0.1", "--activation-dropout", "0.1"]
UPDATES = 5


def probed(tmp_path, *extra, summed=True):
    return ["--criterion", "label_smoothed_cross_entropy_gdps", "--gdps-probe-interval", "1",
            *(["--gdps-summed-statistics"] if summed else []), "--gdps-stats", tmp_path / "stats.pt",
            "--gdps-track", "*", *extra]


UNPROBED = ["--criterion", "label_smoothed_cross_entropy_gdps", "--gdps-probe-interval", "0"]


def model_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def optimizer_state(trainer):
    """Adam's moments of every parameter, in parameter order."""
    state = trainer.optimizer.optimizer.state
    return [t.clone() for p in trainer.optimizer.params for t in (state[p]["exp_avg"], state[p]["exp_avg_sq"])]


def differing(a: dict, b: dict):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def run(trainer, batches, update_freq, nudge=None):
    """``UPDATES`` updates of ``update_freq`` micro-batches each; returns every update's gradients
    as the optimiser used them (normalised and clipped). ``nudge``: (parameter, update) whose
    gradient gets one element moved by one ulp in that update's backward pass."""
    gradients = []
    for u in range(UPDATES):
        handle = None
        if nudge is not None and nudge[1] == u:
            def one_ulp(grad):
                grad = grad.clone()
                grad.view(-1)[0] = torch.nextafter(grad.view(-1)[0], torch.tensor(float("inf")))
                return grad
            handle = nudge[0].register_hook(one_ulp)
        trainer.train_step(batches[u * update_freq: (u + 1) * update_freq])
        if handle is not None:
            handle.remove()
        gradients.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert trainer.get_num_updates() == UPDATES
    return gradients


def differing_gradients(a, b):
    return [(u, name) for u in range(UPDATES) for name in differing(a[u], b[u])]


# the default probe (no summed statistics) on single micro-batch updates reduces each layer's
# shares to their Gram matrix inside the backward pass; the other cases keep the shares
@pytest.mark.parametrize("update_freq,summed", [(1, False), (1, True), (2, True)])
def test_probed_training_is_bit_identical_to_unprobed_training(tiny_data, tmp_path, update_freq, summed,
                                                               monkeypatch):
    halves = []   # every micro-batch's (probe unit, probe row) per utterance, as the task split them
    split = probe_module.probe_halves

    def spy(units, ids, *args, **kwargs):
        rows = split(units, ids, *args, **kwargs)
        halves.append((units.clone(), rows.clone()))
        return rows

    monkeypatch.setattr(probe_module, "probe_halves", spy)
    task, with_probe = build_trainer(tiny_data, *DROPOUT, *probed(tmp_path, summed=summed))
    assert task.probe.capture_keeps_shares() == (summed or update_freq > 1)
    _, without_probe = build_trainer(tiny_data, *DROPOUT, *UNPROBED)
    _, nudged = build_trainer(tiny_data, *DROPOUT, *UNPROBED)
    _, other_seed = build_trainer(tiny_data, *DROPOUT, *UNPROBED, "--seed", "2")
    tracked = task.probe.tracked_blocks(with_probe.model)
    assert any(name.startswith("decoder.") for name in tracked) and len(tracked) == 3
    init = model_state(with_probe)
    for trainer in (without_probe, nudged):
        assert not differing(model_state(trainer), init)
    # seed 2 builds another model: give it seed 1's, so that only its dropout masks differ
    other_seed.model.load_state_dict(init)
    batches = train_batches(task, UPDATES * update_freq)
    assert len(batches) == UPDATES * update_freq

    probed_grads = run(with_probe, batches, update_freq)
    unprobed_grads = run(without_probe, batches, update_freq)
    nudged_grads = run(nudged, batches, update_freq, nudge=(nudged.model.decoder.layers[0].fc1.weight, 2))
    run(other_seed, batches, update_freq)

    # the probe ran on every update and measured every tracked block
    stats = task.probe.statistics
    assert stats.num_steps == UPDATES and stats.same_state.num_probes == UPDATES
    assert stats.module_names == list(tracked)
    # every update's utterances of a unit in two halves that differ by one utterance at most (both
    # non-empty from two utterances on), over all the update's micro-batches
    assert len(halves) == UPDATES * update_freq
    for u in range(UPDATES):
        units = torch.cat([h[0] for h in halves[u * update_freq: (u + 1) * update_freq]])
        rows = torch.cat([h[1] for h in halves[u * update_freq: (u + 1) * update_freq]])
        assert torch.equal(rows // 2, units)
        for unit in units.unique().tolist():
            sizes = [int((rows == 2 * unit + h).sum()) for h in (0, 1)]
            assert abs(sizes[0] - sizes[1]) <= 1, (u, unit, sizes)
    # training moved the weights; the probed run's gradients of every update, its weights and its
    # Adam moments are the unprobed run's, bit for bit
    trained = model_state(with_probe)
    assert len(differing(trained, init)) > 0.9 * len(init)
    assert differing_gradients(probed_grads, unprobed_grads) == []
    assert differing(model_state(without_probe), trained) == []
    assert all(torch.equal(a, b) for a, b in zip(optimizer_state(without_probe), optimizer_state(with_probe)))
    assert without_probe.get_lr() == with_probe.get_lr()
    # the comparison is sensitive: one ulp in one gradient element of one update shows in that
    # update's gradients (a difference that small does not reach float32 weights in 6 Adam steps:
    # measured, one element's gradient must change by ~1e-4 relative), other dropout masks in the weights
    assert (2, "decoder.layers.0.fc1.weight") in differing_gradients(nudged_grads, unprobed_grads)
    assert len(differing(model_state(other_seed), trained)) > 0.9 * len(init)


# ---------------------------------------------------------------- each share is its own gradient

def flat_block_gradient(layers, grads_by_param):
    return torch.cat([grads_by_param[p].reshape(-1) for layer in layers for p in layer.parameters()])


def relative_error(got, expected):
    return float((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


def test_each_probe_half_is_its_utterances_gradient_on_the_real_model(tiny_data, tmp_path):
    task, trainer = build_trainer(tiny_data, "--dropout", "0", *probed(tmp_path))
    model, criterion = trainer.model, trainer.criterion
    tracked = task.probe.tracked_blocks(model)
    assert list(tracked) == ["encoder.transformer_layers.0.ffn", "encoder.transformer_layers.1.ffn",
                             "decoder.layers.0.ffn"]
    # a batch of all four languages, one of them with a single utterance, one with an odd count
    batch = next(b for b in train_batches(task, 11)
                 if sorted(torch.bincount(b["net_input"][LANG_ID_KEY], minlength=4).tolist())[:2] == [1, 2]
                 and 3 in torch.bincount(b["net_input"][LANG_ID_KEY], minlength=4).tolist())
    lang_ids, ids = batch["net_input"][LANG_ID_KEY], batch["id"]
    units = len(task.languages)

    # the halves: a row per utterance, 2 * language + half; each language's utterances split into
    # two disjoint halves, both non-empty when it has two or more, sizes differing by at most one,
    # and the split is by dataset id, not batch order
    rows = probe_halves(lang_ids, ids)
    for lang in range(units):
        mine = set(torch.nonzero(lang_ids == lang).flatten().tolist())
        half_a = set(torch.nonzero(rows == 2 * lang).flatten().tolist())
        half_b = set(torch.nonzero(rows == 2 * lang + 1).flatten().tolist())
        assert half_a | half_b == mine and not half_a & half_b
        if len(mine) >= 2:
            assert half_a and half_b and abs(len(half_a) - len(half_b)) <= 1
        elif mine:
            assert len(half_a) == 1 and not half_b
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))
    assert probe_halves(lang_ids[perm], ids[perm]).tolist() == rows[perm].tolist()

    # reference: the gradient of the loss of each half's utterances alone, within the same padded
    # batch (so padding and the subsampler see exactly what the probe's batch had)
    params = [p for layers in tracked.values() for layer in layers for p in layer.parameters()]
    model.train()
    net_output = model(**batch["net_input"])
    token_loss, _ = criterion.compute_loss(model, net_output, batch, reduce=False)
    utterance_loss = token_loss.view(ids.numel(), -1).sum(1)
    assert torch.allclose(utterance_loss.sum(), criterion(model, batch)[0])
    reference, tokens = {}, torch.zeros(2 * units, dtype=torch.float64)
    for r in range(2 * units):
        mask = rows == r
        tokens[r] = float(batch["target_lengths"][mask].sum())
        grads = torch.autograd.grad(utterance_loss[mask].sum(), params, retain_graph=True, allow_unused=False)
        by_param = dict(zip(params, grads))
        reference[r] = {name: flat_block_gradient(layers, by_param) for name, layers in tracked.items()}
    model.zero_grad()
    del net_output, token_loss, utterance_loss

    # the probe: the stock train step, with the capture handing every half's share to the probe's update
    handed = []
    add_micro_batch = task.probe.add_micro_batch

    def spy(capture, tokens, first_of_update, loss_scale=1.0, utterance_ids=()):
        shares = capture.gradients()
        handed.append(({r: {n: g.detach().clone() for n, g in blocks.items()} for r, blocks in shares.items()},
                       tokens.clone()))
        add_micro_batch(capture, tokens, first_of_update, loss_scale, utterance_ids)

    task.probe.add_micro_batch = spy
    optimizer = trainer.optimizer
    task.train_step(batch, model, criterion, optimizer, 0)
    stock = {name: flat_block_gradient(layers, {p: p.grad for p in params}) for name, layers in tracked.items()}
    task.optimizer_step(optimizer, model, 0)   # records the probe (and steps the weights)

    [(shares, handed_tokens)] = handed
    present_rows = sorted(set(rows.tolist()))
    assert sorted(shares) == present_rows
    assert torch.equal(handed_tokens, tokens)
    errors = []
    for name in tracked:
        for r in present_rows:
            err = relative_error(shares[r][name], reference[r][name])
            errors.append(err)
            assert err < 1e-5, f"{name}, row {r}: relative error {err:.2e}"
        # the shares add up to the stock gradient of the batch
        err = relative_error(sum(shares[r][name] for r in present_rows), stock[name])
        assert err < 1e-5, f"{name}: shares sum to the stock gradient within {err:.2e}"
        # and they really differ: the two halves of a language are different gradients
        a, b = next((2 * u, 2 * u + 1) for u in range(units) if 2 * u + 1 in present_rows)
        assert relative_error(shares[a][name], shares[b][name]) > 0.1
    print(f"largest relative error of a half's share: {max(errors):.2e}")

    # what the statistics keep follows from those gradients: the halves' token counts and the
    # Gram matrix of their per-token gradients (a zero row for an empty half) ...
    stats = task.probe.statistics
    updates, recorded_tokens, grams = stats.same_state.arrays()
    assert updates.tolist() == [0] and recorded_tokens[0].tolist() == tokens.tolist()
    for m, name in enumerate(stats.same_state.blocks):
        Y = torch.stack([reference[r][name].double() / tokens[r] if tokens[r] > 0
                         else torch.zeros_like(reference[0][name], dtype=torch.float64) for r in range(2 * units)])
        expected = Y @ Y.T
        scale = expected.diagonal().max()
        assert float((torch.as_tensor(grams[0, m]) - expected).abs().max() / scale) < 1e-5, name
        empty = [r for r in range(2 * units) if tokens[r] == 0]
        assert empty and all(float(abs(grams[0, m, r]).max()) == 0.0 for r in empty)
    # ... and each language's step of the summed statistics: its per-token gradient, the two
    # halves' gradient sums over the language's tokens
    for lang, code in enumerate(task.languages):
        sums = stats.module_sums("decoder.layers.0.ffn")
        i = stats.languages.index(code)
        assert int(sums["n"][i]) == 1
        expected = (reference[2 * lang]["decoder.layers.0.ffn"].double()
                    + reference[2 * lang + 1]["decoder.layers.0.ffn"].double()) / (tokens[2 * lang] + tokens[2 * lang + 1])
        assert relative_error(sums["S"][i], expected) < 1e-5, code


def test_probe_halves_continue_alternating_over_an_updates_micro_batches():
    """Micro-batch i of an update starts each unit's alternation at half i % 2 (worker r of W:
    (i * W + r) % 2): a unit with one utterance in each of two micro-batches gets one in each half."""
    units, ids = torch.tensor([1, 0, 1, 1]), torch.tensor([7, 3, 2, 5])
    assert probe_halves(units, ids).tolist() == [2, 0, 2, 3]   # unit 1 by id: 2 -> half 0, 5 -> 1, 7 -> 0
    assert probe_halves(units, ids, first_half=1).tolist() == [3, 1, 3, 2]
    one = torch.tensor([0])
    assert [probe_halves(one, torch.tensor([i]), first_half=i % 2).item() for i in (4, 9)] == [0, 1]
