"""GDPS in one ``fairseq-train`` run (``--gdps-split-at-update N``), owned by the
``speech_to_text_gdps`` task.

The probe records until update N. When update N's optimizer step is done, the switch writes the
statistics, runs gdps-analyze's own command on them (``--gdps-analyze-args`` are its flags;
``plan.json``, ``report.md`` and the plots go to ``SAVE_DIR/gdps_analysis``), and, when the plan
puts the languages into more than one group, splits the model in place as ``--gdps-plan`` builds
a split model (function-preserving) and carries the optimizer's state over as
``gdps-split-checkpoint`` does (``models/optimizer_state.py``); training goes on from update N+1.
With one group the run goes on unsplit and says so (log and report). Either way the decision is
kept in the task state of every later checkpoint, so that a run resumed after the switch is
rebuilt split before fairseq loads its weights, and ``fairseq-generate`` / ``gdps-export`` read the
split from the checkpoint's model args like a two-stage one's.

fairseq 0.12 gives a task no handle on the Trainer, so the switch changes the model and the
optimizer it is handed, in place. fairseq's data-parallel wrappers keep the parameters they were
built with: data-parallel training runs under ``gdps-train`` (fairseq-train with a Trainer that
wraps the model anew after the switch, ``cli/train.py``), where the first worker decides the plan
and broadcasts it, and every worker splits alike. Mixed-precision optimizers (their flat float32
copies) and the EMA copy also keep the old parameters: those are refused at start-up, naming the
flag; the two-stage form covers them.
"""

import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import utils as distributed_utils
from omegaconf import II

from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.gdps import analysis_command
from fairseq_gdps.gdps.plan import Plan
from fairseq_gdps.models.optimizer_state import ffn_parameter_names, optimized_parameter_names, split_optimizer_state
from fairseq_gdps.models.s2t_gdps import split_in_place
from fairseq_gdps.tasks.gradient_probe import unwrapped

logger = logging.getLogger(__name__)

# the key of the decision in the task's state (and so in every checkpoint after the switch)
SWITCH_KEY = "gdps_split_switch"
ANALYSIS_FOLDER = "gdps_analysis"


@dataclass
class SplitSwitchConfig(FairseqDataclass):
    """The single-run flags (part of the ``speech_to_text_gdps`` task's configuration)."""

    gdps_split_at_update: int = field(
        default=0,
        metadata={"help": "GDPS in this one run: probe until update N, then analyse the statistics with "
                  "gdps-analyze's code (--gdps-analyze-args), split the model and its optimizer state by the "
                  "plan (written to SAVE_DIR/gdps_analysis) and train on to --max-update; 0: no switch"},
    )
    gdps_analyze_args: str = field(
        default="",
        metadata={"help": "gdps-analyze flags for the analysis at --gdps-split-at-update, as one string given with "
                  "'=' (its first word starts with '--'), e.g. --gdps-analyze-args='--conflict-tau 0.05 --select topk'; "
                  "the statistics and --out are set by the run"},
    )
    max_update: int = II("optimization.max_update")
    distributed_world_size: int = II("distributed_training.distributed_world_size")
    fp16: bool = II("common.fp16")
    bf16: bool = II("common.bf16")
    amp: bool = II("common.amp")
    store_ema: bool = II("ema.store_ema")


