"""The GDPS gradient probe, owned by the ``speech_to_text_gdps`` task.

On the updates it is due (``--gdps-probe-interval``, ``--gdps-probe-start``) the probe measures
how each probe unit (a language, or a (language, speaker) pair) pulls on the tracked FFN blocks.
The stock train step runs unchanged, with hooks (``gdps/gradient_capture.py``) that split each
tracked layer's weight gradient into the shares of every unit's two halves of the batch; the
shares are summed over the update's micro-batches (``--update-freq``) and data-parallel workers
(``gdps/per_language_update.py``) and recorded as one step of ``GradientStatistics``, the same
on every worker. The first worker writes them to ``--gdps-stats`` at every validation, and they
travel in the checkpoint's task state, so that a resumed run goes on adding to them.

The task calls the probe around a probed micro-batch's train step (:meth:`GradientProbe.capture`),
after the update's optimizer step (:meth:`~GradientProbe.record_update`), before every checkpoint
(:meth:`~GradientProbe.save`) and with its own state (:meth:`~GradientProbe.state_dict`,
:meth:`~GradientProbe.load_state_dict`); :attr:`~GradientProbe.statistics` and
:meth:`~GradientProbe.stop` give what was measured to the task that trains on.
"""
import fnmatch
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.distributed import utils as distributed_utils
from fairseq.models import BaseFairseqModel
from omegaconf import II

from fairseq_gdps.gdps.gradient_capture import PerLanguageGradients
from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate, record_blockwise
from fairseq_gdps.gdps.stats import GradientStatistics, _splitmix64
from fairseq_gdps.models import ffn_module_names

logger = logging.getLogger(__name__)

# the key of the probe's statistics in the task's state (and so in every checkpoint's task_state)
STATE_KEY = "gdps_statistics"


@dataclass
class GradientProbeConfig(FairseqDataclass):
    """The probe's flags (part of the ``speech_to_text_gdps`` task's configuration)."""

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
        metadata={"help": "also record the summed statistics behind gdps-analyze's diagnostics (noise-corrected "
                  "cosines, self-similarity, subspace alignment, CCA); without them the report says the "
                  "diagnostic was not recorded. The decision uses the same-state records alone (the probe halves' Gram "
                  "matrices, always recorded); the summed statistics add every language's merged gradient, "
                  "squared, sketched and projected, to the cost of a probed update (benchmarks/speed.py measures it)"},
    )
    seed: int = II("common.seed")
    # an update of several micro-batches needs each one's per-language shares (capture_keeps_shares)
    update_freq: List[int] = II("optimization.update_freq")
    # where fairseq-train resumes from: the statistics saved in that checkpoint are resumed too
    restore_file: str = II("checkpoint.restore_file")
    save_dir: str = II("checkpoint.save_dir")


