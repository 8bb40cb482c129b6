"""Task ``speech_to_text_gdps``: fairseq's speech-to-text task plus the source language of every
utterance in ``net_input["src_lang_id"]``, temperature-based language sampling, and the
per-language backward of the GDPS gradient probe.

The probe splits a training batch into single-language sub-batches and runs one backward per
language. Losses are sums over tokens, so the gradients of the sub-batches add up to the
gradient of the whole batch: the optimizer update is the same as the stock task's.
"""
import csv
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset, ResamplingDataset
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import register_task
from fairseq.tasks.speech_to_text import SpeechToTextTask
from omegaconf import II

logger = logging.getLogger(__name__)

LANG_ID_KEY = "src_lang_id"


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

    def collater(self, samples):
        batch = self.s2t_dataset.collater(samples, return_order=True)
        if not batch:
            return batch
        order = batch.pop("order")
        item_lang = self.lang_ids[torch.tensor([s.index for s in samples], dtype=torch.long)]
        batch["net_input"][LANG_ID_KEY] = item_lang.index_select(0, order)
        return batch


def read_manifest_languages(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "src_lang" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no src_lang column; speech_to_text_gdps needs the source language of every utterance")
        return [row["src_lang"] for row in reader]


def select_rows(sample: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of ``sample`` made of ``rows``, with padding trimmed to the longest row."""
    net_input = sample["net_input"]
    src_lengths = net_input["src_lengths"].index_select(0, rows)
    sub_input = dict(net_input)
    sub_input["src_tokens"] = net_input["src_tokens"].index_select(0, rows)[:, : int(src_lengths.max())].contiguous()
    sub_input["src_lengths"] = src_lengths
    sub_input[LANG_ID_KEY] = net_input[LANG_ID_KEY].index_select(0, rows)
    sub = dict(sample)
    sub["id"] = sample["id"].index_select(0, rows)
    target_lengths = sample["target_lengths"].index_select(0, rows)
    max_tgt = int(target_lengths.max())
    sub["target"] = sample["target"].index_select(0, rows)[:, :max_tgt].contiguous()
    sub["target_lengths"] = target_lengths
    if net_input.get("prev_output_tokens") is not None:
        sub_input["prev_output_tokens"] = net_input["prev_output_tokens"].index_select(0, rows)[:, :max_tgt].contiguous()
    if sample.get("speaker") is not None:
        sub["speaker"] = sample["speaker"].index_select(0, rows)
    sub["net_input"] = sub_input
    sub["ntokens"] = int(target_lengths.sum())
    sub["nsentences"] = int(rows.numel())
    return sub


def sum_logging_outputs(outputs: list[dict]) -> dict:
    """Logging outputs of label-smoothed cross entropy are all sums, so sub-batches add up."""
    total: dict = {}
    for out in outputs:
        for key, value in out.items():
            total[key] = total.get(key, 0) + value
    return total


@register_task("speech_to_text_gdps", dataclass=SpeechToTextGDPSConfig)
class SpeechToTextGDPSTask(SpeechToTextTask):
    def __init__(self, cfg, tgt_dict):
        super().__init__(cfg, tgt_dict)
        self.languages = self.source_languages(cfg)
        self.lang_to_id = {lang: i for i, lang in enumerate(self.languages)}
        logger.info(f"source languages (id order): {self.languages}")
        # the GDPS criterion records statistics and owns the probe schedule; see build_criterion
        self.gdps_criterion = None

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
                weights=self.language_sampling_weights(lang_ids),
                replace=True,
                seed=self.args.seed,
                epoch=epoch,
            )
        self.datasets[split] = LanguageTaggedDataset(dataset, s2t_dataset, lang_ids)

    def language_sampling_weights(self, lang_ids: np.ndarray) -> np.ndarray:
        """Per-utterance weights giving language l the probability (n_l/N)^(1/T), normalised."""
        counts = np.bincount(lang_ids, minlength=len(self.languages)).astype(np.float64)
        present = counts > 0
        target = np.zeros_like(counts)
        target[present] = (counts[present] / counts.sum()) ** (1.0 / self.args.gdps_lang_temperature)
        target /= target.sum()
        logger.info(
            "language sampling probabilities: "
            + ", ".join(f"{self.languages[i]} {counts[i] / counts.sum():.3f}->{target[i]:.3f}" for i in np.flatnonzero(present))
        )
        weights = target[lang_ids] / counts[lang_ids]
        return weights / weights.sum()

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
            criterion.attach_languages(self.languages)
        return criterion

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        probe = self.gdps_criterion is not None and not ignore_grad and criterion.probe_due(update_num)
        if not probe:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        model.train()
        model.set_num_updates(update_num)
        tracked = criterion.tracked_parameters(model)
        lang_ids = sample["net_input"][LANG_ID_KEY]
        losses, sample_sizes, logging_outputs = [], [], []
        per_language_grads = {}
        for lang_id in torch.unique(lang_ids).tolist():
            before = {name: [p.grad.detach().clone() if p.grad is not None else None for p in params] for name, params in tracked.items()}
            sub = select_rows(sample, torch.nonzero(lang_ids == lang_id).squeeze(1))
            with torch.autograd.profiler.record_function("forward"):
                loss, sample_size, logging_output = criterion(model, sub)
            with torch.autograd.profiler.record_function("backward"):
                optimizer.backward(loss)
            per_language_grads[self.languages[lang_id]] = {
                name: torch.cat([
                    (p.grad.detach() - b if b is not None else p.grad.detach()).reshape(-1)
                    if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    for p, b in zip(params, before[name])
                ])
                for name, params in tracked.items()
            }
            losses.append(loss.detach())
            sample_sizes.append(sample_size)
            logging_outputs.append(logging_output)
        criterion.record_step(update_num, per_language_grads)
        return torch.stack(losses).sum(), sum(sample_sizes), sum_logging_outputs(logging_outputs)

    def begin_valid_epoch(self, epoch, model):
        # Validation precedes every checkpoint save: write the statistics file at the same points.
        if self.gdps_criterion is not None:
            self.gdps_criterion.save_statistics()

    def state_dict(self):
        state = dict(super().state_dict())
        if self.gdps_criterion is not None and self.gdps_criterion.statistics is not None:
            state["gdps_statistics"] = self.gdps_criterion.statistics.state_dict()
        return state
