"""--gdps-train-only / --gdps-freeze: glob selection over parameter names and FFN block aliases,
clear errors, and the flags on a built GDPS model (frozen parameters get no gradient)."""
from argparse import Namespace

import pytest
import torch
from torch import nn

from fairseq import models
from fairseq.data import Dictionary

from fairseq_gdps.models import ffn_module_names
from fairseq_gdps.modules.freezing import apply_freezing, ffn_parameter_aliases, parse_globs, trainable_names

NAMES = ["encoder.conv.weight", "encoder.layers.0.fc1.weight", "encoder.layers.0.attn.weight",
         "decoder.layers.0.fc1.weight", "decoder.embed.weight"]


def test_parse_globs():
    assert parse_globs(" decoder.*, *.ffn* ,,") == ["decoder.*", "*.ffn*"]
    assert parse_globs(None) == [] and parse_globs("") == []


def test_train_only_and_freeze_compose():
    assert trainable_names(NAMES, train_only=["decoder.*"]) == ["decoder.layers.0.fc1.weight", "decoder.embed.weight"]
    assert trainable_names(NAMES, freeze=["encoder.*"]) == ["decoder.layers.0.fc1.weight", "decoder.embed.weight"]
    # trained: matches train_only and no freeze glob; '*' crosses dots
    assert trainable_names(NAMES, train_only=["*.fc1.*", "decoder.*"], freeze=["decoder.embed.*"]) == [
        "encoder.layers.0.fc1.weight", "decoder.layers.0.fc1.weight"]
    assert trainable_names(NAMES) == NAMES


def test_block_aliases_select_ffn_parameters():
    aliases = {"encoder.layers.0.fc1.weight": ["encoder.layers.0.ffn.fc1.weight"],
               "decoder.layers.0.fc1.weight": ["decoder.layers.0.ffn.fc1.weight"]}
    assert trainable_names(NAMES, train_only=["*.ffn*"], aliases=aliases) == [
        "encoder.layers.0.fc1.weight", "decoder.layers.0.fc1.weight"]
    assert trainable_names(NAMES, freeze=["encoder.layers.0.ffn.*"], aliases=aliases) == [
        n for n in NAMES if n != "encoder.layers.0.fc1.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):  # without aliases, no name has 'ffn'
        trainable_names(NAMES, train_only=["*.ffn*"])


def test_glob_matching_nothing_is_an_error_naming_flag_and_glob():
    with pytest.raises(ValueError, match=r"--gdps-train-only: 'dekoder\.\*' matches no parameter"):
        trainable_names(NAMES, train_only=["decoder.*", "dekoder.*"])
    with pytest.raises(ValueError, match=r"--gdps-freeze: 'Encoder\.\*' matches no parameter.*encoder\.conv\.weight"):
        trainable_names(NAMES, freeze=["Encoder.*"])  # case-sensitive


def test_freezing_everything_is_an_error():
    with pytest.raises(ValueError, match="leave no parameter to train"):
        trainable_names(NAMES, train_only=["decoder.*"], freeze=["decoder.*"])


def test_apply_freezing_never_unfreezes():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen by someone else (e.g. --finetune-decoder-params)
    frozen = apply_freezing(model, train_only=["1.*"])
    assert frozen == ["0.weight", "0.bias"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["1.weight"]
    assert apply_freezing(model) == []  # no flags: nothing changes


def test_ffn_parameter_aliases_of_a_real_layer_stack():
    from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
    from fairseq.models.transformer import TransformerConfig

    cfg = TransformerConfig()
    cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = 8, 16, 2
    model = nn.Module()
    model.layers = nn.ModuleList([TransformerEncoderLayerBase(cfg), TransformerEncoderLayerBase(cfg)])
    aliases = ffn_parameter_aliases(model, ffn_module_names(model))
    assert aliases["layers.1.fc2.bias"] == ["layers.1.ffn.fc2.bias"]
    assert aliases["layers.0.fc1.weight"] == ["layers.0.ffn.fc1.weight"]
    assert "layers.0.self_attn.k_proj.weight" not in aliases


# ------------------------------------------------------------------------------ on GDPS models
SIZES = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=16, decoder_embed_dim=16,
             encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32, encoder_attention_heads=2,
             decoder_attention_heads=2, conv_channels=8, input_feat_per_channel=8, input_channels=1,
             max_source_positions=1000, max_target_positions=100, dropout=0.0)


class FakeTask:
    def __init__(self):
        d = Dictionary()
        for i in range(12):
            d.add_symbol(f"w{i}")
        self.target_dictionary, self.source_dictionary = d, None
        self.languages = ["a", "b", "c"]


def build(**extra):
    torch.manual_seed(0)
    return models.build_model(Namespace(arch="s2t_transformer_gdps", **SIZES, **extra), FakeTask())


def test_build_model_applies_the_flags_after_the_split(one_thread):
    model = build(gdps_split_modules="encoder.transformer_layers.1.ffn", gdps_groups="a,b;c",
                  gdps_train_only="decoder.*,*.ffn*", gdps_freeze="decoder.embed_tokens.*")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # unsplit encoder FFN (by its block alias) and the split one (under its block name)
    assert {"encoder.transformer_layers.0.fc1.weight", "encoder.transformer_layers.0.fc2.bias",
            "encoder.transformer_layers.1.ffn.fc1_private_weight",
            "encoder.transformer_layers.1.ffn.fc2_shared_weight"} <= trained
    assert "decoder.layers.1.self_attn.q_proj.weight" in trained
    assert not any(n.startswith("decoder.embed_tokens.") for n in trained)
    assert not any(n.startswith("encoder.subsample.") or ".self_attn." in n and n.startswith("encoder.")
                   for n in trained)

    # a backward pass leaves frozen parameters without gradient, trained ones with one
    g = torch.Generator().manual_seed(1)
    out, _ = model(torch.randn(3, 20, 8, generator=g), torch.tensor([20, 17, 12]),
                   torch.randint(4, 16, (3, 5), generator=g), src_lang_id=torch.tensor([0, 1, 2]))
    out.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_build_model_refuses_a_glob_that_matches_nothing(one_thread):
    with pytest.raises(ValueError, match=r"--gdps-train-only: 'encoder\.layers\.\*' matches no parameter"):
        build(gdps_train_only="encoder.layers.*")