class GradientProbe:
    """Records per-probe-unit gradient statistics during ordinary training (see the module
    docstring). Every data-parallel worker holds one and calls it at the same points.

    Args:
        cfg: the task's configuration (the fields of :class:`GradientProbeConfig`).
        languages: the task's languages, in id order; they are the probe units unless
            :meth:`set_units` names (language, speaker) pairs.
    """

    def __init__(self, cfg: GradientProbeConfig, languages: Sequence[str]):
        if cfg.gdps_probe_interval < 0:
            raise ValueError(f"--gdps-probe-interval must be >= 0, got {cfg.gdps_probe_interval}")
        if cfg.gdps_probe_interval > 0 and not cfg.gdps_stats:
            raise ValueError("--gdps-probe-interval > 0 needs --gdps-stats FILE to write the statistics to")
        self.cfg = cfg
        # plain ints: is_due runs twice per update, probed or not, and DictConfig reads are slow
        self.interval = int(cfg.gdps_probe_interval)
        self.start = int(cfg.gdps_probe_start)
        self.languages = list(languages)
        # probe units and their languages; each unit's utterances of a probed batch are split into
        # two halves (rows 2u and 2u + 1)
        self.units = list(languages)
        self.unit_languages = list(languages)
        self.statistics: Optional[GradientStatistics] = None
        self._stopped = False
        self._saved: Optional[Tuple[dict, str]] = None   # statistics to resume from, and where they came from
        self._restored = False   # load_state_dict has been called: nothing to read from the checkpoint
        self._tracked: Optional[Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]] = None
        self._block_sizes: Optional[Dict[str, int]] = None
        self._micro_batch = 0   # index of the probed micro-batch in its update, on this worker
        self._update: Optional[PerLanguageUpdate] = None   # the probed update in progress
        self._spare_update: Optional[PerLanguageUpdate] = None   # its buffer, kept between probed updates
        # (PerLanguageGradients, tokens, loss scale): a probed update's only micro-batch so far, not yet copied
        self._pending = None
        self._reduce_seconds, self._reduced_updates = 0.0, 0
        self._update_key = 0   # batch_key of the update in progress (this worker's utterances)

    # ------------------------------------------------------------------ what the task asks

    def set_units(self, units: Sequence[str], unit_languages: Sequence[str]) -> None:
        """Probe other units than the languages (``--gdps-probe-speakers``: (language, speaker)
        pairs), each with its language; the task then hands :meth:`capture` unit ids."""
        if self.statistics is not None and list(units) != self.units:
            raise RuntimeError("GDPS probe: the probe units changed after the statistics had begun")
        self.units, self.unit_languages = list(units), list(unit_languages)

    def is_due(self, update_num: int) -> bool:
        """Whether update ``update_num`` is probed."""
        interval, start = self.interval, self.start
        return (interval > 0 and not self._stopped and update_num >= start
                and (update_num - start) % interval == 0)

    def stop(self) -> None:
        """Probe no further update. What was recorded stays (:attr:`statistics`, the statistics
        file, the task's state); the buffers of updates in progress are freed."""
        self._stopped = True
        self._update = self._spare_update = self._pending = None

    def state_dict(self) -> dict:
        """The probe's part of the task's state (saved in every checkpoint): its statistics (those
        it resumed from while it has recorded nothing since, as a run resumed after the probe
        stopped)."""
        if self.statistics is not None:
            return {STATE_KEY: self.statistics.state_dict()}
        return {} if self._saved is None else {STATE_KEY: self._saved[0]}

    def load_state_dict(self, state: Mapping, source: str = "the task state") -> None:
        """Resume from a :meth:`state_dict`: the saved statistics are merged into the first
        statistics this probe records (which refuses statistics of other blocks or settings).
        ``source`` names where they came from in errors."""
        if self.statistics is not None:
            raise RuntimeError("GDPS probe: state loaded after the statistics had begun")
        saved = state.get(STATE_KEY)
        self._saved = None if saved is None else (saved, source)
        self._restored = True

    def save(self) -> None:
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

    # ------------------------------------------------------------------ a probed update

    def tracked_blocks(self, model) -> Dict[str, Tuple[torch.nn.Linear, torch.nn.Linear]]:
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

    def capture_keeps_shares(self) -> bool:
        """Whether a probed micro-batch's capture (``PerLanguageGradients``) must keep its
        per-language shares: for the summed statistics (each language's merged gradient), and when
        an update's sums span several micro-batches (``--update-freq``) or data-parallel workers
        (the Gram matrix of a sum is not the sum of the Gram matrices). Otherwise it keeps only the
        halves' Gram matrices, formed layer by layer during the backward pass: all the same-state
        records need."""
        return (bool(self.cfg.gdps_summed_statistics) or max(int(f) for f in self.cfg.update_freq) > 1
                or distributed_utils.get_data_parallel_world_size() > 1)

    @contextmanager
    def capture(self, sample, model, optimizer, units: torch.Tensor):
        """Wrap the stock train step of a probed micro-batch: its backward pass is captured per
        probe half and handed to :meth:`add_micro_batch` (the train step itself is unchanged).
        ``units``: ``(B,)`` probe unit id of every utterance, on the batch's device."""
        # fairseq's trainer sets every gradient to None when an update (or its retry after an
        # fp16 overflow) begins, and micro-batches of the same update (--update-freq) add to them.
        # Read on a trained parameter: a tracked FFN may be frozen (its would-be gradient is measured).
        first_of_update = next(p for p in model.parameters() if p.requires_grad).grad is None
        if first_of_update:
            self._micro_batch = 0
        # each unit's utterances split into two halves: the analysis compares a unit's two halves
        # (self) with other units (cross) at the same parameters (gdps/same_state.py). The halves'
        # alternation starts at half 0 and 1 in turn over the update's batches, in the order one
        # process with --update-freq F*W takes them (worker r of W, micro-batch i: batch i*W + r), so
        # that data-parallel workers split exactly as that process does
        world = distributed_utils.get_data_parallel_world_size()
        rank = distributed_utils.get_data_parallel_rank() if world > 1 else 0
        ids = sample["id"].cpu()
        rows = probe_halves(units.cpu(), ids, first_half=(self._micro_batch * world + rank) % 2)
        self._micro_batch += 1
        rows = rows.to(units.device)
        tracked = self.tracked_blocks(model)
        with PerLanguageGradients(tracked, rows, keep_shares=self.capture_keeps_shares()) as capture:
            yield
        frozen_blocks = capture.blocks_without_gradient()
        if frozen_blocks:   # e.g. a frozen pretrained encoder under the default --gdps-track '*'
            self._untrack(frozen_blocks)
        # Gradient sums and target tokens per probe half, divided once the update's micro-batches
        # and workers are summed (per-token gradients, so that steps of different sizes weigh the
        # same in the statistics).
        tokens = torch.zeros(2 * len(self.units), dtype=torch.float64).index_add_(
            0, rows.cpu(), sample["target_lengths"].cpu().double())
        # the shares (or their Gram matrices) completed now, before the trainer scales and clips
        # the gradients in place
        capture.complete()
        self.add_micro_batch(capture, tokens, first_of_update, loss_scale_of(optimizer), ids.tolist())

    def add_micro_batch(self, capture: PerLanguageGradients, tokens: torch.Tensor, first_of_update: bool,
                        loss_scale: float = 1.0, utterance_ids=()) -> None:
        """Add a micro-batch's capture (its gradient shares per probe half, completed) and its
        ``(2U,)`` target-token counts to the update in progress (a new one when ``first_of_update``:
        with ``--update-freq`` an update has several micro-batches). ``loss_scale``: the factor
        the loss was multiplied by before the backward pass (fp16 / AMP), divided out so that
        steps taken at different loss scales compare. ``utterance_ids``: the micro-batch's dataset
        ids; they identify the update's batch (see ``batch_key``), so that the bootstrap resamples
        batches, not repeats of one batch.

        The capture is held as it is until a second micro-batch of the update arrives: an update of
        one micro-batch on one worker (the common case) is then recorded block by block from it
        (:meth:`record_update`), without the ``PerLanguageUpdate`` buffer of 2U rows x every tracked
        parameter in float64; only several micro-batches or workers, whose sums must be complete
        before any block's Gram matrix is formed, need that buffer."""
        key = batch_key(utterance_ids)
        if first_of_update or (self._update is None and self._pending is None):
            self._update_key = key
            if self._update is not None:   # an update begun again (e.g. after an fp16 overflow)
                self._spare_update = self._update
            self._update, self._pending = None, (capture, tokens, loss_scale)
            return
        self._update_key = (self._update_key + key) & KEY_MASK
        if self._pending is not None:   # the update's second micro-batch: its sums need the buffer
            self._materialize_pending()
        self._add_to_update(capture, tokens, loss_scale)

    def record_update(self, update_num: int) -> None:
        """Record the probed update just completed as one step: its per-half gradient sums and
        token counts are summed over the data-parallel workers (one all_reduce; a worker with
        nothing of this update, e.g. a padding batch, adds zeros), then divided per half, so that
        every worker records the same step a single process would record on all of the update's
        utterances. Every worker must call this for every probed update.

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
        skipped = self._statistics_for(update_num).add_probe(update_num, tokens.cpu(), rows, batch_key=self._update_key)
        _warn_skipped(update_num, skipped)

    # ------------------------------------------------------------------ internals

    def _untrack(self, blocks: List[str]) -> None:
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

    def _block_sizes_of_tracked(self) -> Dict[str, int]:
        if self._block_sizes is None:
            self._block_sizes = {name: sum(p.numel() for layer in layers for p in layer.parameters())
                                 for name, layers in self._tracked.items()}
        return self._block_sizes

    def _read_resumed_state(self, update_num: int) -> None:
        """Load the task state of the checkpoint fairseq-train resumed from. fairseq 0.12's
        ``Trainer.load_checkpoint`` restores the model, optimizer and data position but never
        calls ``task.load_state_dict`` (only ``load_model_ensemble_and_task`` does, for
        inference), so the probe reads that checkpoint itself, once, when it first records."""
        self._restored = True
        path = resumed_checkpoint(self.cfg)
        if path is None:
            return
        task_state = read_task_state(path)
        if STATE_KEY not in task_state:
            logger.warning(f"{path} holds no GDPS statistics: the probe starts afresh at update {update_num}")
            return
        self.load_state_dict(task_state, source=str(path))
        logger.info(f"GDPS statistics resumed from {path}")

    def _statistics_for(self, update_num: int) -> GradientStatistics:
        if self.statistics is None:
            if update_num > 0 and not self._restored:
                self._read_resumed_state(update_num)
            sizes = self._block_sizes_of_tracked()
            statistics = GradientStatistics(
                sizes,
                languages=self.languages,
                sketch_dim=self.cfg.gdps_sketch_dim,
                subspace_dim=self.cfg.gdps_subspace_dim,
                seed=self.cfg.seed,
                # which blocks of which sizes: statistics of another model are refused on load
                model_signature=";".join(f"{name}:{size}" for name, size in sizes.items()),
                probe_units=self.units,
                probe_unit_languages=self.unit_languages,
                summed=self.cfg.gdps_summed_statistics,
            )
            if self._saved is not None:
                saved, source = self._saved
                # refuses statistics of other blocks or settings
                statistics.merge_(GradientStatistics.from_state_dict(saved, source=source))
                self._saved = None
            self.statistics = statistics
        return self.statistics

    def _new_update(self) -> PerLanguageUpdate:
        """An empty PerLanguageUpdate, reusing the last one's buffer (a fresh buffer of every
        tracked gradient element per probe half would be paid for page by page at every probe)."""
        device = next(iter(self._tracked.values()))[0].weight.device
        update, self._spare_update = self._spare_update, None
        rows = 2 * len(self.units)   # two halves per probe unit
        if update is None or update.buffer.device != device or update.num_languages != rows:
            return PerLanguageUpdate(self._block_sizes_of_tracked(), rows, device)
        update.reset()
        return update

    def _add_to_update(self, capture: PerLanguageGradients, tokens: torch.Tensor, loss_scale: float) -> None:
        for name in self._block_sizes_of_tracked():   # block by block, each block's shares freed once added
            self._update.add_gradients(capture.gradients([name]), loss_scale)
            capture.release([name])
        self._update.add_tokens(tokens)

    def _materialize_pending(self) -> None:
        capture, tokens, loss_scale = self._pending
        self._pending = None
        self._update = self._new_update()
        self._add_to_update(capture, tokens, loss_scale)

    def _record_streamed(self, update_num: int) -> None:
        """Record a one-micro-batch update from its capture, one block at a time
        (``per_language_update.record_blockwise``: the buffer path's numbers up to float32
        rounding, one block's shares in memory at a time)."""
        capture, tokens, loss_scale = self._pending
        self._pending = None
        if not bool((tokens > 0).any()):
            return
        statistics = self._statistics_for(update_num)
        skipped = record_blockwise(statistics, update_num, capture, tokens, self._block_sizes_of_tracked(),
                                   loss_scale, self._update_key)
        _warn_skipped(update_num, skipped)


def resumed_checkpoint(cfg) -> Optional[Path]:
    """The checkpoint fairseq-train resumes from (``--restore-file``, by default
    ``checkpoint_last.pt`` in ``--save-dir``), None when there is none (a fresh start)."""
    path = (Path(cfg.save_dir) / "checkpoint_last.pt" if cfg.restore_file == "checkpoint_last.pt"
            else Path(cfg.restore_file))
    return path if path.is_file() else None


def read_task_state(path: Path) -> dict:
    """The task state saved in a checkpoint (fairseq-train's resume does not hand it to the task)."""
    return torch.load(path, map_location="cpu").get("task_state", {})


def _warn_skipped(update_num: int, skipped) -> None:
    for lang in skipped:
        logger.warning(f"update {update_num}: non-finite gradient for language {lang}; left out of its statistics")


def probe_halves(units: torch.Tensor, ids: torch.Tensor, first_half: int = 0) -> torch.Tensor:
    """Probe row of every utterance of a batch: ``2 * unit + half``, where the halves alternate
    over the unit's utterances in the order of their dataset ids (so that both halves of a unit
    with two or more utterances are non-empty, and the split does not depend on batch order).

    ``first_half``: the half each unit's first utterance goes to. The probe alternates it over the
    micro-batches of an update (``--update-freq``, data-parallel workers), so that a unit's halves
    differ by one utterance at most over the whole update, not by one per micro-batch."""
    order = sorted(range(units.numel()), key=lambda k: (int(units[k]), int(ids[k])))
    half = torch.zeros_like(units)
    seen = {}
    for k in order:
        u = int(units[k])
        half[k] = (seen.get(u, 0) + first_half) % 2
        seen[u] = seen.get(u, 0) + 1
    return 2 * units + half


def loss_scale_of(optimizer) -> float:
    """The factor fairseq's mixed-precision optimizers multiply the loss by before the backward
    pass (``--fp16``: a DynamicLossScaler's ``loss_scale``; ``--amp``: torch's GradScaler), 1 for
    the others: the gradients the probe reads carry it."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None:
        return 1.0
    if hasattr(scaler, "loss_scale"):
        return float(scaler.loss_scale)
    if hasattr(scaler, "get_scale"):
        return float(scaler.get_scale())
    return 1.0


KEY_MASK = (1 << 62) - 1


def batch_key(utterance_ids) -> int:
    """An order-independent key of a set of utterances (a sum of 40-bit mixes of their ids, so
    that data-parallel workers' keys add up in int64 to the key one process computes): every
    epoch batches the same utterances again, and probes of one batch are not independent draws."""
    return sum(_splitmix64(int(i)) & ((1 << 40) - 1) for i in utterance_ids) & KEY_MASK


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The fairseq model inside fairseq's data-parallel wrappers (ModuleProxyWrapper around
    (Legacy)DistributedDataParallel), whose module names carry no "module." prefix."""
    while not isinstance(model, BaseFairseqModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model
