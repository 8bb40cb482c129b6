"""gdps-export: a GDPS checkpoint folded, for one language group, into a stock fairseq checkpoint
that plain fairseq (no plugin) builds, loads and decodes exactly as the GDPS model does."""
import csv
import sys
from argparse import Namespace

import pytest
import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary

from conftest import BIN, REPO, STOCK_FAIRSEQ_ENV, run
from fairseq_gdps.cli.export import ExportError, ExportMismatch, export_checkpoint, main
from fairseq_gdps.models import partitioned_ffns

FEAT = 8
LANGS = ["ar", "et", "ga", "sw"]
GROUPS = "ar,ga;et,sw"  # group 0: ar, ga; group 1: et, sw
SIZES = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
             encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=2,
             decoder_attention_heads=2, conv_channels=16, input_feat_per_channel=FEAT, input_channels=1,
             max_source_positions=1000, max_target_positions=100, dropout=0.1, fp16=False,
             depthwise_conv_kernel_size=3)
SPLIT = {"s2t_transformer": "encoder.transformer_layers.1.ffn,decoder.layers.0.ffn",
         "s2t_conformer": "encoder.conformer_layers.0.ffn1,encoder.conformer_layers.1.ffn2,decoder.layers.1.ffn"}


class FakeTask:
    def __init__(self, vocab=20):
        self.target_dictionary = Dictionary()
        for i in range(vocab):
            self.target_dictionary.add_symbol(f"w{i}")
        self.source_dictionary = None
        self.languages = list(LANGS)


