"""The demo's run fingerprint (what results.md records so that two runs can be compared): hashes
that follow the content, not the folder; versions; compute settings."""
import json

from fairseq_gdps.data import fingerprint as F


def make_run(root, audio=b"RIFF0000", tsv_row="u1\twav/ar/u1.wav\t1.0\ts\tar\tx\ty\n"):
    corpus, data = root / "corpus", root / "data"
    (corpus / "wav" / "ar").mkdir(parents=True)
    (corpus / "wav" / "ar" / "u1.wav").write_bytes(audio)
    for split in ("train", "dev", "test"):
        (corpus / f"{split}.tsv").write_text("id\taudio\tduration\tspeaker\tsrc_lang\tsrc_text\ttgt_text\n" + tsv_row)
    (corpus / "corpus.json").write_text(json.dumps({"seed": 1, "versions": {"espeak-ng": "1.51"}}))
    data.mkdir()
    (data / "fbank80.zip").write_bytes(b"PK features")
    (data / "spm_unigram64.model").write_bytes(b"spm")
    (data / "train.tsv").write_text("id\taudio\n")
    (data / "config.yaml").write_text(f"audio_root: {data}\n")  # holds a path: not hashed
    return corpus, data


def test_hashes_follow_the_content_not_the_folder(tmp_path):
    a = F.fingerprint(*make_run(tmp_path / "a"), train_threads=1)
    b = F.fingerprint(*make_run(tmp_path / "b"), train_threads=1)
    for part in ("corpus", "data"):
        assert {k: v for k, v in a[part].items() if k != "path"} == {k: v for k, v in b[part].items() if k != "path"}
    assert a["corpus"]["audio"]["files"] == 1 and a["corpus"]["generated_with"]["versions"] == {"espeak-ng": "1.51"}
    assert "config.yaml" not in json.dumps(a["data"])

    other_audio = F.fingerprint(*make_run(tmp_path / "c", audio=b"RIFF0001"))
    assert other_audio["corpus"]["audio"]["sha256"] != a["corpus"]["audio"]["sha256"]
    assert other_audio["corpus"]["manifests_combined"] == a["corpus"]["manifests_combined"]
    other_text = F.fingerprint(*make_run(tmp_path / "d", tsv_row="u1\twav/ar/u1.wav\t1.0\ts\tar\tx\tz\n"))
    assert other_text["corpus"]["manifests_combined"] != a["corpus"]["manifests_combined"]


def test_versions_compute_and_markdown(tmp_path, capsys):
    corpus, data = make_run(tmp_path)
    assert F.main(["--corpus", str(corpus), "--data", str(data), "--train-threads", "1",
                   "--json", str(tmp_path / "fp.json"), "--markdown"]) == 0
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert fp["versions"]["torch"] and fp["versions"]["fairseq-fixed"] and fp["versions"]["python"]
    assert fp["compute"]["train_threads"] == 1 and fp["compute"]["cores"] >= 1
    md = capsys.readouterr().out
    assert md == F.markdown(fp)
    assert "- corpus manifests (train, dev, test .tsv together): `" + fp["corpus"]["manifests_combined"][:16] in md
    assert "fbank80.zip `" + fp["data"]["features"]["fbank80.zip"][:16] in md
    assert "training threads per process 1" in md and "torch " in md
