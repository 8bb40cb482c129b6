"""Bad input gets an error that names the culprit (file and line, flag, module, language), and
nothing already written is lost or half-written: corpus preparation, features, plans, gradient
statistics and non-finite probe gradients."""
import csv
import os
import shutil
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from fairseq_gdps.cli.prep import main as prep_main
from fairseq_gdps.cli.prep import prepare
from fairseq_gdps.data import features as F
from fairseq_gdps.data.manifest import read_manifest
from fairseq_gdps.gdps.plan import Plan, PlanError
from fairseq_gdps.gdps.stats import GradientStatistics
from fairseq_gdps.models import resolve_split_spec

SR = 16000
HEADER = ["id", "audio", "src_lang", "tgt_text", "speaker"]
# (split, id, language, target): two languages, every language in every split
UTTERANCES = [
    ("train", "de_1", "de", "the cat sat"), ("train", "fr_1", "fr", "a dog ran"),
    ("train", "de_2", "de", "big red house"), ("train", "fr_2", "fr", "small blue mat"),
    ("dev", "de_3", "de", "the dog sat"), ("dev", "fr_3", "fr", "a cat ran"),
    ("test", "de_4", "de", "red mat"), ("test", "fr_4", "fr", "blue house far away"),
]


def write_corpus(root: Path) -> Path:
    (root / "wav").mkdir(parents=True)
    rng = np.random.RandomState(0)
    lines = {s: ["\t".join(HEADER)] for s in ("train", "dev", "test")}
    for i, (split, uid, lang, text) in enumerate(UTTERANCES):
        n = 4000 + 800 * i
        sf.write(str(root / "wav" / f"{uid}.wav"), 0.1 * np.sin(np.arange(n) * (0.05 + 0.01 * i))
                 + 0.01 * rng.randn(n), SR, subtype="PCM_16")
        lines[split].append("\t".join([uid, f"wav/{uid}.wav", lang, text, f"spk{i % 2}"]))
    for split, ls in lines.items():
        (root / f"{split}.tsv").write_text("\n".join(ls) + "\n", encoding="utf-8")
    return root


