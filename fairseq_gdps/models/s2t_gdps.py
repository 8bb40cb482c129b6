"""Stage-2 GDPS models: fairseq's S2T Transformer / Conformer with chosen FFNs partitioned into
shared units and one private block per language group (``PartitionedFFN``), routed by the source
language of every utterance.

Module names (shared with the gradient probe, see ``ffn_module_names``): the path of the FFN block
in the model,

- ``encoder.transformer_layers.{i}.ffn``: fc1/fc2 of transformer encoder layer i;
- ``decoder.layers.{i}.ffn``: fc1/fc2 of decoder layer i (transformer and conformer models);
- ``encoder.conformer_layers.{i}.ffn1`` / ``.ffn2``: the first / second (macaron) feed-forward
  module (w_1/w_2) of conformer layer i.
- ``encoder.w2v_encoder.w2v_model.encoder.layers.{i}.ffn``: fc1/fc2 of wav2vec 2.0 / XLS-R
  encoder layer i (``xm_transformer_gdps``, see ``xm_transformer_gdps.py``).

After the split the ``PartitionedFFN`` lives at exactly that path (its parameters are
``<name>.fc1_shared_weight`` etc.; a conformer split keeps its LayerNorm at
``<name>.layer_norm.*``).

Routing: ``net_input["src_lang_id"]`` (LongTensor (B,), the index of the utterance's source
language in the task's language list, ``task.languages``) is mapped to a group by a
non-persistent buffer built at model-building time from the plan's groups. The encoder returns the
group ids in ``encoder_out["gdps_group_ids"]`` (reordered with the beam), and the decoder routes its
split FFNs with them. Inside fairseq's layers, whose ``forward`` knows nothing of groups, the ids
reach the ``PartitionedFFN`` through ``route`` (set for the duration of the encoder / decoder pass).

In a transformer layer the split replaces the inline ``fc1 -> activation -> activation dropout ->
fc2`` by ``fc1 = <the whole PartitionedFFN>`` (a parameter-free call-through, the parameters stay
at ``<layer>.ffn``), ``activation_fn = identity``, ``activation_dropout_module = Identity`` (moved
into the PartitionedFFN) and ``fc2 = Identity``; the layer's ``forward`` is fairseq's own. In a
conformer layer ``ffn1``/``ffn2`` are replaced by a PartitionedFFN that keeps the module's
LayerNorm, activation and both dropouts.

The split travels in the checkpoint: ``build_model`` resolves ``--gdps-plan`` into the explicit
fields ``gdps_split_modules``, ``gdps_groups``, ``gdps_shared_ratio`` and ``gdps_route_languages``
of the model args (and keeps the plan's JSON in ``gdps_plan_json``), then clears ``gdps_plan`` and
``gdps_init_from``, so ``fairseq-generate`` rebuilds the split model from the checkpoint alone.

Language embedding (``--gdps-lang-embedding``, s2t_transformer_gdps / s2t_conformer_gdps): a learned
vector per source language, ``encoder.gdps_lang_embedding.weight`` (num_languages x
encoder_embed_dim), added to every frame of the encoder input after the subsampler and the
positional embedding (and, in the conformer, after its input projection), just before the dropout
that precedes the first encoder layer. It works with or without a split: without one the model is
a "tagged baseline", a shared model that knows each utterance's language as the split models do
(docs/tagged_baseline.md). The languages its rows stand for are fixed when it is first built (the
task's languages) and kept in ``gdps_lang_embedding_languages``; later builds map the task's
language ids onto those rows by name. It starts at zero, so adding it to a trained model changes
nothing (a stage-1 checkpoint without it loads into a model with it through ``--gdps-init-from``
and computes the same function), and a model trained from scratch with it starts as the untagged
model. A stage-1 model trained with it hands its learned vectors (and their Adam moments, through
``gdps-split-checkpoint``) to stage 2 like any other unsplit parameter, so the split stays
function-preserving and the tagged baseline and GDPS see the same language information.
"""
from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
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
    TransformerDecoderScriptable,
    base_architecture,
    s2t_transformer_m,
    s2t_transformer_s,
)
from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
from fairseq.modules.conformer_layer import FeedForwardModule
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.gdps.split import INIT_METHODS, split_ffn_weights
from fairseq_gdps.modules.freezing import apply_freezing, parse_globs
from fairseq_gdps.modules.partitioned_ffn import PartitionedFFN, route

