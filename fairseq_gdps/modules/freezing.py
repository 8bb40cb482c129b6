"""Which parameters a fine-tuning run trains: globs over parameter names.

``--gdps-train-only GLOBS`` keeps training only the parameters that match one of the globs;
``--gdps-freeze GLOBS`` stops training the parameters that match one of them (``'encoder.*'``
freezes the whole encoder). Both may be given: a parameter is trained when it matches
``train_only`` (or ``train_only`` is empty) and matches no ``freeze`` glob. Globs are
comma-separated ``fnmatch`` patterns matched case-sensitively against the whole name (``*``
also crosses dots).

Freezing only ever sets ``requires_grad = False``: a parameter that fairseq's own options
(``--finetune-w2v-params``, ``--finetune-decoder-params``) already froze stays frozen. fairseq's
trainer hands the optimizer only the parameters that require gradients, so a frozen parameter
is neither updated nor decayed.

FFN blocks are also addressable by their GDPS block name (see ``models/ffn_surgery.py``): the
parameters of an unsplit block ``B`` (its fc1 and fc2, whatever the layer calls them) answer to
``B.fc1.weight``, ``B.fc1.bias``, ``B.fc2.weight``, ``B.fc2.bias`` besides their own names, and
those of a split block already live under ``B.``. So ``'*.ffn*'`` selects every FFN before and
after a split, and ``'decoder.*,*.ffn*'`` trains the decoder and every FFN of the encoder.

A glob that matches no parameter is an error (a misspelt glob would otherwise silently freeze
or train the wrong set), and so is freezing every parameter.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torch import nn


def parse_globs(text: Optional[str]) -> List[str]:
    """'a.*, *.ffn*' -> ['a.*', '*.ffn*'] (None or '' -> [])."""
    return [g.strip() for g in (text or "").split(",") if g.strip()]


def ffn_parameter_aliases(
    model: nn.Module, blocks: Mapping[str, Tuple[nn.Module, nn.Module]]
) -> Dict[str, List[str]]:
    """{parameter name: [its block aliases]} for the parameters of the unsplit FFN ``blocks``
    ({block name: (fc1, fc2)}, as ``ffn_module_names`` gives them)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    aliases: Dict[str, List[str]] = {}
    for block, layers in blocks.items():
        for k, layer in enumerate(layers, start=1):
            for leaf, p in layer.named_parameters():
                if id(p) in name_of:
                    aliases.setdefault(name_of[id(p)], []).append(f"{block}.fc{k}.{leaf}")
    return aliases


def _matches(names: Sequence[str], globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)


def trainable_names(
    names: Sequence[str],
    train_only: Sequence[str] = (),
    freeze: Sequence[str] = (),
    aliases: Optional[Mapping[str, Sequence[str]]] = None,
) -> List[str]:
    """The names (in the given order) that stay trainable under ``train_only`` / ``freeze``.

    Raises ValueError naming the flag and the glob when a glob matches no name (nor alias), or
    when no name would stay trainable.
    """
    aliases = aliases or {}
    every = {n: [n, *aliases.get(n, ())] for n in names}
    for flag, globs in (("--gdps-train-only", train_only), ("--gdps-freeze", freeze)):
        for glob in globs:
            if not any(_matches(forms, [glob]) for forms in every.values()):
                examples = ", ".join(list(names)[:6]) + (", ..." if len(names) > 6 else "")
                raise ValueError(f"{flag}: {glob!r} matches no parameter of the model "
                                 f"(parameter names look like: {examples})")
    kept = [n for n, forms in every.items()
            if (not train_only or _matches(forms, train_only)) and not _matches(forms, freeze)]
    if names and not kept:
        raise ValueError(f"--gdps-train-only {','.join(train_only)!r} / --gdps-freeze {','.join(freeze)!r} "
                         "leave no parameter to train")
    return kept


def apply_freezing(
    model: nn.Module,
    train_only: Sequence[str] = (),
    freeze: Sequence[str] = (),
    blocks: Optional[Mapping[str, Tuple[nn.Module, nn.Module]]] = None,
) -> List[str]:
    """Set ``requires_grad = False`` on the parameters that ``train_only`` / ``freeze`` exclude
    (never True on any). Returns the names of the parameters frozen here."""
    if not train_only and not freeze:
        return []
    params = dict(model.named_parameters())
    aliases = ffn_parameter_aliases(model, blocks) if blocks else None
    kept = set(trainable_names(list(params), train_only, freeze, aliases))
    frozen = [n for n, p in params.items() if n not in kept and p.requires_grad]
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
