"""Criterion ``label_smoothed_cross_entropy_gdps``: fairseq's label-smoothed cross entropy plus
the options and the recorder of the GDPS gradient probe.

The loss is the stock one. The per-language gradients come from the ``speech_to_text_gdps``
task, which asks :meth:`probe_due` whether to split the batch by language and hands the
gradients of the tracked modules to :meth:`record_step`.
"""
import fnmatch
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from omegaconf import II

from fairseq_gdps.gdps.stats import GradientStatistics
from fairseq_gdps.models.s2t_gdps import ffn_module_names

logger = logging.getLogger(__name__)


@dataclass
class LabelSmoothedCrossEntropyGDPSConfig(LabelSmoothedCrossEntropyCriterionConfig):
    gdps_track: str = field(
        default="*",
        metadata={"help": "comma-separated globs over FFN block names (e.g. 'encoder.*', "
                  "'decoder.layers.1.ffn'); the blocks whose per-language gradients are recorded"},
    )
    gdps_probe_interval: int = field(
        default=0,
        metadata={"help": "record per-language gradients every N updates; 0 disables the probe"},
    )
    gdps_probe_start: int = field(default=0, metadata={"help": "first update that may be probed"})
    gdps_stats: Optional[str] = field(
        default=None, metadata={"help": "statistics file, written atomically at every validation"}
    )
    gdps_sketch_dim: Optional[int] = field(
        default=None,
        metadata={"help": "count-sketch every module's gradient to this many dimensions, so the "
                  "statistics' size no longer depends on module size"},
    )
    gdps_subspace_dim: int = field(
        default=64, metadata={"help": "dimension of the per-step projection kept for SVD/CCA analysis"}
    )
    seed: int = II("common.seed")
    # where fairseq-train resumes from: the statistics saved in that checkpoint are resumed too
    restore_file: str = II("checkpoint.restore_file")
    save_dir: str = II("checkpoint.save_dir")


@register_criterion("label_smoothed_cross_entropy_gdps", dataclass=LabelSmoothedCrossEntropyGDPSConfig)
class LabelSmoothedCrossEntropyGDPSCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(self, cfg: LabelSmoothedCrossEntropyGDPSConfig, task):
        super().__init__(
            task,
            cfg.sentence_avg,
            cfg.label_smoothing,
            ignore_prefix_size=cfg.ignore_prefix_size,
            report_accuracy=cfg.report_accuracy,
        )
        if cfg.gdps_probe_interval < 0:
            raise ValueError(f"--gdps-probe-interval must be >= 0, got {cfg.gdps_probe_interval}")
        if cfg.gdps_probe_interval > 0 and not cfg.gdps_stats:
            raise ValueError("--gdps-probe-interval > 0 needs --gdps-stats FILE to write the statistics to")
        self.cfg = cfg
        self.languages: List[str] = []
        self.statistics: Optional[GradientStatistics] = None
        self._tracked: Optional[Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]] = None

    @classmethod
    def build_criterion(cls, cfg, task):
        return cls(cfg, task)

    def attach_languages(self, languages: list[str]) -> None:
        self.languages = list(languages)

    def probe_due(self, update_num: int) -> bool:
        interval = self.cfg.gdps_probe_interval
        return interval > 0 and update_num >= self.cfg.gdps_probe_start and (update_num - self.cfg.gdps_probe_start) % interval == 0

    def tracked_modules(self, model) -> Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]:
        """The tracked FFN blocks' (fc1, fc2) layers, by block name (resolved once per model)."""
        if self._tracked is None:
            patterns = [p.strip() for p in self.cfg.gdps_track.split(",") if p.strip()]
            blocks = ffn_module_names(model)
            chosen = {name: layers for name, layers in blocks.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
            if not chosen:
                raise ValueError(
                    f"--gdps-track {self.cfg.gdps_track!r} matches none of the model's FFN blocks: "
                    f"{', '.join(blocks) or '(none)'}"
                )
            self._tracked = chosen
            logger.info(f"GDPS probe tracks {len(chosen)} FFN blocks: {', '.join(chosen)}")
        return self._tracked

    def _resumed_statistics(self, update_num: int) -> Optional[GradientStatistics]:
        """The statistics in the checkpoint fairseq-train resumed from (fairseq's trainer does not
        hand task state back on resume, so the checkpoint is read here, once)."""
        if update_num == 0:
            return None
        path = (Path(self.cfg.save_dir) / "checkpoint_last.pt" if self.cfg.restore_file == "checkpoint_last.pt"
                else Path(self.cfg.restore_file))
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=False).get("task_state", {}).get("gdps_statistics")
        if saved is None:
            logger.warning(f"{path} holds no GDPS statistics: the probe starts afresh at update {update_num}")
            return None
        logger.info(f"GDPS statistics resumed from {path}")
        return GradientStatistics.from_state_dict(saved, source=str(path))

    def _statistics_for(self, tracked, update_num: int) -> GradientStatistics:
        if self.statistics is None:
            sizes = {name: sum(p.numel() for layer in layers for p in layer.parameters()) for name, layers in tracked.items()}
            self.statistics = GradientStatistics(
                sizes,
                languages=self.languages,
                sketch_dim=self.cfg.gdps_sketch_dim,
                subspace_dim=self.cfg.gdps_subspace_dim,
                seed=self.cfg.seed,
                # which blocks of which sizes: statistics of another model are refused on load
                model_signature=";".join(f"{name}:{size}" for name, size in sizes.items()),
            )
            resumed = self._resumed_statistics(update_num)
            if resumed is not None:
                self.statistics.merge_(resumed)  # refuses statistics of other blocks or settings
        return self.statistics

    def record_step(self, update_num: int, grads: dict[str, dict[str, torch.Tensor]]) -> None:
        statistics = self._statistics_for(self._tracked, update_num)
        skipped = statistics.add_step(update_num, grads)
        for lang in skipped:
            logger.warning(f"update {update_num}: non-finite gradient for language {lang}; left out of its statistics")

    def save_statistics(self) -> None:
        if self.statistics is not None and self.cfg.gdps_stats:
            self.statistics.save(self.cfg.gdps_stats)
            logger.info(f"GDPS statistics written to {self.cfg.gdps_stats}")