logger = logging.getLogger(__name__)

LANG_ID_KEY = "src_lang_id"  # the net_input key holding the source-language id of every utterance
GROUP_IDS_KEY = "gdps_group_ids"  # the encoder_out key holding the group id of every utterance

# Layers with an inline fc1 -> activation -> activation dropout -> fc2 FFN, and the attribute
# holding that activation dropout (wav2vec 2.0 / XLS-R encoder layers call it dropout2).
_TRANSFORMER_LAYERS = (TransformerEncoderLayerBase, TransformerDecoderLayerBase, TransformerSentenceEncoderLayer)


def _activation_dropout_attr(layer: nn.Module) -> str:
    return "dropout2" if isinstance(layer, TransformerSentenceEncoderLayer) else "activation_dropout_module"


# ---------------------------------------------------------------------------------------------
# options and the plan
# ---------------------------------------------------------------------------------------------
def add_gdps_args(parser):
    parser.add_argument("--gdps-plan", type=str, metavar="JSON",
                        help="plan.json from gdps-analyze: FFN modules to split, language groups, "
                             "shared ratio (excludes --gdps-split-modules/--gdps-groups/--gdps-shared-ratio)")
    parser.add_argument("--gdps-split-modules", type=str, metavar="NAMES",
                        help="comma-separated FFN modules to split, e.g. "
                             "'encoder.transformer_layers.3.ffn,decoder.layers.1.ffn' or "
                             "'encoder.conformer_layers.11.ffn2'")
    parser.add_argument("--gdps-groups", type=str, metavar="GROUPS",
                        help="language groups, ';' between groups and ',' within, e.g. 'aeb,est,gle;bem'")
    parser.add_argument("--gdps-shared-ratio", type=float, metavar="R",
                        help="fraction of every split FFN's hidden units kept shared (default 0.5)")
    parser.add_argument("--gdps-init", type=str, choices=INIT_METHODS,
                        help="which units stay shared: energy (default), svd or random")
    parser.add_argument("--gdps-init-seed", type=int, metavar="N", help="seed of --gdps-init random")
    parser.add_argument("--gdps-init-from", type=str, metavar="CHECKPOINT",
                        help="stage-1 checkpoint whose model weights are loaded before the split")
    parser.add_argument("--gdps-train-only", type=str, metavar="GLOBS",
                        help="train only the parameters matching these comma-separated globs over "
                             "parameter (or FFN block) names, e.g. 'decoder.*,*.ffn*'; the rest is frozen")
    parser.add_argument("--gdps-freeze", type=str, metavar="GLOBS",
                        help="freeze the parameters matching these comma-separated globs, e.g. 'encoder.*'")
    parser.add_argument("--gdps-lang-embedding", action="store_true", default=None,
                        help="add a learned vector per source language (zero at the start) to the encoder input, "
                             "before the first encoder layer: with no split, a shared 'tagged baseline' that knows "
                             "each utterance's language; with a split, GDPS uses the same vectors")


def gdps_defaults(args):
    for key, value in (("gdps_plan", None), ("gdps_split_modules", None), ("gdps_groups", None),
                       ("gdps_shared_ratio", None), ("gdps_init", "energy"), ("gdps_init_seed", 1),
                       ("gdps_init_from", None), ("gdps_route_languages", None), ("gdps_plan_json", None),
                       ("gdps_train_only", None), ("gdps_freeze", None), ("gdps_lang_embedding", False),
                       ("gdps_lang_embedding_languages", None)):
        if getattr(args, key, None) is None:
            _set_arg(args, key, value)


def _set_arg(args, key, value):
    try:
        from omegaconf import OmegaConf, open_dict

        if OmegaConf.is_config(args):
            with open_dict(args):
                args[key] = value
            return
    except ImportError:  # pragma: no cover
        pass
    setattr(args, key, value)


def parse_groups(text: str) -> List[List[str]]:
    groups = [[lang.strip() for lang in g.split(",") if lang.strip()] for g in text.split(";")]
    groups = [g for g in groups if g]
    langs = [lang for g in groups for lang in g]
    if len(set(langs)) != len(langs):
        raise ValueError(f"a language appears in two groups: {text!r}")
    return groups


