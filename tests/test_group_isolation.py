"""Group isolation of a split model under the recipes' optimiser (issue 11, point 8).

examples/speech_to_text_gdps/common.sh trains with fairseq's Adam (betas (0.9, 0.98)), weight
decay 1e-4 (decoupled: p -= lr * wd * p on every step) and clip-norm 10. A PartitionedFFN keeps the
private units of all groups in one Parameter per kind, ``(G, P, d)``: on a batch without group B's
languages, B's slice gets a gradient of exact zeros, not None, so fairseq's Adam (which skips only
parameters whose gradient is None) still steps it. What is guaranteed, and tested here on a fairseq
Trainer:

* on a batch of group A only, group B's private gradient is exactly zero;
* from a fresh optimiser, group B's private weights then change by weight decay alone (bit for bit
  ``p -= lr_t * wd * p`` per step), so they are bit-identical with ``--weight-decay 0``;
* once B has been trained, its Adam momentum keeps moving its private weights on updates without
  B; that movement is a function of B's own optimiser state and the learning rate only: two runs
  that differ only in group A's batches end with bit-identical group-B private weights.
"""
import pytest
import torch

from fairseq_gdps.models import partitioned_ffns
from gdps_training import build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP_A, GROUP_B = ("ar", "et"), ("ga", "sw")
SPLIT = ["--dropout", "0.1", "--criterion", "label_smoothed_cross_entropy",
         "--gdps-split-modules", "encoder.transformer_layers.1.ffn,decoder.layers.0.ffn",
         "--gdps-groups", f"{','.join(GROUP_A)};{','.join(GROUP_B)}", "--gdps-shared-ratio", "0.5"]
PRIVATE = ("fc1_private_weight", "fc1_private_bias", "fc2_private_weight")
SHARED = ("fc1_shared_weight", "fc1_shared_bias", "fc2_shared_weight", "fc2_bias")


def private(trainer, group):
    return {(name, p): getattr(ffn, p)[group].detach().clone()
            for name, ffn in partitioned_ffns(trainer.model).items() for p in PRIVATE}


def shared(trainer):
    return {(name, p): getattr(ffn, p).detach().clone()
            for name, ffn in partitioned_ffns(trainer.model).items() for p in SHARED}


def equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def none_equal(a, b):
    return not any(torch.equal(a[k], b[k]) for k in a)


class Batches:
    """Batches of chosen train utterances: group A only, or both groups."""

    def __init__(self, task):
        task.load_dataset("train")
        self.dataset = task.dataset("train")
        langs = self.dataset.s2t_dataset.src_langs
        self.a = [i for i, lang in enumerate(langs) if lang in GROUP_A]
        self.b = [i for i, lang in enumerate(langs) if lang in GROUP_B]
        assert len(self.a) >= 36 and len(self.b) >= 12

    def make(self, indices):
        return self.dataset.collater([self.dataset[i] for i in indices])

    def group_a(self, k, offset=0):
        start = offset + 4 * k
        return self.make(self.a[start: start + 4])

    def mixed(self, k):
        return self.make(self.a[3 * k: 3 * k + 3] + self.b[3 * k: 3 * k + 3])


def step(trainer, batch):
    """One update; returns the learning rate it used (what Adam's weight decay multiplies)."""
    lr = trainer.get_lr()
    trainer.train_step([batch])
    return lr


def assert_group_b_gradient_is_zero(trainer):
    for name, ffn in partitioned_ffns(trainer.model).items():
        for p in PRIVATE:
            grad = getattr(ffn, p).grad
            assert grad is not None, f"{name}.{p}"   # one Parameter for every group: a zero slice, not None
            assert torch.count_nonzero(grad[1]) == 0, f"{name}.{p}: group B got a gradient"
            assert torch.count_nonzero(grad[0]) > 0, f"{name}.{p}: group A got none"


def test_adam_with_weight_decay_moves_an_absent_groups_private_weights_by_weight_decay_alone(tiny_data):
    task, trainer = build_trainer(tiny_data, *SPLIT)
    _, no_decay = build_trainer(tiny_data, *SPLIT, "--weight-decay", "0")
    assert trainer.cfg.optimizer.weight_decay == 1e-4 and trainer.cfg.optimization.clip_norm == 10.0
    batches = Batches(task)
    before_b, before_a, before_shared = private(trainer, 1), private(trainer, 0), shared(trainer)
    assert equal(private(no_decay, 1), before_b)
    expected_b = {k: v.clone() for k, v in before_b.items()}
    for k in range(4):   # a fresh optimiser, group A's languages only
        lr = step(trainer, batches.group_a(k))
        step(no_decay, batches.group_a(k))
        for trained in (trainer, no_decay):
            assert_group_b_gradient_is_zero(trained)
        for v in expected_b.values():   # fairseq's Adam: p.add_(p, alpha=-wd * lr) before the Adam step
            v.add_(v, alpha=-1e-4 * lr)
    assert trainer.get_num_updates() == 4
    # group A and the shared units trained; group B's private weights moved by weight decay only
    assert none_equal(private(trainer, 0), before_a) and none_equal(shared(trainer), before_shared)
    assert equal(private(trainer, 1), expected_b)
    assert none_equal(private(trainer, 1), before_b)   # not untouched: decay shrinks them
    drift = max(float((private(trainer, 1)[k] - before_b[k]).abs().max()) for k in before_b)
    assert 0 < drift < 1e-6
    # without weight decay they are untouched, bit for bit
    assert none_equal(private(no_decay, 0), before_a)
    assert equal(private(no_decay, 1), before_b)


def test_adam_momentum_moves_an_absent_groups_private_weights_independently_of_the_present_groups_data(tiny_data):
    task, first = build_trainer(tiny_data, *SPLIT)
    _, second = build_trainer(tiny_data, *SPLIT)
    batches = Batches(task)
    for k in range(3):   # both runs: the same updates with both groups
        for trainer in (first, second):
            step(trainer, batches.mixed(k))
    assert equal(private(first, 1), private(second, 1)) and equal(private(first, 0), private(second, 0))
    trained_b, trained_a = private(first, 1), private(first, 0)
    # then updates with group A only, on other A utterances in each run
    for k in range(3):
        step(first, batches.group_a(k, offset=9))
        assert_group_b_gradient_is_zero(first)
        step(second, batches.group_a(k, offset=24))
        assert_group_b_gradient_is_zero(second)
    # group A's weights now differ between the runs; group B's moved (Adam's momentum from the
    # mixed updates, and weight decay), identically in both: none of A's data reached them
    assert none_equal(private(first, 0), private(second, 0))
    assert none_equal(shared(first), shared(second))
    assert equal(private(first, 1), private(second, 1))
    assert none_equal(private(first, 1), trained_b)
    moved_b = max(float((private(first, 1)[k] - trained_b[k]).abs().max()) for k in trained_b)
    moved_a = max(float((private(first, 0)[k] - trained_a[k]).abs().max()) for k in trained_a)
    print(f"\nover 3 updates without group B: group B's private weights moved by up to {moved_b:.2e} "
          f"(group A's: {moved_a:.2e})")
    assert moved_b > 0.1 * moved_a   # momentum is not a rounding effect: comparable to A's own movement
