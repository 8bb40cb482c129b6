"""Task ``speech_to_text_gdps``: fairseq's speech-to-text task plus the source language of every
utterance in ``net_input["src_lang_id"]``, temperature-based language sampling, and the GDPS
gradient probe.

On probed updates the train step is the stock one (same forward, same backward, same update),
with hooks on the tracked FFN layers that split each weight gradient into the shares of the
batch's languages (see ``modules/per_language_gradients.py``); the shares go to the criterion,
which records one step per update (all micro-batches of ``--update-freq`` and all data-parallel
workers summed, see ``gdps/per_language_update.py``) from ``optimizer_step``.
"""
import csv
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset, ResamplingDataset
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import utils as distributed_utils
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask
from omegaconf import II

from fairseq_gdps.modules.per_language_gradients import PerLanguageGradients

logger = logging.getLogger(__name__)

LANG_ID_KEY = "src_lang_id"


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


@dataclass
class SpeechToTextGDPSConfig(FairseqDataclass):
    data: str = field(default="", metadata={"help": "manifest root path"})
    config_yaml: str = field(default="config.yaml", metadata={"help": "configuration YAML under the manifest root"})
    multitask_config_yaml: Optional[str] = field(default=None, metadata={"help": "multitask YAML under the manifest root"})
    max_source_positions: int = field(default=6000, metadata={"help": "max number of frames in the source"})
    max_target_positions: int = field(default=1024, metadata={"help": "max number of tokens in the target"})
    gdps_languages: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated source languages, defining the language ids; "
                  "default: the sorted src_lang values of the train manifest"},
    )
    gdps_lang_temperature: float = field(
        default=1.0,
        metadata={"help": "language sampling temperature T: language l is sampled with probability "
                  "proportional to (n_l/N)^(1/T); 1 keeps the data's proportions (no resampling)"},
    )
    seed: int = II("common.seed")
    train_subset: str = II("dataset.train_subset")


class LanguageTaggedDataset(BaseWrapperDataset):
    """Adds the source-language id of every utterance to ``net_input``.

    ``dataset`` may be the S2T dataset itself or a resampling of it; items are the S2T dataset's
    items, whose ``index`` points into ``s2t_dataset`` and so into ``lang_ids``.
    """

    def __init__(self, dataset, s2t_dataset, lang_ids: np.ndarray):
        super().__init__(dataset)
        self.s2t_dataset = s2t_dataset
        self.lang_ids = torch.as_tensor(lang_ids, dtype=torch.long)

    # fairseq's ResamplingDataset shadows its batch_by_size method with a bool attribute, and
    # forwards filter_indices_by_size to the dataset it samples from (whose indices are others):
    # batch and filter here, with FairseqDataset's own code over this dataset's sizes (what the
    # S2T dataset itself uses when it is not resampled).
    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        return FairseqDataset.batch_by_size(self, indices, max_tokens, max_sentences, required_batch_size_multiple)

    def filter_indices_by_size(self, indices, max_sizes):
        return FairseqDataset.filter_indices_by_size(self, indices, max_sizes)

    def collater(self, samples):
        batch = self.s2t_dataset.collater(samples, return_order=True)
        if not batch:
            return batch
        order = batch.pop("order")
        item_lang = self.lang_ids[torch.tensor([s.index for s in samples], dtype=torch.long)]
        batch["net_input"][LANG_ID_KEY] = item_lang.index_select(0, order)
        return batch


def language_sampling_weights(lang_ids: np.ndarray, languages: list, temperature: float) -> np.ndarray:
    """Per-utterance sampling weights that draw language l with probability proportional to
    (n_l/N)^(1/T), utterances uniformly within a language."""
    if temperature <= 0:
        raise ValueError(f"--gdps-lang-temperature must be positive, got {temperature}")
    counts = np.bincount(lang_ids, minlength=len(languages)).astype(np.float64)
    present = counts > 0
    target = np.zeros_like(counts)
    target[present] = (counts[present] / counts.sum()) ** (1.0 / temperature)
    target /= target.sum()
    logger.info(
        "language sampling probabilities: "
        + ", ".join(f"{languages[i]} {counts[i] / counts.sum():.3f}->{target[i]:.3f}" for i in np.flatnonzero(present))
    )
    weights = target[lang_ids] / counts[lang_ids]
    return weights / weights.sum()


