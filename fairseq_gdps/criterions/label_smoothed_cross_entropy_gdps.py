"""Criterion ``label_smoothed_cross_entropy_gdps``: fairseq's label-smoothed cross entropy plus
the options and the recorder of the GDPS gradient probe.

The loss is the stock one. The per-language gradients come from the ``speech_to_text_gdps``
task, which asks :meth:`probe_due` whether to split the batch by language, hands every
micro-batch's per-language gradient sums to :meth:`add_micro_batch` and, once per update (from
the task's ``optimizer_step``), calls :meth:`record_update`: the update's sums are reduced across
data-parallel workers and recorded as one step, the same on every worker. An update of one
micro-batch on one worker is recorded block by block from the task's capture instead, without the
buffer of every tracked gradient per probe half (``per_language_update.record_blockwise``).
"""
import fnmatch
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.distributed import utils as distributed_utils
from fairseq.models import BaseFairseqModel
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from omegaconf import II

from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate, record_blockwise
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
    gdps_probe_speakers: bool = field(
        default=False,
        metadata={"help": "probe per (language, speaker) pair as well (needs a speaker column in the train "
                  "manifest): the analysis then checks per block whether languages are told apart from "
                  "speakers. Costs one gradient share per pair and half on probed updates"},
    )
    gdps_summed_statistics: bool = field(
        default=False,
        metadata={"help": "also record the summed statistics behind gdps-analyze's diagnostics (the old "
                  "estimator's noise-corrected cosines, self-similarity, subspace alignment, CCA), which are "
                  "otherwise reported as unavailable. The decision uses the same-state records alone (the "
                  "probe halves' Gram matrices, always recorded); the summed statistics add every language's "
                  "merged gradient, squared, sketched and projected, to the cost of a probed update "
                  "(1.20x instead of 1.10x an unprobed update when every update is probed, benchmarks/speed.py)"},
    )
    seed: int = II("common.seed")
    # an update of several micro-batches needs each one's per-language shares (capture_keeps_shares)
    update_freq: List[int] = II("optimization.update_freq")
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
        # plain ints: probe_due runs twice per update, probed or not, and DictConfig reads are slow
        self.probe_interval = int(cfg.gdps_probe_interval)
        self.probe_start = int(cfg.gdps_probe_start)
        self._summed = bool(cfg.gdps_summed_statistics)
        self._max_update_freq = max(int(f) for f in cfg.update_freq)
        self.languages: List[str] = []
        # probe units (languages, or "language@speaker" pairs) and their languages; each unit's
        # utterances of a probed batch are split into two halves (rows 2u and 2u + 1)
        self.probe_units: List[str] = []
        self.probe_unit_languages: List[str] = []
        self.statistics: Optional[GradientStatistics] = None
        self._tracked: Optional[Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]] = None
        self._block_sizes: Optional[Dict[str, int]] = None
        self._update: Optional[PerLanguageUpdate] = None   # the probed update in progress
        self._spare_update: Optional[PerLanguageUpdate] = None   # its buffer, kept between probed updates
        # (PerLanguageGradients, tokens, loss scale): a probed update's only micro-batch so far, not yet copied
        self._pending = None
        self._reduce_seconds, self._reduced_updates = 0.0, 0
        self._update_key = 0   # batch_key of the update in progress (this worker's utterances)

    @classmethod
    def build_criterion(cls, cfg, task):
        return cls(cfg, task)

    def attach_languages(self, languages: list[str], probe_units: Optional[List[str]] = None,
                         probe_unit_languages: Optional[List[str]] = None) -> None:
        """The task's languages and the probe's units (default: one unit per language)."""
        self.languages = list(languages)
        self.probe_units = list(languages) if probe_units is None else list(probe_units)
        self.probe_unit_languages = (list(self.probe_units) if probe_unit_languages is None
                                     else list(probe_unit_languages))

    def capture_keeps_shares(self) -> bool:
        """Whether a probed micro-batch's capture (``PerLanguageGradients``) must keep its
        per-language shares: for the summed statistics (each language's merged gradient), and when
        an update's sums span several micro-batches (``--update-freq``) or data-parallel workers
        (the Gram matrix of a sum is not the sum of the Gram matrices). Otherwise it keeps only the
        halves' Gram matrices, formed layer by layer during the backward pass: all the same-state
        records need."""
        return (self._summed or self._max_update_freq > 1
                or distributed_utils.get_data_parallel_world_size() > 1)

    def probe_due(self, update_num: int) -> bool:
        interval, start = self.probe_interval, self.probe_start
        return interval > 0 and update_num >= start and (update_num - start) % interval == 0

    def tracked_modules(self, model) -> Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]:
        """The tracked FFN blocks' (fc1, fc2) layers, by block name (resolved once per model)."""
        if self._tracked is None:
            model = unwrapped(model)   # block names without the data-parallel wrappers' "module."
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

    def untrack(self, blocks: List[str]) -> None:
        """Stop tracking FFN blocks that get no gradient (they and everything below them are
        frozen, e.g. a pretrained encoder under ``--gdps-freeze``), found by the first probed
        batch. Under the default ``--gdps-track '*'`` ("every block that can be measured") they
        are left out with a warning; blocks the user named are an error, and so is a block that
        stops getting gradients once its statistics have begun."""
        names = ", ".join(blocks)
        if self.statistics is not None or self._update is not None or self._pending is not None:
            raise RuntimeError(f"GDPS probe: FFN block(s) {names} got no gradient after their statistics had begun")
        if self.cfg.gdps_track.strip() != "*":
            raise ValueError(f"--gdps-track {self.cfg.gdps_track!r}: FFN block(s) {names} get no gradient (they and "
                             "everything below them are frozen), so there is nothing to measure: leave them out")
        remaining = {name: layers for name, layers in self._tracked.items() if name not in blocks}
        if not remaining:
            raise ValueError(f"GDPS probe: no FFN block gets a gradient ({names}): the probe has nothing to measure; "
                             "train at least one FFN block or a layer below one (--gdps-train-only / --gdps-freeze)")
        logger.warning(f"GDPS probe: {len(blocks)} FFN block(s) get no gradient (frozen, with everything below them) "
                       f"and are not tracked: {names}")
        self._tracked, self._block_sizes, self._spare_update = remaining, None, None
        logger.info(f"GDPS probe tracks {len(remaining)} FFN blocks: {', '.join(remaining)}")

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
                probe_units=self.probe_units,
                probe_unit_languages=self.probe_unit_languages,
                summed=self.cfg.gdps_summed_statistics,
            )
            resumed = self._resumed_statistics(update_num)
            if resumed is not None:
                self.statistics.merge_(resumed)  # refuses statistics of other blocks or settings
        return self.statistics

    def block_sizes(self) -> Dict[str, int]:
        if self._block_sizes is None:
            self._block_sizes = {name: sum(p.numel() for layer in layers for p in layer.parameters())
                                 for name, layers in self._tracked.items()}
        return self._block_sizes

    def _new_update(self) -> PerLanguageUpdate:
        """An empty PerLanguageUpdate, reusing the last one's buffer (a fresh buffer of every
        tracked gradient element per language would be paid for page by page at every probe)."""
        device = next(iter(self._tracked.values()))[0].weight.device
        update, self._spare_update = self._spare_update, None
        rows = 2 * len(self.probe_units)   # two halves per probe unit
        if update is None or update.buffer.device != device or update.num_languages != rows:
            return PerLanguageUpdate(self.block_sizes(), rows, device)
        update.reset()
        return update

    def add_micro_batch(self, grads, tokens: torch.Tensor, first_of_update: bool, loss_scale: float = 1.0,
                        utterance_ids=()) -> None:
        """Add a micro-batch's gradient sums per probe half and its ``(2U,)`` target-token counts
        to the update in progress (a new one when ``first_of_update``: with ``--update-freq`` an
        update has several micro-batches). ``grads``: ``{2 * unit + half: {block: gradient}}``,
        or the micro-batch's ``PerLanguageGradients`` capture itself (read block by block).
        ``loss_scale``: the factor the loss was multiplied by before the backward pass (fp16 /
        AMP), divided out so that steps taken at different loss scales compare.
        ``utterance_ids``: the micro-batch's dataset ids; they identify the update's batch (see
        ``batch_key``), so that the bootstrap resamples batches, not repeats of one batch.

        A capture is held as it is until a second micro-batch of the update arrives: an update of
        one micro-batch on one worker (the common case) is then recorded block by block from the
        capture (:meth:`record_update`), without the ``PerLanguageUpdate`` buffer of 2U rows x
        every tracked parameter in float64 (26 GB for 4 languages at SeamlessM4T-Medium's encoder
        shape); only several micro-batches or workers, whose sums must be complete before any
        block's Gram matrix is formed, need that buffer."""
        key = batch_key(utterance_ids)
        if first_of_update or (self._update is None and self._pending is None):
            self._update_key = key
            if self._update is not None:   # an update begun again (e.g. after an fp16 overflow)
                self._spare_update = self._update
            self._update, self._pending = None, None
            if hasattr(grads, "gradients"):
                self._pending = (grads, tokens, loss_scale)
                return
            self._update = self._new_update()
        else:
            self._update_key = (self._update_key + key) & KEY_MASK
            if self._pending is not None:   # the update's second micro-batch: its sums need the buffer
                self._materialize_pending()
        self._add_to_update(grads, tokens, loss_scale)

    def _add_to_update(self, grads, tokens: torch.Tensor, loss_scale: float) -> None:
        if not hasattr(grads, "gradients"):
            self._update.add(grads, tokens, loss_scale)
            return
        for name in self.block_sizes():   # block by block, each block's shares freed once added
            self._update.add_gradients(grads.gradients([name]), loss_scale)
            grads.release([name])
        self._update.add_tokens(tokens)

    def _materialize_pending(self) -> None:
        capture, tokens, loss_scale = self._pending
        self._pending = None
        self._update = self._new_update()
        self._add_to_update(capture, tokens, loss_scale)

    def record_update(self, update_num: int) -> None:
        """Record the probed update just completed as one step: its per-language gradient sums
        and token counts are summed over the data-parallel workers (one all_reduce; a worker with
        nothing of this update, e.g. a padding batch, adds zeros), then divided per language, so
        that every worker records the same step a single process would record on all of the
        update's utterances. Every worker must call this for every probed update.

        One micro-batch on one worker: recorded block by block from the capture (the same
        numbers up to float32 rounding: the Gram matrices and language rows are formed from the
        shares in their own dtype, without the float64 rows)."""
        single_worker = distributed_utils.get_data_parallel_world_size() <= 1
        if self._pending is not None and single_worker:
            self._record_streamed(update_num)
            return
        if self._pending is not None:
            self._materialize_pending()
        update, self._update = self._update, None
        if update is None:   # this worker had no probed micro-batch in the update
            update = self._new_update()
            self._update_key = 0
        if not single_worker:
            start = time.perf_counter()
            distributed_utils.all_reduce(update.buffer, distributed_utils.get_data_parallel_group())
            # the batch key: the workers' utterances together (40-bit terms: the int64 sum cannot wrap)
            key = torch.tensor([self._update_key], dtype=torch.int64, device=update.buffer.device)
            distributed_utils.all_reduce(key, distributed_utils.get_data_parallel_group())
            self._update_key = int(key.item()) & KEY_MASK
            self._reduce_seconds += time.perf_counter() - start
            self._reduced_updates += 1
        tokens, rows = update.per_token_halves()   # divides the buffer in place
        self._spare_update = update
        if not bool((tokens > 0).any()):
            return
        statistics = self._statistics_for(self._tracked, update_num)
        skipped = statistics.add_probe(update_num, tokens.cpu(), rows, batch_key=self._update_key)
        self._warn_skipped(update_num, skipped)

    def _record_streamed(self, update_num: int) -> None:
        """Record a one-micro-batch update from its capture, one block at a time
        (``per_language_update.record_blockwise``: the buffer path's numbers up to float32
        rounding, one block's shares in memory at a time)."""
        capture, tokens, loss_scale = self._pending
        self._pending = None
        if not bool((tokens > 0).any()):
            return
        statistics = self._statistics_for(self._tracked, update_num)
        skipped = record_blockwise(statistics, update_num, capture, tokens, self.block_sizes(), loss_scale,
                                   self._update_key)
        self._warn_skipped(update_num, skipped)

    @staticmethod
    def _warn_skipped(update_num: int, skipped) -> None:
        for lang in skipped:
            logger.warning(f"update {update_num}: non-finite gradient for language {lang}; left out of its statistics")

    def save_statistics(self) -> None:
        """Write the statistics file (atomically). Every worker holds the same statistics; the
        first data-parallel worker writes them."""
        if self._reduced_updates:
            logger.info(f"GDPS probe: all_reduce of the per-language gradients took "
                        f"{1000 * self._reduce_seconds / self._reduced_updates:.1f} ms per probed update "
                        f"({self._reduced_updates} updates)")
        first_worker = (distributed_utils.get_data_parallel_world_size() == 1
                        or distributed_utils.get_data_parallel_rank() == 0)
        if self.statistics is not None and self.cfg.gdps_stats and first_worker:
            self.statistics.save(self.cfg.gdps_stats)
            logger.info(f"GDPS statistics written to {self.cfg.gdps_stats}")


KEY_MASK = (1 << 62) - 1


def batch_key(utterance_ids) -> int:
    """An order-independent key of a set of utterances (a sum of 40-bit mixes of their ids, so
    that data-parallel workers' keys add up in int64 to the key one process computes): every
    epoch batches the same utterances again, and probes of one batch are not independent draws."""
    from fairseq_gdps.gdps.stats import _splitmix64

    return sum(_splitmix64(int(i)) & ((1 << 40) - 1) for i in utterance_ids) & KEY_MASK


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The fairseq model inside fairseq's data-parallel wrappers (ModuleProxyWrapper around
    (Legacy)DistributedDataParallel), whose module names carry no "module." prefix."""
    while not isinstance(model, BaseFairseqModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model
