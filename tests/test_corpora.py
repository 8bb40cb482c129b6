"""gdps-prep-corpus on small folders that mimic each release's layout (synthesised tones, a few
seconds): cut segment lengths and samples, resampling/mix-down, in-place references, TSV rows and
language codes, the path through gdps-prep into manifests, and errors that name file and line."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from fairseq_gdps.cli import prep as gdps_prep
from fairseq_gdps.cli.prep_corpus import main
from fairseq_gdps.data import features as F
from fairseq_gdps.data.manifest import read_manifest

SR = 16000


def tone(seconds, sr, freq, seed=0, channels=1):
    rng = np.random.RandomState(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.randn(len(t))
    if channels == 1:
        return x
    return np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)  # louder per channel


def write_audio(path, x, sr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr, subtype="PCM_16", **kw)
    return sf.read(str(path), dtype="float32", always_2d=True)[0]  # what the preparer reads back


def rows_of(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def peak_hz(x, sr=SR):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


def run_ok(*argv):
    assert main([*map(str, argv), "--quiet"]) == 0


def run_err(capsys, *argv):
    assert main([*map(str, argv), "--quiet"]) == 1
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- fixtures

TUN_FILES = {  # file id -> (split list, tone Hz, [(start, end, english, has transcript)])
    "20170601_110003_13355_A": ("train", 300, [(0.5, 1.75, "Hello, (my) Friend!", True),
                                               (2.0, 3.125, "How are you?", True),
                                               (4.0, 5.5, "Fine; thanks.", False)]),
    "20170601_110003_13355_B": ("train", 500, [(0.25, 1.5, "Yes: \"indeed\"", True),
                                               (3.0, 4.0, "excluded one", True)]),
    "20170604_215447_13632_A": ("dev", 700, [(1.0, 2.5, "See you.", True)]),
    "20171112_221142_18581_A": ("test1", 900, [(0.0, 1.25, "Good night.", True),
                                               (2.5, 6.0, "Until the end.", True)]),
}


def make_tunisian(root):
    ldc, splits = root / "LDC2022E01", root / "iwslt22-dialect"
    splits.mkdir(parents=True)
    lists = {"train": [], "dev": [], "test1": []}
    signals = {}
    for i, (fid, (split, hz, segs)) in enumerate(TUN_FILES.items()):
        lists[split].append(fid)
        signals[fid] = write_audio(ldc / "data/audio/ta" / f"{fid}.sph", tone(6.0, 8000, hz, seed=i), 8000,
                                   format="NIST")
        tl = "".join(f"{s:.3f}\t{e:.3f}\tspk{i}\t{en}\n" for s, e, en, _ in segs)
        tr = "".join(f"{s:.3f}\t{e:.3f}\tspk{i}\tU/كلام عربي؟ {k}\n" for k, (s, e, _, has) in enumerate(segs) if has)
        (ldc / "data/translations/ta").mkdir(parents=True, exist_ok=True)
        (ldc / "data/transcripts/ta").mkdir(parents=True, exist_ok=True)
        (ldc / "data/translations/ta" / f"{fid}.tsv").write_text(tl, encoding="utf-8")
        (ldc / "data/transcripts/ta" / f"{fid}.tsv").write_text(tr, encoding="utf-8")
    for name, ids in lists.items():
        (splits / f"{name}.file_id.txt").write_text("".join(f"{x}\n" for x in ids))
    (splits / "exclude-utterance.txt").write_text("20170601_110003_13355_B 3.000 4.000\n")
    return ldc, splits, signals


def make_bigc(root):
    bem = root / "bigc/data/bem"
    header = "pair_id\timage\tsentence_id\timage_id\taudio_id\tsentence\ttranslation\tspeaker_id\tgender\tduration\n"
    lines, n = {"train": [], "test": []}, 0
    for split, count in (("train", 4), ("test", 2)):
        for i in range(count):
            aid = f"{10 + n}_22{n}_1_102_02_211104-2112{n:02d}_bem_574_elicit_0.wav"
            write_audio(bem / "audio" / aid, tone(1.0 + 0.25 * i, SR, 200 + 50 * n, seed=n), SR)
            tgt = f'"a ""quoted"" dog {n}"' if n == 1 else f"a dog runs {n}"  # pandas-style quoting
            lines[split].append(f"{n}\t{n}\t1\t{n}.jpg\t{aid}\timbwa {n}\t{tgt}\t{100 + n}\tmale\t1.0\n")
            n += 1
    (bem / "splits").mkdir(parents=True)
    for split, ls in lines.items():
        (bem / "splits" / f"{split}.tsv").write_text(header + "".join(ls), encoding="utf-8")
    # dev only as JSONL; one file stored with the double extension of early snapshots, one stereo 22.05 kHz
    dev = []
    for i, (aid, sr, ch) in enumerate((("9_1_01_x_bem_dd_elicit_0.wav", SR, 1), ("9_2_01_x_bem_dd_elicit_1.wav", 22050, 2))):
        on_disk = aid + ".wav" if i == 0 else aid
        write_audio(bem / "audio" / on_disk, tone(1.5, sr, 440, seed=9 + i, channels=ch), sr)
        dev.append(json.dumps({"audio_id": aid, "speaker_id": 7, "bem_transcription": f"ici {i}",
                               "en_translation": f"this {i}", "duration": 1.5}) + "\n")
    (bem / "splits/valid.jsonl").write_text("".join(dev), encoding="utf-8")
    return bem


def make_irish(root):
    data = root / "ga-eng-iwslt2023/data"
    layout = {"train": ("train.eng", 3), "dev": ("dev.eng", 2), "test-2023": ("test.eng", 2), "test-2024": (None, 2)}
    for d, (eng, count) in layout.items():
        stamps, texts = [], []
        for i in range(count):
            name = f"iwslt2023_ga-eng_{d}_{i:03d}.wav"
            x = write_audio(data / d / "wav" / name, tone(1.857 + 0.1 * i, SR, 330, seed=i), SR)
            stamps.append(f"wav/{name}\t0\t{round(len(x) / SR + 0.004, 2)}\n")  # rounded up past the end
            texts.append(f"irish sentence {d} {i}\n")
        (data / d / "stamped.tsv").write_text("".join(stamps))
        if eng:
            (data / d / "txt").mkdir()
            (data / d / "txt" / eng).write_text("".join(texts), encoding="utf-8")
    return data.parent


def make_estonian(root, with_test=True):
    est = root / "iwslt2025_est2eng_data"
    for split, count in (("train", 3), ("dev", 2)) + ((("test", 2),) if with_test else ()):
        lines = ["audio\tEstonian\tEnglish\n"]
        for i in range(count):
            rec = f"saade_{split}"
            rel = f"{rec}/{rec}_{i:04d}_{i * 2:.3f}_{i * 2 + 1.2:.3f}.flac"
            write_audio(est / "audio" / rel, tone(1.2, SR, 600, seed=i), SR, format="FLAC")
            lines.append(f"{rel}\tTere {i}, \"sõber\"\tHello {i}, \"friend\"\n")
        (est / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
    return est


# ----------------------------------------------------------------------------- layouts


def test_tunisian_cuts_resamples_and_normalises(tmp_path):
    ldc, splits, signals = make_tunisian(tmp_path)
    out = tmp_path / "aeb"
    run_ok("tunisian", "--root", ldc, "--splits", splits, "--out", out)
    rows = {s: rows_of(out / f"{s}.tsv") for s in ("train", "dev", "test")}
    assert [len(rows[s]) for s in ("train", "dev", "test")] == [4, 1, 2]  # one excluded
    train = {r["id"]: r for r in rows["train"]}
    first = train["aeb_20170601_110003_13355_A_00000500"]
    assert first["tgt_text"] == "hello my friend" and first["src_lang"] == "aeb" and first["tgt_lang"] == "en"
    assert first["src_text"] == "كلام عربي 0"  # U/ tag and Arabic question mark dropped
    assert train["aeb_20170601_110003_13355_A_00004000"]["src_text"] == ""  # translated, never transcribed
    assert train["aeb_20170601_110003_13355_B_00000250"]["tgt_text"] == "yes indeed"
    assert "aeb_20170601_110003_13355_B_00003000" not in train
    assert first["speaker"] == "spk0"
    for split, fid_rows in rows.items():
        for r in fid_rows:
            fid = r["id"][4:-9]
            start, end = next((s, e) for s, e, *_ in TUN_FILES[fid][2] if r["id"].endswith(f"{int(s * 1000):08d}"))
            wav, sr = sf.read(str(out / r["audio"]), dtype="float32")
            assert sr == SR and wav.ndim == 1 and r["audio"].startswith(f"wav/{split}/")
            assert len(wav) == round(end * SR) - round(start * SR)
            assert float(r["duration"]) == pytest.approx(len(wav) / SR, abs=1e-6)
            expected = resample_poly(signals[fid][:, 0], 2, 1)[round(start * SR):round(end * SR)]
            assert np.max(np.abs(wav - expected)) <= 1.5 / 32768  # 16-bit rounding only
            assert peak_hz(wav) == pytest.approx(TUN_FILES[fid][1], abs=2)
    report = json.loads((out / "prep_corpus.json").read_text())
    assert report["counts"]["train"]["written_wavs"] == 4 and report["skipped"] == 0
    assert any("exclude-utterance" in w for w in report["warnings"])
    # two worker processes: same TSVs, same wav bytes
    run_ok("tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "jobs2", "--jobs", "2")
    for name in ("train.tsv", "dev.tsv", "test.tsv", rows["test"][1]["audio"]):
        assert (tmp_path / "jobs2" / name).read_bytes() == (out / name).read_bytes()
    # raw text on request
    run_ok("tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "raw", "--no-normalize")
    assert rows_of(tmp_path / "raw/train.tsv")[0]["tgt_text"] == "Hello, (my) Friend!"


def test_bemba_in_place_jsonl_quoting_and_resampling(tmp_path):
    bem = make_bigc(tmp_path)
    out = tmp_path / "bem"
    run_ok("bemba", "--root", bem, "--out", out)
    train, dev, test = (rows_of(out / f"{s}.tsv") for s in ("train", "dev", "test"))
    assert len(train) == 4 and len(test) == 2 and len(dev) == 2
    assert {r["src_lang"] for r in train + dev + test} == {"bem"}
    assert train[1]["tgt_text"] == 'a "quoted" dog 1' and train[0]["src_text"] == "imbwa 0"
    assert train[0]["id"] == "bem_10_220_1_102_02_211104-211200_bem_574_elicit_0" and train[0]["speaker"] == "100"
    # 16 kHz mono utterances are referenced where they are, nothing copied
    for r in train + test:
        assert os.path.isabs(r["audio"]) and Path(r["audio"]).parent == bem / "audio"
    assert dev[0]["audio"].endswith("elicit_0.wav.wav") and dev[0]["speaker"] == "7"
    assert dev[0]["tgt_text"] == "this 0" and dev[0]["src_text"] == "ici 0"
    # the 22.05 kHz stereo one is mixed down and resampled into OUT/wav
    assert dev[1]["audio"] == "wav/dev/bem_9_2_01_x_bem_dd_elicit_1.wav"
    wav, sr = sf.read(str(out / dev[1]["audio"]), dtype="float32")
    src, _ = sf.read(str(bem / "audio/9_2_01_x_bem_dd_elicit_1.wav"), dtype="float32")
    assert sr == SR and wav.ndim == 1 and len(wav) == round(len(src) * SR / 22050)
    expected = resample_poly(src.mean(axis=1), 320, 441)
    assert np.max(np.abs(wav - expected)) <= 1.5 / 32768
    assert peak_hz(wav) == pytest.approx(440, abs=2)
    # --copy-audio writes every utterance
    run_ok("bemba", "--root", bem, "--out", tmp_path / "copied", "--copy-audio")
    copied = rows_of(tmp_path / "copied/train.tsv")
    assert all(r["audio"].startswith("wav/train/") for r in copied)
    a, _ = sf.read(str(tmp_path / "copied" / copied[0]["audio"]), dtype="float32")
    b, _ = sf.read(train[0]["audio"], dtype="float32")
    assert np.array_equal(a, b)


def test_irish_stamped_layout(tmp_path):
    root = make_irish(tmp_path)
    out = tmp_path / "ga"
    run_ok("irish", "--root", root, "--out", out)
    train, dev, test = (rows_of(out / f"{s}.tsv") for s in ("train", "dev", "test"))
    assert [len(train), len(dev), len(test)] == [3, 2, 2]
    assert test[0]["tgt_text"] == "irish sentence test-2023 0"  # test-2024 has no translations
    assert train[2]["id"] == "ga_iwslt2023_ga-eng_train_002" and train[2]["src_lang"] == "ga"
    for r in train:  # end times rounded past the file's end are clipped, the file used in place
        assert os.path.isabs(r["audio"])
        assert float(r["duration"]) == pytest.approx(sf.info(r["audio"]).frames / SR, abs=1e-6)
    # a segment inside a wav is cut; two segments of one wav get time-stamped ids
    d = root / "data/train"
    (d / "stamped.tsv").write_text("wav/iwslt2023_ga-eng_train_000.wav\t0.25\t1.0\n"
                                   "wav/iwslt2023_ga-eng_train_000.wav\t1.0\t1.5\n"
                                   "wav/iwslt2023_ga-eng_train_001.wav\t0\t1.96\n")
    run_ok("irish", "--root", root, "--out", tmp_path / "ga2")
    rows = rows_of(tmp_path / "ga2/train.tsv")
    assert [r["id"] for r in rows[:2]] == ["ga_iwslt2023_ga-eng_train_000_00000250", "ga_iwslt2023_ga-eng_train_000_00001000"]
    wav, _ = sf.read(str(tmp_path / "ga2" / rows[0]["audio"]), dtype="float32")
    src, _ = sf.read(str(d / "wav/iwslt2023_ga-eng_train_000.wav"), dtype="float32")
    assert np.array_equal(wav, src[4000:16000])  # 16-bit in, 16-bit out: exact


def test_estonian_flac_in_place(tmp_path):
    est = make_estonian(tmp_path, with_test=False)
    out = tmp_path / "et"
    run_ok("estonian", "--root", est, "--out", out)
    assert not (out / "test.tsv").exists()
    train = rows_of(out / "train.tsv")
    assert [r["id"] for r in train] == [f"et_saade_train_{i:04d}_{i * 2:.3f}_{i * 2 + 1.2:.3f}" for i in range(3)]
    assert train[0]["tgt_text"] == 'Hello 0, "friend"' and train[0]["src_text"] == 'Tere 0, "sõber"'
    assert train[0]["audio"].endswith(".flac") and os.path.isabs(train[0]["audio"])
    report = json.loads((out / "prep_corpus.json").read_text())
    assert any("test.tsv: not found" in w for w in report["warnings"])


def test_generic_tsv_with_times_and_kaldi_folder(tmp_path):
    rec = write_audio(tmp_path / "rec/long.wav", tone(4.0, 8000, 250), 8000)[:, 0]
    (tmp_path / "t.tsv").write_text("path\tbegin\tfinish\ten\tspk\n"
                                    "rec/long.wav\t0.5\t1.5\tone\ta\n"
                                    "rec/long.wav\t2\t3.75\ttwo\tb\n")
    run_ok("tsv", "--train", tmp_path / "t.tsv", "--lang", "xx", "--audio-col", "path", "--tgt-col", "en",
           "--start-col", "begin", "--end-col", "finish", "--speaker-col", "spk", "--out", tmp_path / "o1")
    rows = rows_of(tmp_path / "o1/train.tsv")
    assert [r["id"] for r in rows] == ["xx_long_00000500", "xx_long_00002000"] and rows[1]["speaker"] == "b"
    wav, _ = sf.read(str(tmp_path / "o1" / rows[1]["audio"]), dtype="float32")
    assert len(wav) == 28000
    assert np.max(np.abs(wav - resample_poly(rec, 2, 1)[32000:60000])) <= 1.5 / 32768

    k = tmp_path / "kaldi/train"
    k.mkdir(parents=True)
    (k / "wav.scp").write_text(f"recA {tmp_path / 'rec/long.wav'}\n")
    (k / "segments").write_text("u1 recA 0.0 1.0\nu2 recA 3.0 -1\n")
    (k / "text").write_text("u1 kala\nu2 koer\n")
    (k / "utt2spk").write_text("u1 s1\nu2 s2\n")
    (k / "text.tc.en").write_text("u1 a fish\nu2 a dog\n")
    run_ok("kaldi", "--train", k, "--lang", "yy", "--translations", "text.tc.en", "--out", tmp_path / "o2")
    rows = rows_of(tmp_path / "o2/train.tsv")
    assert [(r["id"], r["tgt_text"], r["src_text"], r["speaker"]) for r in rows] == [
        ("yy_u1", "a fish", "kala", "s1"), ("yy_u2", "a dog", "koer", "s2")]
    assert float(rows[1]["duration"]) == pytest.approx(1.0)  # end -1: to the end of the recording


def test_four_corpora_merged_through_gdps_prep(tmp_path):
    ldc, splits, _ = make_tunisian(tmp_path)
    sources = {
        "aeb": ["tunisian", "--root", ldc, "--splits", splits],
        "bem": ["bemba", "--root", make_bigc(tmp_path)],
        "ga": ["irish", "--root", make_irish(tmp_path)],
        "et": ["estonian", "--root", make_estonian(tmp_path)],
    }
    for lang, argv in sources.items():
        run_ok(*argv, "--out", tmp_path / "corpus" / lang)
    run_ok("merge", *(tmp_path / "corpus" / lang for lang in sources), "--out", tmp_path / "corpus/all")
    data = tmp_path / "data"
    assert gdps_prep.main(["--corpus", str(tmp_path / "corpus/all"), "--out", str(data), "--quiet",
                           "--jobs", "1", "--vocab-size", "64"]) == 0
    report = json.loads((data / "prep.json").read_text())
    assert report["languages"] == ["aeb", "bem", "et", "ga"] and report["skipped"] == 0
    assert report["counts"]["train"]["per_lang"] == {"aeb": 4, "bem": 4, "et": 3, "ga": 3}
    merged = {r["id"]: r for s in ("train", "dev", "test") for r in rows_of(tmp_path / f"corpus/all/{s}.tsv")}
    for lang in sources:
        manifest = read_manifest(str(data / f"test_{lang}.tsv"))
        assert manifest and {m["src_lang"] for m in manifest} == {lang}
        for m in manifest:
            assert m["tgt_lang"] == "en" and m["tgt_text"] == merged[m["id"]]["tgt_text"]
            samples = round(float(merged[m["id"]]["duration"]) * SR)
            assert int(m["n_frames"]) == F.num_frames(samples)


def test_run_iwslt4_help_and_dry_run(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "examples/speech_to_text_gdps/run_iwslt4.sh"
    help_ = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "--aeb-splits" in help_.stdout and "UNTESTED" in help_.stdout
    missing = subprocess.run(["bash", str(script), "--aeb", "x"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "missing --aeb-splits --bem --ga --et" in missing.stderr
    dry = subprocess.run(["bash", str(script), "--aeb", "A", "--aeb-splits", "S", "--bem", "B", "--ga", "G",
                          "--et", "E", "--work", str(tmp_path / "w"), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    steps = [line for line in dry.stdout.splitlines() if line.startswith("+ ")]
    assert [s.split()[1:3] for s in steps[:6]] == [
        ["gdps-prep-corpus", "tunisian"], ["gdps-prep-corpus", "bemba"], ["gdps-prep-corpus", "irish"],
        ["gdps-prep-corpus", "estonian"], ["gdps-prep-corpus", "merge"], ["gdps-prep", "--corpus"]]
    assert "run_baseline.sh" in steps[6] and "--arch s2t_transformer_m" in steps[6]
    assert "run_gdps.sh" in steps[7] and "--arch s2t_transformer_gdps_m" in steps[7]
    assert f"--baseline-decode-dir {tmp_path / 'w'}/baseline/decode" in steps[7]
    assert not (tmp_path / "w").exists()  # a dry run runs nothing


# ----------------------------------------------------------------------------- errors


def test_bad_times_name_file_and_line(tmp_path, capsys):
    ldc, splits, _ = make_tunisian(tmp_path)
    tl = ldc / "data/translations/ta/20170601_110003_13355_A.tsv"
    lines = tl.read_text().splitlines(keepends=True)
    tl.write_text(lines[0] + "2.500\t2.500\tspk0\tzero length\n" + "".join(lines[2:]))
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert f"{tl}:2: end time 2.5 s is not after start time 2.5 s" in err and "--skip-bad" in err
    tl.write_text(lines[0] + "5.0\t6.3\tspk0\ttoo long\n" + "".join(lines[2:]))
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert f"{tl}:2: end time 6.3 s is past the end of" in err and "(6.000 s; tolerance 0.05 s)" in err
    tl.write_text(lines[0] + "1.0\tx\tspk0\tbad number\n")
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert f"{tl}:2: end time 'x' is not a number" in err
    # --skip-bad: the run goes on and lists what it skipped
    tl.write_text(lines[0] + "2.500\t2.000\tspk0\tbackwards\n" + "".join(lines[2:]))
    run_ok("tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o", "--skip-bad")
    skipped = rows_of(tmp_path / "o/skipped.tsv")
    assert [(s["file"], s["line"]) for s in skipped] == [(str(tl), "2")]
    assert len(rows_of(tmp_path / "o/train.tsv")) == 3


def test_missing_files_and_unknown_ids(tmp_path, capsys):
    ldc, splits, _ = make_tunisian(tmp_path)
    (splits / "dev.file_id.txt").write_text("20170604_215447_13632_A\nno_such_call_A\n")
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert f"{splits / 'dev.file_id.txt'}:2: unknown file id no_such_call_A" in err
    (splits / "dev.file_id.txt").write_text("20170604_215447_13632_A\n")
    (ldc / "data/audio/ta/20170604_215447_13632_A.sph").unlink()
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert "20170604_215447_13632_A.tsv:1: " in err and "20170604_215447_13632_A.sph: audio file not found" in err
    assert "no train.file_id.txt" not in err
    (splits / "train.file_id.txt").unlink()
    err = run_err(capsys, "tunisian", "--root", ldc, "--splits", splits, "--out", tmp_path / "o")
    assert "train.file_id.txt: not found" in err

    est = make_estonian(tmp_path, with_test=False)
    (est / "audio/saade_dev/saade_dev_0001_2.000_3.200.flac").unlink()
    err = run_err(capsys, "estonian", "--root", est, "--out", tmp_path / "e")
    assert f"{est / 'dev.tsv'}:3: " in err and "saade_dev_0001_2.000_3.200.flac: audio file not found" in err

    k = tmp_path / "kaldi"
    k.mkdir()
    write_audio(tmp_path / "r.wav", tone(2.0, SR, 300), SR)
    (k / "wav.scp").write_text(f"r1 {tmp_path / 'r.wav'}\n")
    (k / "segments").write_text("u1 r1 0 1\nu2 r9 0 1\n")
    (k / "text.en").write_text("u1 one\nu3 three\n")
    err = run_err(capsys, "kaldi", "--train", k, "--lang", "xx", "--out", tmp_path / "o3")
    assert f"{k / 'segments'}:2: unknown recording id r9" in err and "(and 1 more problem)" in err
    (k / "segments").write_text("u1 r1 0 1\n")
    err = run_err(capsys, "kaldi", "--train", k, "--lang", "xx", "--out", tmp_path / "o3")
    assert f"{k / 'text.en'}:2: unknown utterance id u3" in err
    (k / "text.en").write_text("u1 one\n")
    (k / "wav.scp").write_text("r1 sph2pipe -f wav r.sph |\n")
    err = run_err(capsys, "kaldi", "--train", k, "--lang", "xx", "--out", tmp_path / "o3")
    assert f"{k / 'wav.scp'}:1: recording r1: pipe commands are not supported" in err
    assert "more problem" not in err  # its segment and translation are not reported again


def test_layout_mismatches_and_merge_conflicts(tmp_path, capsys):
    root = make_irish(tmp_path)
    eng = root / "data/dev/txt/dev.eng"
    eng.write_text("only one line\n")
    err = run_err(capsys, "irish", "--root", root, "--out", tmp_path / "o")
    assert f"{eng}: 1 lines, but {root / 'data/dev/stamped.tsv'} has 2 segments" in err
    bem = make_bigc(tmp_path)
    (bem / "splits/train.tsv").write_text("audio_id\tsentence\n x.wav\tabc\n")
    err = run_err(capsys, "bemba", "--root", bem, "--out", tmp_path / "b")
    assert f"{bem / 'splits/train.tsv'}:1: missing column(s) translation" in err
    # two corpora that share an id cannot be merged
    est = make_estonian(tmp_path, with_test=False)
    err = run_err(capsys, "estonian", "--root", est, "--out", est)  # would overwrite the release's train.tsv
    assert f"would overwrite the release's own {est / 'train.tsv'}" in err
    assert (est / "train.tsv").read_text().startswith("audio\tEstonian\tEnglish\n")
    run_ok("estonian", "--root", est, "--out", tmp_path / "e1")
    run_ok("estonian", "--root", est, "--out", tmp_path / "e2")
    err = run_err(capsys, "merge", tmp_path / "e1", tmp_path / "e2", "--out", tmp_path / "m")
    assert f"{tmp_path / 'e2/train.tsv'}:2: duplicate utterance id 'et_saade_train_0000_0.000_1.200'" in err
    assert f"first at {tmp_path / 'e1/train.tsv'}:2" in err
