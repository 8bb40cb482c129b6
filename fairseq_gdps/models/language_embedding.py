"""The language embedding (``--gdps-lang-embedding``): a learned vector per source language,
added to every frame of the encoder input just before the dropout that precedes the first
encoder layer (after the subsampler and positional embedding; in the conformer, after its input
projection). Without a split the model is a "tagged baseline", a shared model that knows each
utterance's language as the split models do; with a split, GDPS uses the same vectors.

The vectors start at zero, so adding the embedding to a trained model changes nothing: a stage-1
checkpoint without it loads into a model with it (``load_stage1_weights``) and computes the same
function. The languages its rows stand for are fixed when it is first built and kept in
``gdps_lang_embedding_languages``; later builds map the task's language ids onto those rows by name.
"""
from __future__ import annotations

import contextlib
import logging
from typing import List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.models.speech_to_text.s2t_conformer import S2TConformerEncoder
from fairseq.models.speech_to_text.s2t_transformer import S2TTransformerEncoder

from fairseq_gdps.models.arguments import set_arg
from fairseq_gdps.models.split_spec import SplitSpec
from fairseq_gdps.net_input import LANG_ID_KEY

logger = logging.getLogger(__name__)

LANG_EMBEDDING_FLAG = "--gdps-lang-embedding"
LANG_EMBEDDING_KEY = "encoder.gdps_lang_embedding.weight"  # its parameter in the model's state dict


class LanguageEmbeddingMixin:
    """The encoder side: the embedding ``gdps_lang_embedding``, the map from task language ids to
    its rows, and the forward pre-hook that adds a batch's vectors to the encoder input."""

    def _lang_embedding_site(self) -> Optional[nn.Module]:
        """The dropout module applied to the encoder input right before the first encoder layer
        (S2T transformer: ``dropout_module``; S2T conformer: ``dropout``, after ``linear``)."""
        if isinstance(self, S2TConformerEncoder):
            return self.dropout
        if isinstance(self, S2TTransformerEncoder):
            return self.dropout_module
        return None

    def add_language_embedding(self, num_languages: int, embed_dim: int):
        """``gdps_lang_embedding`` (zeros), added to the input of the dropout module that precedes
        the encoder layers, by a forward pre-hook, for the utterances of every forward pass."""
        site = self._lang_embedding_site()
        if site is None:
            raise ValueError(f"{LANG_EMBEDDING_FLAG} is supported by s2t_transformer_gdps* and s2t_conformer_gdps* "
                             f"only, not by {type(self).__name__}")
        if num_languages < 1:
            raise ValueError(f"{LANG_EMBEDDING_FLAG} needs the task's source languages (--task speech_to_text_gdps)")
        self.gdps_lang_embedding = nn.Embedding(num_languages, embed_dim)
        nn.init.zeros_(self.gdps_lang_embedding.weight)
        self._gdps_lang_vectors = None
        site.register_forward_pre_hook(self._add_language_vectors)

    def set_language_rows(self, lang_to_row: Optional[List[int]]):
        """Task language id -> row of the language embedding (-1: a language it has no row for)."""
        table = None if lang_to_row is None else torch.tensor(lang_to_row, dtype=torch.long)
        if hasattr(self, "gdps_lang_to_row"):
            del self.gdps_lang_to_row
        self.register_buffer("gdps_lang_to_row", table, persistent=False)

    def language_vectors(self, src_lang_id: Optional[Tensor]) -> Optional[Tensor]:
        """(B, C) language vectors of a batch, or None without a language embedding."""
        embedding = getattr(self, "gdps_lang_embedding", None)
        if embedding is None:
            return None
        if src_lang_id is None:
            raise RuntimeError(f"{LANG_EMBEDDING_FLAG}: the model adds a vector per source language to the encoder "
                               f"input: give the model net_input['{LANG_ID_KEY}'] (--task speech_to_text_gdps)")
        table = self.gdps_lang_to_row
        lang = src_lang_id.to(device=table.device, dtype=torch.long).view(-1)
        if lang.numel() and (int(lang.min()) < 0 or int(lang.max()) >= table.numel()):
            raise ValueError(f"{LANG_ID_KEY} outside [0, {table.numel()}): {lang.tolist()}")
        rows = table.index_select(0, lang)
        if bool((rows < 0).any()):
            bad = sorted(set(lang[rows < 0].tolist()))
            raise ValueError(f"language ids {bad} have no vector in the language embedding ({LANG_EMBEDDING_FLAG}), "
                             "which was trained for other languages")
        return embedding(rows.to(embedding.weight.device))

    @contextlib.contextmanager
    def adding_language_vectors(self, src_lang_id: Optional[Tensor]):
        """For the duration of an encoder pass, the pre-hook adds these utterances' vectors."""
        self._gdps_lang_vectors = self.language_vectors(src_lang_id)
        try:
            yield
        finally:
            self._gdps_lang_vectors = None

    def _add_language_vectors(self, module, inputs):
        vectors = self._gdps_lang_vectors
        if vectors is None:
            return None
        x = inputs[0]  # T x B x C
        return (x + vectors.unsqueeze(0).to(x.dtype),) + tuple(inputs[1:])


