"""GDPS stage 1 (and a split model) started from a pretrained stock S2T/ASR encoder
(``--load-pretrained-encoder-from``): every encoder weight, FFNs included, comes from it."""
from argparse import Namespace

import pytest
import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary

from conftest import BIN, REPO, run
from fairseq_gdps.gdps.stats import GradientStatistics
from fairseq_gdps.models import ffn_module_names, partitioned_ffns

FEAT = 8
LANGS = ["ar", "et", "ga", "sw"]
SIZES = dict(encoder_layers=2, decoder_layers=1, encoder_embed_dim=32, decoder_embed_dim=32,
             encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=2,
             decoder_attention_heads=2, conv_channels=16, input_feat_per_channel=FEAT, input_channels=1,
             max_source_positions=1000, max_target_positions=100, dropout=0.1, fp16=False,
             depthwise_conv_kernel_size=3)
ENCODER_FFN = {"s2t_transformer": "encoder.transformer_layers.1.ffn", "s2t_conformer": "encoder.conformer_layers.1.ffn2"}


class FakeTask:
    def __init__(self, vocab):
        self.target_dictionary = Dictionary()
        for i in range(vocab):
            self.target_dictionary.add_symbol(f"w{i}")
        self.source_dictionary = None
        self.languages = list(LANGS)


def save_asr_checkpoint(path, kind, vocab=30, **sizes):
    """A stock S2T model with its own (ASR) vocabulary, saved as fairseq's trainer saves it."""
    torch.manual_seed(7)
    args = Namespace(arch=kind, **dict(SIZES, **sizes))
    model = models.build_model(args, FakeTask(vocab))
    state = {"args": None, "cfg": {"model": args}, "model": model.state_dict(), "criterion": None,
             "optimizer_history": [{"criterion_name": "x", "optimizer_name": "y", "lr_scheduler_state": {},
                                    "num_updates": 2}], "task_state": {}, "extra_state": {}}
    checkpoint_utils.torch_persistent_save(state, str(path))
    return model.eval()


def build_gdps(kind, pretrained, **extra):
    torch.manual_seed(0)
    args = Namespace(arch=f"{kind}_gdps", load_pretrained_encoder_from=str(pretrained), **SIZES, **extra)
    return models.build_model(args, FakeTask(20)), args


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_encoder_weights_are_the_pretrained_ones(tmp_path, kind, one_thread):
    asr = save_asr_checkpoint(tmp_path / "asr.pt", kind)
    model, args = build_gdps(kind, tmp_path / "asr.pt")
    pretrained = asr.encoder.state_dict()
    loaded = model.encoder.state_dict()
    assert set(loaded) == set(pretrained)
    for name, value in pretrained.items():
        assert torch.equal(loaded[name], value), name
    # the encoder FFNs the probe tracks are the pretrained ones
    blocks = ffn_module_names(model)
    fc1, _ = blocks[ENCODER_FFN[kind]]
    assert torch.equal(fc1.weight, ffn_module_names(asr)[ENCODER_FFN[kind]][0].weight)
    # the decoder (another vocabulary) is not loaded; the flag is consumed
    assert model.decoder.embed_tokens.weight.shape[0] != asr.decoder.embed_tokens.weight.shape[0]
    assert args.load_pretrained_encoder_from is None


