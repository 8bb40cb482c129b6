"""Which FFNs a GDPS model splits, for which language groups: the split resolved from
``--gdps-plan`` or the explicit flags.

The split travels in the checkpoint: ``resolve_split_spec`` writes the plan into the explicit
model args (``gdps_split_modules``, ``gdps_groups``, ``gdps_shared_ratio``,
``gdps_route_languages``; the plan's JSON in ``gdps_plan_json``) and clears ``gdps_plan``, so
``fairseq-generate`` rebuilds the split model from the checkpoint alone.
"""
from __future__ import annotations

import logging
from argparse import Namespace
from typing import List

from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.models.arguments import set_arg

logger = logging.getLogger(__name__)


def parse_groups(text: str) -> List[List[str]]:
    """'aeb,est;bem' -> [['aeb', 'est'], ['bem']]; a language in two groups is an error."""
    groups = [[lang.strip() for lang in g.split(",") if lang.strip()] for g in text.split(";")]
    groups = [g for g in groups if g]
    langs = [lang for g in groups for lang in g]
    if len(set(langs)) != len(langs):
        raise ValueError(f"a language appears in two groups: {text!r}")
    return groups


def format_groups(groups: List[List[str]]) -> str:
    return ";".join(",".join(g) for g in groups)


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
        plan = Plan.load(args.gdps_plan, languages=list(getattr(task, "languages", None) or []) or None)
        source = f"--gdps-plan {args.gdps_plan}"
        set_arg(args, "gdps_split_modules", ",".join(plan.modules))
        set_arg(args, "gdps_groups", format_groups(plan.groups))
        set_arg(args, "gdps_shared_ratio", float(plan.shared_ratio))
        set_arg(args, "gdps_plan_json", plan.dumps())
        logger.info(f"GDPS plan {args.gdps_plan}: split {plan.modules}, groups {plan.groups}, "
                    f"shared ratio {plan.shared_ratio}")
        set_arg(args, "gdps_plan", None)  # from here on the explicit fields define the split
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
    set_arg(args, "gdps_shared_ratio", ratio)

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
    set_arg(args, "gdps_route_languages", ",".join(languages))
    return SplitSpec(modules=modules, groups=groups, shared_ratio=ratio, languages=languages, source=source)