def _model_cfg_value(state: dict, key: str):
    """A model arg of a loaded checkpoint (cfg.model, or legacy args), None when absent."""
    cfg = state.get("cfg")
    model_cfg = cfg.get("model") if cfg is not None else state.get("args")
    if model_cfg is None:
        return None
    try:
        return model_cfg.get(key) if hasattr(model_cfg, "get") else getattr(model_cfg, key, None)
    except Exception:  # a struct config without the key
        return None


def add_language_embedding(model, args, spec: SplitSpec, init_state: Optional[dict] = None):
    """--gdps-lang-embedding: one row per language of ``gdps_lang_embedding_languages`` (set here,
    once: from the stage-1 checkpoint of --gdps-init-from when it has an embedding, else from the
    task's languages), and the task's language ids mapped onto those rows by name."""
    stored = [x for x in (getattr(args, "gdps_lang_embedding_languages", None) or "").split(",") if x]
    if not stored and init_state is not None:
        stored = [x for x in (_model_cfg_value(init_state, "gdps_lang_embedding_languages") or "").split(",") if x]
    rows = stored or list(spec.languages)
    if not rows:
        raise ValueError(f"{LANG_EMBEDDING_FLAG} needs the task's source languages (--task speech_to_text_gdps "
                         "with a train manifest, or --gdps-languages)")
    if len(set(rows)) != len(rows):
        raise ValueError(f"{LANG_EMBEDDING_FLAG}: a language is listed twice: {rows}")
    missing = [lang for lang in spec.languages if lang not in rows]
    if missing:
        logger.warning(f"{LANG_EMBEDDING_FLAG}: languages {missing} of the task have no learned vector (the "
                       f"embedding holds {rows}); their utterances cannot be encoded")
    model.encoder.add_language_embedding(len(rows), args.encoder_embed_dim)
    model.encoder.set_language_rows([rows.index(lang) if lang in rows else -1 for lang in spec.languages])
    set_arg(args, "gdps_lang_embedding_languages", ",".join(rows))
    logger.info(f"GDPS language embedding: {len(rows)} x {args.encoder_embed_dim}, rows {rows}")


def load_stage1_weights(model, state: dict, args, init_from: str):
    """--gdps-init-from: the stage-1 weights, strictly, except that a stage-1 model without a
    language embedding may start one (it stays zero: the function is unchanged)."""
    weights = state["model"]
    own = model.state_dict()
    if LANG_EMBEDDING_KEY in weights and LANG_EMBEDDING_KEY not in own:
        raise RuntimeError(f"--gdps-init-from {init_from}: the stage-1 model has a language embedding "
                           f"({LANG_EMBEDDING_FLAG}); pass {LANG_EMBEDDING_FLAG} to stage 2 as well")
    if LANG_EMBEDDING_KEY in own and LANG_EMBEDDING_KEY not in weights:
        weights = dict(weights, **{LANG_EMBEDDING_KEY: own[LANG_EMBEDDING_KEY]})
        logger.info(f"--gdps-init-from {init_from}: no language embedding there; {LANG_EMBEDDING_FLAG} starts at zero")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"--gdps-init-from {init_from}: its weights do not fit the unsplit "
                           f"{args.arch} (same sizes needed): {e}") from e
