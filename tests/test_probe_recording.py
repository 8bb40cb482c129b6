"""The probe's recording path (one PerLanguageUpdate buffer reused from update to update, divided
in place by per_token_halves, then GradientStatistics.add_probe) gives bit for bit the statistics
of a fresh buffer per update, whichever probe halves an update holds, sketched or not."""
import pytest
import torch

from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate
from fairseq_gdps.gdps.stats import GradientStatistics

LANGUAGES = ["ar", "et", "ga", "sw"]   # the probe units; rows 2u and 2u + 1 are unit u's halves
ROWS = 2 * len(LANGUAGES)
SIZES = {"enc": 5000, "dec": 300}   # enc is count-sketched to the aux space (aux_dim 1024), dec is not


def bits(t):
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def assert_bit_identical(a: GradientStatistics, b: GradientStatistics):
    ta, tb = a.to_tensors(), b.to_tensors()
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(bits(ta[name]), bits(tb[name])), name
    for x, y in zip(a.same_state.arrays(), b.same_state.arrays()):
        assert x.dtype == y.dtype and x.shape == y.shape and (x.view("int64") == y.view("int64")).all()


def micro_batch(gen, present):
    grads = {row: {name: torch.randn(d, generator=gen) * (row + 1) for name, d in SIZES.items()} for row in present}
    tokens = torch.zeros(ROWS, dtype=torch.float64)
    for row in present:
        tokens[row] = float(torch.randint(1, 50, (1,), generator=gen))
    return grads, tokens


def statistics(**settings):
    return GradientStatistics(SIZES, languages=LANGUAGES, probe_units=LANGUAGES, **settings)


@pytest.mark.parametrize("sketch_dim", [None, 2000])
def test_reused_buffer_records_the_same_bits_as_a_fresh_one(sketch_dim):
    gen = torch.Generator().manual_seed(0)
    settings = dict(sketch_dim=sketch_dim, aux_dim=1024, subspace_dim=8, seed=3)
    fresh_stats, reused_stats = statistics(**settings), statistics(**settings)
    reused = PerLanguageUpdate(SIZES, ROWS)
    # updates with every half, with some, with one, over two micro-batches
    updates = [[list(range(ROWS))], [[2, 3, 6, 7]], [[4]], [[0, 4], [6, 5]], [list(range(ROWS))], [[7], [2, 3]]]
    for step, micro_batches in enumerate(updates):
        fresh = PerLanguageUpdate(SIZES, ROWS)
        reused.reset()
        for present in micro_batches:
            grads, tokens = micro_batch(gen, present)
            fresh.add(grads, tokens)
            reused.add(grads, tokens)
        expected_tokens, expected_rows = fresh.per_token_halves()
        tokens, rows = reused.per_token_halves()
        assert torch.equal(tokens, expected_tokens)
        for name in SIZES:
            assert torch.equal(bits(rows[name]), bits(expected_rows[name])), (step, name)
        assert fresh_stats.add_probe(step, expected_tokens, expected_rows) == []
        assert reused_stats.add_probe(step, tokens, rows) == []
        assert_bit_identical(fresh_stats, reused_stats)
    assert reused_stats.num_steps == len(updates)
    assert reused_stats.counts()["sw"] == {"enc": 5, "dec": 5}   # updates 0, 1, 3, 4, 5
    assert reused_stats.counts()["ga"] == {"enc": 4, "dec": 4}   # updates 0, 2, 3, 4


def test_non_finite_half_skips_its_language_and_keeps_no_gram_matrices():
    """The default probe (same-state records alone): a non-finite gradient in one half leaves that
    half's language out, counted, and the probe keeps no Gram matrix."""
    gen = torch.Generator().manual_seed(1)
    stats = statistics(summed=False)
    update = PerLanguageUpdate(SIZES, ROWS)
    grads, tokens = micro_batch(gen, [0, 1, 2, 3, 6, 7])
    grads[3]["dec"][5] = float("nan")   # et's second half
    update.add(grads, tokens)
    assert stats.add_probe(0, *update.per_token_halves()) == ["et"]
    assert stats.skipped_nonfinite == {"ar": 0, "et": 1, "ga": 0, "sw": 0}
    assert stats.same_state.num_probes == 0
    grads, tokens = micro_batch(gen, [0, 1, 2, 3, 6, 7])
    update.reset()
    update.add(grads, tokens)
    assert stats.add_probe(1, *update.per_token_halves()) == []
    assert stats.same_state.num_probes == 1 and stats.num_steps == 1
