"""gdps-train: fairseq-train with a Trainer that wraps the model anew when the single run's switch
(``--gdps-split-at-update``) has split it, so that GDPS in one run also trains data-parallel.

fairseq-train builds its Trainer inside ``fairseq_cli.train.main`` and gives a task no handle on it,
and fairseq's data-parallel wrappers keep the parameters they were built with (legacy_ddp its
per-device lists, PyTorch's DDP its gradient buckets). ``Trainer.reinitialize()`` is fairseq's own
answer ("after model params change", used by iterative quantization); :class:`GdpsTrainer` hands the
task the model part of it. :func:`main` is ``fairseq_cli.train.main`` of fairseq 0.12.3 with that
Trainer (its epoch loop, validation and checkpointing are fairseq's own functions), so every
fairseq-train flag means the same here; only its TPU, Plasma-store and profiler branches are left
out, and those flags are refused.

    gdps-train DATA --task speech_to_text_gdps ... --gdps-split-at-update N --distributed-world-size 2 ...

The plugin is loaded by the command itself (``--user-dir fairseq_gdps`` may be given too).
"""
import argparse
import logging
import math
import os
import sys

import fairseq_gdps  # noqa: F401  (registers the task, criterion and models)
import numpy as np
from fairseq import checkpoint_utils, options, quantization_utils, tasks, utils
from fairseq.data import data_utils
from fairseq.dataclass.initialize import add_defaults
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import fsdp_enable_wrap, fsdp_wrap
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import meters, metrics
from fairseq.model_parallel.megatron_trainer import MegatronTrainer
from fairseq.trainer import Trainer
from fairseq_cli import train as fairseq_train   # its epoch loop and validation

logger = logging.getLogger("fairseq_cli.train")   # the log reads as fairseq-train's


class GdpsTrainer(Trainer):
    """fairseq's Trainer; a task with ``attach_model_rewrapper`` gets :meth:`rewrap_model`."""

    def __init__(self, cfg, task, model, criterion, quantizer=None):
        super().__init__(cfg, task, model, criterion, quantizer)
        if hasattr(task, "attach_model_rewrapper"):
            task.attach_model_rewrapper(self.rewrap_model)

    def rewrap_model(self) -> None:
        """The model's parameters were replaced in place (the switch's split): wrap it anew for
        data-parallel training at its next use, as ``Trainer.reinitialize()`` does. The optimizer
        and learning-rate scheduler are kept: the switch has given the optimizer the new
        parameters, with their state carried over."""
        self._wrapped_model = None


def main(cfg) -> None:
    """``fairseq_cli.train.main`` (fairseq 0.12.3) with :class:`GdpsTrainer`."""
    if isinstance(cfg, argparse.Namespace):
        cfg = convert_namespace_to_omegaconf(cfg)
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    assert cfg.dataset.max_tokens is not None or cfg.dataset.batch_size is not None, \
        "Must specify batch size either with --max-tokens or --batch-size"
    metrics.reset()
    if cfg.common.log_file is not None:
        logger.addHandler(logging.FileHandler(filename=cfg.common.log_file))
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    if distributed_utils.is_master(cfg.distributed_training):
        checkpoint_utils.verify_checkpoint_directory(cfg.checkpoint.save_dir)
    logger.info(cfg)

    task = tasks.setup_task(cfg.task)
    assert cfg.criterion, "Please specify criterion to train a model"
    if cfg.distributed_training.ddp_backend == "fully_sharded":
        with fsdp_enable_wrap(cfg.distributed_training):
            model = fsdp_wrap(task.build_model(cfg.model))
    else:
        model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    logger.info(model)
    logger.info(f"task: {task.__class__.__name__}")
    logger.info(f"model: {model.__class__.__name__}")
    logger.info(f"criterion: {criterion.__class__.__name__}")
    logger.info("num. shared model params: {:,} (num. trained: {:,})".format(
        sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)))

    if not cfg.dataset.disable_validation:
        data_utils.raise_if_valid_subsets_unintentionally_ignored(cfg)
        if cfg.dataset.combine_valid_subsets:
            task.load_dataset("valid", combine=True, epoch=1)
        else:
            for valid_sub_split in cfg.dataset.valid_subset.split(","):
                task.load_dataset(valid_sub_split, combine=False, epoch=1)

    quantizer = None
    if cfg.common.quantization_config_path is not None:
        quantizer = quantization_utils.Quantizer(config_path=cfg.common.quantization_config_path,
                                                 max_epoch=cfg.optimization.max_epoch,
                                                 max_update=cfg.optimization.max_update)
    if cfg.common.model_parallel_size == 1:
        trainer = GdpsTrainer(cfg, task, model, criterion, quantizer)
    else:
        trainer = MegatronTrainer(cfg, task, model, criterion)
    logger.info(f"training on {cfg.distributed_training.distributed_world_size} devices (GPUs/TPUs)")
    logger.info(f"max tokens per device = {cfg.dataset.max_tokens} and max sentences per device = "
                f"{cfg.dataset.batch_size}")

    extra_state, epoch_itr = checkpoint_utils.load_checkpoint(
        cfg.checkpoint, trainer, disable_iterator_cache=task.has_sharded_data("train"))
    max_epoch = cfg.optimization.max_epoch or math.inf
    lr = trainer.get_lr()
    if not cfg.dataset.disable_validation:   # fairseq's dry run of the validation sets
        for subset in cfg.dataset.valid_subset.split(","):
            logger.info(f'begin dry-run validation on "{subset}" subset')
            for _ in trainer.get_valid_iterator(subset).next_epoch_itr(shuffle=False, set_dataset_epoch=False):
                pass

    train_meter = meters.StopwatchMeter()
    train_meter.start()
    while epoch_itr.next_epoch_idx <= max_epoch:
        if lr <= cfg.optimization.stop_min_lr:
            logger.info(f"stopping training because current learning rate ({lr}) is smaller than or equal to "
                        f"minimum learning rate (--stop-min-lr={cfg.optimization.stop_min_lr})")
            break
        valid_losses, should_stop = fairseq_train.train(cfg, trainer, task, epoch_itr)
        if should_stop:
            break
        lr = trainer.lr_step(epoch_itr.epoch, valid_losses[0])
        epoch_itr = trainer.get_train_iterator(epoch_itr.next_epoch_idx, load_dataset=task.has_sharded_data("train"),
                                               disable_iterator_cache=task.has_sharded_data("train"))
    train_meter.stop()
    logger.info(f"done training in {train_meter.sum:.1f} seconds")
    if cfg.checkpoint.write_checkpoints_asynchronously:
        PathManager.async_close()


def cli_main(argv=None) -> None:
    # fairseq-train's log set-up: fairseq_cli.train makes it when imported first, but importing this
    # package has imported fairseq modules before it, one of which sets the root logger to DEBUG
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout, force=True)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    for flag in ("tpu", "use_plasma_view", "profile"):
        if getattr(args, flag, False):
            parser.error(f"--{flag.replace('_', '-')}: not supported by gdps-train (use fairseq-train)")
    cfg = convert_namespace_to_omegaconf(args)
    distributed_utils.call_main(cfg, main)


if __name__ == "__main__":
    cli_main(sys.argv[1:])
