"""benchmarks/single_run.py on the tiny corpus: both forms of run_gdps.sh side by side, the
same final model and plan recorded, the results files and their markdown. No timing assertions
(the machine is shared)."""
import json
import re
import sys

import pytest

from conftest import REPO, run

pytestmark = pytest.mark.slow

TINY_MODEL = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
              "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--max-tokens", "4000"]


def test_both_forms_recorded_with_one_model(tiny_data, tmp_path):
    out = tmp_path / "results"
    printed = run([sys.executable, "-m", "benchmarks.single_run", "--data", tiny_data, "--work", tmp_path / "work",
                   "--max-update", "6", "--stage1", "3", "--probe-interval", "1", "--analyze-args", "--groups 2 --resamples 20",
                   "--out", out, "--", *TINY_MODEL],
                  cwd=REPO, timeout=600).stdout
    results = json.loads((out / "single_run.json").read_text())
    one, two = results["runs"]["single_run"], results["runs"]["two_stage"]
    assert results["identical_models"] and one["model_sha256"] == two["model_sha256"]
    assert results["identical_plans"] and one["plan"]["modules"] and len(one["plan"]["groups"]) == 2
    assert one["bleu"] == two["bleu"] and set(one["bleu"]) == {"ar", "et", "ga", "sw"}
    assert one["wall_s"] > 0 and two["wall_s"] > 0
    assert results["setting"]["extra"] == TINY_MODEL
    # nothing recorded holds an absolute path of this machine (paths are relative to the repository)
    assert not re.search(r'(^|[\s"=])/(tmp|work|root|home)/', (out / "single_run.json").read_text())
    assert "Final models bit-identical: **yes**" in printed
    again = run([sys.executable, "-m", "benchmarks.single_run", "--markdown", out / "single_run.json"], cwd=REPO).stdout
    assert again == (out / "single_run.md").read_text()
