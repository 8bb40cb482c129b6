"""``xm_transformer_gdps``: fairseq's ``xm_transformer`` (a pretrained wav2vec 2.0 / XLS-R encoder
read from ``--w2v-path``, a convolutional adaptor and a transformer decoder, on raw waveforms)
with GDPS: the probe, the split and the routing of the S2T GDPS models, unchanged.

FFN block names (``ffn_module_names``): ``encoder.w2v_encoder.w2v_model.encoder.layers.{i}.ffn``
for the wav2vec 2.0 encoder layers (their fc1/fc2) and ``decoder.layers.{i}.ffn`` for the decoder.
The encoder routes its split FFNs by ``net_input["src_lang_id"]`` and hands the group ids to the
decoder in ``encoder_out["gdps_group_ids"]``, as the S2T GDPS models do.

Differences from the stock ``xm_transformer`` build (``XMTransformerModel.build_encoder`` /
``build_decoder`` name their classes, so the two are rebuilt here with the GDPS classes, with the
same options):

- When the adaptor has no projection (``--adaptor-proj`` and ``--encoder-proj`` unset, the "V0"
  layout in which the decoder attends to the wav2vec 2.0 width), ``encoder_embed_dim`` is read from
  the ``--w2v-path`` checkpoint. The stock model leaves it at its 1024 default, so its decoder's
  encoder attention does not fit any other width.
- Options the stock architecture forgets to default (``w2v_args``, ``load_ema``,
  ``freeze_regex``, read by fairseq's ``Wav2VecEncoder``) get their defaults, so the model also
  builds outside ``fairseq-train``'s argument parser.
- ``--w2v-freezing-updates`` (which makes every wav2vec 2.0 parameter trainable after N updates)
  is refused together with ``--gdps-train-only`` / ``--gdps-freeze``, which it would undo.

Input: raw 16 kHz mono waveforms (data config ``use_audio_input: true``). fairseq-fixed 0.12.3.1
cannot read ``.wav``/``.flac`` files without torchaudio (``audio_utils.get_waveform`` calls
``convert_waveform``, which imports ``torchaudio.sox_effects`` before checking whether any
conversion is needed); it does read a waveform stored as ``.npy`` inside an uncompressed zip
(``<zip>:<offset>:<length>``), see ``docs/pretrained.md``.
"""
from __future__ import annotations

import copy
import logging

from fairseq import checkpoint_utils
from fairseq.models import register_model, register_model_architecture
from fairseq.models.speech_to_text.xm_transformer import (
    Wav2VecEncoderWithAdaptor,
    XMTransformerModel,
    base_architecture as xm_base_architecture,
    need_finetuning,
    remove_weight_norm_from_model,
)

from fairseq_gdps.models.arguments import add_gdps_args, gdps_defaults, set_arg
from fairseq_gdps.models.routing import GDPSEncoderMixin, GDPSTransformerDecoder
from fairseq_gdps.models.s2t_gdps import GDPSModelMixin
from fairseq_gdps.modules.freezing import parse_globs

logger = logging.getLogger(__name__)


class XMTransformerGDPSEncoder(GDPSEncoderMixin, Wav2VecEncoderWithAdaptor):
    """wav2vec 2.0 encoder + adaptor; routes its split FFNs by ``src_lang_id``."""


def w2v_embed_dim(path: str) -> int:
    """The encoder width stored in a wav2vec 2.0 / XLS-R checkpoint (``cfg`` or legacy ``args``)."""
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    if state.get("cfg") is not None:
        return int(state["cfg"]["model"]["encoder_embed_dim"])
    if state.get("args") is not None:
        return int(state["args"].encoder_embed_dim)
    raise ValueError(f"--w2v-path {path}: neither 'cfg' nor 'args' in the checkpoint")


def _is_v0(args) -> bool:
    return not args.adaptor_proj and not args.encoder_proj


@register_model("xm_transformer_gdps")
class XMTransformerGDPSModel(GDPSModelMixin, XMTransformerModel):
    @classmethod
    def add_args(cls, parser):
        XMTransformerModel.add_args(parser)
        add_gdps_args(parser)

    @classmethod
    def build_model(cls, args, task):
        xm_transformer_gdps(args)
        if getattr(args, "w2v_freezing_updates", None) is not None and (
            parse_globs(args.gdps_train_only) or parse_globs(args.gdps_freeze)
        ):
            raise ValueError("--w2v-freezing-updates makes every wav2vec 2.0 parameter trainable after N "
                             "updates, undoing --gdps-train-only / --gdps-freeze: use one or the other")
        if _is_v0(args) and args.w2v_path:
            width = w2v_embed_dim(args.w2v_path)
            if args.encoder_embed_dim != width:
                logger.info(f"encoder_embed_dim {args.encoder_embed_dim} -> {width}, the width of {args.w2v_path}")
                set_arg(args, "encoder_embed_dim", width)
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, args):
        enc_args = copy.deepcopy(args)
        if _is_v0(args):  # no projection: the adaptor works at the wav2vec 2.0 width
            enc_args.decoder_embed_dim = args.encoder_embed_dim
        encoder = XMTransformerGDPSEncoder(enc_args)
        encoder = cls.maybe_load_pretrained(encoder, getattr(args, "load_pretrained_encoder_from", None))
        if args.remove_weight_norm:
            logger.warning("Removing weight norm from wav2vec encoder")
            remove_weight_norm_from_model(encoder)
        return encoder

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        dec_args = copy.deepcopy(args)
        if not _is_v0(args):
            dec_args.encoder_embed_dim = dec_args.decoder_embed_dim
        dec_args.dropout = args.decoder_dropout
        dec_args.attention_dropout = args.decoder_attention_dropout
        dec_args.activation_dropout = args.decoder_activation_dropout
        dec_args.layerdrop = args.decoder_layerdrop
        decoder = GDPSTransformerDecoder(dec_args, task.target_dictionary, embed_tokens)
        decoder = cls.maybe_load_pretrained(decoder, getattr(args, "load_pretrained_decoder_from", None))
        for name, p in decoder.named_parameters():
            p.requires_grad = need_finetuning(args.finetune_decoder_params, name)
        return decoder


@register_model_architecture("xm_transformer_gdps", "xm_transformer_gdps")
def xm_transformer_gdps(args):
    gdps_defaults(args)
    for key, value in (("w2v_args", None), ("load_ema", False), ("freeze_regex", None), ("ddp_backend", "pytorch_ddp"),
                       ("load_pretrained_encoder_from", None), ("load_pretrained_decoder_from", None)):
        if not hasattr(args, key):
            set_arg(args, key, value)
    xm_base_architecture(args)
