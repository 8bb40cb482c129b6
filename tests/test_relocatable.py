"""A data folder and a run folder moved to other places keep working: nothing the plugin needs
later is an absolute path of where they were made. Paths are read relative to the data or run
folder, or named again on the command line (``gdps-split-checkpoint --data``)."""
import csv
import json
import re
import shutil
import subprocess

import pytest
import torch

from conftest import BIN, REPO, STOCK_FAIRSEQ_ENV, run
from fairseq_gdps.cli.split_checkpoint import data_folder
from gdps_training import stage1_args


def test_split_checkpoint_data_folder(tmp_path):
    """The stage-1 checkpoint's data folder serves while it exists; a moved one must be named,
    and the error says which folder and which flag."""
    data = tmp_path / "data"
    data.mkdir()
    assert data_folder("s1.pt", str(data), None) == str(data)
    assert data_folder("s1.pt", str(tmp_path / "gone"), str(data)) == str(data)
    with pytest.raises(ValueError, match=rf"s1\.pt was trained on the data folder {re.escape(str(tmp_path / 'gone'))}, "
                                         r"which does not exist here .*: name it with --data DIR"):
        data_folder("s1.pt", str(tmp_path / "gone"), None)
    with pytest.raises(ValueError, match=r"--data .*missing: no such folder"):
        data_folder("s1.pt", str(data), str(tmp_path / "missing"))


def manifest_ids(path):
    with open(path, newline="") as f:
        return [row["id"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def generate(data, checkpoint, subset, *extra, cwd, stock=False):
    """fairseq-generate of one manifest (``stock``: without the plugin); returns {utterance id:
    hypothesis line} and the log."""
    ids = manifest_ids(data / f"{subset}.tsv")
    out = run([*(STOCK_FAIRSEQ_ENV if stock else []), BIN / "fairseq-generate", data, "--config-yaml", "config.yaml",
               "--gen-subset", subset,
               "--path", checkpoint, "--beam", "1", "--max-len-b", "5", "--max-tokens", "100000",
               "--num-workers", "0", "--required-batch-size-multiple", "1", "--cpu", *extra], cwd=cwd).stdout
    hypotheses = {ids[int(line.split("\t")[0][2:])]: line for line in out.splitlines() if line.startswith("D-")}
    return hypotheses, out


@pytest.mark.slow
def test_moved_data_and_run_folders(tiny_corpus, tmp_path):
    """Stage 1 and its analysis, then both folders moved (the old paths gone): the split, the
    decoding of every test utterance, the scores and the export all work in the new places, from
    another working directory; stock fairseq decodes the export once ``gdps-prep --relocate`` has
    pointed config.yaml at the moved data folder."""
    old_data, old_run = tmp_path / "made" / "data", tmp_path / "made" / "run"
    run([BIN / "gdps-prep", "--corpus", tiny_corpus, "--out", old_data, "--vocab-size", "64", "--quiet"])
    run(stage1_args(old_data, old_run / "stage1", 4))
    run([BIN / "gdps-analyze", old_run / "stage1" / "stats.pt", "--out", old_run / "analysis",
         "--groups", "2", "--resamples", "20"])

    data, work = tmp_path / "elsewhere" / "data_renamed", tmp_path / "elsewhere" / "run_renamed"
    work.parent.mkdir()
    shutil.move(old_data, data)
    shutil.move(old_run, work)
    shutil.rmtree(tmp_path / "made")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    plan = json.loads((work / "analysis" / "plan.json").read_text())
    assert (work / "analysis" / plan["provenance"]["stats_file"]).resolve() == (work / "stage1" / "stats.pt").resolve()

    # the stage-1 checkpoint names a data folder that is gone: the error says so and names the flag
    split_cmd = [BIN / "gdps-split-checkpoint", work / "stage1" / "checkpoint_last.pt",
                 "--plan", work / "analysis" / "plan.json", "--out", work / "stage2_init.pt"]
    refused = subprocess.run([str(c) for c in split_cmd], cwd=cwd, capture_output=True, text=True)
    assert refused.returncode == 1 and not (work / "stage2_init.pt").exists()
    assert f"data folder {old_data}, which does not exist" in refused.stderr and "--data DIR" in refused.stderr
    run([*split_cmd, "--data", data], cwd=cwd)

    # the split model decodes every test utterance with the plugin's task
    test_ids = manifest_ids(data / "test.tsv")
    hypotheses, log = generate(data, work / "stage2_init.pt", "test", "--user-dir", REPO / "fairseq_gdps",
                               "--task", "speech_to_text_gdps", cwd=cwd)
    assert sorted(hypotheses) == sorted(test_ids)
    (work / "decode").mkdir()
    (work / "decode" / "test.txt").write_text(log)

    run([BIN / "gdps-score", "--data", data, "--decode-dir", work / "decode", "--out", work / "scores"], cwd=cwd)
    scores = json.loads((work / "scores.json").read_text())
    assert scores["pooled"]["n"] == len(test_ids)
    assert set(scores["languages"]) == {"ar", "et", "ga", "sw"}

    run([BIN / "gdps-export", work / "stage2_init.pt", "--language", "ar", "--out", work / "export" / "ar.pt"], cwd=cwd)
    exported = torch.load(work / "export" / "ar.pt", map_location="cpu", weights_only=False)
    assert exported["cfg"]["task"]["_name"] == "speech_to_text"
    assert exported["extra_state"]["export"]["source_checkpoint"] == "../stage2_init.pt"

    # stock fairseq joins the manifests' audio to config.yaml's audio_root as it stands
    run([BIN / "gdps-prep", "--out", data, "--relocate", "--quiet"], cwd=cwd)
    hypotheses, _ = generate(data, work / "export" / "ar.pt", "test_ar", "--task", "speech_to_text", cwd=cwd,
                             stock=True)
    assert sorted(hypotheses) == sorted(manifest_ids(data / "test_ar.tsv"))