def gdps_checkpoint(tmp_path, kind, split=True, **extra):
    """A stage-2 GDPS model whose groups differ, saved as fairseq-train saves it."""
    torch.manual_seed(0)
    gdps = dict(gdps_split_modules=SPLIT[kind], gdps_groups=GROUPS) if split else {}
    gdps.update(extra)
    args = Namespace(arch=f"{kind}_gdps", _name=f"{kind}_gdps", task="speech_to_text_gdps", user_dir=str(REPO / "fairseq_gdps"),
                     criterion="label_smoothed_cross_entropy_gdps", gdps_probe_interval=1, **SIZES, **gdps)
    model = models.build_model(args, FakeTask())
    with torch.no_grad():  # private blocks start as copies; make the groups differ
        for ffn in partitioned_ffns(model).values():
            for p in (ffn.fc1_private_weight, ffn.fc2_private_weight, ffn.fc1_private_bias):
                p.add_(0.3 * torch.randn_like(p))
    cfg = {"_name": None, "common": {"user_dir": str(REPO / "fairseq_gdps"), "seed": 1}, "model": args,
           "task": {"_name": "speech_to_text_gdps", "data": "data", "config_yaml": "config.yaml",
                    "gdps_languages": None, "gdps_lang_temperature": 1.0},
           "criterion": {"_name": "label_smoothed_cross_entropy_gdps", "label_smoothing": 0.1,
                         "gdps_probe_interval": 1, "gdps_stats": "stats.pt"}}
    state = {"args": None, "cfg": cfg, "model": model.state_dict(), "criterion": None,
             "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyGDPSCriterion",
                                    "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}, "num_updates": 7}],
             "task_state": {"gdps_statistics": {"x": 1}}, "extra_state": {"train_iterator": {"epoch": 1}},
             "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{}]}}
    path = tmp_path / f"{kind}_stage2.pt"
    torch.save(state, path)
    return path, model.eval()


def load_stock(path):
    """As stock fairseq loads a checkpoint: rebuild from its args, load its weights strictly."""
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    model = models.build_model(state["cfg"].model, FakeTask())
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return model.eval(), state


def net_input(lang_ids, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = len(lang_ids)
    return {"src_tokens": torch.randn(b, 23, FEAT, generator=g),
            "src_lengths": torch.tensor([23 - 3 * (i % 3) for i in range(b)]),
            "prev_output_tokens": torch.randint(4, 24, (b, 6), generator=g), "src_lang_id": torch.tensor(lang_ids)}


def stock_logits(model, ni):
    return model(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])[0]


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_export_is_the_gdps_model_for_each_group(tmp_path, kind, one_thread):
    path, gdps = gdps_checkpoint(tmp_path, kind)
    logits = {}
    for group, langs in enumerate([["ar", "ga"], ["et", "sw"]]):
        out = tmp_path / f"group{group}.pt"
        summary = export_checkpoint(path, out, group=group)
        assert summary["languages"] == langs and summary["arch"] == kind
        stock, state = load_stock(out)
        assert type(stock) is models.ARCH_MODEL_REGISTRY[kind]  # the stock class, not a GDPS subclass
        ni = net_input([LANGS.index(langs[0]), LANGS.index(langs[1]), LANGS.index(langs[0])])
        with torch.no_grad():
            logits[group] = stock_logits(stock, ni)
            torch.testing.assert_close(logits[group], gdps(**ni)[0], atol=1e-5, rtol=1e-5)
    # the groups really differ, so each export carries its own group
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_exported_checkpoint_is_stock(tmp_path, one_thread):
    path, _ = gdps_checkpoint(tmp_path, "s2t_transformer")
    out = tmp_path / "et.pt"
    assert main([str(path), "--language", "et", "--out", str(out)]) == 0
    raw = torch.load(out, map_location="cpu", weights_only=False)
    assert raw["cfg"]["model"].arch == raw["cfg"]["model"]._name == "s2t_transformer"
    assert raw["cfg"]["model"].task == raw["cfg"]["task"]["_name"] == "speech_to_text"
    assert raw["cfg"]["criterion"]["_name"] == raw["cfg"]["model"].criterion == "label_smoothed_cross_entropy"
    assert raw["cfg"]["common"]["user_dir"] is None and raw["cfg"]["model"].user_dir is None
    assert not [k for k in vars(raw["cfg"]["model"]) if "gdps" in k]
    assert not [k for k in raw["cfg"]["task"] if "gdps" in k] and not [k for k in raw["cfg"]["criterion"] if "gdps" in k]
    assert "last_optimizer_state" not in raw and raw["task_state"] == {}
    assert raw["optimizer_history"][-1]["criterion_name"] == "LabelSmoothedCrossEntropyCriterion"
    assert not [k for k in raw["model"] if "private" in k or "shared" in k or "unit_order" in k]
    assert raw["extra_state"]["export"]["group"] == 1
    # --language picks the language's group: the same weights as --group 1
    assert main([str(path), "--group", "1", "--out", str(tmp_path / "g1.pt")]) == 0
    g1 = torch.load(tmp_path / "g1.pt", map_location="cpu", weights_only=False)["model"]
    assert g1.keys() == raw["model"].keys() and all(torch.equal(g1[k], raw["model"][k]) for k in g1)


def test_unsplit_checkpoint_exports_without_group(tmp_path, one_thread):
    path, gdps = gdps_checkpoint(tmp_path, "s2t_transformer", split=False)
    out = tmp_path / "stage1.pt"
    assert export_checkpoint(path, out)["group"] is None
    stock, _ = load_stock(out)
    ni = net_input([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(stock_logits(stock, ni), gdps(**ni)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ExportError, match="--group 0: .* has no split FFNs"):
        export_checkpoint(path, out, group=0)


def test_export_errors_name_the_flag_and_file(tmp_path, capsys, one_thread):
    path, _ = gdps_checkpoint(tmp_path, "s2t_transformer")
    out = tmp_path / "x.pt"
    with pytest.raises(ExportError, match=r"--language 'xx': not in any language group of .*stage2.pt \(0: ar,ga; 1: et,sw\)"):
        export_checkpoint(path, out, language="xx")
    with pytest.raises(ExportError, match=r"--group 2: out of range, .*stage2.pt has 2 groups"):
        export_checkpoint(path, out, group=2)
    with pytest.raises(ExportError, match="--group G or --language L"):
        export_checkpoint(path, out)
    with pytest.raises(ExportError, match="missing.pt not found"):
        export_checkpoint(tmp_path / "missing.pt", out, group=0)
    stock = tmp_path / "stock.pt"
    export_checkpoint(path, stock, group=0)
    with pytest.raises(ExportError, match="stock.pt: not a GDPS checkpoint"):
        export_checkpoint(stock, out, group=0)
    assert not out.exists()
    # the command line reports the error and exits 1; nothing is written
    assert main([str(path), "--group", "-1", "--out", str(out)]) == 1
    assert "gdps-export: error: --group -1: out of range" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".x.pt.*"))


@pytest.mark.parametrize("split", [True, False])
def test_language_embedding_is_refused(tmp_path, capsys, one_thread, split):
    """A learned vector per language added to the encoder input has no stock weight to go to."""
    path, _ = gdps_checkpoint(tmp_path, "s2t_transformer", split=split, gdps_lang_embedding=True)
    assert "encoder.gdps_lang_embedding.weight" in torch.load(path, weights_only=False)["model"]
    out = tmp_path / "x.pt"
    with pytest.raises(ExportError, match=r"stage2.pt: the model was trained with --gdps-lang-embedding .*"
                                          r"cannot be exported"):
        export_checkpoint(path, out, group=0 if split else None)
    assert main([str(path), "--language", "et", "--out", str(out)]) == 1
    assert "--gdps-lang-embedding" in capsys.readouterr().err and not out.exists()


def test_export_beyond_the_tolerance_is_refused_and_nothing_written(tmp_path, capsys, one_thread):
    """The check compares the folded model with the split one; a fold that differs by more than
    --check-tolerance is refused. The fold only reorders sums, so the two differ by rounding: more
    than a tolerance of 0 allows."""
    path, _ = gdps_checkpoint(tmp_path, "s2t_transformer")
    rounding = export_checkpoint(path, tmp_path / "ok.pt", group=1)["max_logit_difference"]
    assert 0 < rounding < 1e-5
    out = tmp_path / "x.pt"
    with pytest.raises(ExportMismatch, match=r"stage2.pt: the exported model differs from the GDPS model by "
                                             r"[\d.e-]+ in the logits \(group 1; allowed 0, --check-tolerance 0\); not written"):
        export_checkpoint(path, out, group=1, check_rtol=0.0)
    assert main([str(path), "--language", "et", "--out", str(out), "--check-tolerance", "0"]) == 1
    assert "gdps-export: error: " in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".x.pt.*"))
    with pytest.raises(ExportError, match="--check-tolerance -1.0: must be a finite number >= 0"):
        export_checkpoint(path, out, group=1, check_rtol=-1.0)


