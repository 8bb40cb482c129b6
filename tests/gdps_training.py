"""Helpers of the distributed, resume and reproducibility tests: tiny fairseq-train command lines
for both GDPS stages, several processes at once (data-parallel workers, or independent runs side
by side), a run killed with SIGKILL after a checkpoint, and comparisons of what they wrote."""
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, REPO

# One FFN per stack, width 32, a 32-channel subsampler; dropout 0 so that different batch
# groupings (--update-freq vs data-parallel workers) draw no different dropout masks.
TINY_GDPS_MODEL = ["--arch", "s2t_transformer_gdps_s", "--encoder-layers", "1", "--decoder-layers", "1",
                   "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                   "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
                   "--conv-channels", "32", "--dropout", "0"]


def train_args(data, save_dir, max_update, *extra):
    """fairseq-train arguments shared by both stages (add the stage's --gdps-* options). With
    --max-tokens 2800 the tiny train set makes 11 batches: an epoch of 6 updates of two batches
    (--update-freq 2 or two workers) ends with a single batch (a padding batch on worker 1)."""
    return [BIN / "fairseq-train", data, "--user-dir", REPO / "fairseq_gdps", "--task", "speech_to_text_gdps",
            "--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev", *TINY_GDPS_MODEL,
            "--optimizer", "adam", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4",
            "--criterion", "label_smoothed_cross_entropy_gdps", "--label-smoothing", "0.1",
            "--max-tokens", "2800", "--required-batch-size-multiple", "1", "--max-update", str(max_update),
            "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints", "--seed", "1",
            "--log-format", "simple", "--log-interval", "1", "--cpu", *extra]


def stage1_args(data, save_dir, max_update, *extra):
    # the summed statistics too: the strictest comparisons (resume, data-parallel) then cover both parts
    return train_args(data, save_dir, max_update, "--gdps-probe-interval", "1", "--gdps-summed-statistics",
                      "--gdps-stats", Path(save_dir) / "stats.pt", *extra)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel(args, world_size=2):
    """The command lines of a CPU data-parallel run: one fairseq-train process per worker, gloo,
    fairseq's legacy_ddp (PyTorch's DDP wrapper refuses CPU modules with fairseq's device_ids)."""
    init = f"tcp://127.0.0.1:{free_port()}"
    return [[*args, "--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
             "--distributed-init-method", init, "--distributed-no-spawn", "--distributed-backend", "gloo",
             "--ddp-backend", "legacy_ddp"] for rank in range(world_size)]


def environment():
    return dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")


def run_all(commands, timeout=300):
    """Run commands side by side (workers of one run, or independent runs); fail with the
    output of any that fails. Returns their stdout+stderr."""
    logs = []
    procs = []
    for i, cmd in enumerate(commands):
        log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"gdps_test_{os.getpid()}_{i}_{time.time_ns()}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([str(c) for c in cmd], env=environment(), stdout=log, stderr=subprocess.STDOUT))
    outputs = []
    try:
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
            os.unlink(log.name)
    failures = [f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{out[-6000:]}"
                for cmd, proc, out in zip(commands, procs, outputs) if proc.returncode != 0]
    if failures:   # every failing worker: the first to fail is often not the first listed
        pytest.fail("\n\n".join(failures))
    return outputs


SAVED = re.compile(r"Saved checkpoint \S+ \(epoch \d+ @ (\d+) updates")


