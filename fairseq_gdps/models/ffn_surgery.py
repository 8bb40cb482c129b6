"""Finding the FFN blocks of a fairseq model, splitting them in place, and folding a split model
back into the stock one.

Block names (shared with the gradient probe and the plan): the path of the FFN block in the model,

- ``encoder.transformer_layers.{i}.ffn``: fc1/fc2 of transformer encoder layer i;
- ``decoder.layers.{i}.ffn``: fc1/fc2 of decoder layer i;
- ``encoder.conformer_layers.{i}.ffn1`` / ``.ffn2``: the first / second (macaron) feed-forward
  module (w_1/w_2) of conformer layer i;
- ``encoder.w2v_encoder.w2v_model.encoder.layers.{i}.ffn``: fc1/fc2 of wav2vec 2.0 / XLS-R
  encoder layer i.

After the split the ``PartitionedFFN`` lives at exactly that path (a conformer split keeps its
LayerNorm at ``<name>.layer_norm.*``). In a transformer layer the inline ``fc1 -> activation ->
activation dropout -> fc2`` becomes ``fc1 = <the whole PartitionedFFN>`` (a parameter-free
call-through, so the parameters are saved once, at ``<layer>.ffn``), identity activation, dropout
and fc2: the layer's ``forward`` stays fairseq's own. A conformer ``ffn1``/``ffn2`` is replaced by a
PartitionedFFN that keeps the module's LayerNorm, activation and both dropouts.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch.nn as nn
from torch import Tensor

from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
from fairseq.modules.conformer_layer import FeedForwardModule
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from fairseq_gdps.gdps.split import split_ffn_weights
from fairseq_gdps.modules.partitioned_ffn import PartitionedFFN

logger = logging.getLogger(__name__)

# Layers with an inline fc1 -> activation -> activation dropout -> fc2 FFN
_TRANSFORMER_LAYERS = (TransformerEncoderLayerBase, TransformerDecoderLayerBase, TransformerSentenceEncoderLayer)


def _activation_dropout_attr(layer: nn.Module) -> str:
    """The attribute holding a transformer layer's activation dropout (wav2vec 2.0 calls it dropout2)."""
    return "dropout2" if isinstance(layer, TransformerSentenceEncoderLayer) else "activation_dropout_module"


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
    """Replace the named FFNs of ``model`` by function-preserving PartitionedFFNs, in place.
    ``act_energy``: optional {name: per-unit E[act^2]} for the energy and svd initialisations."""
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
