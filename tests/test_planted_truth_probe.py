"""Planted truth on statistics recorded by the real probe in fairseq-train runs (test size): a
language split at random into two pseudo-languages must agree with itself and never be split;
shuffled language labels must give no stable grouping. (The demo-size planted conflict, five
seeds, is benchmarks/planted_truth.py; its records are in benchmarks/results/planted_truth/.)"""
import sys

import pytest

from conftest import BIN, REPO, run
from gdps_training import run_all, stage1_args

sys.path.insert(0, str(REPO / "benchmarks"))
import planted_truth  # noqa: E402

from fairseq_gdps.gdps.report import analyze  # noqa: E402
from fairseq_gdps.gdps.stats import GradientStatistics  # noqa: E402

pytestmark = pytest.mark.slow   # fairseq-train runs

UPDATES = 40


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Stage-1 statistics of a conflict/duplicate derivation and of shuffled labels. The corpus
    is larger than the suite's tiny one: with a dozen utterances per language every epoch repeats
    the same few half-batches, and an estimate over probes is an estimate over those few."""
    root = tmp_path_factory.mktemp("planted")
    corpus, prepared = root / "corpus", root / "data"
    run([BIN / "gdps-make-corpus", "--profile", "quick", "--utterances-per-language", "150", "--seed", "5",
         "--out", corpus])
    run([BIN / "gdps-prep", "--corpus", corpus, "--out", prepared, "--vocab-size", "64"])
    out = {}
    commands = []
    for kind in ("conflict", "shuffled"):
        data = root / f"{kind}_data"
        assert planted_truth.main(["make-data", "--data", str(prepared), "--out", str(data), "--kind", kind]) == 0
        save = root / kind
        commands.append(stage1_args(data, save, UPDATES, "--max-tokens", "6000"))
        out[kind] = save / "stats.pt"
    run_all(commands, timeout=600)
    return {k: GradientStatistics.load(p) for k, p in out.items()}


def test_duplicate_language_agrees_with_itself_and_stays_together(probed):
    stats = probed["conflict"]
    assert stats.same_state.num_probes == UPDATES
    a = analyze(stats, resamples=100)
    assert a.estimator == "same-state"
    langs = a.languages
    i, j = langs.index("sw"), langs.index("sw2")
    for block, e in a.conflict.estimates.items():
        # the two halves of one language: ~1 (every term at one state; the summed estimator
        # had same-update products in its cross term only, and came out far beyond 1)
        assert 0.9 <= e.rho[i, j] < 1.15, (block, e.rho[i, j])
    assert any({"sw", "sw2"} <= set(g) for g in a.grouping.partition)
    # the same holds in the bootstrap: the two halves of one language are never separated
    if a.grouping.resamples:
        assert a.grouping.coassignment[i, j] == 1.0


def test_shuffled_labels_give_no_stable_grouping(probed):
    a = analyze(probed["shuffled"], resamples=100)
    assert a.estimator == "same-state"
    g = a.grouping
    assert len(g.partition) == 1 or g.chosen_frequency < 0.5, (g.partition, g.chosen_frequency)


def test_run_trains_with_the_language_embedding_only_when_asked(tmp_path):
    from types import SimpleNamespace

    base = dict(probe_interval=4, probe_start=0, speakers=False, updates=10)
    plain = planted_truth.train_command(tmp_path, tmp_path / "s", 1, SimpleNamespace(**base, lang_embedding=False))
    tagged = planted_truth.train_command(tmp_path, tmp_path / "s", 1, SimpleNamespace(**base, lang_embedding=True))
    assert "--gdps-lang-embedding" not in plain and "--gdps-lang-embedding" in tagged
    assert tagged.replace(" --gdps-lang-embedding", "") == plain


def test_readme_tables_keep_every_condition_heading_and_only_window_all():
    lines = ["### Condition `a` (1 seeds)", "truth a", "Window `all`:", "| a all |", "Window `second_half`:",
             "| a second |", "Window `first_half`:", "| a first |",
             "### Condition `b` (1 seeds)", "truth b", "Window `all`:", "| b all |", "Window `first_half`:", "| b first |"]
    assert planted_truth.readme_tables(lines).split("\n") == [
        "### Condition `a` (1 seeds)", "truth a", "Window `all`:", "| a all |",
        "### Condition `b` (1 seeds)", "truth b", "Window `all`:", "| b all |"]