def _first_worker() -> bool:
    return distributed_utils.get_data_parallel_world_size() == 1 or distributed_utils.get_data_parallel_rank() == 0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class SplitSwitch:
    """The switch of a ``--gdps-split-at-update`` run (see the module doc). The task builds it
    when the flag is set and calls :meth:`model_built`, :meth:`is_due` / :meth:`switch` after
    an update's optimizer step, and :meth:`state_dict` / :meth:`load_state_dict`."""

    def __init__(self, cfg, probe):
        self.cfg = cfg
        self.probe = probe
        self.update = int(cfg.gdps_split_at_update)
        self.out_dir = Path(cfg.save_dir) / ANALYSIS_FOLDER
        self.decision: Optional[dict] = None   # {"update": N, "plan": plan JSON text, or None: no split}
        self._model_args = None
        self._task = None
        self._rewrap_model = None   # set by gdps-train's Trainer: wrap the model anew for data-parallel

    def attach_rewrapper(self, rewrap_model) -> None:
        """``rewrap_model()``: called after the split, so that data-parallel training wraps the
        split parameters (gdps-train's Trainer gives it)."""
        self._rewrap_model = rewrap_model

    def check_data_parallel(self) -> None:
        """Refuse data-parallel training without a Trainer that can wrap the split model anew
        (before the first update: the Trainer exists only after the task is set up)."""
        world = self.cfg.distributed_world_size
        if world > 1 and self._rewrap_model is None and self.decision is None:
            raise ValueError(f"--gdps-split-at-update with --distributed-world-size {world} needs gdps-train (the same "
                             "flags as fairseq-train): fairseq-train's data-parallel wrapper would keep the unsplit "
                             "parameters after the switch; or use the two-stage form (run_gdps.sh --two-stage)")

    # ------------------------------------------------------------------ start-up

    def check_flags(self) -> None:
        """Refuse, naming the flags, what cannot work together (at start-up, before training)."""
        cfg, n, flag = self.cfg, self.update, "--gdps-split-at-update"
        if n < 0:
            raise ValueError(f"{flag} must be >= 0 (0: no switch), got {n}")
        if cfg.gdps_probe_interval <= 0:
            raise ValueError(f"{flag} {n} needs the probe before it: --gdps-probe-interval N (> 0) and --gdps-stats FILE")
        if cfg.gdps_probe_start >= n:
            raise ValueError(f"{flag} {n}: no probed update before the switch (--gdps-probe-start {cfg.gdps_probe_start})")
        if cfg.max_update and n >= cfg.max_update:
            raise ValueError(f"{flag} {n} must lie before --max-update {cfg.max_update}")
        for name in ("fp16", "bf16", "amp", "store_ema"):
            if getattr(cfg, name, False):
                raise ValueError(f"{flag} cannot be combined with {_flag(name)}: fairseq keeps its own copies of the "
                                 "parameters there, which the switch cannot reach; use the two-stage form")
        self.analysis_flags()   # refuses flags gdps-analyze would refuse

    def analysis_flags(self):
        tokens = shlex.split(self.cfg.gdps_analyze_args or "")
        if "--out" in tokens or any(t.startswith("--out=") for t in tokens):
            raise ValueError("--gdps-analyze-args: leave out --out (the analysis is written to SAVE_DIR/gdps_analysis)")
        try:
            return analysis_command.parse([str(self.cfg.gdps_stats), "--out", str(self.out_dir), *tokens],
                                          exit_on_error=False)
        except analysis_command.AnalysisFlagsError as exc:
            raise ValueError(f"--gdps-analyze-args {self.cfg.gdps_analyze_args!r}: {exc}") from None

    def model_built(self, model, model_args, task, resumed_task_state: Optional[dict], resumed_from: Optional[Path],
                    resumed_update: int) -> None:
        """After the model is built for training: refuse a split given twice; on resume after the
        switch, split the model as the run had split it, so that its checkpoint loads."""
        given = [k for k in ("gdps_plan", "gdps_split_modules", "gdps_groups") if getattr(model_args, k, None)]
        if given and not (resumed_task_state or {}).get(SWITCH_KEY):
            raise ValueError(f"--gdps-split-at-update decides the split in the run: leave out "
                             f"{', '.join(_flag(k) for k in given)}")
        if not hasattr(model.encoder, "set_language_groups"):
            raise ValueError("--gdps-split-at-update needs a GDPS architecture (e.g. --arch s2t_transformer_gdps_xs)")
        self._model_args, self._task = model_args, task
        decision = (resumed_task_state or {}).get(SWITCH_KEY)
        if decision is None:
            if resumed_from is not None and resumed_update >= self.update:
                raise ValueError(f"{resumed_from} is at update {resumed_update}, past --gdps-split-at-update "
                                 f"{self.update}, and records no switch (trained without the flag?)")
            return
        self.load_state_dict({SWITCH_KEY: decision})
        self.probe.stop()
        if decision["plan"] is not None:
            plan = Plan.from_dict(json.loads(decision["plan"]), source=f"{resumed_from} (task state)")
            split_in_place(model, model_args, task, plan, source=f"the switch recorded in {resumed_from}")
        logger.info(f"GDPS single run resumed after the switch at update {decision['update']} "
                    f"({'split' if decision['plan'] else 'unsplit'})")

    # ------------------------------------------------------------------ the switch

    def is_due(self, update_num: int) -> bool:
        """Whether the optimizer step of update ``update_num`` (0-based) completes update N."""
        return self.decision is None and update_num + 1 == self.update

    def analyse(self) -> dict:
        """Run the analysis (on the first data-parallel worker, which alone holds the statistics
        file) and hand every worker its outcome: {"plan": JSON text or None, "report": path} or
        {"error": why}."""
        outcome = None
        if _first_worker():
            args = self.analysis_flags()
            logger.info(f"GDPS single run: analysing the statistics of updates before {self.update} "
                        f"(gdps-analyze {' '.join(shlex.quote(a) for a in [args.stats, '--out', args.out])} "
                        f"{self.cfg.gdps_analyze_args})")
            try:
                analysis, paths = analysis_command.run(args)
                logger.info("GDPS analysis:\n" + analysis_command.summary(analysis, paths))
                plan = Plan.load(paths["plan"])
                split = len(plan.groups) >= 2 and bool(plan.modules)
                outcome = {"plan": plan.dumps() if split else None, "report": str(paths["report"])}
            except (ValueError, FileNotFoundError) as exc:
                outcome = {"error": str(exc)}
        if distributed_utils.get_data_parallel_world_size() > 1:   # one decision for all workers
            outcome = distributed_utils.broadcast_object(outcome, src_rank=0,
                                                         group=distributed_utils.get_data_parallel_group())
        if "error" in outcome:
            raise RuntimeError(f"--gdps-split-at-update {self.update}: the analysis stopped: {outcome['error']}. The "
                               f"statistics are in {self.cfg.gdps_stats} and the last checkpoint is unsplit; analyse them "
                               "with gdps-analyze and go on with the two-stage form, or change --gdps-analyze-args")
        return outcome

    def switch(self, model, optimizer) -> None:
        """Analyse, and split model and optimizer state (see the module doc)."""
        self.probe.stop()
        self.probe.save()
        outcome = self.analyse()
        report = outcome["report"] if _first_worker() else None   # the first worker wrote it
        if outcome["plan"] is None:
            self.decision = {"update": self.update, "plan": None}
            self._note_in_report(report, "the analysis kept the languages in one group, so the run went "
                                 "on unsplit: every later update trained the shared model.")
            logger.info(f"GDPS single run: no conflict to split at update {self.update}: training goes on unsplit")
            return
        plan = Plan.from_dict(json.loads(outcome["plan"]), source=f"the analysis at update {self.update}")
        fairseq_model = unwrapped(model)
        names_before = optimized_parameter_names(fairseq_model)
        ffn_names_before = ffn_parameter_names(fairseq_model)
        state_before = optimizer.state_dict()
        if len(state_before["param_groups"][0]["params"]) != len(names_before):
            raise RuntimeError("--gdps-split-at-update: the optimizer holds parameters outside the model "
                               "(a criterion with parameters?), which the switch cannot map")
        split_in_place(fairseq_model, self._model_args, self._task, plan, source=f"the plan in {self.out_dir}")
        state_after = split_optimizer_state(names_before, ffn_names_before, fairseq_model, state_before)
        params = [p for p in fairseq_model.parameters() if p.requires_grad]
        # a fresh instance of the same optimizer over the split parameters ("reset optimizer
        # instance", FairseqOptimizer's own setter), then the carried-over state
        optimizer.optimizer = type(optimizer.optimizer)(params, **optimizer.optimizer_config)
        optimizer.load_state_dict(state_after)
        if self._rewrap_model is not None:
            self._rewrap_model()
        self.decision = {"update": self.update, "plan": plan.dumps()}
        self._note_in_report(report, f"the run split {', '.join(plan.modules)} into the groups "
                             f"{' / '.join('{' + ', '.join(g) + '}' for g in plan.groups)} and trained on.")
        logger.info(f"GDPS single run: split at update {self.update}: {plan.modules}, groups {plan.groups}, "
                    f"shared ratio {plan.shared_ratio:g}; {sum(p.numel() for p in params):,} trained parameters")

    def _note_in_report(self, report: Optional[str], what: str) -> None:
        if report is None:   # a worker other than the first: it wrote no report
            return
        text = Path(report).read_text(encoding="utf-8")
        with atomic_write(report) as f:
            f.write(f"{text}\n## In the run (--gdps-split-at-update {self.update})\n\nAfter update {self.update}, {what}\n")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {} if self.decision is None else {SWITCH_KEY: dict(self.decision)}

    def load_state_dict(self, state) -> None:
        decision = state.get(SWITCH_KEY)
        if decision is not None:
            self.decision = {"update": int(decision["update"]), "plan": decision["plan"]}
