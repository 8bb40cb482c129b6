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
    with pytest.raises(ValueError, match=r"2 hypotheses for 3 manifest rows; missing sample indices \[1\].*required-batch-size-multiple 1"):
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
