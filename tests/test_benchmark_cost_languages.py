"""benchmarks/cost_languages.py without fairseq training: the round-robin relabelling, the
same-state records' size (linear in probes, quadratic in probe units, as measured in memory and on
disk), and the size and gdps-analyze measurements on small statistics recorded through
``add_probe``, down to the markdown."""
import json

import pytest
import torch

from benchmarks import cost_languages as cl
from benchmarks.common import read_tsv, write_tsv
from benchmarks.statistics_cost import random_probe

from fairseq_gdps.gdps.stats import GradientStatistics

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCKS = {"encoder.transformer_layers.0.ffn": 40, "encoder.transformer_layers.1.ffn": 40, "decoder.layers.0.ffn": 24}


def probed_statistics(units: int, probes: int = 3) -> GradientStatistics:
    languages = cl.pseudo_languages(units)
    stats = GradientStatistics(BLOCKS, languages=languages, probe_units=languages, subspace_dim=4)
    generator = torch.Generator().manual_seed(0)
    for step in range(probes):
        random_probe(stats, step, generator)
    return stats


def test_relabel_round_robin(tmp_path):
    src, out = tmp_path / "prepared", tmp_path / "derived"
    src.mkdir()
    (src / "config.yaml").write_text("vocab_filename: spm.txt\n")
    fields = ["id", "audio", "n_frames", "tgt_text", "speaker", "src_lang"]
    for split, n in (("train", 7), ("dev", 3), ("test", 2)):
        write_tsv(src / f"{split}.tsv", fields, [{"id": f"{split}{k}", "audio": f"a{k}", "n_frames": str(10 + k),
                                                  "tgt_text": f"text {k}", "speaker": "s1",
                                                  "src_lang": "et" if k < 4 else "sw"} for k in range(n)])
    assert cl.relabel_round_robin(src, out, 3) == ["q00", "q01", "q02"]
    for split in ("train", "dev", "test"):
        _, before = read_tsv(src / f"{split}.tsv")
        _, after = read_tsv(out / f"{split}.tsv")
        assert [r["src_lang"] for r in after] == [f"q0{k % 3}" for k in range(len(before))]
        assert [{**r, "src_lang": None} for r in after] == [{**r, "src_lang": None} for r in before]
    assert (out / "config.yaml").resolve() == (src / "config.yaml").resolve()
    with pytest.raises(ValueError, match="at least 2 languages"):
        cl.relabel_round_robin(src, out, 1)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        cl.relabel_round_robin(tmp_path / "nothing", out, 3)


def test_records_grow_linearly_with_probes_and_quadratically_with_units(tmp_path):
    per_probe = {}
    for units in (2, 4, 8):
        stats = probed_statistics(units)
        per_probe[units] = cl.record_bytes_per_probe(units, len(BLOCKS))
        assert stats.same_state.nbytes() == 3 * per_probe[units]
        file_bytes = {}
        for probes in (5, 50):
            records = cl.replicated_records(stats.same_state, probes)
            assert records.num_probes == probes and records.nbytes() == probes * per_probe[units]
            # each copy its own batch, so that the bootstrap draws P probes
            assert len(set(records.batch_keys().tolist())) == probes
            path = tmp_path / f"u{units}_p{probes}.pt"
            cl.save_with_records(stats, records, path)
            file_bytes[probes] = path.stat().st_size
        # on disk too: what the file gains per probe is the records' bytes per probe (give or take
        # torch.save's framing, a few bytes per probe)
        assert per_probe[units] <= (file_bytes[50] - file_bytes[5]) / 45 <= 1.05 * per_probe[units] + 8
        assert stats.same_state.num_probes == 3   # the statistics themselves keep their own probes
    # the Gram matrices are (2U)^2 per block: quadratic in the probe units
    M = len(BLOCKS)
    for units in (2, 4, 8):
        assert per_probe[units] == 8 * (M * (2 * units) ** 2 + 2 * units + 2)
    assert 3.5 < per_probe[8] / per_probe[4] < 4.0 and 3.5 < per_probe[4] / per_probe[2] < 4.0


def test_size_and_analyze_measurements_and_markdown(tmp_path):
    sizes, files = [], {}
    for units in (2, 4):
        size, files[units] = cl.measure_statistics_size(probed_statistics(units), [4, 12], tmp_path, f"u{units}")
        sizes.append(size)
    for s in sizes:
        assert s["records_linear"] and s["summed_bytes"] > 0
        assert [r["probes"] for r in s["by_probes"]] == [4, 12]
        assert s["summed_bytes_sketch"] <= s["summed_bytes"]   # the blocks are smaller than the sketch
        assert s["by_probes"][1]["file_bytes"] > s["by_probes"][0]["file_bytes"]
    assert sizes[1]["summed_bytes"] > sizes[0]["summed_bytes"]   # the sums grow with the languages
    runs = cl.measure_analyze_time(files, [4, 12], [3, 0], tmp_path)
    assert [(r["languages"], r["probes"], r["resamples"]) for r in runs] == [
        (u, p, r) for u in (2, 4) for p in (4, 12) for r in (3, 0)]
    assert all(r["cpu_s"] > 0 and r["estimator"] == "same-state" for r in runs)
    profile = cl.profile_analyze(files[4][12], tmp_path / "profiled", 3)
    parts = profile["cpu_s"]
    assert set(parts) == {*cl.ANALYZE_PARTS, "total"} and all(t > 0 for t in parts.values())
    assert sum(t for part, t in parts.items() if part != "total") <= parts["total"]

    results = {"date": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.cost_languages --test",
               "machine": {"cpu": "test CPU", "cores": 2, "load_average_at_start": [0.5, 0.5, 0.5]},
               "versions": {"torch": "t", "fairseq": "f"}, "cpu_seconds": 60.0, "wall_seconds": 90.0,
               "settings": {"model": "tiny", "size_probes": [4, 12]},
               "statistics_size": sizes, "analyze_time": runs,
               "analyze_profile": {"languages": 4, "probes": 12, **profile}}
    json.dumps(results, default=str)   # what write_results writes must be JSON
    text = cl.markdown(results)
    assert "`python -m benchmarks.cost_languages --test`" in text and "test CPU (2 cores" in text
    table = [line for line in text.splitlines() if line.startswith("| 4 |")]
    assert len(table) == 2   # one row of sizes, one of analysis times, for 4 languages
    assert "Where one run's time goes (4 languages, 12 probes, 3 resamples" in text
    assert table[1].count("|") == 1 + 1 + 4   # 2 probe counts x 2 resample counts