def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def set_line(tsv: Path, lineno: int, text: bytes):
    lines = tsv.read_bytes().split(b"\n")
    lines[lineno - 1] = text
    tsv.write_bytes(b"\n".join(lines))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A clean corpus and its data folder (prepared once; tests work on copies)."""
    base = tmp_path_factory.mktemp("bad_input")
    corpus = write_corpus(base / "corpus")
    out = base / "data"
    prepare(str(corpus), str(out), vocab_size=30, jobs=1, quiet=True)
    return corpus, out


@pytest.fixture
def work(prepared, tmp_path):
    """Copies of the clean corpus and of its data folder, to damage."""
    corpus, out = prepared
    shutil.copytree(corpus, tmp_path / "corpus")
    shutil.copytree(out, tmp_path / "data")
    return tmp_path / "corpus", tmp_path / "data"


EXPECTED_LANGUAGES = ["--languages", "de,fr"]


def fails(corpus: Path, out: Path, capsys, *extra) -> str:
    """Run gdps-prep expecting failure; the data folder must be exactly as before."""
    before = snapshot(out) if out.is_dir() else None
    assert prep_main(["--corpus", str(corpus), "--out", str(out), "--quiet", "--jobs", "1", *EXPECTED_LANGUAGES,
                      *extra]) == 1
    after = snapshot(out) if out.is_dir() else None
    assert after == before  # nothing lost, nothing half-written, no temp file left behind
    err = capsys.readouterr().err
    assert err.startswith("gdps-prep: error: ")
    return err


# ------------------------------------------------------------------------- corpus TSV lines

def _truncate_line(c):  # a line cut short: its language and target are missing
    set_line(c / "train.tsv", 3, b"fr_1\twav/fr_1.wav")
    return f"{c}/train.tsv:3: 2 fields, header has 5 (no value for src_lang, tgt_text, speaker"


def _spaces_for_tabs(c):
    set_line(c / "dev.tsv", 2, b"de_3 wav/de_3.wav de the dog sat spk0")
    return f"{c}/dev.tsv:2: 1 fields, header has 5 (no value for audio, src_lang"


def _unknown_language(c):  # a language outside --languages (see EXPECTED_LANGUAGES)
    set_line(c / "dev.tsv", 3, b"fr_3\twav/fr_3.wav\tfra\ta cat ran\tspk1")
    return f"{c}/dev.tsv:3: unknown src_lang 'fra' (--languages de,fr)"


def _invalid_language(c):
    set_line(c / "test.tsv", 2, b"de_4\twav/de_4.wav\tde;fr\tred mat\tspk0")
    return f"{c}/test.tsv:2: invalid src_lang 'de;fr' (a language code is"


def _non_utf8_text(c):
    set_line(c / "train.tsv", 4, "de_2\twav/de_2.wav\tde\tbig red h\u00e4use\tspk0".encode("latin-1"))
    return f"{c}/train.tsv:4: not valid UTF-8 in tgt_text (invalid continuation byte at byte 30 of the line)"


def _missing_audio(c):
    os.remove(c / "wav" / "fr_2.wav")
    return f"{c}/train.tsv:5: {c}/wav/fr_2.wav: audio file not found"


def _empty_audio(c):
    (c / "wav" / "de_1.wav").write_bytes(b"")
    return f"{c}/train.tsv:2: {c}/wav/de_1.wav: empty file (0 bytes) (utterance de_1)"


def _truncated_audio(c):
    p = c / "wav" / "fr_4.wav"
    p.write_bytes(p.read_bytes()[:-2001])
    return f"{c}/test.tsv:3: {c}/wav/fr_4.wav: truncated: data chunk declares"


def _not_audio(c):
    (c / "wav" / "de_3.wav").write_text("id\taudio\nthis is a text file, not a recording\n")
    return f"{c}/dev.tsv:2: {c}/wav/de_3.wav: cannot read audio ("


def _wrong_sample_rate(c):
    sf.write(str(c / "wav" / "fr_3.wav"), np.zeros(8000), 8000)
    return f"{c}/dev.tsv:3: {c}/wav/fr_3.wav: sample rate 8000 Hz, expected 16000 Hz (utterance fr_3)"


def _stereo(c):
    sf.write(str(c / "wav" / "de_2.wav"), np.zeros((16000, 2)), SR)
    return f"{c}/train.tsv:4: {c}/wav/de_2.wav: 2 channels, expected mono (1 channel) (utterance de_2)"


DAMAGE = [_truncate_line, _spaces_for_tabs, _unknown_language, _invalid_language, _non_utf8_text,
          _missing_audio, _empty_audio, _truncated_audio, _not_audio, _wrong_sample_rate, _stereo]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_prep_fails_naming_file_and_line_and_keeps_previous_output(work, capsys, damage):
    corpus, out = work
    expected = damage(corpus)
    err = fails(corpus, out, capsys)
    assert expected in err
    assert err.rstrip().endswith("; use --skip-bad to skip bad lines")


def test_prep_failure_into_a_new_folder_leaves_no_files(work, tmp_path, capsys):
    corpus, _ = work
    _wrong_sample_rate(corpus)
    out = tmp_path / "fresh"
    fails(corpus, out, capsys)
    assert not out.exists()  # no temp zip or manifest left behind, not even the folder


def test_prep_counts_and_locates_further_problems(work, capsys):
    corpus, out = work
    _truncate_line(corpus)
    _non_utf8_text(corpus)
    _unknown_language(corpus)
    err = fails(corpus, out, capsys)
    first = f"{corpus}/dev.tsv:3: unknown src_lang 'fra'"  # problems sorted by file, then line
    assert first in err and "(and 2 more problems: train.tsv:3, train.tsv:4)" in err


def test_skip_bad_skips_and_reports_every_bad_line(work, tmp_path):
    corpus, _ = work
    for damage in (_truncate_line, _non_utf8_text, _unknown_language, _stereo, _not_audio, _truncated_audio):
        damage(corpus)  # train lines 3, 4 (twice: text and audio); dev 2, 3; test 3
    out = tmp_path / "skipping"
    assert prep_main(["--corpus", str(corpus), "--out", str(out), "--quiet", "--jobs", "1", "--skip-bad",
                      "--vocab-size", "30", *EXPECTED_LANGUAGES]) == 0
    with open(out / "skipped.tsv", encoding="utf-8") as f:
        skipped = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    got = {(Path(r["file"]).name, int(r["line"])): r["reason"] for r in skipped}
    assert set(got) == {("train.tsv", 3), ("train.tsv", 4), ("dev.tsv", 2), ("dev.tsv", 3), ("test.tsv", 3)}
    assert got["train.tsv", 3].startswith("2 fields, header has 5")
    assert got["train.tsv", 4].startswith("not valid UTF-8")  # the text is read before the audio
    assert got["dev.tsv", 2] == f"{corpus}/wav/de_3.wav: cannot read audio (Format not recognised.) (utterance de_3)"
    assert got["dev.tsv", 3] == "unknown src_lang 'fra' (--languages de,fr)"
    assert "fr_4.wav: truncated" in got["test.tsv", 3]
    kept = {split: [r["id"] for r in read_manifest(out / f"{split}.tsv")] for split in ("train", "dev", "test")}
    assert kept == {"train": ["de_1", "fr_2"], "dev": [], "test": ["de_4"]}


def test_language_left_without_training_data_is_warned_about(work, tmp_path, capsys):
    corpus, _ = work
    for uid in ("fr_1", "fr_2"):  # French loses its training data to bad audio
        sf.write(str(corpus / "wav" / f"{uid}.wav"), np.zeros(8000), 22050)
    out = tmp_path / "skipping"
    assert prep_main(["--corpus", str(corpus), "--out", str(out), "--quiet", "--jobs", "1", "--skip-bad",
                      "--vocab-size", "30"]) == 0
    with open(out / "skipped.tsv", encoding="utf-8") as f:
        skipped = {(Path(r["file"]).name, int(r["line"])): r["reason"]
                   for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    assert set(skipped) == {("train.tsv", 3), ("train.tsv", 5)}
    assert skipped["train.tsv", 3].endswith("fr_1.wav: sample rate 22050 Hz, expected 16000 Hz (utterance fr_1)")
    # zero-shot evaluation stays possible (stock task), with a warning that names the first line
    assert [r["id"] for r in read_manifest(out / "dev_fr.tsv")] == ["fr_3"]
    err = capsys.readouterr().err
    for split, line in (("dev", 3), ("test", 3)):
        assert (f"warning: {corpus}/{split}.tsv:{line}: src_lang 'fr' (1 line(s) of {split}) has no utterance in "
                f"{corpus}/train.tsv; speech_to_text_gdps refuses it unless --gdps-languages names it") in err


def test_non_finite_features_name_the_utterance(work, capsys, monkeypatch):
    corpus, out = work
    real = F.compute_fbank

    def poisoned(wav, *a, **k):  # the features of one utterance (fr_2: 6,400 samples) hold an inf
        feats = real(wav, *a, **k)
        if len(wav) == 6400:
            feats[7, 42] = np.inf
        return feats

    monkeypatch.setattr(F, "compute_fbank", poisoned)
    err = fails(corpus, out, capsys)
    assert (f"{corpus}/train.tsv:5: {corpus}/wav/fr_2.wav: features contain NaN or infinite values "
            f"(1 of {F.num_frames(6400) * 80}; first at frame 7, bin 42: inf) (utterance fr_2)") in err


def test_check_finite_features_names_first_bad_value():
    feats = np.zeros((5, 80), np.float32)
    F.check_finite_features(feats, "u")
    feats[3, 9] = np.nan
    feats[4, 0] = -np.inf
    with pytest.raises(F.AudioError, match=r"^u: features contain NaN or infinite values "
                                           r"\(2 of 400; first at frame 3, bin 9: nan\)$"):
        F.check_finite_features(feats, "u")


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "4"], "--vocab-size must be at least 8, got 4"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--splits", "dev,test"], "--splits must include train"),
    (["--splits", "train,../dev"], "--splits: invalid split name '../dev'"),
    (["--splits", "train,dev,train"], "--splits names a split twice: train,dev,train"),
    (["--tgt-lang", "e n"], "--tgt-lang: invalid language code 'e n'"),
    (["--languages", "de,f r"], "--languages: invalid language code(s) ['f r']"),
    (["--languages", "de,fr,de"], "--languages names a language twice: de,fr,de"),
])
def test_prep_bad_flags_are_named(work, capsys, flags, message):
    corpus, out = work
    assert message in fails(corpus, out, capsys, *flags)


def test_prep_missing_corpus_or_unusable_out_is_named(work, tmp_path, capsys):
    err = fails(tmp_path / "nowhere", tmp_path / "out", capsys)
    assert f"--corpus {tmp_path}/nowhere: folder not found" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("not a folder")
    err = fails(work[0], tmp_path / "file", capsys)
    assert f"--out {tmp_path}/file: cannot create the output folder (File exists)" in err


def test_prep_bad_header_names_file(work, capsys):
    corpus, out = work
    set_line(corpus / "test.tsv", 1, b"id\taudio\tlang\ttgt_text")
    assert (f"{corpus}/test.tsv:1: missing required column(s) src_lang "
            "(header has: id, audio, lang, tgt_text;") in fails(corpus, out, capsys)
    (corpus / "dev.tsv").write_bytes(b"")
    assert f"{corpus}/dev.tsv: empty file" in fails(corpus, out, capsys)


# ------------------------------------------------------------------------------------ plans

MODULES = ["encoder.transformer_layers.0.ffn", "decoder.layers.1.ffn"]
LANGS = ["ar", "et", "ga", "sw"]


def good_plan(**changes) -> dict:
    d = Plan(modules=["decoder.layers.1.ffn"], groups=[["ar", "et"], ["ga", "sw"]], shared_ratio=0.5).to_dict()
    d.update(changes)
    if "groups" in changes:
        d.pop("language_to_group")
    return d


def plan_file(tmp_path, d, name="plan.json") -> Path:
    import json

    path = tmp_path / name
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


def resolve(task_languages, **flags):
    args = Namespace(**{"gdps_plan": None, "gdps_split_modules": None, "gdps_groups": None,
                        "gdps_shared_ratio": None, "gdps_route_languages": None, **flags})
    return resolve_split_spec(args, SimpleNamespace(languages=list(task_languages)))


def test_plan_module_the_model_lacks(tmp_path):
    path = plan_file(tmp_path, good_plan(modules=["decoder.layers.1.ffn", "decoder.layers.7.ffn"]))
    with pytest.raises(PlanError, match=rf"^{path}: the model has no module \['decoder\.layers\.7\.ffn'\] "
                                        r"named in the plan \(model modules: decoder\.layers\.1\.ffn, encoder"):
        Plan.load(path, model_module_names=MODULES)


def test_plan_module_the_model_lacks_when_the_model_is_built(tmp_path):
    from fairseq import models
    from fairseq.data import Dictionary

    d = Dictionary()
    task = SimpleNamespace(target_dictionary=d, source_dictionary=None, languages=LANGS)
    path = plan_file(tmp_path, good_plan(modules=["decoder.layers.7.ffn"]))
    args = Namespace(arch="s2t_transformer_gdps", encoder_layers=1, decoder_layers=2, encoder_embed_dim=16,
                     decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32,
                     encoder_attention_heads=2, decoder_attention_heads=2, conv_channels=8,
                     input_feat_per_channel=8, input_channels=1, max_source_positions=100,
                     max_target_positions=20, gdps_plan=str(path))
    with pytest.raises(ValueError, match=r"^--gdps-plan .*plan.*\.json: no unsplit FFN named 'decoder\.layers\.7\.ffn'; "
                                         r"the model has: "
                                         r"encoder\.transformer_layers\.0\.ffn, decoder\.layers\.0\.ffn, "
                                         r"decoder\.layers\.1\.ffn$"):
        models.build_model(args, task)


def test_plan_language_the_data_lacks_and_data_language_the_plan_lacks(tmp_path):
    path = plan_file(tmp_path, good_plan())
    with pytest.raises(PlanError, match=rf"^{path}: plan languages \['sw'\] are missing from the data "
                                        r"\(data languages: \['ar', 'et', 'ga'\]\)$"):
        resolve(["ar", "et", "ga"], gdps_plan=str(path))
    with pytest.raises(PlanError, match=rf"^{path}: languages \['xx'\] of the data are in no group of the plan"):
        resolve(LANGS + ["xx"], gdps_plan=str(path))
    spec = resolve(LANGS, gdps_plan=str(path))
    assert spec.groups == [["ar", "et"], ["ga", "sw"]] and spec.modules == ["decoder.layers.1.ffn"]
    assert spec.source == f"--gdps-plan {path}"  # for errors found later, when the model is split


@pytest.mark.parametrize("ratio", [1, 1.0, -0.25, -1e-12, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_plan_ratio_outside_unit_interval(tmp_path, ratio):
    path = plan_file(tmp_path, good_plan(shared_ratio=ratio))
    with pytest.raises(PlanError, match=rf"^{path}: (malformed plan: )?shared_ratio must "):
        Plan.load(path)


@pytest.mark.parametrize("groups, message", [
    ([["ar", "et"], ["et", "ga", "sw"]], r"language 'et' is in group 0 and in group 1: groups overlap"),
    ([["ar", "et", "ga", "sw"], []], r"groups must be non-empty lists of languages"),
    ([["ar", "et"], ["ga,sw"]], r"invalid language 'ga,sw' in groups"),
    ("ar,et;ga,sw", r"malformed plan: groups must be a list of lists of languages"),
    ([["ar", "et"], "ga"], r"malformed plan: groups must be a list of lists"),
])
def test_plan_groups_that_overlap_or_are_malformed(tmp_path, groups, message):
    path = plan_file(tmp_path, good_plan(groups=groups))
    with pytest.raises(PlanError, match=rf"^{path}: {message}"):
        Plan.load(path)


def test_plan_groups_that_do_not_cover_every_language(tmp_path):
    path = plan_file(tmp_path, good_plan(groups=[["ar", "et"], ["ga"]]))
    with pytest.raises(PlanError, match=rf"^{path}: languages \['sw'\] of the data are in no group"):
        resolve(LANGS, gdps_plan=str(path))


def test_plan_file_problems_name_the_file(tmp_path):
    with pytest.raises(PlanError, match=rf"^{tmp_path}/absent\.json: cannot read the plan"):
        Plan.load(tmp_path / "absent.json")
    (tmp_path / "latin1.json").write_bytes('{"modules": ["d\u00e9"]}'.encode("latin-1"))
    with pytest.raises(PlanError, match=r"latin1\.json: not UTF-8 text"):
        Plan.load(tmp_path / "latin1.json")
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(PlanError, match=r"deep\.json: JSON nested too deeply"):
        Plan.load(tmp_path / "deep.json")
    path = plan_file(tmp_path, good_plan(modules="decoder.layers.1.ffn"))  # a string, not a list
    with pytest.raises(PlanError, match=r"malformed plan: modules must be a list of module names"):
        Plan.load(path)
    path = plan_file(tmp_path, good_plan(version=True))
    with pytest.raises(PlanError, match=r"plan version True is not supported"):
        Plan.load(path)


def test_explicit_split_flags_are_named():
    with pytest.raises(ValueError, match=r"^--gdps-groups: a language appears in two groups: 'ar,et;et,ga,sw'$"):
        resolve(LANGS, gdps_split_modules="decoder.layers.1.ffn", gdps_groups="ar,et;et,ga,sw")
    with pytest.raises(ValueError, match=r"^languages \['sw'\] are in no group of --gdps-groups 'ar,et;ga'"):
        resolve(LANGS, gdps_split_modules="decoder.layers.1.ffn", gdps_groups="ar,et;ga")
    with pytest.raises(ValueError, match=r"^--gdps-split-modules names a module twice"):
        resolve(LANGS, gdps_split_modules="decoder.layers.1.ffn,decoder.layers.1.ffn", gdps_groups="ar,et;ga,sw")
    with pytest.raises(ValueError, match=r"^--gdps-shared-ratio must lie in \[0, 1\], got 1\.5$"):
        resolve(LANGS, gdps_split_modules="decoder.layers.1.ffn", gdps_groups="ar,et;ga,sw", gdps_shared_ratio=1.5)
    spec = resolve(LANGS, gdps_groups="ar,et;ga")  # nothing split: uncovered languages only warn
    assert spec.modules == [] and spec.languages == LANGS


def test_failed_plan_save_keeps_the_previous_plan(tmp_path):
    path = tmp_path / "plan.json"
    Plan.load(plan_file(tmp_path, good_plan())).save(path)
    before = path.read_bytes()
    broken = Plan.load(path)
    broken.provenance = {"stats": object()}  # not storable: fails while writing
    with pytest.raises(TypeError, match="cannot store object"):
        broken.save(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["plan.json"]
    invalid = Plan.load(path)
    invalid.shared_ratio = 1.0  # a plan that load would refuse is not written
    with pytest.raises(PlanError, match=r"shared_ratio must lie in \[0, 1\), got 1.0"):
        invalid.save(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["plan.json"]


# ------------------------------------------------------------------------------- statistics

SIZES = {"enc.0.fc1": 24, "enc.0.fc2": 24, "dec.1.fc1": 40}
STAT_LANGS = ["aa", "bb", "cc"]


def steps(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(t, {l: {m: torch.randn(d, generator=g) for m, d in SIZES.items()} for l in STAT_LANGS})
            for t in range(n)]


def record(steps_, **kw):
    st = GradientStatistics(SIZES, languages=STAT_LANGS, subspace_dim=3, aux_dim=16, sketch_dim=32, **kw)
    for t, grads in steps_:
        st.add_step(t, grads)
    return st


def rows_of(st, drop):
    """Every buffer restricted to the languages other than ``drop`` (on every language axis)."""
    keep = torch.tensor([i for i in range(len(st.languages)) if i != drop])
    out = {}
    for name, _, axes in st._specs():
        t = st.to_tensors()[name]
        for ax in axes:
            t = t.index_select(ax, keep)
        out[name] = t
    return out


@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_gradient_leaves_other_languages_bit_identical(tmp_path, bad_value):
    clean_steps = steps()
    poisoned = [(t, {l: {m: g.clone() for m, g in mods.items()} for l, mods in grads.items()})
                for t, grads in clean_steps]
    poisoned[2][1]["bb"]["dec.1.fc1"][5] = bad_value  # one element of one module of one language
    clean, st = record(clean_steps), GradientStatistics(SIZES, languages=STAT_LANGS, subspace_dim=3,
                                                        aux_dim=16, sketch_dim=32)
    for t, grads in poisoned:
        assert st.add_step(t, grads) == (["bb"] if t == 2 else [])
    assert st.skipped_nonfinite == {"aa": 0, "bb": 1, "cc": 0}
    assert st.num_steps == clean.num_steps == 5  # the others' share of that step is recorded
    assert st.counts()["bb"] == {m: 4 for m in SIZES}  # all of bb's modules left out of that step
    assert st.counts()["aa"] == st.counts()["cc"] == {m: 5 for m in SIZES}
    ours, theirs = rows_of(st, drop=1), rows_of(clean, drop=1)
    for name in ours:
        if name != "skipped":
            assert torch.equal(ours[name], theirs[name]), name  # bit for bit
    for t in st.to_tensors().values():
        assert torch.isfinite(t).all()
    # bb itself equals a clean run without that step
    without = record([(t, {l: g for l, g in grads.items() if not (t == 2 and l == "bb")})
                      for t, grads in clean_steps])
    for m in SIZES:
        torch.testing.assert_close(st.module_sums(m)["S"][1], without.module_sums(m)["S"][1], rtol=0, atol=0)
    # the counter is saved with the statistics and adds up on merge
    st.save(tmp_path / "s.pt")
    back = GradientStatistics.load(tmp_path / "s.pt")
    assert back.skipped_nonfinite == {"aa": 0, "bb": 1, "cc": 0}
    assert back.merge_(st).skipped_nonfinite == {"aa": 0, "bb": 2, "cc": 0}


def test_step_where_every_language_is_non_finite_is_not_counted():
    st = record(steps(2))
    bad = {l: {m: torch.full((d,), float("nan")) for m, d in SIZES.items()} for l in ("aa", "cc")}
    assert sorted(st.add_step(7, bad)) == ["aa", "cc"]
    assert st.num_steps == 2 and st.skipped_nonfinite == {"aa": 1, "bb": 0, "cc": 1}


def test_statistics_of_another_model_are_refused(tmp_path):
    st = record(steps(2), model_signature="enc.0.fc1:24;enc.0.fc2:24;dec.1.fc1:40")
    st.save(tmp_path / "s.pt")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/s\.pt: gradient statistics were recorded for model "
                                         r"signature 'enc\.0\.fc1:24;enc\.0\.fc2:24;dec\.1\.fc1:40', "
                                         r"expected 'dec\.1\.fc1:80'$"):
        GradientStatistics.load(tmp_path / "s.pt", expect_signature="dec.1.fc1:80")
    # resuming a probe (the criterion merges the checkpoint's statistics into its own)
    resumed = GradientStatistics.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True),
                                                 source=str(tmp_path / "ckpt.pt"))
    other = GradientStatistics(SIZES, languages=STAT_LANGS, subspace_dim=3, aux_dim=16, sketch_dim=32,
                               model_signature="another model")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ckpt\.pt: cannot merge statistics of different models "
                                         r"\(model signature 'enc\.0\.fc1:24;.*', expected 'another model'\)$"):
        other.merge_(resumed)
    smaller = GradientStatistics({"enc.0.fc1": 24}, languages=STAT_LANGS, subspace_dim=3, aux_dim=16,
                                 sketch_dim=32, model_signature=st.model_signature)
    with pytest.raises(ValueError, match=r"ckpt\.pt: cannot merge gradient statistics with different settings"):
        smaller.merge_(resumed)


def test_statistics_of_an_older_format_or_malformed_are_refused(tmp_path):
    d = record(steps(2)).state_dict()
    torch.save({**d, "format_version": 0}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/old\.pt: gradient statistics format version 0 is not "
                                         r"supported \(this code reads versions \(1, 2, 3, 4\)\); record them again"):
        GradientStatistics.load(tmp_path / "old.pt")
    torch.save({k: v for k, v in d.items() if k != "module_sizes"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt: gradient statistics lack \['module_sizes'\]"):
        GradientStatistics.load(tmp_path / "partial.pt")
    torch.save({**d, "module_sizes": [25, 24, 40]}, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match=r"shapes\.pt: malformed gradient statistics \(.*S/enc\.0\.fc1 has shape"):
        GradientStatistics.load(tmp_path / "shapes.pt")


def test_failed_statistics_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.pt"
    record(steps(2)).save(path)
    before = path.read_bytes()

    def dies_half_way(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        record(steps(3)).save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.pt"]