def test_export_of_non_finite_weights_is_refused(tmp_path, one_thread):
    """A NaN in one group's private weights (a diverged run): that group's export is refused (a
    NaN difference would pass any tolerance), the other group's is not affected."""
    path, _ = gdps_checkpoint(tmp_path, "s2t_transformer")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["model"]["decoder.layers.0.ffn.fc1_private_weight"][1, 0, 0] = float("nan")  # group 1: et, sw
    torch.save(state, path)
    out = tmp_path / "x.pt"
    with pytest.raises(ExportMismatch, match=r"the GDPS model's logits \(group 1\) are not finite .*not written"):
        export_checkpoint(path, out, language="sw")
    assert not out.exists()
    assert export_checkpoint(path, out, language="ar")["group"] == 0


# --------------------------------------------------------------------------------------------
# end to end: train a tiny split model, export each group, decode with plain fairseq-generate
# --------------------------------------------------------------------------------------------
TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "16"]
# tiny tensors on shared cores: more threads only contend (conftest's run() sets 2)
ONE_THREAD = ["env", "OMP_NUM_THREADS=1"]
DECODE = ["--config-yaml", "config.yaml", "--beam", "3", "--max-len-b", "12", "--batch-size", "1",
          "--required-batch-size-multiple", "1", "--num-workers", "0"]