def run_killed_after_checkpoint(cmd, update, timeout=300):
    """Start ``cmd`` and SIGKILL it as soon as it reports a checkpoint at or after ``update``.
    Returns the update of that checkpoint; fails if the run ended before it could be killed."""
    proc = subprocess.Popen([str(c) for c in cmd], env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            lines.append(line)
            saved = SAVED.search(line)
            if saved and int(saved.group(1)) >= update:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return int(saved.group(1))
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    pytest.fail(f"run ended (rc {proc.returncode}) before a checkpoint at update {update}:\n{''.join(lines)[-6000:]}")


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def num_updates(path):
    return load_checkpoint(path)["optimizer_history"][-1]["num_updates"]


def assert_statistics_equal(actual, expected, scale_tolerance=0.0):
    """Every sum of two GradientStatistics and every same-state probe record (its halves' token
    counts and Gram matrices), exactly by default; else each tensor within ``scale_tolerance`` x
    its largest magnitude (rounding differences, which are relative to the summed terms' size,
    not to a sum that cancels to near zero)."""
    def close(a, e, what):
        a, e = torch.as_tensor(a), torch.as_tensor(e)
        atol = scale_tolerance * float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=0.0, atol=atol, msg=lambda m: f"{what}: {m}")

    assert actual.languages == expected.languages and actual.module_names == expected.module_names
    assert actual.num_steps == expected.num_steps and actual.counts() == expected.counts()
    for name, value in expected.to_tensors().items():
        close(actual.to_tensors()[name], value, name)
    assert (actual.same_state is None) == (expected.same_state is None)
    if expected.same_state is not None:
        assert actual.same_state.settings() == expected.same_state.settings()
        for what, a, e in zip(("updates", "tokens", "grams"), actual.same_state.arrays(), expected.same_state.arrays()):
            close(a, e, f"same-state {what}")


def assert_models_equal(actual, expected, rtol=0.0, atol=0.0):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def plan_json(stats_path, out_dir, **options):
    """gdps-analyze's plan.json for a statistics file (no figures), named by a fixed stats path so
    that plans of different runs can be compared byte for byte. Returns its text."""
    from fairseq_gdps.gdps.report import analyze
    from fairseq_gdps.gdps.stats import GradientStatistics

    stats = GradientStatistics.load(stats_path)
    cwd = os.getcwd()
    os.chdir(Path(stats_path).parent)   # the plan names the statistics file as given: "stats.pt"
    try:
        analysis = analyze(stats, Path(stats_path).name, **{"n_groups": 2, "resamples": 20, **options})
    finally:
        os.chdir(cwd)
    plan = analysis.plan().validate(languages=analysis.languages)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plan.save(Path(out_dir) / "plan.json")
    return (Path(out_dir) / "plan.json").read_text()


def split_checkpoint(stage1_checkpoint, plan, out):
    """gdps-split-checkpoint: the stage-2 starting checkpoint (split model and optimizer state),
    in this process (it spares a fairseq start-up)."""
    from fairseq_gdps.cli.split_checkpoint import main

    assert main([str(stage1_checkpoint), "--plan", str(plan), "--out", str(out)]) == 0


# In-process fairseq Trainers (no fairseq-train start-up): the recipes' optimiser
# (examples/speech_to_text_gdps/common.sh: Adam, betas (0.9, 0.98), inverse_sqrt, clip-norm 10,
# weight decay 1e-4) on the tiny model, with a short warm-up so that a few updates move the weights.
TRAINER_ARGS = ["--task", "speech_to_text_gdps", "--config-yaml", "config.yaml", "--train-subset", "train",
                *TINY_GDPS_MODEL, "--encoder-layers", "2",
                "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
                "--warmup-updates", "2", "--clip-norm", "10.0", "--weight-decay", "0.0001",
                "--label-smoothing", "0.1", "--max-tokens", "2800", "--required-batch-size-multiple", "1",
                "--num-workers", "0", "--seed", "1", "--cpu"]


def build_trainer(data, *extra):
    """Task and fairseq Trainer built as fairseq-train builds them from TRAINER_ARGS + ``extra``
    (later flags win)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    import fairseq_gdps  # noqa: F401  (registers the task, criterion and models)

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[str(data), *TRAINER_ARGS, *map(str, extra)])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(cfg.common.seed)   # as fairseq-train, before the model is built
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, Trainer(cfg, task, model, criterion)


def train_batches(task, n, seed=1):
    """The first ``n`` batches of an epoch of the train set (fixed: the same for every trainer)."""
    task.load_dataset("train")
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=2800, required_batch_size_multiple=1,
                                  seed=seed, num_workers=0, epoch=1)
    batches = []
    for batch in itr.next_epoch_itr(shuffle=True):
        batches.append(batch)
        if len(batches) == n:
            break
    return batches
