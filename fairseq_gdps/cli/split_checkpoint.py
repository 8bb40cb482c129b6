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
from fairseq_gdps.gdps.split import split_ffn_weights
from fairseq_gdps.models import ffn_module_names, partitioned_ffns

SPLIT_PARAMETERS = ("fc1_shared_weight", "fc1_shared_bias", "fc1_private_weight", "fc1_private_bias",
                    "fc2_shared_weight", "fc2_private_weight", "fc2_bias")


def trainable_names(model) -> list:
    """Parameter names in the order fairseq's trainer hands parameters to the optimizer."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def split_optimizer_state(stage1, stage2, optimizer_state: dict) -> dict:
    """Stage-1 optimizer state (fairseq/torch format, parameters by index) mapped onto stage 2."""
    if len(optimizer_state["param_groups"]) != 1:
        raise ValueError("only optimizers with a single parameter group are supported")
    names1 = trainable_names(stage1)
    by_name = {names1[i]: s for i, s in optimizer_state["state"].items()}
    param_name = {id(p): n for n, p in stage1.named_parameters()}
    split_state = {}
    for block, ffn in partitioned_ffns(stage2).items():
        fc1, fc2 = ffn_module_names(stage1)[block]
        originals = [by_name.get(param_name[id(p)]) if p is not None else None
                     for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
        if any(s is None for s in originals[::2]):
            continue  # no moments yet (e.g. frozen): the split parameters start without state
        shared = ffn.unit_order[: ffn.fc1_shared_weight.shape[0]].tolist()
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            w1, b1, w2, b2 = (s[key] if s is not None else None for s in originals)
            moments[key] = split_ffn_weights(w1, b1, w2, b2, ffn.fc1_private_weight.shape[0], 0.0,
                                             shared_units=shared)
        for attr in SPLIT_PARAMETERS:
            split_state[f"{block}.{attr}"] = {
                "step": originals[0]["step"],
                "exp_avg": getattr(moments["exp_avg"], attr).clone(),
                "exp_avg_sq": getattr(moments["exp_avg_sq"], attr).clone(),
            }
    state = {}
    for i, name in enumerate(trainable_names(stage2)):
        if name in split_state:
            state[i] = split_state[name]
        elif name in by_name:
            state[i] = copy.deepcopy(by_name[name])
        else:
            raise ValueError(f"no stage-1 optimizer state for stage-2 parameter {name}")
    group = dict(optimizer_state["param_groups"][0], params=list(range(len(state))))
    return {"state": state, "param_groups": [group]}


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
    out["last_optimizer_state"] = split_optimizer_state(stage1, stage2, state["last_optimizer_state"])
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