def format_groups(groups: List[List[str]]) -> str:
    return ";".join(",".join(g) for g in groups)


def read_plan(path: str, languages: Optional[List[str]] = None) -> Plan:
    """Load and validate a plan.json (``languages``: the task's, which the groups must cover)."""
    return Plan.load(path, languages=languages or None)


class SplitSpec(Namespace):
    """modules: [name]; groups: [[lang]]; shared_ratio: float; languages: [lang] (id order);
    source: where the split was given ('--gdps-plan PATH' or '--gdps-split-modules'), for errors."""


def resolve_split_spec(args, task=None) -> SplitSpec:
    """Read the split from --gdps-plan or the explicit fields and write it back into ``args`` as
    the explicit fields (so it is saved with the checkpoint)."""
    source = "--gdps-split-modules"
    if getattr(args, "gdps_plan", None):
        explicit = [k for k in ("gdps_split_modules", "gdps_groups", "gdps_shared_ratio") if getattr(args, k, None) is not None]
        if explicit:
            raise ValueError(f"--gdps-plan excludes {', '.join('--' + k.replace('_', '-') for k in explicit)}")
        plan = read_plan(args.gdps_plan, list(getattr(task, "languages", None) or []))
        source = f"--gdps-plan {args.gdps_plan}"
        _set_arg(args, "gdps_split_modules", ",".join(plan.modules))
        _set_arg(args, "gdps_groups", format_groups(plan.groups))
        _set_arg(args, "gdps_shared_ratio", float(plan.shared_ratio))
        _set_arg(args, "gdps_plan_json", plan.dumps())
        logger.info(f"GDPS plan {args.gdps_plan}: split {plan.modules}, groups {plan.groups}, "
                    f"shared ratio {plan.shared_ratio}")
        _set_arg(args, "gdps_plan", None)  # from here on the explicit fields define the split
    modules = [m.strip() for m in (getattr(args, "gdps_split_modules", None) or "").split(",") if m.strip()]
    if len(set(modules)) != len(modules):
        raise ValueError(f"--gdps-split-modules names a module twice: {args.gdps_split_modules!r}")
    try:
        groups = parse_groups(getattr(args, "gdps_groups", None) or "")
    except ValueError as exc:
        raise ValueError(f"--gdps-groups: {exc}") from None
    ratio = getattr(args, "gdps_shared_ratio", None)
    ratio = 0.5 if ratio is None else float(ratio)
    if modules and not groups:
        raise ValueError("--gdps-split-modules needs --gdps-groups (or a --gdps-plan)")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"--gdps-shared-ratio must lie in [0, 1], got {ratio}")
    _set_arg(args, "gdps_shared_ratio", ratio)

    stored = [x for x in (getattr(args, "gdps_route_languages", None) or "").split(",") if x]
    task_langs = list(getattr(task, "languages", None) or [])
    if task_langs:
        if stored and stored != task_langs:
            logger.warning(f"the task's language ids {task_langs} differ from those the model was trained "
                           f"with {stored}; routing follows the task's")
        languages = task_langs
    elif stored:
        languages = stored
    else:
        languages = sorted(lang for g in groups for lang in g)
    if groups:
        unknown = sorted(set(languages) - {lang for g in groups for lang in g})
        if unknown:
            msg = (f"languages {unknown} are in no group of --gdps-groups {format_groups(groups)!r}: their "
                   f"utterances cannot be routed (put every language in a group, or name the languages "
                   f"with --gdps-languages)")
            if modules:
                raise ValueError(msg)
            logger.warning(msg)
    _set_arg(args, "gdps_route_languages", ",".join(languages))
    return SplitSpec(modules=modules, groups=groups, shared_ratio=ratio, languages=languages, source=source)


# ---------------------------------------------------------------------------------------------
# FFN discovery and the split
# ---------------------------------------------------------------------------------------------
def ffn_module_names(model: nn.Module) -> Dict[str, Tuple[nn.Linear, nn.Linear]]:
    """{name: (fc1, fc2)} for every unsplit FFN of the model, in model order (see module doc)."""
    out: Dict[str, Tuple[nn.Linear, nn.Linear]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, _TRANSFORMER_LAYERS):
            if isinstance(mod.fc1, nn.Linear) and isinstance(mod.fc2, nn.Linear):
                out[f"{name}.ffn" if name else "ffn"] = (mod.fc1, mod.fc2)
        elif isinstance(mod, FeedForwardModule):
            out[name] = (mod.w_1, mod.w_2)
    return out


