"""gdps-export: fold a GDPS checkpoint, for one language group, into a stock fairseq checkpoint.

    gdps-export CKPT (--group G | --language L) --out OUT.pt

The stage-2 model's split FFNs (shared units + one private block per group) are folded, for the
chosen group, back into ordinary FFNs of the original width (``dense_state_dict``): the result is
a plain ``s2t_transformer`` (or ``s2t_conformer``) that computes what the GDPS model computes for
that group's languages. The written checkpoint is what stock ``fairseq-train`` writes for that
architecture: task ``speech_to_text``, criterion without GDPS options, model args without any
``gdps_*`` field, no ``--user-dir``, no optimizer state, no probe statistics. So plain

    fairseq-generate DATA --task speech_to_text --config-yaml config.yaml --path OUT.pt \
        --gen-subset test_<lang> ...

decodes it without the plugin. A model trained with ``--gdps-lang-embedding`` (a learned vector per
language added to the encoder input) has no stock equivalent and is refused. ``--language`` picks
the group of that language from the plan the checkpoint carries (its ``gdps_groups``). A checkpoint
without a split (stage 1) needs neither flag: its export is the same model for every language.

Before writing, the stock model is built from the exported args, loads the folded weights
strictly and is compared with the GDPS model on a random input routed to the group (the largest
logit difference is printed). The export is refused, and nothing is written, when the logits are
not finite or differ by more than ``--check-tolerance`` (relative to the largest logit; default
1e-4: the fold only reorders sums, so the two differ by rounding). The output is written
atomically.

The export needs neither the data folder nor any other file of the training run: its model is
rebuilt from the checkpoint alone. Its ``extra_state["export"]`` records the source checkpoint
relative to the exported file's folder.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from argparse import Namespace
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_NAME_REGISTRY
from omegaconf import OmegaConf

import fairseq_gdps  # noqa: F401  (registers the GDPS models)
from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.models import (
    LANG_EMBEDDING_FLAG,
    LANG_EMBEDDING_KEY,
    dense_state_dict,
    parse_groups,
)

# GDPS model -> the stock fairseq model (and architecture) its folded weights load into
STOCK_MODEL = {"s2t_transformer_gdps": "s2t_transformer", "s2t_conformer_gdps": "s2t_conformer"}
STOCK_TASK = "speech_to_text"
# the GDPS criterion is fairseq's label-smoothed cross entropy (it adds no loss term; the probe is the task's)
STOCK_CRITERION = {"label_smoothed_cross_entropy_gdps": "label_smoothed_cross_entropy"}
GDPS_PREFIX = "gdps_"
# flags that point at files of the training machine and would be re-read when the model is built
TRAINING_PATHS = ("load_pretrained_encoder_from", "load_pretrained_decoder_from")
# relative tolerance of the built-in check, on the scale of the logits
CHECK_RTOL = 1e-4


class ExportError(ValueError):
    """Bad input to gdps-export (names the flag and the file)."""


class ExportMismatch(RuntimeError):
    """The folded model does not compute what the GDPS model computes: the export is refused."""


class _ModelShape:
    """What fairseq's S2T models take from a task at build time: the target dictionary (only its
    size and padding index shape the model; the weights come from the checkpoint) and, for the
    GDPS models, the language ids. Lets the export run without the training data folder."""

    def __init__(self, vocab_size: int, languages: List[str]):
        self.target_dictionary = Dictionary()
        for i in range(vocab_size - len(self.target_dictionary)):
            self.target_dictionary.add_symbol(f"<export_{i}>")
        self.source_dictionary = None
        self.languages = list(languages)


def _model_args(state, path) -> Namespace:
    cfg = state.get("cfg")
    args = cfg.get("model") if cfg is not None else None
    if args is None:
        raise ExportError(f"{path}: no model args in the checkpoint (cfg.model): not a fairseq checkpoint")
    if OmegaConf.is_config(args):
        args = Namespace(**OmegaConf.to_container(args, resolve=True))
    return copy.deepcopy(args)


def gdps_model_name(args, path) -> str:
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model not in STOCK_MODEL and str(model).endswith("_gdps"):
        raise ExportError(f"{path}: a {model} checkpoint; gdps-export folds only "
                          f"{', '.join(sorted(STOCK_MODEL))} checkpoints so far")
    if model not in STOCK_MODEL:
        raise ExportError(
            f"{path}: not a GDPS checkpoint (arch {arch!r}, model {model!r}); gdps-export takes "
            f"checkpoints of {', '.join(sorted(STOCK_MODEL))} (--arch s2t_transformer_gdps_* / s2t_conformer_gdps_*)"
        )
    return model


def checkpoint_groups(args) -> Tuple[List[str], List[List[str]]]:
    """(split modules, language groups) stored in the checkpoint's model args."""
    modules = [m for m in (getattr(args, "gdps_split_modules", None) or "").split(",") if m.strip()]
    groups = parse_groups(getattr(args, "gdps_groups", None) or "")
    return modules, groups


