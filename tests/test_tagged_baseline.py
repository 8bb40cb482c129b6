"""--gdps-lang-embedding end to end on the tiny corpus: a tagged baseline (no split) trained by
fairseq-train and decoded by fairseq-generate from its checkpoint alone, then used as a GDPS
stage 1 whose learned language vectors (and their Adam moments) gdps-split-checkpoint carries into
stage 2, which trains on from them."""
import csv

import pytest

import torch

from conftest import BIN, REPO, run
from gdps_training import load_checkpoint, num_updates, run_all, stage1_args, train_args

pytestmark = pytest.mark.slow   # fairseq-train and fairseq-generate runs

KEY = "encoder.gdps_lang_embedding.weight"
ARCH = ["--arch", "s2t_transformer_gdps_xs", "--gdps-lang-embedding"]  # xs with the helpers' tiny sizes
SPLIT = ["--gdps-split-modules", "decoder.layers.0.ffn", "--gdps-groups", "ar,ga;et,sw", "--gdps-shared-ratio", "0.5"]


def n_rows(path):
    with open(path, newline="") as f:
        return len(list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)))


def decode(data, checkpoint, subset):
    out = run(["env", "OMP_NUM_THREADS=1", BIN / "fairseq-generate", data, "--user-dir", REPO / "fairseq_gdps",
               "--task", "speech_to_text_gdps", "--config-yaml", "config.yaml", "--gen-subset", subset,
               "--path", checkpoint, "--beam", "2", "--max-len-b", "8", "--max-tokens", "100000",
               "--required-batch-size-multiple", "1", "--num-workers", "0"])
    return out.stdout.count("\nD-") + out.stdout.startswith("D-")


def test_tagged_baseline_trains_decodes_and_carries_into_stage2(tiny_data, tmp_path):
    from fairseq import checkpoint_utils

    from fairseq_gdps.cli.split_checkpoint import main as split_checkpoint
    from fairseq_gdps.models.optimizer_state import optimized_parameter_names as trainable_names

    # the tagged baseline: no plan, the probe on (so that it is also a GDPS stage 1)
    run_all([stage1_args(tiny_data, tmp_path / "stage1", 4, *ARCH)])
    stage1_path = tmp_path / "stage1" / "checkpoint_last.pt"
    stage1 = load_checkpoint(stage1_path)
    model_cfg = stage1["cfg"]["model"]
    assert model_cfg.arch == "s2t_transformer_gdps_xs" and model_cfg.gdps_lang_embedding is True
    assert model_cfg.gdps_lang_embedding_languages == "ar,et,ga,sw"
    assert not model_cfg.gdps_split_modules and not [k for k in stage1["model"] if "private" in k]
    vectors = stage1["model"][KEY]
    assert vectors.shape == (4, 32)
    assert bool((vectors.abs().sum(dim=1) > 0).all())  # every language's vector learned (it starts at zero)
    assert not torch.allclose(vectors[0], vectors[1])
    assert decode(tiny_data, stage1_path, "test") == n_rows(tiny_data / "test.tsv")

    # stage 2: the split checkpoint keeps the vectors and their Adam moments
    split_path = tmp_path / "split.pt"
    assert split_checkpoint([str(stage1_path), "--split-modules", "decoder.layers.0.ffn", "--groups", "ar,ga;et,sw",
                             "--shared-ratio", "0.5", "--out", str(split_path)]) == 0
    init = load_checkpoint(split_path)
    assert torch.equal(init["model"][KEY], vectors)
    assert init["cfg"]["model"].gdps_lang_embedding is True

    def names(path):   # parameter order of the optimizer state = the trainer's parameter order
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
        return trainable_names(models[0])

    def moments(ckpt, path):
        return ckpt["last_optimizer_state"]["state"][names(path).index(KEY)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(moments(init, split_path)[key], moments(stage1, stage1_path)[key])

    run_all([train_args(tiny_data, tmp_path / "stage2", 6, *ARCH, *SPLIT, "--restore-file", split_path)])
    stage2_path = tmp_path / "stage2" / "checkpoint_last.pt"
    stage2 = load_checkpoint(stage2_path)
    assert num_updates(stage2_path) == 6 and any("private" in k for k in stage2["model"])
    assert not torch.equal(stage2["model"][KEY], vectors)  # trained on
    assert decode(tiny_data, stage2_path, "test_et") == n_rows(tiny_data / "test_et.tsv")
