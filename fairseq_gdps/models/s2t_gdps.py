"""Stage-2 GDPS models: fairseq's S2T Transformer / Conformer with chosen FFNs partitioned into
shared units and one private block per language group, routed by the source language of every
utterance (``s2t_transformer_gdps*``, ``s2t_conformer_gdps*``).

``GDPSModelMixin.build_model`` is the whole stage-2 build, shared with ``xm_transformer_gdps``:
resolve the split (``split_spec``), build the stock model with the GDPS encoder and decoder
(``routing``), add the language embedding (``language_embedding``), load the stage-1 weights of
``--gdps-init-from``, split the FFNs (``ffn_surgery``) and apply the freezing flags. The flags
naming a file (``--gdps-plan``, ``--gdps-init-from``, ``--load-pretrained-encoder-from``) are
cleared once used, so the checkpoint alone rebuilds the model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch.nn as nn
from torch import Tensor

from fairseq import checkpoint_utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.speech_to_text.s2t_conformer import (
    S2TConformerEncoder,
    S2TConformerModel,
    conformer_base_architecture,
)
from fairseq.models.speech_to_text.s2t_transformer import (
    S2TTransformerEncoder,
    S2TTransformerModel,
    base_architecture,
    s2t_transformer_m,
    s2t_transformer_s,
)
from fairseq.modules.conformer_layer import FeedForwardModule

from fairseq_gdps.models.arguments import add_gdps_args, gdps_defaults, set_arg
from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.models.ffn_surgery import ffn_module_names, partitioned_ffns, split_ffns
from fairseq_gdps.models.language_embedding import add_language_embedding, load_stage1_weights
from fairseq_gdps.models.routing import GDPSEncoderMixin, GDPSTransformerDecoder
from fairseq_gdps.models.split_spec import SplitSpec, format_groups, resolve_split_spec
from fairseq_gdps.modules.freezing import apply_freezing, parse_globs

logger = logging.getLogger(__name__)


class S2TTransformerGDPSEncoder(GDPSEncoderMixin, S2TTransformerEncoder):
    pass


class S2TConformerGDPSEncoder(GDPSEncoderMixin, S2TConformerEncoder):
    def __init__(self, args):
        super().__init__(args)
        # fairseq's FeedForwardModule builds its activation as nn.SiLU(hidden_units), i.e. with
        # inplace=True: it overwrites w_1's output, so a hook on that output (the GDPS probe's
        # per-language weight gradients) never fires. The out-of-place SiLU computes the same.
        for module in self.modules():
            if isinstance(module, FeedForwardModule) and isinstance(module.activation, nn.SiLU) \
                    and module.activation.inplace:
                module.activation = nn.SiLU()


def _load_pretrained_encoder(encoder, args):
    """``--load-pretrained-encoder-from``: every ``encoder.*`` weight of a fairseq S2T/ASR
    checkpoint (FFNs included, before any split), strictly. Unlike stock fairseq, a missing file
    is an error, not a warning; the flag is then cleared, as ``--gdps-init-from`` is, so the
    checkpoints (which hold the weights) do not need that file to be rebuilt."""
    path = getattr(args, "load_pretrained_encoder_from", None)
    if path is None:
        return encoder
    flag = f"--load-pretrained-encoder-from {path}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: no such file")
    weights = {k[len("encoder."):]: v for k, v in checkpoint_utils.load_checkpoint_to_cpu(path)["model"].items()
               if k.startswith("encoder.")}
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RuntimeError(
            f"{flag}: its encoder does not fit the {args.arch} encoder (same architecture and sizes "
            f"needed): missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    encoder.load_state_dict(weights, strict=True)
    logger.info(f"loaded pretrained encoder from: {path}")
    set_arg(args, "load_pretrained_encoder_from", None)
    return encoder


def freeze_parameters(model: nn.Module, args) -> List[str]:
    """Apply --gdps-train-only / --gdps-freeze (after the split, so globs can name its parts)."""
    frozen = apply_freezing(model, parse_globs(getattr(args, "gdps_train_only", None)),
                            parse_globs(getattr(args, "gdps_freeze", None)), blocks=ffn_module_names(model))
    if frozen:
        total = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(f"GDPS freezing: {len(frozen)} parameter tensors frozen; training {trained:,} of "
                    f"{total:,} parameters")
    return frozen


def _apply_split(model: nn.Module, args, spec: SplitSpec) -> None:
    """Route the languages to their groups, split the FFNs (function-preserving) and apply the
    freezing flags: the last steps of a build, and the whole of a split in place."""
    group_of = {lang: k for k, g in enumerate(spec.groups) for lang in g}
    model.encoder.set_language_groups([group_of.get(lang, -1) for lang in spec.languages] if spec.groups else None)
    if spec.modules:
        try:
            split_ffns(model, spec.modules, len(spec.groups), spec.shared_ratio, method=args.gdps_init,
                       seed=args.gdps_init_seed)
        except ValueError as e:  # e.g. a module the model lacks: say which plan or flag named it
            raise ValueError(f"{spec.source}: {e}") from None
    freeze_parameters(model, args)


def split_in_place(model: nn.Module, args, task, plan: Plan, source: str) -> SplitSpec:
    """Split a built (and trained) unsplit GDPS model in place by ``plan``, exactly as a build
    with ``--gdps-plan`` splits the stage-1 weights it loads. The plan is written into ``args`` as
    the explicit split fields, so that checkpoints saved with these args rebuild the split model.
    ``source`` names the plan in errors. The single-run switch (``--gdps-split-at-update``) calls it."""
    if not isinstance(model, GDPSModelMixin):
        raise ValueError(f"{type(model).__name__} is not a GDPS model: use an s2t_*_gdps architecture")
    if partitioned_ffns(model):
        raise ValueError(f"{source}: the model is split already")
    set_arg(args, "gdps_split_modules", ",".join(plan.modules))
    set_arg(args, "gdps_groups", format_groups(plan.groups))
    set_arg(args, "gdps_shared_ratio", float(plan.shared_ratio))
    set_arg(args, "gdps_plan_json", plan.dumps())
    spec = resolve_split_spec(args, task)
    spec.source = source
    _apply_split(model, args, spec)
    return spec


class GDPSModelMixin:
    """The stage-2 build of every GDPS model (see the module doc) and a forward that passes
    ``src_lang_id`` to the encoder."""

    encoder_class = None

    @classmethod
    def build_encoder(cls, args):
        return _load_pretrained_encoder(cls.encoder_class(args), args)

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        return GDPSTransformerDecoder(args, task.target_dictionary, embed_tokens)

    @classmethod
    def build_model(cls, args, task):
        gdps_defaults(args)
        spec = resolve_split_spec(args, task)
        init_from = getattr(args, "gdps_init_from", None)
        state = checkpoint_utils.load_checkpoint_to_cpu(init_from) if init_from else None
        model = super().build_model(args, task)
        if getattr(args, "gdps_lang_embedding", False):
            add_language_embedding(model, args, spec, state)
        if init_from:
            load_stage1_weights(model, state, args, init_from)
            logger.info(f"GDPS stage 2 initialised from {init_from}")
            set_arg(args, "gdps_init_from", None)  # the checkpoint then holds the weights itself
        _apply_split(model, args, spec)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, src_lang_id: Optional[Tensor] = None):
        encoder_out = self.encoder(src_tokens=src_tokens, src_lengths=src_lengths, src_lang_id=src_lang_id)
        return self.decoder(prev_output_tokens=prev_output_tokens, encoder_out=encoder_out)


@register_model("s2t_transformer_gdps")
class S2TTransformerGDPSModel(GDPSModelMixin, S2TTransformerModel):
    encoder_class = S2TTransformerGDPSEncoder

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_gdps_args(parser)


@register_model("s2t_conformer_gdps")
class S2TConformerGDPSModel(GDPSModelMixin, S2TConformerModel):
    encoder_class = S2TConformerGDPSEncoder

    @staticmethod
    def add_args(parser):
        S2TConformerModel.add_args(parser)
        add_gdps_args(parser)


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------
@register_model_architecture("s2t_transformer_gdps", "s2t_transformer_gdps")
def s2t_transformer_gdps(args):
    gdps_defaults(args)
    base_architecture(args)


@register_model_architecture("s2t_transformer_gdps", "s2t_transformer_gdps_xs")
def s2t_transformer_gdps_xs(args):
    """Tiny, for 2 CPU cores: 4 encoder / 2 decoder layers, 160-dim, FFN 512, 4 heads."""
    args.encoder_layers = getattr(args, "encoder_layers", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 160)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.conv_channels = getattr(args, "conv_channels", 256)
    args.dropout = getattr(args, "dropout", 0.1)
    s2t_transformer_gdps(args)


@register_model_architecture("s2t_transformer_gdps", "s2t_transformer_gdps_s")
def s2t_transformer_gdps_s(args):
    gdps_defaults(args)
    s2t_transformer_s(args)


@register_model_architecture("s2t_transformer_gdps", "s2t_transformer_gdps_m")
def s2t_transformer_gdps_m(args):
    gdps_defaults(args)
    s2t_transformer_m(args)


@register_model_architecture("s2t_conformer_gdps", "s2t_conformer_gdps")
def s2t_conformer_gdps(args):
    gdps_defaults(args)
    conformer_base_architecture(args)


@register_model_architecture("s2t_conformer_gdps", "s2t_conformer_gdps_xs")
def s2t_conformer_gdps_xs(args):
    """Tiny, for 2 CPU cores: 4 conformer / 2 decoder layers, 160-dim, FFN 512, 4 heads, kernel 15."""
    args.encoder_layers = getattr(args, "encoder_layers", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 160)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    args.depthwise_conv_kernel_size = getattr(args, "depthwise_conv_kernel_size", 15)
    args.conv_channels = getattr(args, "conv_channels", 256)
    args.dropout = getattr(args, "dropout", 0.1)
    s2t_conformer_gdps(args)


@register_model_architecture("s2t_conformer_gdps", "s2t_conformer_gdps_s")
def s2t_conformer_gdps_s(args):
    """12 conformer layers (a layer 11 as in the paper), 256-dim, FFN 1024, 4 heads; 6 decoder layers."""
    args.encoder_layers = getattr(args, "encoder_layers", 12)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 256)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    s2t_conformer_gdps(args)


@register_model_architecture("s2t_conformer_gdps", "s2t_conformer_gdps_m")
def s2t_conformer_gdps_m(args):
    """12 conformer layers, 512-dim, FFN 2048, 8 heads; 6 decoder layers."""
    args.encoder_layers = getattr(args, "encoder_layers", 12)
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 2048)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 8)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 8)
    args.dropout = getattr(args, "dropout", 0.15)
    s2t_conformer_gdps(args)