@pytest.mark.parametrize("kind", ["s2t_transformer", "s2t_conformer"])
def test_split_of_a_pretrained_encoder_ffn_preserves_it(tmp_path, kind, one_thread):
    asr = save_asr_checkpoint(tmp_path / "asr.pt", kind)
    model, _ = build_gdps(kind, tmp_path / "asr.pt", gdps_split_modules=ENCODER_FFN[kind],
                          gdps_groups="ar,ga;et,sw", gdps_shared_ratio=0.5)
    model.eval()
    fc1, fc2 = ffn_module_names(asr)[ENCODER_FFN[kind]]
    ffn = partitioned_ffns(model)[ENCODER_FFN[kind]]
    for group in range(2):
        w1, b1, w2, b2 = ffn.to_dense(group)
        assert torch.equal(w1, fc1.weight) and torch.equal(b1, fc1.bias)
        assert torch.equal(w2, fc2.weight) and torch.equal(b2, fc2.bias)
    x = torch.randn(2, 23, FEAT, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([23, 17])
    with torch.no_grad():
        expected = asr.encoder(x, lengths)["encoder_out"][0]
        for lang in range(len(LANGS)):
            out = model.encoder(x, lengths, src_lang_id=torch.full((2,), lang))["encoder_out"][0]
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_missing_or_mismatched_pretrained_encoder_is_an_error(tmp_path, one_thread):
    with pytest.raises(FileNotFoundError, match=r"--load-pretrained-encoder-from .*missing.pt: no such file"):
        build_gdps("s2t_transformer", tmp_path / "missing.pt")
    save_asr_checkpoint(tmp_path / "wide.pt", "s2t_transformer", encoder_embed_dim=48, decoder_embed_dim=48)
    with pytest.raises(RuntimeError, match=r"--load-pretrained-encoder-from .*wide.pt: its encoder does not fit "
                                           r"the s2t_transformer_gdps encoder.*shape mismatches \['.*\(48"):
        build_gdps("s2t_transformer", tmp_path / "wide.pt")
    save_asr_checkpoint(tmp_path / "conformer.pt", "s2t_conformer")
    with pytest.raises(RuntimeError, match=r"conformer.pt: its encoder does not fit.*missing \[.*'transformer_layers.0.fc1"):
        build_gdps("s2t_transformer", tmp_path / "conformer.pt")


TINY = ["--encoder-layers", "2", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--decoder-attention-heads", "2", "--conv-channels", "16"]
ONE_THREAD = ["env", "OMP_NUM_THREADS=1"]  # tiny tensors on shared cores (conftest's run() sets 2)


def train(data, save_dir, *extra, updates, lr):
    run([*ONE_THREAD, BIN / "fairseq-train", data, "--user-dir", REPO / "fairseq_gdps", "--config-yaml", "config.yaml",
         "--train-subset", "train", "--valid-subset", "dev", *TINY, "--optimizer", "adam", "--lr", str(lr),
         "--label-smoothing", "0.1", "--max-tokens", "4000", "--required-batch-size-multiple", "1",
         "--max-update", str(updates), "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints",
         "--seed", "1", "--log-format", "simple", *extra])


@pytest.mark.slow
def test_stage1_starts_from_a_trained_stock_encoder(tiny_data, tmp_path):
    """A stock s2t_transformer trained for 2 updates; GDPS stage 1 (probe) from its encoder."""
    train(tiny_data, tmp_path / "asr", "--task", "speech_to_text", "--arch", "s2t_transformer_s",
          "--criterion", "label_smoothed_cross_entropy", updates=2, lr=5e-3)
    asr = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "asr" / "checkpoint_last.pt"))["model"]
    lr = 1e-4
    train(tiny_data, tmp_path / "stage1", "--task", "speech_to_text_gdps", "--arch", "s2t_transformer_gdps_s",
          "--load-pretrained-encoder-from", tmp_path / "asr" / "checkpoint_last.pt", "--seed", "2",
          "--criterion", "label_smoothed_cross_entropy_gdps", "--gdps-probe-interval", "1",
          "--gdps-stats", tmp_path / "stage1" / "stats.pt", updates=1, lr=lr)
    stage1 = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "stage1" / "checkpoint_last.pt"))
    # Adam's first step moves every weight by at most lr: the encoder started at the pretrained
    # weights (a fresh initialisation differs by ~0.1), the decoder did not
    encoder = [k for k in asr if k.startswith("encoder.") and torch.is_floating_point(asr[k])]
    assert any(".fc1." in k for k in encoder)
    for k in encoder:
        assert (stage1["model"][k] - asr[k]).abs().max() <= lr * 1.001, k
    assert (stage1["model"]["decoder.layers.0.fc1.weight"] - asr["decoder.layers.0.fc1.weight"]).abs().max() > 10 * lr
    assert stage1["cfg"]["model"].load_pretrained_encoder_from is None  # the checkpoint holds the weights
    # the probe recorded the pretrained encoder's FFNs
    stats = GradientStatistics.load(tmp_path / "stage1" / "stats.pt")
    assert {"encoder.transformer_layers.0.ffn", "encoder.transformer_layers.1.ffn"} <= set(stats.module_names)
