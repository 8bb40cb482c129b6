"""gdps-score: pairing fairseq-generate output with manifests, and per-language scores."""
import json

import pytest

from fairseq_gdps.cli import score as score_cli
from fairseq_gdps.data.generate_output import pair_with_manifest, read_hypotheses, read_manifest

MANIFEST = (
    "id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text\tsrc_lang\ttgt_lang\n"
    "u0\tfbank80.zip:1:2\t100\tthree kilograms and five meters\ts1\tx\tet\ten\n"
    "u1\tfbank80.zip:3:2\t100\tin two days and four liters\ts1\tx\tet\ten\n"
    "u2\tfbank80.zip:5:2\t100\tseven hours ago and one meter\ts2\tx\tsw\ten\n"
)


def generate_log(hyps: dict[int, str]) -> str:
    """What fairseq-generate prints: S/T/H/D/P lines per sample, in arbitrary order."""
    lines = []
    for index, hyp in hyps.items():
        lines += [f"T-{index}\tref", f"H-{index}\t-0.1\t{hyp}", f"D-{index}\t-0.1\t{hyp}", f"P-{index}\t-0.1 -0.2"]
    return "\n".join(lines + ["Generate test with beam=5: BLEU4 = 1.0"]) + "\n"


def test_every_utterance_needs_exactly_one_hypothesis(tmp_path):
    (tmp_path / "test.tsv").write_text(MANIFEST)
    manifest = read_manifest(tmp_path / "test.tsv")
    (tmp_path / "out.txt").write_text(generate_log({2: "a", 0: "b"}))
    with pytest.raises(ValueError,
                       match=r"2 hypotheses for 3 manifest rows; missing sample indices \[1\].*required-batch-size-multiple 1"):
        pair_with_manifest(manifest, read_hypotheses(tmp_path / "out.txt"), where="out.txt")
    (tmp_path / "dup.txt").write_text(generate_log({0: "b"}) + "D-0\t-0.2\tc\n")
    with pytest.raises(ValueError, match=r"dup.txt:\d+: second hypothesis for sample 0"):
        read_hypotheses(tmp_path / "dup.txt")


