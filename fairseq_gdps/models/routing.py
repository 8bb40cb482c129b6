"""Routing by language: the encoder and decoder parts shared by every GDPS model.

``net_input["src_lang_id"]`` (the index of each utterance's source language in the task's
languages) is mapped to a group by a non-persistent buffer built from the split's groups. The
encoder returns the group ids in ``encoder_out["gdps_group_ids"]`` (reordered with the beam), and
the decoder routes its split FFNs with them. Inside fairseq's layers, whose ``forward`` knows
nothing of groups, the ids reach each ``PartitionedFFN`` through ``route``, set for the duration
of the encoder / decoder pass.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.models.speech_to_text.s2t_transformer import TransformerDecoderScriptable

from fairseq_gdps.models.language_embedding import LanguageEmbeddingMixin
from fairseq_gdps.modules.partitioned_ffn import PartitionedFFN, route
from fairseq_gdps.net_input import LANG_ID_KEY

GROUP_IDS_KEY = "gdps_group_ids"  # the encoder_out key holding the group id of every utterance


class GDPSEncoderMixin(LanguageEmbeddingMixin):
    """Maps ``src_lang_id`` to groups, routes the encoder's split FFNs and hands the group ids on;
    adds the language embedding, when the model has one, to the encoder input."""

    def set_language_groups(self, lang_to_group: Optional[List[int]]):
        """Task language id -> group (-1: a language in no group)."""
        table = None if lang_to_group is None else torch.tensor(lang_to_group, dtype=torch.long)
        if hasattr(self, "gdps_lang_to_group"):
            del self.gdps_lang_to_group
        self.register_buffer("gdps_lang_to_group", table, persistent=False)

    def group_ids(self, src_lang_id: Optional[Tensor]) -> Optional[Tensor]:
        table = getattr(self, "gdps_lang_to_group", None)
        if src_lang_id is None or table is None:
            return None
        lang = src_lang_id.to(device=table.device, dtype=torch.long).view(-1)
        if lang.numel() and (int(lang.min()) < 0 or int(lang.max()) >= table.numel()):
            raise ValueError(f"{LANG_ID_KEY} outside [0, {table.numel()}): {lang.tolist()}")
        groups = table.index_select(0, lang)
        if bool((groups < 0).any()):
            bad = sorted(set(lang[groups < 0].tolist()))
            raise ValueError(f"language ids {bad} belong to no GDPS group")
        return groups

    def forward(self, src_tokens, src_lengths, src_lang_id: Optional[Tensor] = None, return_all_hiddens: bool = False):
        groups = self.group_ids(src_lang_id)
        ffns = [m for m in self.modules() if isinstance(m, PartitionedFFN)]
        with self.adding_language_vectors(src_lang_id), route(ffns, groups):
            out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        out[GROUP_IDS_KEY] = [groups] if groups is not None else []
        return out

    def reorder_encoder_out(self, encoder_out, new_order):
        new = super().reorder_encoder_out(encoder_out, new_order)
        new[GROUP_IDS_KEY] = [g.index_select(0, new_order) for g in encoder_out.get(GROUP_IDS_KEY, [])]
        return new


class GDPSTransformerDecoder(TransformerDecoderScriptable):
    """Routes the decoder's split FFNs with ``encoder_out["gdps_group_ids"]``."""

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        ffns = [m for m in self.modules() if isinstance(m, PartitionedFFN)]
        groups = None
        if encoder_out is not None and len(encoder_out.get(GROUP_IDS_KEY, [])) > 0:
            groups = encoder_out[GROUP_IDS_KEY][0]
        with route(ffns, groups):
            return super().extract_features(prev_output_tokens, encoder_out, incremental_state,
                                            full_context_alignment, alignment_layer, alignment_heads)