def resolve_group(args, path, group: Optional[int], language: Optional[str]) -> Optional[int]:
    """The group index to export (None: the checkpoint has no split)."""
    modules, groups = checkpoint_groups(args)
    listing = "; ".join(f"{k}: {','.join(g)}" for k, g in enumerate(groups))
    if not modules:
        if group is not None:
            raise ExportError(f"--group {group}: {path} has no split FFNs (a stage-1 checkpoint), hence "
                              "no groups; omit --group (the export is the same for every language)")
        return None
    if group is None and language is None:
        raise ExportError(f"{path} is split into {len(groups)} language groups ({listing}): "
                          "choose one with --group G or --language L")
    if language is not None:
        found = [k for k, g in enumerate(groups) if language in g]
        if not found:
            raise ExportError(f"--language {language!r}: not in any language group of {path} ({listing})")
        return found[0]
    if not 0 <= group < len(groups):
        raise ExportError(f"--group {group}: out of range, {path} has {len(groups)} groups "
                          f"(0..{len(groups) - 1}: {listing})")
    return group


def stock_args(args, model_name: str) -> Namespace:
    """The checkpoint's args as stock fairseq-train would have written them for the stock model."""
    out = Namespace(**{k: v for k, v in vars(args).items() if not k.startswith(GDPS_PREFIX)})
    out.arch = out._name = STOCK_MODEL[model_name]
    out.task = STOCK_TASK
    out.user_dir = None
    if getattr(out, "criterion", None) in STOCK_CRITERION:
        out.criterion = STOCK_CRITERION[out.criterion]
    for key in TRAINING_PATHS:
        if hasattr(out, key):
            setattr(out, key, None)
    return out


def _stock_section(section, args: Namespace, name: str):
    """A cfg section (task / criterion) of the stock checkpoint."""
    if isinstance(section, Namespace) or section is None:
        out = copy.deepcopy(args)
        out._name = name
        return out
    section = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    out = {k: v for k, v in section.items() if not k.startswith(GDPS_PREFIX)}
    out["_name"] = name
    return out


def _stock_cfg(cfg, args: Namespace):
    cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg) else dict(cfg)
    cfg = copy.deepcopy(cfg)
    cfg["model"] = args
    cfg["task"] = _stock_section(cfg.get("task"), args, STOCK_TASK)
    criterion = cfg.get("criterion")
    name = (criterion.get("_name") if isinstance(criterion, dict) else getattr(criterion, "_name", None)) or args.criterion
    cfg["criterion"] = _stock_section(criterion, args, STOCK_CRITERION.get(name, name))
    if isinstance(cfg.get("common"), dict):
        cfg["common"]["user_dir"] = None
    return cfg


