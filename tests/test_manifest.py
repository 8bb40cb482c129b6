"""gdps-prep end to end on a tiny synthetic corpus: fbank zip + manifests read back
through fairseq's own readers, config.yaml through S2TDataConfig, determinism,
and errors that name the culprit."""
import csv
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from fairseq_gdps.cli.prep import main
from fairseq_gdps.data import features as F
from fairseq_gdps.data.manifest import MANIFEST_COLUMNS, read_manifest, resolve_audio_root

LANGS = ("de", "fr", "sw")
WORDS = "the cat sat on a mat dog ran far away house green blue red big small".split()
HEADER = "id\taudio\tduration\tspeaker\tsrc_lang\tsrc_text\ttgt_text\n"


def make_corpus(root: Path, n_train=12, n_dev=3, n_test=6, seed=0):
    rng = np.random.RandomState(seed)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        lines = [HEADER]
        for i in range(n):
            lang = LANGS[i % len(LANGS)]
            uid = f"{lang}_{split}_{i:03d}"
            ns = int(rng.uniform(0.2, 0.6) * 16000)
            t = np.arange(ns) / 16000
            x = 0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.randn(ns)
            sf.write(str(root / "wav" / f"{uid}.wav"), x, 16000, subtype="PCM_16")
            text = " ".join(rng.choice(WORDS, rng.randint(2, 7)))
            lines.append(f"{uid}\twav/{uid}.wav\t{ns / 16000:.3f}\tspk{i % 2}\t{lang}\tsrc \"{text}\"\t{text}\n")
        (root / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    return root


def run(corpus, out, *extra):
    return main(["--corpus", str(corpus), "--out", str(out), "--quiet", "--jobs", "2", *extra])


def read_input_tsv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def snapshot(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    corpus = make_corpus(base / "corpus")
    out = base / "data"
    assert run(corpus, out) == 0
    return corpus, out


def test_layout(prepared):
    corpus, out = prepared
    names = set(os.listdir(out))
    expected = {"fbank80.zip", "config.yaml", "prep.json", "spm_unigram256.model", "spm_unigram256.vocab",
                "spm_unigram256.txt"}
    for split in ("train", "dev", "test"):
        expected |= {f"{split}.tsv"} | {f"{split}_{lang}.tsv" for lang in LANGS}
    assert names == expected  # no temp files, no skipped.tsv without --skip-bad
    report = json.loads((out / "prep.json").read_text())
    assert report["counts"]["train"]["utterances"] == 12 and report["counts"]["test"]["utterances"] == 6
    assert report["languages"] == sorted(LANGS)
    assert sorted(report["files"]) == sorted(names)


def test_zip_round_trip_through_fairseq_reader(prepared, monkeypatch):
    from fairseq.data.audio.audio_utils import get_features_or_waveform, parse_path

    corpus, out = prepared
    with zipfile.ZipFile(out / "fbank80.zip") as zf:
        infos = zf.infolist()
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    # same offsets as fairseq's get_zip_manifest (header_offset + 30 + len(filename))
    fairseq_ptr = {Path(i.filename).stem: f"fbank80.zip:{i.header_offset + 30 + len(i.filename)}:{i.file_size}"
                   for i in infos}
    monkeypatch.chdir(out)  # manifest paths are relative to the data folder
    n_checked = 0
    for split in ("train", "dev", "test"):
        src = {r["id"]: r for r in read_input_tsv(corpus / f"{split}.tsv")}
        rows = read_manifest(out / f"{split}.tsv")
        assert [r["id"] for r in rows] == list(src)  # input order kept
        for r in rows:
            assert r["audio"] == fairseq_ptr[r["id"]]
            path, ptr = parse_path(r["audio"])
            assert path == "fbank80.zip" and len(ptr) == 2
            feats = get_features_or_waveform(r["audio"])
            ref = F.extract_file(str(corpus / src[r["id"]]["audio"]))
            assert feats.dtype == np.float32 and feats.shape[1] == 80
            assert np.array_equal(feats, ref)
            assert int(r["n_frames"]) == feats.shape[0] == F.num_frames(sf.info(str(corpus / src[r["id"]]["audio"])).frames)
            n_checked += 1
    assert n_checked == 21 == len(infos)


def test_manifest_columns_languages_and_partition(prepared):
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator as C

    corpus, out = prepared
    for split in ("train", "dev", "test"):
        samples = C._load_samples_from_tsv(str(out), split)  # fairseq's own TSV reader
        assert list(samples[0]) == list(MANIFEST_COLUMNS)
        src = {r["id"]: r for r in read_input_tsv(corpus / f"{split}.tsv")}
        for s in samples:
            assert s["src_lang"] == src[s["id"]]["src_lang"] and s["tgt_lang"] == "en"
            assert s["tgt_text"] == src[s["id"]]["tgt_text"]
            assert s["src_text"] == src[s["id"]]["src_text"]  # quotes survive QUOTE_NONE
            assert s["speaker"] == src[s["id"]]["speaker"]
        union = []
        for lang in LANGS:
            part = C._load_samples_from_tsv(str(out), f"{split}_{lang}")
            assert {s["src_lang"] for s in part} == {lang}
            union += part
        assert sorted(union, key=lambda s: s["id"]) == sorted(samples, key=lambda s: s["id"])
        assert len({s["id"] for s in union}) == len(samples)


def test_config_yaml_with_fairseq(prepared, tmp_path, monkeypatch):
    import sentencepiece as spm
    from argparse import Namespace

    from fairseq.data import Dictionary, encoders
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator

    corpus, out = prepared
    monkeypatch.chdir(tmp_path)  # resolve from elsewhere, as fairseq-train would
    cfg = S2TDataConfig(out / "config.yaml")
    assert cfg.input_feat_per_channel == 80 and cfg.input_channels == 1
    model = cfg.bpe_tokenizer["sentencepiece_model"]
    assert cfg.bpe_tokenizer["bpe"] == "sentencepiece"
    assert Path(model).is_file() and Path(model).parent == out
    dict_path = out / cfg.vocab_filename  # how the speech_to_text task finds it
    tgt_dict = Dictionary.load(str(dict_path))
    sp = spm.SentencePieceProcessor(model_file=model)
    assert len(tgt_dict) == sp.get_piece_size()  # 4 specials + dictionary lines
    lines = dict_path.read_text(encoding="utf-8").splitlines()
    assert all(line.endswith(" 1") for line in lines)
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & {line[:-2] for line in lines}
    report = json.loads((out / "prep.json").read_text())
    assert report["settings"]["vocab_size"] == sp.get_piece_size() < 256  # lowered for a tiny corpus
    assert any("too large" in w for w in report["warnings"])
    assert cfg.get_feature_transforms("train", True)["feature_transforms"] == ["utterance_cmvn"]

    bpe = encoders.build_bpe(Namespace(**cfg.bpe_tokenizer))
    ds = SpeechToTextDatasetCreator.from_tsv(
        str(out), cfg, "test_fr", tgt_dict, pre_tokenizer=None, bpe_tokenizer=bpe,
        is_train_split=False, epoch=1, seed=1,
    )
    item = ds[0]
    assert item.source.shape[1] == 80 and abs(float(item.source.mean())) < 1e-4  # utterance CMVN applied
    assert tgt_dict.unk() not in item.target.tolist()
    assert tgt_dict.string(item.target[:-1], "sentencepiece") == ds.tgt_texts[0]


def test_audio_root_resolution(tmp_path):
    """The folder the manifests' audio is read from: audio_root when it is a folder (empty: the
    manifests' paths as they stand), relative ones also under the data folder, else the data
    folder itself (a moved folder whose config.yaml names the old place)."""
    data = tmp_path / "data"
    (data / "feats").mkdir(parents=True)
    assert resolve_audio_root("", str(data)) == ""
    assert resolve_audio_root(str(tmp_path), str(data)) == str(tmp_path)
    assert resolve_audio_root("feats", str(data)) == str(data / "feats")
    assert resolve_audio_root(str(tmp_path / "old" / "data"), str(data)) == str(data)
    assert resolve_audio_root("nowhere", str(data)) == str(data)


def test_moved_data_folder(tmp_path, monkeypatch, capsys):
    """After moving a prepared folder, speech_to_text_gdps's config reads the features from the
    new place; stock fairseq reads them from config.yaml's audio_root as it stands, which
    --relocate points at the new place, leaving every other file and key as it was."""
    from fairseq.data import Dictionary
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator

    from fairseq_gdps.tasks.data_folder_config import DataFolderConfig

    corpus = make_corpus(tmp_path / "c", n_train=3, n_dev=1, n_test=3)
    old, data = tmp_path / "old" / "data", tmp_path / "moved"
    assert run(corpus, old, "--vocab-size", "20") == 0
    shutil.move(old, data)
    assert not old.exists()
    before = snapshot(data)
    monkeypatch.chdir(tmp_path / "c")  # resolve from elsewhere, as fairseq-train would

    def first_features(cfg):
        tgt_dict = Dictionary.load(str(data / cfg.vocab_filename))
        ds = SpeechToTextDatasetCreator.from_tsv(str(data), cfg, "test", tgt_dict, pre_tokenizer=None,
                                                 bpe_tokenizer=None, is_train_split=False, epoch=1, seed=1)
        return ds[0].source

    assert S2TDataConfig(data / "config.yaml").audio_root == str(old)
    with pytest.raises(FileNotFoundError, match=str(old)):
        first_features(S2TDataConfig(data / "config.yaml"))
    gdps_features = first_features(DataFolderConfig(data / "config.yaml"))
    assert gdps_features.shape[1] == 80

    assert main(["--out", str(data), "--relocate"]) == 0
    assert f"audio_root is now {data}" in capsys.readouterr().err
    after = snapshot(data)
    assert {n for n in before if before[n] != after[n]} == {"config.yaml"}
    assert yaml.safe_load(after["config.yaml"]) == {**yaml.safe_load(before["config.yaml"]), "audio_root": str(data)}
    assert (data / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert torch.equal(first_features(S2TDataConfig(data / "config.yaml")), gdps_features)
    assert main(["--out", str(data), "--relocate"]) == 0  # the folder is found: nothing to change
    assert "unchanged" in capsys.readouterr().err and snapshot(data) == after


def test_relocate_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--relocate", "--corpus", str(tmp_path)])
    assert "--relocate takes only --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
    assert "required: --corpus" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--relocate"]) == 1
    assert f"{tmp_path / 'config.yaml'}: cannot read" in capsys.readouterr().err


def test_specaugment_option(tmp_path):
    from fairseq.data.audio.data_cfg import S2TDataConfig

    corpus = make_corpus(tmp_path / "c", n_train=3, n_dev=1, n_test=3)
    assert run(corpus, tmp_path / "d", "--specaugment", "lb", "--vocab-size", "20") == 0
    cfg = S2TDataConfig(tmp_path / "d" / "config.yaml")
    tr = cfg.get_feature_transforms("train", True)
    assert tr["feature_transforms"] == ["utterance_cmvn", "specaugment"]
    assert tr["specaugment"]["time_warp_W"] == 0 and tr["specaugment"]["freq_mask_F"] == 27
    assert cfg.get_feature_transforms("test", False)["feature_transforms"] == ["utterance_cmvn"]


def test_deterministic_and_independent_of_jobs(prepared, tmp_path):
    corpus, out = prepared
    first = snapshot(out)
    assert run(corpus, out) == 0  # again, same folder
    assert snapshot(out) == first
    other = tmp_path / "other"
    assert main(["--corpus", str(corpus), "--out", str(other), "--quiet", "--jobs", "1"]) == 0
    second = snapshot(other)
    assert set(second) == set(first)
    for name in first:
        if name in ("config.yaml", "prep.json"):  # audio_root is the absolute output folder
            a = first[name].replace(str(out).encode(), b"ROOT")
            b = second[name].replace(str(other).encode(), b"ROOT")
            assert a == b
        else:
            assert first[name] == second[name], name


# ---------------------------------------------------------------- errors


@pytest.fixture
def small(tmp_path):
    return make_corpus(tmp_path / "c", n_train=4, n_dev=1, n_test=3)


def _edit_line(tsv: Path, lineno: int, fn):
    lines = tsv.read_bytes().split(b"\n")
    lines[lineno - 1] = fn(lines[lineno - 1])
    tsv.write_bytes(b"\n".join(lines))


def _fails(corpus, out, capsys, *extra):
    assert run(corpus, out, *extra) == 1
    return capsys.readouterr().err


def test_missing_column(small, tmp_path, capsys):
    tsv = small / "dev.tsv"
    tsv.write_text(tsv.read_text().replace("tgt_text", "translation"))
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/dev.tsv:1: missing required column(s) tgt_text" in err


def test_missing_audio_names_tsv_line_and_file(small, tmp_path, capsys):
    os.remove(small / "wav" / "fr_train_001.wav")
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/train.tsv:3: {small}/wav/fr_train_001.wav: audio file not found" in err


def test_wrong_sample_rate_and_channels(small, tmp_path, capsys):
    sf.write(str(small / "wav" / "sw_test_002.wav"), np.zeros(8000), 8000)
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/test.tsv:4: {small}/wav/sw_test_002.wav: sample rate 8000 Hz" in err
    sf.write(str(small / "wav" / "sw_test_002.wav"), np.zeros((8000, 2)), 16000)
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/wav/sw_test_002.wav: 2 channels" in err


def test_empty_and_truncated_audio(small, tmp_path, capsys):
    (small / "wav" / "de_train_000.wav").write_bytes(b"")
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/train.tsv:2: {small}/wav/de_train_000.wav: empty file" in err
    make_corpus(small, n_train=4, n_dev=1, n_test=3)
    p = small / "wav" / "de_test_000.wav"
    p.write_bytes(p.read_bytes()[:-1000])
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/wav/de_test_000.wav: truncated" in err


def test_non_utf8_and_bad_lines(small, tmp_path, capsys):
    _edit_line(small / "train.tsv", 4, lambda b: b.replace(b"\tspk", b"\tsp\xffk"))
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/train.tsv:4: not valid UTF-8" in err
    make_corpus(small, n_train=4, n_dev=1, n_test=3)
    _edit_line(small / "dev.tsv", 2, lambda b: b + b"\textra")
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/dev.tsv:2: 8 fields, header has 7" in err


def test_duplicate_id_across_splits(small, tmp_path, capsys):
    _edit_line(small / "test.tsv", 2, lambda b: b.replace(b"de_test_000\t", b"de_train_000\t", 1))
    err = _fails(small, tmp_path / "o", capsys)
    assert f"{small}/test.tsv:2: duplicate id 'de_train_000' (first at {small}/train.tsv:2)" in err


def test_nan_features_named(small, tmp_path, capsys, monkeypatch):
    real = F.compute_fbank

    def poisoned(wav, *a, **k):
        out = real(wav, *a, **k)
        out[0, 0] = np.nan
        return out

    monkeypatch.setattr(F, "compute_fbank", poisoned)
    err = _fails(small, tmp_path / "o", capsys, "--jobs", "1")
    assert "features contain NaN or infinite values" in err and f"{small}/wav/" in err


def test_failure_leaves_previous_output_intact(small, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(small, out) == 0
    before = snapshot(out)
    sf.write(str(small / "wav" / "fr_train_001.wav"), np.zeros(8000), 22050)
    assert run(small, out) == 1
    assert "fr_train_001.wav: sample rate 22050 Hz" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temp files left behind


def test_skip_bad_writes_skipped_tsv(small, tmp_path):
    os.remove(small / "wav" / "fr_train_001.wav")
    sf.write(str(small / "wav" / "sw_test_002.wav"), np.zeros(8000), 8000)
    _edit_line(small / "dev.tsv", 2, lambda b: b.replace(b"\tde\t", b"\t\t"))  # empty src_lang
    out = tmp_path / "o"
    assert run(small, out, "--skip-bad") == 0
    with open(out / "skipped.tsv", encoding="utf-8") as f:
        skipped = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    got = {(Path(r["file"]).name, int(r["line"])) for r in skipped}
    assert got == {("train.tsv", 3), ("test.tsv", 4), ("dev.tsv", 2)}
    assert any("sample rate 8000" in r["reason"] and "sw_test_002.wav" in r["reason"] for r in skipped)
    train_ids = [r["id"] for r in read_manifest(out / "train.tsv")]
    test_ids = [r["id"] for r in read_manifest(out / "test.tsv")]
    assert "fr_train_001" not in train_ids and len(train_ids) == 3
    assert "sw_test_002" not in test_ids and len(test_ids) == 2
    assert read_manifest(out / "dev.tsv") == []
    assert not (out / "test_sw.tsv").exists()  # its only utterance was skipped
    report = json.loads((out / "prep.json").read_text())
    assert report["skipped"] == 3 and report["counts"]["test"]["skipped"] == 1
    with zipfile.ZipFile(out / "fbank80.zip") as zf:
        assert len(zf.infolist()) == 5

    # a clean re-run drops outputs that no longer apply (skipped.tsv, stale manifests)
    make_corpus(small, n_train=4, n_dev=1, n_test=3)
    (out / "test_sw.tsv").write_text("")  # pretend stale; it is produced again
    assert run(small, out) == 0
    assert not (out / "skipped.tsv").exists()
    assert len(read_manifest(out / "test_sw.tsv")) == 1


def test_out_must_differ_from_corpus(small, capsys):
    err = _fails(small, small, capsys)
    assert "output folder must differ" in err
    assert (small / "train.tsv").read_text().startswith("id\taudio\tduration")
