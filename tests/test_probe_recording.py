"""The probe's in-place recording path (PerLanguageUpdate.per_token_rows, reused buffers,
GradientStatistics.add_step_rows) gives bit for bit the statistics of the plain path
(per_token + add_step), whichever languages an update holds, sketched or not."""
import pytest
import torch

from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate
from fairseq_gdps.gdps.stats import GradientStatistics

LANGUAGES = ["ar", "et", "ga", "sw"]
SIZES = {"enc": 5000, "dec": 300}   # enc is count-sketched to the aux space (aux_dim 1024), dec is not


def bits(t):
    return t.view(torch.int64) if t.dtype == torch.float64 else t


def assert_bit_identical(a: GradientStatistics, b: GradientStatistics):
    ta, tb = a.to_tensors(), b.to_tensors()
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].shape == tb[name].shape, name
        assert torch.equal(bits(ta[name]), bits(tb[name])), name


def micro_batch(gen, present):
    grads = {lang: {name: torch.randn(d, generator=gen) * (lang + 1) for name, d in SIZES.items()} for lang in present}
    tokens = torch.zeros(len(LANGUAGES), dtype=torch.float64)
    for lang in present:
        tokens[lang] = float(torch.randint(1, 50, (1,), generator=gen))
    return grads, tokens


@pytest.mark.parametrize("sketch_dim", [None, 2000])
def test_in_place_path_records_the_same_bits_as_the_plain_path(sketch_dim):
    gen = torch.Generator().manual_seed(0)
    settings = dict(languages=LANGUAGES, sketch_dim=sketch_dim, aux_dim=1024, subspace_dim=8, seed=3)
    plain, in_place = GradientStatistics(SIZES, **settings), GradientStatistics(SIZES, **settings)
    reused = PerLanguageUpdate(SIZES, len(LANGUAGES))
    # updates with every language, with some (rows moved up), with one, over two micro-batches
    updates = [[[0, 1, 2, 3]], [[1, 3]], [[2]], [[0, 2], [3]], [[0, 1, 2, 3]], [[3], [1]]]
    for step, micro_batches in enumerate(updates):
        fresh = PerLanguageUpdate(SIZES, len(LANGUAGES))
        reused.reset()
        for present in micro_batches:
            grads, tokens = micro_batch(gen, present)
            fresh.add(grads, tokens)
            reused.add(grads, tokens)
        expected = fresh.per_token(LANGUAGES)
        languages, rows = reused.per_token_rows(LANGUAGES)
        assert languages == list(expected) == [LANGUAGES[l] for l in sorted({l for p in micro_batches for l in p})]
        for i, lang in enumerate(languages):
            for name in SIZES:
                assert torch.equal(bits(rows[name][i]), bits(expected[lang][name])), (step, lang, name)
        plain.add_step(step, expected)
        in_place.add_step_rows(step, languages, rows)
        assert_bit_identical(plain, in_place)
    assert in_place.num_steps == len(updates)
    assert in_place.counts()["sw"] == {"enc": 5, "dec": 5}   # updates 0, 1, 3, 4, 5
    assert in_place.counts()["ga"] == {"enc": 4, "dec": 4}   # updates 0, 2, 3, 4


def test_add_step_rows_rejects_wrong_shapes_and_unknown_modules():
    stats = GradientStatistics(SIZES, languages=LANGUAGES)
    with pytest.raises(ValueError, match="'enc'.*shape \\(2, 10\\).*expected \\(2, 5000\\)"):
        stats.add_step_rows(0, ["ar", "et"], {"enc": torch.zeros(2, 10, dtype=torch.float64)})
    with pytest.raises(ValueError, match="untracked modules \\['mid'\\]"):
        stats.add_step_rows(0, ["ar"], {"mid": torch.zeros(1, 7, dtype=torch.float64)})
    assert stats.num_steps == 0


def test_non_finite_language_is_skipped_in_place_as_in_add_step():
    gen = torch.Generator().manual_seed(1)
    plain, in_place = GradientStatistics(SIZES, languages=LANGUAGES), GradientStatistics(SIZES, languages=LANGUAGES)
    update = PerLanguageUpdate(SIZES, len(LANGUAGES))
    grads, tokens = micro_batch(gen, [0, 1, 3])
    grads[1]["dec"][5] = float("nan")
    update.add(grads, tokens)
    expected = update.per_token(LANGUAGES)
    assert plain.add_step(0, expected) == ["et"]
    assert in_place.add_step_rows(0, *update.per_token_rows(LANGUAGES)) == ["et"]
    assert_bit_identical(plain, in_place)
    assert in_place.skipped_nonfinite == {"ar": 0, "et": 1, "ga": 0, "sw": 0}