def read_manifest_languages(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "src_lang" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no src_lang column; speech_to_text_gdps needs the source language of every utterance")
        return [row["src_lang"] for row in reader]


def speaker_unit(language: str, speaker: str) -> str:
    """The probe unit of a (language, speaker) pair."""
    return f"{language}@{speaker}"


def probe_halves(units: torch.Tensor, ids: torch.Tensor, first_half: int = 0) -> torch.Tensor:
    """Probe row of every utterance of a batch: ``2 * unit + half``, where the halves alternate
    over the unit's utterances in the order of their dataset ids (so that both halves of a unit
    with two or more utterances are non-empty, and the split does not depend on batch order).

    ``first_half``: the half each unit's first utterance goes to. The task alternates it over the
    micro-batches of an update (``--update-freq``, data-parallel workers): restarting at half 0 in
    every micro-batch put one more utterance in half 0 for every micro-batch with an odd number
    of a unit's utterances (the tiny test corpus with --update-freq 2: 4 and 2 of a unit's 6; a
    unit with one utterance in each of two micro-batches had both in half 0 and an empty half 1).
    With two micro-batches per update the halves now differ by one utterance at most."""
    order = sorted(range(units.numel()), key=lambda k: (int(units[k]), int(ids[k])))
    half = torch.zeros_like(units)
    seen = {}
    for k in order:
        u = int(units[k])
        half[k] = (seen.get(u, 0) + first_half) % 2
        seen[u] = seen.get(u, 0) + 1
    return 2 * units + half


@register_task("speech_to_text_gdps", dataclass=SpeechToTextGDPSConfig)
class SpeechToTextGDPSTask(SpeechToTextTask):
    def __init__(self, cfg, tgt_dict):
        super().__init__(cfg, tgt_dict)
        self.languages = self.source_languages(cfg)
        self.lang_to_id = {lang: i for i, lang in enumerate(self.languages)}
        logger.info(f"source languages (id order): {self.languages}")
        # the GDPS criterion records statistics and owns the probe schedule; see build_criterion
        self.gdps_criterion = None
        self.probe_unit_of = None   # (utterances of the train S2T dataset,) probe unit ids, built on first probe
        self._probe_micro_batch = 0   # index of the probed micro-batch in its update, on this worker

    @classmethod
    def add_args(cls, parser):
        # The dataclass defines this task's command-line flags; SpeechToTextTask's own argparse
        # add_args, inherited otherwise, would silently leave out the --gdps-* flags.
        gen_parser_from_dataclass(parser, SpeechToTextGDPSConfig())

    @staticmethod
    def source_languages(cfg) -> list[str]:
        if cfg.gdps_languages:
            languages = [lang.strip() for lang in cfg.gdps_languages.split(",") if lang.strip()]
            if len(set(languages)) != len(languages):
                raise ValueError(f"--gdps-languages lists a language twice: {cfg.gdps_languages}")
            return languages
        train_manifest = Path(cfg.data) / f"{cfg.train_subset.split(',')[0]}.tsv"
        if not train_manifest.is_file():
            raise FileNotFoundError(
                f"{train_manifest} not found: pass --gdps-languages to fix the language ids without it"
            )
        return sorted(set(read_manifest_languages(train_manifest)))

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        s2t_dataset = self.datasets[split]
        unknown = sorted(set(s2t_dataset.src_langs) - set(self.lang_to_id))
        if unknown:
            raise ValueError(
                f"{Path(self.args.data) / split}.tsv: source language(s) {unknown} are not among the "
                f"task's languages {self.languages} (set by --gdps-languages or the train manifest)"
            )
        lang_ids = np.array([self.lang_to_id[lang] for lang in s2t_dataset.src_langs], dtype=np.int64)
        dataset = s2t_dataset
        if split.startswith("train") and self.args.gdps_lang_temperature != 1.0:
            dataset = ResamplingDataset(
                s2t_dataset,
                weights=language_sampling_weights(lang_ids, self.languages, self.args.gdps_lang_temperature),
                replace=True,
                seed=self.args.seed,
                epoch=epoch,
            )
        self.datasets[split] = LanguageTaggedDataset(dataset, s2t_dataset, lang_ids)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if LANG_ID_KEY not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"--task speech_to_text_gdps passes net_input['{LANG_ID_KEY}'], which the model "
                f"'{cfg._name if hasattr(cfg, '_name') else cfg.arch}' does not take: use an s2t_*_gdps "
                "architecture (e.g. --arch s2t_transformer_gdps_xs), or --task speech_to_text for stock models"
            )
        return model

    def build_criterion(self, cfg):
        criterion = super().build_criterion(cfg)
        if hasattr(criterion, "probe_due"):
            self.gdps_criterion = criterion
            if getattr(criterion.cfg, "gdps_probe_speakers", False):
                units = self.speaker_units()
                criterion.attach_languages(self.languages, units, [u.split("@", 1)[0] for u in units])
            else:
                criterion.attach_languages(self.languages)
        return criterion

    def _train_manifest(self) -> Path:
        return Path(self.args.data) / f"{self.args.train_subset.split(',')[0]}.tsv"

    def speaker_units(self) -> list[str]:
        """The (language, speaker) probe units of the train manifest, sorted by language order."""
        path = self._train_manifest()
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if "speaker" not in (reader.fieldnames or []):
                raise ValueError(f"--gdps-probe-speakers: {path} has no speaker column")
            pairs = {(row["src_lang"], row["speaker"]) for row in reader}
        order = {lang: i for i, lang in enumerate(self.languages)}
        return [speaker_unit(lang, spk) for lang, spk in sorted(pairs, key=lambda p: (order.get(p[0], len(order)), p[1]))]

    def _probe_units_of_batch(self, sample, criterion) -> torch.Tensor:
        """Probe unit id of every utterance of a train batch (its language id, or the id of its
        (language, speaker) pair)."""
        lang_ids = sample["net_input"][LANG_ID_KEY]
        if criterion.probe_units == self.languages:
            return lang_ids.cpu()
        if self.probe_unit_of is None:
            train = self.datasets[self.args.train_subset.split(",")[0]].s2t_dataset
            index = {u: i for i, u in enumerate(criterion.probe_units)}
            speakers = train.speakers if train.speakers is not None else [None] * len(train)
            try:
                self.probe_unit_of = torch.tensor([index[speaker_unit(lang, spk)] for lang, spk
                                                   in zip(train.src_langs, speakers)], dtype=torch.long)
            except KeyError as exc:
                raise ValueError(f"--gdps-probe-speakers: {self._train_manifest()}: no probe unit {exc} "
                                 "(the train manifest's speaker column is read when the criterion is built)") from None
        return self.probe_unit_of[sample["id"].cpu()]

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        probe = self.gdps_criterion is not None and not ignore_grad and criterion.probe_due(update_num)
        if not probe:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        # each probe unit's utterances split into two halves: the analysis compares a unit's two
        # halves (self) with other units (cross) at the same parameters (gdps/same_state.py)
        # fairseq's trainer sets every gradient to None when an update (or its retry after an
        # fp16 overflow) begins, and micro-batches of the same update (--update-freq) add to them.
        # Read on a trained parameter: a tracked FFN may be frozen (its would-be gradient is measured).
        first_of_update = next(p for p in model.parameters() if p.requires_grad).grad is None
        if first_of_update:
            self._probe_micro_batch = 0
        # the halves' alternation starts at half 0 and 1 in turn over the update's batches, in the
        # order one process with --update-freq F*W takes them (worker r of W, micro-batch i: batch
        # i*W + r), so that data-parallel workers split exactly as that process does
        world = distributed_utils.get_data_parallel_world_size()
        rank = distributed_utils.get_data_parallel_rank() if world > 1 else 0
        rows = probe_halves(self._probe_units_of_batch(sample, criterion), sample["id"].cpu(),
                            first_half=(self._probe_micro_batch * world + rank) % 2)
        self._probe_micro_batch += 1
        rows = rows.to(sample["net_input"][LANG_ID_KEY].device)
        tracked = criterion.tracked_modules(model)
        with PerLanguageGradients(tracked, rows, keep_shares=criterion.capture_keeps_shares()) as capture:
            result = super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        frozen_blocks = capture.blocks_without_gradient()
        if frozen_blocks:   # e.g. a frozen pretrained encoder under the default --gdps-track '*'
            criterion.untrack(frozen_blocks)
        # Gradient sums and target tokens per probe half; the criterion divides them once the
        # update's micro-batches and workers are summed (per-token gradients, so that steps of
        # different sizes weigh the same in the statistics).
        tokens = torch.zeros(2 * len(criterion.probe_units), dtype=torch.float64).index_add_(
            0, rows.cpu(), sample["target_lengths"].cpu().double())
        # the capture itself (its shares, or their Gram matrices, completed now, before the trainer
        # scales and clips the gradients in place): the criterion reads it block by block (one
        # micro-batch on one worker is recorded straight from it, without a buffer of every
        # tracked gradient per half)
        capture.complete()
        criterion.add_micro_batch(capture, tokens, first_of_update,
                                  loss_scale_of(optimizer), sample["id"].tolist())
        return result

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        # Called once per update on every worker, after all its micro-batches: the probed
        # update's per-language gradients are complete here (and reduced across workers).
        if self.gdps_criterion is not None and self.gdps_criterion.probe_due(update_num):
            self.gdps_criterion.record_update(update_num)

    def begin_valid_epoch(self, epoch, model):
        # Validation precedes every checkpoint save: write the statistics file at the same points.
        if self.gdps_criterion is not None:
            self.gdps_criterion.save_statistics()

    def state_dict(self):
        state = dict(super().state_dict())
        if self.gdps_criterion is not None and self.gdps_criterion.statistics is not None:
            state["gdps_statistics"] = self.gdps_criterion.statistics.state_dict()
        return state
