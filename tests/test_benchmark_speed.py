"""benchmarks/speed.py --setting tiny: the results files' structure, every ratio positive and
finite, the markdown table and --markdown. No timing assertions (the machine is shared)."""
import json
import math
import sys

import pytest

from conftest import REPO, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_results(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    run([sys.executable, "-m", "benchmarks.speed", "--setting", "tiny", "--data", tiny_data,
         "--work", out / "work", "--out", out / "results"], cwd=REPO, timeout=300)
    return out / "results"


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def strings(obj):
    """Every string in a JSON document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)


def test_results_file_structure_and_ratios(tiny_results, tiny_data):
    results = json.loads((tiny_results / "speed.json").read_text())
    assert results["setting"] == "tiny" and results["threads"] == 1
    assert results["versions"]["torch"] and results["versions"]["fairseq"]
    assert results["machine"]["cores"] >= 1 and results["command"].startswith("python -m benchmarks.speed")
    assert not list(tiny_results.glob(".*.tmp"))   # atomic writes leave no temporary files
    # paths are recorded relative to the repository: results files hold no machine's own paths
    assert not [s for s in strings(results) if s.startswith("/")]
    assert (REPO / results["data"]["path"]).resolve() == tiny_data.resolve()

    updates = results["updates"]
    assert set(updates["variants"]) == {"shared", "stage1_off", "stage1_probe_every", "stage1_probe_10",
                                        "stage1_probe_every_speakers", "stage1_probe_every_summed",
                                        "stage2_plan", "stage2_all", "stage2_all_per_language"}
    for name, variant in updates["variants"].items():
        assert len(variant["cpu_s_per_update_by_round"]) == updates["rounds"], name
        assert all(finite_positive(t) for t in variant["cpu_s_per_update_by_round"]), name
    probed = {name: v["probed_updates"] for name, v in updates["variants"].items()}
    # the probe ran on every update, on one in ten, and nowhere else
    assert probed["stage1_probe_every"] == updates["variants"]["stage1_probe_every"]["updates"]
    assert probed["stage1_probe_every_speakers"] == updates["variants"]["stage1_probe_every_speakers"]["updates"]
    assert (probed["stage1_probe_every_summed"]
            == updates["variants"]["stage1_probe_every_summed"]["updates"])
    # a probe unit per language, and more with --gdps-probe-speakers (a unit per (language, speaker))
    units = {name: v["probe_units"] for name, v in updates["variants"].items()}
    assert (units["stage1_probe_every"] == units["stage1_probe_10"] == units["stage1_probe_every_summed"]
            == len(updates["languages"]))
    assert units["stage1_probe_every_speakers"] > units["stage1_probe_every"]
    assert probed["stage1_probe_10"] == updates["variants"]["stage1_probe_10"]["updates"] // 10
    assert probed["stage1_off"] == probed["stage2_all"] == probed["shared"] == 0
    for key in ("stage1_probe_every", "stage1_probe_10", "stage1_probe_every_speakers",
                "stage1_probe_every_summed", "stage2_plan", "stage2_all"):
        r = updates["ratios"][key]
        assert all(finite_positive(r[k]) for k in ("ratio", "ratio_min", "ratio_max", "wall_ratio")), key
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]

    decoding = results["decoding"]
    assert set(decoding["ratios"]) == {"decode_plan", "decode_all"}
    for r in decoding["ratios"].values():
        assert finite_positive(r["ratio"]) and finite_positive(r["fairseq_generate_ratio"])
    test_rows = sum(1 for _ in open(tiny_data / "test.tsv")) - 1
    for name, model in decoding["models"].items():
        assert finite_positive(model["median_cpu_sentences_per_s"]), name
        assert model["fairseq_generate_sentences"] == decoding["sentences"] == test_rows, name
        # the split is function-preserving: the split models write the shared model's hypotheses
        assert model["hypotheses_identical_to_shared"] == decoding["sentences"], name

    memory = results["statistics_memory"]
    sizes = {(r["width"], r["languages"], r["sketch_dim"]): r["bytes"] for r in memory["by_size"]}
    (w0, _), (w1, _) = results["settings"]["memory_widths"][:2]
    l0, l1 = results["settings"]["memory_languages"][:2]
    sketch = results["settings"]["sketch_dim"]
    assert sizes[w1, l0, None] > sizes[w0, l0, None]          # exact sums grow with width
    assert sizes[w1, l0, sketch] == sizes[w0, l0, sketch]      # sketched ones do not
    assert sizes[w0, l1, None] > sizes[w0, l0, None]          # both grow with the languages
    steps = [r for r in memory["by_recorded_updates"] if r["sketch_dim"] is None]
    assert [r["recorded_updates"] for r in steps] == results["settings"]["memory_steps"]
    assert len({r["bytes"] for r in steps}) == 1               # not with the number of updates
    # the same-state records: a fixed number of bytes per probe, every probe kept
    per_probe = memory["same_state_bytes_per_probe"]
    U, M = steps[0]["probe_units"], steps[0]["blocks"]
    assert per_probe == 8 * (2 * U + M * (2 * U) ** 2 + 2)   # + the update number and the batch key
    for r in memory["by_recorded_updates"]:
        assert r["probes_kept"] == r["recorded_updates"]
        assert r["same_state_bytes"] == per_probe * r["probes_kept"]

    assert all(finite_positive(r["cpu_s"]) and r["split"] for r in results["analyze_time"]["runs"])
    targets = {t["name"]: t for t in results["targets"]}
    assert targets["statistics_memory_independent_of_updates"]["met"] is True
    assert targets["same_state_bytes_fixed_per_probe"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in targets.values())


def test_markdown_table_and_markdown_option(tiny_results):
    md = (tiny_results / "speed.md").read_text()
    assert md.startswith("### Speed and memory (tiny setting)")
    assert "| stage-1 update, probe on every update / probe off |" in md
    assert "| stage-1 update, probe on every update, `--gdps-probe-speakers` / probe off |" in md
    assert "| stage-1 update, probe on every update, `--gdps-summed-statistics` / probe off |" in md
    assert "bytes per probe" in md
    assert "| stage-2 update, every FFN split / shared model |" in md
    printed = run([sys.executable, "-m", "benchmarks.speed", "--markdown", tiny_results / "speed.json"], cwd=REPO)
    assert printed.stdout == md
