"""The command-line options of the GDPS models and their defaults.

Every GDPS architecture calls ``gdps_defaults`` so that a model also builds from args that never
went through the parser (a checkpoint's stored args, a test's Namespace).
"""
from __future__ import annotations

from omegaconf import OmegaConf, open_dict

from fairseq_gdps.gdps.split import INIT_METHODS


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
    """Fill in every GDPS model arg that is unset (None or absent)."""
    for key, value in (("gdps_plan", None), ("gdps_split_modules", None), ("gdps_groups", None),
                       ("gdps_shared_ratio", None), ("gdps_init", "energy"), ("gdps_init_seed", 1),
                       ("gdps_init_from", None), ("gdps_route_languages", None), ("gdps_plan_json", None),
                       ("gdps_train_only", None), ("gdps_freeze", None), ("gdps_lang_embedding", False),
                       ("gdps_lang_embedding_languages", None)):
        if getattr(args, key, None) is None:
            set_arg(args, key, value)


def set_arg(args, key, value):
    """Set a model arg in an argparse Namespace or in a (possibly struct) OmegaConf config."""
    if OmegaConf.is_config(args):
        with open_dict(args):
            args[key] = value
    else:
        setattr(args, key, value)
