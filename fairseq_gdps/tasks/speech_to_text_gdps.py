"""Task ``speech_to_text_gdps``: fairseq's speech-to-text task plus the source language of every
utterance in ``net_input["src_lang_id"]``, temperature-based language sampling, the GDPS
gradient probe and, with ``--gdps-split-at-update``, the analysis and split inside the run
(``tasks/split_switch.py``).

The probe (``tasks/gradient_probe.py``) belongs to the task, so it works with any criterion
(stock ``label_smoothed_cross_entropy`` included). On probed updates the train step is the stock
one (same forward, same backward, same update) run inside the probe's capture, which records one
step of per-language gradient statistics per update from ``optimizer_step``.
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
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask
from omegaconf import II

from fairseq_gdps.net_input import LANG_ID_KEY
from fairseq_gdps.tasks.data_folder_config import DataFolderConfig
from fairseq_gdps.tasks.gradient_probe import STATE_KEY, GradientProbe, GradientProbeConfig, resumed_checkpoint
from fairseq_gdps.tasks.split_switch import SWITCH_KEY, SplitSwitch, SplitSwitchConfig

logger = logging.getLogger(__name__)


@dataclass
class SpeechToTextGDPSConfig(GradientProbeConfig, SplitSwitchConfig):
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


@register_task("speech_to_text_gdps", dataclass=SpeechToTextGDPSConfig)
class SpeechToTextGDPSTask(SpeechToTextTask):
    def __init__(self, cfg, tgt_dict):
        super().__init__(cfg, tgt_dict)
        self.data_cfg = DataFolderConfig(Path(cfg.data) / cfg.config_yaml)  # reads a moved data folder too
        self.languages = self.source_languages(cfg)
        self.lang_to_id = {lang: i for i, lang in enumerate(self.languages)}
        logger.info(f"source languages (id order): {self.languages}")
        self.probe = GradientProbe(cfg, self.languages)
        self.switch = SplitSwitch(cfg, self.probe) if cfg.gdps_split_at_update else None
        # (utterances of the train S2T dataset,) probe unit ids under --gdps-probe-speakers (set
        # when the train set is loaded); None: the units are the languages
        self._unit_of_utterance: Optional[torch.Tensor] = None

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
        if split == self.args.train_subset and self.args.gdps_probe_speakers and self.args.gdps_probe_interval > 0:
            self._probe_speakers(s2t_dataset)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if LANG_ID_KEY not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"--task speech_to_text_gdps passes net_input['{LANG_ID_KEY}'], which the model "
                f"'{cfg._name if hasattr(cfg, '_name') else cfg.arch}' does not take: use an s2t_*_gdps "
                "architecture (e.g. --arch s2t_transformer_gdps_xs), or --task speech_to_text for stock models"
            )
        if self.switch is not None and not from_checkpoint:   # training (not a decode of a saved model)
            self.switch.check_flags()
            resumed_from = resumed_checkpoint(self.args)
            state = None if resumed_from is None else torch.load(resumed_from, map_location="cpu")
            task_state = None if state is None else state.get("task_state", {})
            if task_state is not None:   # the probe's statistics too, read once here
                self.probe.load_state_dict(task_state, source=str(resumed_from))
            update = 0 if state is None else int(state["optimizer_history"][-1]["num_updates"])
            self.switch.model_built(model, cfg, self, task_state, resumed_from, update)
        return model

    def _train_manifest(self) -> Path:
        return Path(self.args.data) / f"{self.args.train_subset.split(',')[0]}.tsv"

    def _probe_speakers(self, s2t_dataset) -> None:
        """--gdps-probe-speakers: the probe units are the train set's (language, speaker) pairs,
        sorted by language order, then speaker."""
        path = self._train_manifest()
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if "speaker" not in header:
            raise ValueError(f"--gdps-probe-speakers: {path} has no speaker column")
        pairs = list(zip(s2t_dataset.src_langs, s2t_dataset.speakers))
        unique = sorted(set(pairs), key=lambda p: (self.lang_to_id[p[0]], p[1]))
        self.probe.set_units([speaker_unit(lang, spk) for lang, spk in unique], [lang for lang, _ in unique])
        index = {pair: i for i, pair in enumerate(unique)}
        self._unit_of_utterance = torch.tensor([index[pair] for pair in pairs], dtype=torch.long)

    def _probe_units_of_batch(self, sample) -> torch.Tensor:
        """Probe unit id of every utterance of a train batch (its language id, or the id of its
        (language, speaker) pair), on the batch's device."""
        lang_ids = sample["net_input"][LANG_ID_KEY]
        if self._unit_of_utterance is None:
            return lang_ids
        return self._unit_of_utterance[sample["id"].cpu()].to(lang_ids.device)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if ignore_grad or not self.probe.is_due(update_num):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        with self.probe.capture(sample, model, optimizer, self._probe_units_of_batch(sample)):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        # Called once per update on every worker, after all its micro-batches: the probed
        # update's per-language gradients are complete here (and reduced across workers).
        if self.probe.is_due(update_num):
            self.probe.record_update(update_num)
        if self.switch is not None and self.switch.is_due(update_num):
            self.switch.switch(model, optimizer)

    def attach_model_rewrapper(self, rewrap_model) -> None:
        """gdps-train's Trainer hands the task ``rewrap_model()``, which has fairseq wrap the
        model anew for data-parallel training; the single run's switch calls it after the split."""
        if self.switch is not None:
            self.switch.attach_rewrapper(rewrap_model)

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        if self.switch is not None:   # before the first update of a data-parallel run
            self.switch.check_data_parallel()

    def begin_valid_epoch(self, epoch, model):
        # Validation precedes every checkpoint save: write the statistics file at the same points.
        self.probe.save()

    def state_dict(self):
        switch = {} if self.switch is None else self.switch.state_dict()
        return {**super().state_dict(), **self.probe.state_dict(), **switch}

    def load_state_dict(self, state_dict):
        # fairseq's load_model_ensemble_and_task calls this; fairseq-train's resume does not (the
        # probe reads its checkpoint itself, see GradientProbe._read_resumed_state)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in (STATE_KEY, SWITCH_KEY)})
        self.probe.load_state_dict(state_dict)
        if self.switch is not None:
            self.switch.load_state_dict(state_dict)
