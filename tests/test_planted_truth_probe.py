"""Planted truth on statistics recorded by the real probe in fairseq-train runs (test size): a
language split at random into two pseudo-languages must agree with itself and never be split;
shuffled language labels must give no stable grouping. (The demo-size planted conflict, five
seeds, is benchmarks/planted_truth.py; its records are in benchmarks/results/planted_truth/.)"""
import pytest

from benchmarks import planted_truth
from conftest import BIN, REPO, run
from gdps_training import run_all, stage1_args

from fairseq_gdps.gdps.report import analyze
from fairseq_gdps.gdps.stats import GradientStatistics

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


def test_corpus_conflict_keeps_the_corpus_pair_and_derives_only_the_duplicate(tmp_path):
    import json

    src, out = tmp_path / "prepared", tmp_path / "planted"
    src.mkdir()
    fields = ["id", "audio", "n_frames", "tgt_text", "speaker", "src_lang"]
    for split in planted_truth.SPLITS:
        rows = [{"id": f"{lang}_{split}_{i}", "audio": "fbank80.zip:1:2", "n_frames": "10", "tgt_text": "five cats",
                 "speaker": "s", "src_lang": lang} for lang in ("et", "sw", "xx") for i in range(40)]
        planted_truth.write_tsv(src / f"{split}.tsv", fields, rows)
    (src / "config.yaml").write_text("input_channels: 1\n")
    assert planted_truth.main(["make-data", "--data", str(src), "--out", str(out), "--kind", "corpus-conflict"]) == 0
    truth = json.loads((out / "planted_truth.json").read_text())
    assert truth["kind"] == "conflict" and truth["conflict"] == ["et", "xx"] and truth["duplicate"] == ["sw", "sw2"]
    assert truth["planted_by"] == "corpus"
    # the source folder is recorded relative to the repository: no machine path goes into a record
    assert not truth["source"].startswith("/") and (REPO / truth["source"]).resolve() == src.resolve()
    _, train = planted_truth.read_tsv(out / "train.tsv")
    by_lang = {}
    for r in train:
        by_lang.setdefault(r["src_lang"], []).append(r)
    assert len(by_lang["et"]) == len(by_lang["xx"]) == 40 and len(by_lang["sw"]) + len(by_lang["sw2"]) == 40
    assert 5 < len(by_lang["sw2"]) < 35 and all(r["tgt_text"] == "five cats" for r in train)  # no text changed
    assert (out / "config.yaml").is_symlink() and (out / "train_sw2.tsv").is_file()
    # a corpus without the pair is refused, naming what is missing
    with pytest.raises(SystemExit, match=r"train.tsv has no \['yy'\]"):
        planted_truth.main(["make-data", "--data", str(src), "--out", str(tmp_path / "p2"), "--kind", "corpus-conflict",
                            "--conflict", "et:yy"])
    assert not (tmp_path / "p2").exists()
