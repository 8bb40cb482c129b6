"""The optimizer state of an unsplit model carried over to its split: a shared unit keeps its
moments, and every group's private copy of a unit starts with that unit's moments (the same
permutation and copies ``split_ffn_weights`` applies to the weights). Used by
``gdps-split-checkpoint`` on a saved checkpoint and by the single-run switch on a live optimizer.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from fairseq_gdps.gdps.split import split_ffn_weights
from fairseq_gdps.models.ffn_surgery import ffn_module_names, partitioned_ffns

# a PartitionedFFN's parameters, as split_ffn_weights names its parts
SPLIT_PARAMETERS = ("fc1_shared_weight", "fc1_shared_bias", "fc1_private_weight", "fc1_private_bias",
                    "fc2_shared_weight", "fc2_private_weight", "fc2_bias")


def optimized_parameter_names(model: nn.Module) -> List[str]:
    """Parameter names in the order fairseq's trainer hands parameters to the optimizer (the
    trainable ones, in ``model.parameters()`` order): the index of a parameter's state."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def ffn_parameter_names(model: nn.Module) -> Dict[str, Tuple[str, Optional[str], str, Optional[str]]]:
    """{block: names of (fc1 weight, fc1 bias, fc2 weight, fc2 bias)} of every unsplit FFN."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {block: tuple(name_of.get(id(p)) if p is not None else None
                         for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))
            for block, (fc1, fc2) in ffn_module_names(model).items()}


def split_optimizer_state(names_before: List[str], ffn_names_before: Dict[str, tuple], split_model: nn.Module,
                          optimizer_state: dict) -> dict:
    """An optimizer state dict (torch format, parameters by index) of the unsplit model, whose
    optimized parameters were ``names_before`` and FFN parameters ``ffn_names_before`` (see
    :func:`ffn_parameter_names`), mapped onto ``split_model``. Every per-parameter tensor of a
    split FFN's weights (Adam's two moments, SGD's momentum, ...) goes through the split; other
    entries (Adam's step) are copied."""
    if len(optimizer_state["param_groups"]) != 1:
        raise ValueError("only optimizers with a single parameter group are supported")
    by_name = {names_before[i]: s for i, s in optimizer_state["state"].items()}
    split_state = {}
    for block, ffn in partitioned_ffns(split_model).items():
        originals = [by_name.get(n) if n is not None else None for n in ffn_names_before[block]]
        if any(s is None for s in originals[::2]):
            continue  # no state yet (e.g. frozen): the split parameters start without state
        shared = ffn.unit_order[: ffn.fc1_shared_weight.shape[0]].tolist()
        entries = {}
        for key, value in originals[0].items():
            if torch.is_tensor(value) and value.dim() > 0:   # one value per weight (a step count is not)
                w1, b1, w2, b2 = (s[key] if s is not None else None for s in originals)
                entries[key] = split_ffn_weights(w1, b1, w2, b2, ffn.fc1_private_weight.shape[0], 0.0,
                                                 shared_units=shared)
        for attr in SPLIT_PARAMETERS:
            state = {k: copy.deepcopy(v) for k, v in originals[0].items() if k not in entries}
            state.update({k: getattr(parts, attr).clone() for k, parts in entries.items()})
            split_state[f"{block}.{attr}"] = state
    state = {}
    for i, name in enumerate(optimized_parameter_names(split_model)):
        if name in split_state:
            state[i] = split_state[name]
        elif name in by_name:
            state[i] = copy.deepcopy(by_name[name])
        else:
            raise ValueError(f"no optimizer state of the unsplit model for the split model's parameter {name}")
    group = dict(optimizer_state["param_groups"][0], params=list(range(len(state))))
    return {"state": state, "param_groups": [group]}