def partitioned_ffns(model: nn.Module) -> Dict[str, PartitionedFFN]:
    """{name: PartitionedFFN} for every split FFN of the model."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, PartitionedFFN)}


class _CallFFN(nn.Module):
    """Stands in for a transformer layer's fc1 and runs the layer's whole PartitionedFFN. The
    target is kept out of ``_modules`` so its parameters are saved once, at ``<layer>.ffn``."""

    def __init__(self, target: PartitionedFFN):
        super().__init__()
        object.__setattr__(self, "_target", target)

    def forward(self, x):
        return self._target(x)

    def extra_repr(self):
        return "runs <layer>.ffn (fc1 -> activation -> dropout -> fc2)"


def _identity(x):
    return x


def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def split_ffns(
    model: nn.Module,
    modules: List[str],
    n_groups: int,
    shared_ratio: float,
    method: str = "energy",
    act_energy: Optional[Dict[str, list]] = None,
    seed: int = 1,
) -> Dict[str, PartitionedFFN]:
    """Replace the named FFNs of ``model`` by function-preserving PartitionedFFNs, in place."""
    available = ffn_module_names(model)
    for name in modules:
        if name not in available:
            done = " (already split)" if name in partitioned_ffns(model) else ""
            raise ValueError(f"no unsplit FFN named {name!r}{done}; the model has: {', '.join(available)}")
    out = {}
    for name in modules:
        fc1, fc2 = available[name]
        energy = (act_energy or {}).get(name)
        w = split_ffn_weights(fc1.weight, fc1.bias, fc2.weight, fc2.bias, n_groups, shared_ratio,
                              method=method, act_energy=energy, seed=seed)
        owner, leaf = _parent(model, name)
        if isinstance(owner, _TRANSFORMER_LAYERS):
            if getattr(owner, "ffn_layernorm", None) is not None or getattr(owner, "w_resid", None) is not None:
                raise NotImplementedError(f"{name}: scale_fc / scale_resids layers cannot be split")
            dropout_attr = _activation_dropout_attr(owner)
            ffn = PartitionedFFN.from_split(w, activation_fn=owner.activation_fn,
                                            activation_dropout=getattr(owner, dropout_attr))
            owner.ffn = ffn
            owner.fc1 = _CallFFN(ffn)
            owner.fc2 = nn.Identity()
            owner.activation_fn = _identity
            setattr(owner, dropout_attr, nn.Identity())
        else:  # conformer FeedForwardModule
            old: FeedForwardModule = getattr(owner, leaf)
            ffn = PartitionedFFN.from_split(w, activation_fn=old.activation, activation_dropout=old.dropout1,
                                            dropout=old.dropout2, layer_norm=old.layer_norm)
            setattr(owner, leaf, ffn)
        ffn.train(fc1.training)
        out[name] = ffn
        logger.info(f"GDPS split {name}: {w.n_shared} shared + {n_groups} x {w.n_private} private units (init {method})")
    return out


def dense_state_dict(model: nn.Module, group: int) -> Dict[str, Tensor]:
    """The model's state dict with every PartitionedFFN folded, for ``group``, into the unsplit
    FFN it came from: loadable (strict) by the stock fairseq architecture."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, ffn in partitioned_ffns(model).items():
        for k in [k for k in state if k.startswith(name + ".")]:
            if not k.startswith(name + ".layer_norm."):
                del state[k]
        w1, b1, w2, b2 = ffn.to_dense(group)
        owner, _ = _parent(model, name)
        if isinstance(owner, _TRANSFORMER_LAYERS):
            prefix = name[: -len(".ffn")]
            keys = (f"{prefix}.fc1", f"{prefix}.fc2")
        else:
            keys = (f"{name}.w_1", f"{name}.w_2")
        state[f"{keys[0]}.weight"], state[f"{keys[0]}.bias"] = w1, b1
        state[f"{keys[1]}.weight"], state[f"{keys[1]}.bias"] = w2, b2
    return state


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