def _random_batch(args, vocab: int, lang_id: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feat = int(args.input_feat_per_channel) * int(getattr(args, "input_channels", 1))
    frames, tokens = 40, 6
    return {"src_tokens": torch.randn(2, frames, feat, generator=g), "src_lengths": torch.tensor([frames, frames - 7]),
            "prev_output_tokens": torch.randint(4, max(5, vocab), (2, tokens), generator=g),
            "src_lang_id": torch.full((2,), lang_id, dtype=torch.long)}


def export_checkpoint(path, out_path, group: Optional[int] = None, language: Optional[str] = None,
                      check_rtol: float = CHECK_RTOL) -> dict:
    """Write the stock checkpoint; returns a summary (group, languages, arch, largest logit difference).

    ``check_rtol``: the largest logit difference allowed between the folded and the GDPS model,
    relative to the largest logit (1 + max |logit|); beyond it, or with non-finite logits, nothing
    is written (``ExportMismatch``)."""
    if not (check_rtol >= 0 and math.isfinite(check_rtol)):
        raise ExportError(f"--check-tolerance {check_rtol}: must be a finite number >= 0")
    path = str(path)
    if not Path(path).is_file():
        raise ExportError(f"checkpoint {path} not found")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as e:  # torch / pickle errors vary; name the file
        raise ExportError(f"{path}: cannot be read as a fairseq checkpoint: {e}") from e
    args = _model_args(state, path)
    model_name = gdps_model_name(args, path)
    if getattr(args, "gdps_lang_embedding", False) or LANG_EMBEDDING_KEY in (state.get("model") or {}):
        # x + e[lang] before the first encoder layer: the subsampler ends in a GLU and the positions
        # are fixed sinusoids, so no stock weight can absorb a constant added there.
        raise ExportError(f"{path}: the model was trained with {LANG_EMBEDDING_FLAG} (a learned vector per "
                          f"language added to the encoder input), which a stock {STOCK_MODEL[model_name]} "
                          "has no weight for: it cannot be exported; decode it with --user-dir and --task "
                          "speech_to_text_gdps instead")
    k = resolve_group(args, path, group, language)
    _, groups = checkpoint_groups(args)
    languages = [x for x in (getattr(args, "gdps_route_languages", None) or "").split(",") if x]
    if "decoder.embed_tokens.weight" not in state["model"]:
        raise ExportError(f"{path}: no decoder.embed_tokens.weight in the model state")
    shape = _ModelShape(state["model"]["decoder.embed_tokens.weight"].shape[0], languages)

    gdps_args = copy.deepcopy(args)
    for key in TRAINING_PATHS + ("gdps_init_from", "gdps_plan"):
        if hasattr(gdps_args, key):
            setattr(gdps_args, key, None)
    gdps_model = models.build_model(gdps_args, shape)
    try:
        gdps_model.load_state_dict(state["model"], strict=True, model_cfg=gdps_args)
    except RuntimeError as e:
        raise ExportError(f"{path}: its weights do not fit the model its args describe: {e}") from e
    gdps_model.eval()
    dense = dense_state_dict(gdps_model, 0 if k is None else k)

    out_args = stock_args(args, model_name)
    stock = models.build_model(copy.deepcopy(out_args), shape)
    stock.load_state_dict(dense, strict=True)  # the folded weights fit the stock model exactly
    stock.eval()
    # The same model on a random input: the GDPS model routed to the group, the stock model plain.
    group_langs = groups[k] if k is not None else languages[:1]
    lang_id = languages.index(group_langs[0]) if group_langs and group_langs[0] in languages else 0
    net_input = _random_batch(args, len(shape.target_dictionary), lang_id)
    with torch.no_grad():
        expected = gdps_model(**net_input)[0]
        got = stock(*(net_input[x] for x in ("src_tokens", "src_lengths", "prev_output_tokens")))[0]
    if not (bool(torch.isfinite(expected).all()) and bool(torch.isfinite(got).all())):
        raise ExportMismatch(f"{path}: the GDPS model's logits (group {k}) are not finite (NaN or inf in its "
                             "weights?); not written")
    max_diff = float((expected - got).abs().max())
    allowed = check_rtol * (1.0 + float(expected.abs().max()))
    if max_diff > allowed:
        raise ExportMismatch(f"{path}: the exported model differs from the GDPS model by {max_diff:.3g} "
                             f"in the logits (group {k}; allowed {allowed:.3g}, --check-tolerance {check_rtol:g}); "
                             "not written")

    source_dtypes = {v.dtype for v in state["model"].values() if torch.is_floating_point(v)}
    if len(source_dtypes) == 1:  # keep a half-precision checkpoint in half precision
        dtype = source_dtypes.pop()
        dense = {n: (v.to(dtype) if torch.is_floating_point(v) else v) for n, v in dense.items()}
    history = [dict(h) for h in state.get("optimizer_history") or [{}]]
    for h in history:
        if h.get("criterion_name") == "LabelSmoothedCrossEntropyGDPSCriterion":
            h["criterion_name"] = "LabelSmoothedCrossEntropyCriterion"
    # relative to the exported file's folder, so the record stays true when the run folder moves
    summary = {"source_checkpoint": os.path.relpath(path, os.path.dirname(os.path.abspath(out_path))), "group": k,
               "languages": list(groups[k]) if k is not None else languages,
               "arch": out_args.arch, "max_logit_difference": max_diff}
    out = {
        "args": None,
        "cfg": _stock_cfg(state["cfg"], out_args),
        "model": dense,
        "criterion": None,
        "optimizer_history": history[-1:],
        "task_state": {},
        # fairseq ignores unknown extra_state keys; the provenance of the export travels here
        "extra_state": {"export": summary},
    }
    with atomic_write(out_path, "wb") as f:
        torch.save(out, f)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gdps-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="GDPS checkpoint (stage 2, or an unsplit stage 1)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--group", type=int, metavar="G", help="language group index (order of the plan's groups)")
    which.add_argument("--language", metavar="L", help="source language whose group is exported")
    parser.add_argument("--out", required=True, help="stock fairseq checkpoint to write")
    parser.add_argument("--check-tolerance", type=float, default=CHECK_RTOL, metavar="RTOL",
                        help="largest logit difference allowed between the exported and the GDPS model, relative "
                             "to the largest logit (default %(default)g); the export is refused beyond it")
    args = parser.parse_args(argv)
    try:
        summary = export_checkpoint(args.checkpoint, args.out, group=args.group, language=args.language,
                                    check_rtol=args.check_tolerance)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"gdps-export: error: {e}", file=sys.stderr)
        return 1
    group = "all languages (no split)" if summary["group"] is None else f"group {summary['group']}"
    print(f"gdps-export: {args.out}: {summary['arch']} for {group} ({','.join(summary['languages'])}); "
          f"largest logit difference to the GDPS model {summary['max_logit_difference']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