def test_scores_per_language(tmp_path):
    data, decode = tmp_path / "data", tmp_path / "decode"
    data.mkdir(), decode.mkdir()
    (data / "test_all.tsv").write_text(MANIFEST)
    (decode / "test_all.txt").write_text(generate_log({
        0: "three kilograms and five meters",   # exact
        1: "in two days and four meters",        # one word wrong
        2: "seven hours ago and one meter",      # exact
    }))
    assert score_cli.main(["--data", str(data), "--decode-dir", str(decode), "--out", str(tmp_path / "scores")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["languages"]) == {"et", "sw"}
    assert scores["languages"]["sw"]["bleu"] == pytest.approx(100.0)
    assert scores["languages"]["sw"]["exact_match"] == 100.0
    assert scores["languages"]["et"]["exact_match"] == 50.0
    assert 0 < scores["languages"]["et"]["bleu"] < 100
    assert scores["average"]["exact_match"] == 75.0
    assert scores["pooled"]["n"] == 3
    assert "nrefs:1" in scores["signatures"]["bleu"]
    table = (tmp_path / "scores.md").read_text()
    assert "| sw | 1 | 100.0 |" in table


def test_missing_manifest_is_named(tmp_path, capsys):
    (tmp_path / "test_xx.txt").write_text(generate_log({0: "a"}))
    assert score_cli.main(["--data", str(tmp_path), "--decode-dir", str(tmp_path), "--out", str(tmp_path / "s")]) == 1
    assert "test_xx.tsv" in capsys.readouterr().err


def test_side_by_side_comparison(tmp_path, capsys):
    def scores(bleu):
        s = {"bleu": bleu, "chrf": 50.0, "exact_match": 10.0}
        return {"languages": {"et": s, "sw": s}, "average": s}
    (tmp_path / "a.json").write_text(json.dumps(scores(20.0)))
    (tmp_path / "b.json").write_text(json.dumps(scores(25.5)))
    assert score_cli.main(["--compare", f"baseline={tmp_path / 'a.json'}", f"gdps={tmp_path / 'b.json'}",
                           "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| et | 20.0 | 50.0 | 10.0 | 25.5 | 50.0 | 10.0 |" in table
    assert "| average | 20.0 |" in table


MANY = "id\taudio\tn_frames\ttgt_text\tspeaker\tsrc_text\tsrc_lang\ttgt_lang\n" + "".join(
    f"u{i}\tfbank80.zip:1:2\t100\t{ref}\ts1\tsource {i}\t{lang}\ten\n"
    for i, (ref, lang) in enumerate(
        [(f"in {n} days and {m} liters", "et")
         for n, m in zip("two three four five six seven eight nine".split(),
                         "one two three four five six seven eight".split())] * 3
        + [(f"{n} hours ago and one meter", "sw") for n in "two three four five six seven eight nine".split()] * 3))


def write_decodes(tmp_path, name, hypothesis_of):
    rows = read_manifest_text(MANY)
    decode = tmp_path / name
    decode.mkdir()
    (decode / "test_all.txt").write_text(generate_log({i: hypothesis_of(i, ref) for i, ref in enumerate(rows)}))
    return decode


def read_manifest_text(text):
    return [line.split("\t")[3] for line in text.splitlines()[1:]]


def test_paired_bootstrap_against_baseline(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_all.tsv").write_text(MANY)
    # baseline gets every other et sentence wrong; the system is perfect on et and equal on sw
    baseline = write_decodes(tmp_path, "baseline", lambda i, ref: ref.replace("liters", "meters") if i % 2 else ref)
    system = write_decodes(tmp_path, "system", lambda i, ref: ref)
    same = write_decodes(tmp_path, "same", lambda i, ref: ref.replace("liters", "meters") if i % 2 else ref)
    out = tmp_path / "scores"
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--baseline-decode-dir", str(baseline),
                           "--bootstrap-samples", "200", "--out", str(out)]) == 0
    sig = json.loads(out.with_suffix(".json").read_text())["significance"]
    assert set(sig) == {"et", "sw", "pooled"}
    assert sig["et"]["bleu"]["delta"] > 5 and sig["et"]["bleu"]["p_value"] < 0.05
    assert sig["et"]["ter"]["delta"] < 0
    assert sig["sw"]["bleu"]["delta"] == 0 and sig["sw"]["bleu"]["p_value"] > 0.5
    assert "bs:200" in sig["pooled"]["bleu"]["signature"]
    assert "| et | bleu |" in out.with_suffix(".md").read_text()
    # a system identical to the baseline is never significant
    assert score_cli.main(["--data", str(data), "--decode-dir", str(same), "--baseline-decode-dir", str(baseline),
                           "--bootstrap-samples", "200", "--out", str(tmp_path / "same_scores")]) == 0
    same_sig = json.loads((tmp_path / "same_scores.json").read_text())["significance"]
    assert all(r["delta"] == 0 and r["p_value"] == 1.0 for m in same_sig.values() for r in m.values())


def test_baseline_decode_of_other_utterances_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_all.tsv").write_text(MANY)
    system = write_decodes(tmp_path, "system", lambda i, ref: ref)
    other_data = tmp_path / "other"
    other_data.mkdir()
    (other_data / "test_all.tsv").write_text(MANIFEST)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "test_all.txt").write_text(generate_log({0: "a", 1: "b", 2: "c"}))
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--baseline-decode-dir",
                           str(tmp_path / "short"), "--out", str(tmp_path / "s")]) == 1
    assert "test_all.txt" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_comet_is_skipped_without_a_model_and_never_invented(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_all.tsv").write_text(MANY)
    system = write_decodes(tmp_path, "system", lambda i, ref: ref)
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--out", str(tmp_path / "s")]) == 0
    assert "COMET skipped" in capsys.readouterr().err
    scores = json.loads((tmp_path / "s.json").read_text())
    assert "comet" not in scores["pooled"] and "comet_skipped" in scores
    assert "COMET: skipped" in (tmp_path / "s.md").read_text()
    # a path that holds no model is an error naming the flag, and nothing is written
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--comet-model", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "c")]) == 1
    assert "--comet-model" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_comet_scores_through_the_unbabel_comet_interface(tmp_path, monkeypatch):
    """The calls gdps-score makes into unbabel-comet (load_from_checkpoint, predict), with a
    stand-in model that scores a segment 1 when the hypothesis equals the reference."""
    import sys
    import types

    class Prediction:
        def __init__(self, scores):
            self.scores, self.system_score = scores, sum(scores) / len(scores)

    class StandInModel:
        def predict(self, data, batch_size, gpus, progress_bar):
            assert all(set(d) == {"src", "mt", "ref"} and d["src"].startswith("source") for d in data)
            return Prediction([float(d["mt"] == d["ref"]) for d in data])

    loaded = []
    fake = types.ModuleType("comet")
    fake.load_from_checkpoint = lambda path: loaded.append(path) or StandInModel()
    monkeypatch.setitem(sys.modules, "comet", fake)
    ckpt = tmp_path / "wmt22" / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_all.tsv").write_text(MANY)
    system = write_decodes(tmp_path, "system", lambda i, ref: ref if i < 24 else "wrong")
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--comet-model", str(tmp_path / "wmt22"),
                           "--out", str(tmp_path / "s")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert loaded == [str(ckpt)]
    assert scores["languages"]["et"]["comet"] == 100.0 and scores["languages"]["sw"]["comet"] == 0.0
    assert scores["average"]["comet"] == 50.0 and scores["pooled"]["comet"] == 50.0


def test_comet_without_the_package_says_how_to_install(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "comet", None)  # import comet -> ImportError
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test_all.tsv").write_text(MANY)
    system = write_decodes(tmp_path, "system", lambda i, ref: ref)
    assert score_cli.main(["--data", str(data), "--decode-dir", str(system), "--comet-model", str(ckpt),
                           "--out", str(tmp_path / "s")]) == 1
    assert "pip install -e '.[comet]'" in capsys.readouterr().err