# ---------------------------------------------------------------------------------------------
# encoder / decoder / models
# ---------------------------------------------------------------------------------------------
LANG_EMBEDDING_FLAG = "--gdps-lang-embedding"


class _GDPSEncoderMixin:
    """Maps ``src_lang_id`` to groups, routes the encoder's split FFNs, hands the ids on; adds the
    language embedding (``--gdps-lang-embedding``) to the encoder input."""

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

    def _add_language_vectors(self, module, inputs):
        vectors = self._gdps_lang_vectors
        if vectors is None:
            return None
        x = inputs[0]  # T x B x C
        return (x + vectors.unsqueeze(0).to(x.dtype),) + tuple(inputs[1:])

    def set_language_groups(self, lang_to_group: Optional[List[int]]):
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
        self._gdps_lang_vectors = self.language_vectors(src_lang_id)
        try:
            with route(ffns, groups):
                out = super().forward(src_tokens, src_lengths, return_all_hiddens=return_all_hiddens)
        finally:
            self._gdps_lang_vectors = None
        out[GROUP_IDS_KEY] = [groups] if groups is not None else []
        return out

    def reorder_encoder_out(self, encoder_out, new_order):
        new = super().reorder_encoder_out(encoder_out, new_order)
        new[GROUP_IDS_KEY] = [g.index_select(0, new_order) for g in encoder_out.get(GROUP_IDS_KEY, [])]
        return new


class S2TTransformerGDPSEncoder(_GDPSEncoderMixin, S2TTransformerEncoder):
    pass


class S2TConformerGDPSEncoder(_GDPSEncoderMixin, S2TConformerEncoder):
    def __init__(self, args):
        super().__init__(args)
        # fairseq's FeedForwardModule builds its activation as nn.SiLU(hidden_units), i.e. with
        # inplace=True: it overwrites w_1's output, so a hook on that output (the GDPS probe's
        # per-language weight gradients) never fires. The out-of-place SiLU computes the same.
        for module in self.modules():
            if isinstance(module, FeedForwardModule) and isinstance(module.activation, nn.SiLU) \
                    and module.activation.inplace:
                module.activation = nn.SiLU()


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
    _set_arg(args, "load_pretrained_encoder_from", None)
    return encoder


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
    _set_arg(args, "gdps_lang_embedding_languages", ",".join(rows))
    logger.info(f"GDPS language embedding: {len(rows)} x {args.encoder_embed_dim}, rows {rows}")


LANG_EMBEDDING_KEY = "encoder.gdps_lang_embedding.weight"


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


class _GDPSModelMixin:
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
        group_of = {lang: k for k, g in enumerate(spec.groups) for lang in g}
        model.encoder.set_language_groups(
            [group_of.get(lang, -1) for lang in spec.languages] if spec.groups else None
        )
        if getattr(args, "gdps_lang_embedding", False):
            add_language_embedding(model, args, spec, state)
        if init_from:
            load_stage1_weights(model, state, args, init_from)
            logger.info(f"GDPS stage 2 initialised from {init_from}")
            _set_arg(args, "gdps_init_from", None)  # the checkpoint then holds the weights itself
        if spec.modules:
            try:
                split_ffns(model, spec.modules, len(spec.groups), spec.shared_ratio, method=args.gdps_init,
                           seed=args.gdps_init_seed)
            except ValueError as e:  # e.g. a module the model lacks: say which plan or flag named it
                raise ValueError(f"{spec.source}: {e}") from None
        freeze_parameters(model, args)
        return model

    def forward(self, src_tokens, src_lengths, prev_output_tokens, src_lang_id: Optional[Tensor] = None):
        encoder_out = self.encoder(src_tokens=src_tokens, src_lengths=src_lengths, src_lang_id=src_lang_id)
        return self.decoder(prev_output_tokens=prev_output_tokens, encoder_out=encoder_out)


@register_model("s2t_transformer_gdps")
class S2TTransformerGDPSModel(_GDPSModelMixin, S2TTransformerModel):
    encoder_class = S2TTransformerGDPSEncoder

    @staticmethod
    def add_args(parser):
        S2TTransformerModel.add_args(parser)
        add_gdps_args(parser)


@register_model("s2t_conformer_gdps")
class S2TConformerGDPSModel(_GDPSModelMixin, S2TConformerModel):
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
