"""gdps-split-checkpoint: turn a stage-1 checkpoint into the stage-2 (split) checkpoint that
``fairseq-train --restore-file`` continues from.

    gdps-split-checkpoint STAGE1.pt --plan plan.json --out SPLIT.pt [--init energy|svd|random] [--data DIR]
    gdps-split-checkpoint STAGE1.pt --split-modules M1,M2 --groups 'a,b;c' --shared-ratio R --out SPLIT.pt

The second form takes the split from the same fields as the model's --gdps-split-modules /
--gdps-groups / --gdps-shared-ratio (a split of your own, e.g. a control's: one block per language, none shared);
stage 2 must then be trained with those same flags instead of --gdps-plan.

The model is split as ``--gdps-plan``/``--gdps-init-from`` split it (function-preserving). Adam's
moments go through the same split: a shared unit keeps its moments, every group's private copy of
a unit starts with that unit's moments. The update count, learning-rate schedule and data
iterator position are kept, so stage 2 is a continuation of stage 1: with the same number of
total updates it sees the same data stream at the same learning rates as the shared baseline.

The task (target dictionary, languages) is rebuilt from the data folder stage 1 trained on: the
one ``--data`` names, else the one the checkpoint stores, as long as it still exists (a run and its
data folder can be moved; the split checkpoint then stores the folder it was given).
"""
import argparse
import copy
import os
import sys

import torch
from fairseq import checkpoint_utils, tasks
from omegaconf import OmegaConf

import fairseq_gdps  # noqa: F401  (registers the task and models)
from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.models.optimizer_state import ffn_parameter_names, optimized_parameter_names, split_optimizer_state

def data_folder(stage1_path: str, stored: str | None, data: str | None) -> str:
    """The data folder to rebuild the task from: ``--data`` when given, else the one the stage-1
    checkpoint stores while it exists (a moved folder must be named again)."""
    if data is not None:
        if not os.path.isdir(data):
            raise ValueError(f"--data {data}: no such folder")
        return data
    if not stored or not os.path.isdir(stored):
        raise ValueError(f"{stage1_path} was trained on the data folder {stored or '(none stored)'}, which does not "
                         "exist here (moved or renamed?): name it with --data DIR")
    return stored


def split_checkpoint(stage1_path: str, plan_path: str | None, out_path: str, init: str = "energy",
                     split_modules: str | None = None, groups: str | None = None, shared_ratio: float | None = None,
                     data: str | None = None) -> None:
    state = checkpoint_utils.load_checkpoint_to_cpu(stage1_path)
    if state.get("last_optimizer_state") is None:
        raise ValueError(f"{stage1_path}: no optimizer state (saved with --no-save-optimizer-state?)")
    cfg = state["cfg"]
    cfg.task.data = data_folder(stage1_path, cfg.task.get("data"), data)
    task = tasks.setup_task(cfg.task)
    stage1 = task.build_model(copy.deepcopy(cfg.model))
    stage1.load_state_dict(state["model"], strict=True)
    stage2_args = copy.deepcopy(cfg.model)
    stage2_args.gdps_plan, stage2_args.gdps_init_from, stage2_args.gdps_init = plan_path, stage1_path, init
    stage2_args.gdps_split_modules, stage2_args.gdps_groups, stage2_args.gdps_shared_ratio = split_modules, groups, shared_ratio
    stage2 = task.build_model(stage2_args)  # resolves the plan into explicit fields of stage2_args
    out = dict(state)
    out["model"] = stage2.state_dict()
    out["last_optimizer_state"] = split_optimizer_state(optimized_parameter_names(stage1), ffn_parameter_names(stage1),
                                                        stage2, state["last_optimizer_state"])
    out["task_state"] = {}  # the probe's statistics stay with stage 1
    stage2_cfg = copy.deepcopy(cfg)
    stage2_cfg.model = stage2_args
    # stored as fairseq's Trainer stores it (plain containers), so that weights-only loading reads it
    out["cfg"] = OmegaConf.to_container(stage2_cfg, resolve=True, enum_to_str=True)
    with atomic_write(out_path, "wb") as f:
        torch.save(out, f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gdps-split-checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage1", help="stage-1 checkpoint (with optimizer state)")
    parser.add_argument("--plan", help="plan.json from gdps-analyze")
    parser.add_argument("--split-modules", help="instead of --plan: comma-separated FFN blocks to split")
    parser.add_argument("--groups", help="instead of --plan: language groups, ';' between groups, ',' within")
    parser.add_argument("--shared-ratio", type=float, help="instead of --plan: share of units kept shared, in [0, 1)")
    parser.add_argument("--out", required=True, help="stage-2 checkpoint to write")
    parser.add_argument("--init", default="energy", choices=("energy", "svd", "random"))
    parser.add_argument("--data", metavar="DIR",
                        help="the data folder stage 1 trained on (default: the one the checkpoint stores, if it "
                             "still exists; name it after moving or renaming the folder)")
    args = parser.parse_args(argv)
    explicit = [args.split_modules, args.groups, args.shared_ratio]
    if bool(args.plan) == any(x is not None for x in explicit):
        parser.error("give either --plan or all of --split-modules, --groups and --shared-ratio")
    if not args.plan and any(x is None for x in explicit):
        parser.error("--split-modules, --groups and --shared-ratio go together")
    try:
        split_checkpoint(args.stage1, args.plan, args.out, args.init, args.split_modules, args.groups, args.shared_ratio,
                         data=args.data)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"gdps-split-checkpoint: error: {e}", file=sys.stderr)
        return 1
    print(f"gdps-split-checkpoint: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