# fairseq-generate, once per "PATH SUBSET" argument, in one process where the plugin cannot be
# imported at all; each run's output ends with a line "=== END".
STOCK_GENERATE = """
import sys
sys.modules["fairseq_gdps"] = None
from fairseq_cli.generate import cli_main
data, runs, common = sys.argv[1], sys.argv[2].split(";"), sys.argv[3:]
for run in runs:
    path, subset = run.split(" ")
    sys.argv = ["fairseq-generate", data, "--task", "speech_to_text", "--path", path, "--gen-subset", subset, *common]
    cli_main()
    print("=== END", flush=True)
"""


def manifest_ids(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [row["id"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def hypotheses(stdout, ids):
    """{utterance id: (hypothesis tokens, score, reference)} from fairseq-generate output; sample
    index i is row i of the (concatenated) manifests."""
    out = {}
    for prefix in ("T-", "H-"):
        for line in stdout.splitlines():
            if line.startswith(prefix):
                head, *rest = line.split("\t")
                utt = ids[int(head[2:])]
                if prefix == "T-":
                    out[utt] = {"ref": rest[0]}
                else:
                    out[utt].update(score=float(rest[0]), tokens=rest[1])
    return out


@pytest.mark.slow
def test_exported_groups_decode_like_gdps_with_plain_fairseq(tiny_data, tmp_path):
    run([*ONE_THREAD, BIN / "fairseq-train", tiny_data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text_gdps",
         "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev",
         "--arch", "s2t_transformer_gdps_s", *TINY,
         "--gdps-split-modules", "encoder.transformer_layers.0.ffn,decoder.layers.0.ffn", "--gdps-groups", GROUPS,
         "--optimizer", "adam", "--lr", "5e-3", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
         "--max-tokens", "4000", "--required-batch-size-multiple", "1", "--max-update", "4", "--num-workers", "0",
         "--save-dir", tmp_path / "stage2", "--no-epoch-checkpoints", "--seed", "1", "--log-format", "simple"])
    stage2 = tmp_path / "stage2" / "checkpoint_last.pt"
    # the GDPS model, routed per utterance, on every test utterance (batch size 1: no padding effects)
    gdps_out = run([*ONE_THREAD, BIN / "fairseq-generate", tiny_data, "--user-dir", REPO / "fairseq_gdps", "--task",
                    "speech_to_text_gdps", "--gen-subset", "test", "--path", stage2, *DECODE]).stdout
    gdps = hypotheses(gdps_out, manifest_ids(tiny_data / "test.tsv"))
    assert len(gdps) == len(manifest_ids(tiny_data / "test.tsv"))
    gdps_state = checkpoint_utils.load_checkpoint_to_cpu(str(stage2))
    groups = [["ar", "ga"], ["et", "sw"]]
    exported, runs = {}, []
    for group, langs in enumerate(groups):
        out = tmp_path / f"group{group}.pt"
        assert export_checkpoint(stage2, out, language=langs[-1])["group"] == group
        exported[group] = torch.load(out, map_location="cpu", weights_only=False)["model"]
        runs += [f"{out} test_{lang}" for lang in langs]  # the per-language manifests of gdps-prep
    stock_out = run([*STOCK_FAIRSEQ_ENV, *ONE_THREAD, sys.executable, "-c", STOCK_GENERATE, tiny_data, ";".join(runs),
                     *DECODE]).stdout
    decodes = stock_out.split("=== END")[:-1]
    assert len(decodes) == len(runs) == 4
    for lang, decode in zip([lang for langs in groups for lang in langs], decodes):
        ids = manifest_ids(tiny_data / f"test_{lang}.tsv")
        stock = hypotheses(decode, ids)
        assert len(stock) == len(ids) > 0
        for utt, hyp in stock.items():
            assert hyp["ref"] == gdps[utt]["ref"], utt  # the same utterance
            assert hyp["tokens"] == gdps[utt]["tokens"], utt
            assert hyp["score"] == pytest.approx(gdps[utt]["score"], abs=1e-5), utt
    # four updates made the groups' private weights differ, so each export is its own group's
    split_key = "encoder.transformer_layers.0.fc1.weight"
    assert "encoder.transformer_layers.0.ffn.fc1_private_weight" in gdps_state["model"]
    assert not torch.allclose(exported[0][split_key], exported[1][split_key])
