"""Speed and memory benchmark of GDPS against the shared model: what probing, the split model
and the statistics cost, measured against the budgets GDPS is held to (``TARGETS``).

    python -m benchmarks.speed [--setting default|tiny] [--data DATA] [--work DIR] [--out DIR]
                               [--threads N]
    python -m benchmarks.speed --markdown [benchmarks/results/speed.json]   # print the docs/benchmarks.md table

(from the repository root).

Everything is measured in one process, on one machine and one data set, so that the ratios
compare like with like:

* update time: every variant (stock shared model; stage 1 with the probe off, on every update,
  every 10 updates, on every update with ``--gdps-probe-speakers`` (a probe unit per
  (language, speaker) pair: more units, for information), and on every update with
  ``--gdps-summed-statistics`` (the old estimator's diagnostics too, for information); stage 2 with 2 FFNs
  split, every FFN split, every FFN split one group per
  language) is a fairseq ``Trainer`` built through fairseq's API with the recipes' model size and
  optimiser. Each round runs one block of ``block`` updates per variant on the same fixed batches,
  variants interleaved (order reversed every other round), so that load from other processes hits
  all variants alike; a ratio is the median over rounds of the paired ratio of block times.
* decoding: ``fairseq-generate`` (as the recipes run it) on the test manifest, shared model against
  the same model split function-preservingly (so both write the same hypotheses and decode the
  same number of steps: the ratio is the cost of the split alone); sentences/s as fairseq-generate
  reports it (generation only, model loading excluded), runs interleaved, medians.
* statistics memory: bytes of the sums held by ``GradientStatistics`` as model width and number of
  languages grow, exact and count-sketched, and after 0..N probed updates: the summed statistics
  must not grow; the same-state records (every probe's Gram matrices of the probe units' halves,
  kept so that the bootstrap over probes is exact) grow by a fixed number of bytes per probe;
* ``gdps-analyze`` time on synthetic statistics (random same-state probes through ``add_probe``) as width
  and number of languages grow (these two need no model: ``benchmarks.statistics_cost``).

Results go to ``<out>/speed.json`` and ``<out>/speed.md`` (both written atomically); the markdown
is also what ``--markdown`` prints; ``scripts/publish_benchmark_results.sh`` copies it into
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import statistics as pystats
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if not __package__:
    sys.exit("run the speed benchmark from the repository root as a module: python -m benchmarks.speed ...")

from benchmarks import statistics_cost
from benchmarks.common import (REPO, RESULTS, command_line, configure_logging, machine_details, portable_args,
                               portable_path, print_results_markdown, software_versions, write_results)
from benchmarks.statistics_cost import measure_analyze_time, measure_statistics_memory, statistics_markdown

USER_DIR = REPO / "fairseq_gdps"
BIN = Path(sys.executable).parent
# The budgets GDPS is held to, as ratios to the reference variant. The probe runs inside ordinary
# stage-1 training, so it must cost little: at most 10% on an update it probes, and 2% when it
# probes every 10th update (the recipes probe every 4-8). A split model does, per token, the work of
# the unsplit FFN (shared units plus one group's private units), so training and decoding it may
# cost at most 5% more than the shared model: the price of routing utterances to their group.
TARGETS = {
    "stage1_probe_every": 1.10,
    "stage1_probe_10": 1.02,
    "stage2_plan": 1.05,
    "stage2_all": 1.05,
    "decode_plan": 1.05,
    "decode_all": 1.05,
}

# The recipes' model and optimiser (examples/speech_to_text_gdps/common.sh).
DEMO_SIZE = ["--encoder-layers", "4", "--decoder-layers", "2", "--conv-channels", "256",
             "--encoder-embed-dim", "160", "--decoder-embed-dim", "160",
             "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
             "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
             "--dropout", "0.1", "--share-decoder-input-output-embed"]
TINY_SIZE = ["--encoder-layers", "2", "--decoder-layers", "1", "--conv-channels", "32",
             "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
             "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
             "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
             "--dropout", "0.1", "--share-decoder-input-output-embed"]
OPTIM = ["--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", "150", "--clip-norm", "10.0", "--weight-decay", "0.0001",
         "--label-smoothing", "0.1", "--report-accuracy"]


@dataclass
class Setting:
    size_args: List[str]
    encoder_layers: int
    decoder_layers: int
    corpus_utterances: int          # per language, when the corpus is built here
    vocab_size: int
    max_tokens: int
    batches: int                    # fixed batches, cycled through
    block: int                      # updates per timed block (>= 10: one probed update at interval 10)
    rounds: int                     # timed rounds (after one untimed warm-up round)
    decode_passes: int              # in-process decoding passes over the test set (after a warm-up pass)
    generate_runs: int              # fairseq-generate runs per model
    max_len_b: int                  # decoding length cap (the same for every model)
    memory_widths: List[List[int]]  # (model width, FFN width) pairs
    memory_languages: List[int]
    memory_steps: List[int]         # recorded updates at which the size is read
    sketch_dim: int
    analyze_widths: List[List[int]]
    analyze_languages: List[int]
    analyze_steps: int
    analyze_resamples: int


SETTINGS: Dict[str, Setting] = {
    "default": Setting(size_args=DEMO_SIZE, encoder_layers=4, decoder_layers=2, corpus_utterances=200,
                       vocab_size=256, max_tokens=8000, batches=10, block=10, rounds=10, decode_passes=4, generate_runs=2,
                       max_len_b=60, memory_widths=[[160, 512], [256, 1024], [512, 2048]],
                       memory_languages=[2, 4, 8, 16], memory_steps=[0, 1, 10, 100], sketch_dim=4096,
                       analyze_widths=[[160, 512], [256, 1024], [512, 2048]], analyze_languages=[2, 4, 8, 16],
                       analyze_steps=30, analyze_resamples=200),
    "tiny": Setting(size_args=TINY_SIZE, encoder_layers=2, decoder_layers=1, corpus_utterances=30,
                    vocab_size=64, max_tokens=4000, batches=4, block=10, rounds=2, decode_passes=1, generate_runs=1,
                    max_len_b=20, memory_widths=[[32, 64], [64, 128]], memory_languages=[2, 4],
                    memory_steps=[0, 1, 5], sketch_dim=256, analyze_widths=[[32, 64]], analyze_languages=[2, 4],
                    analyze_steps=8, analyze_resamples=10),
}

logger = logging.getLogger("benchmarks.speed")


# ---------------------------------------------------------------------------------------------
# environment and data
# ---------------------------------------------------------------------------------------------
def run_tool(cmd: Sequence, threads: int, log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); see {log}:\n{proc.stderr[-3000:]}")
    return proc


def prepare_data(setting: Setting, work: Path, threads: int) -> Path:
    """A small quick-profile corpus and its fairseq data folder (reused when already built)."""
    corpus, data = work / "corpus", work / "data"
    if not (corpus / "corpus.json").is_file():
        run_tool([BIN / "gdps-make-corpus", "--profile", "quick", "--utterances-per-language",
                  setting.corpus_utterances, "--seed", "1", "--out", corpus], threads, work / "corpus.log")
    if not (data / "config.yaml").is_file():
        run_tool([BIN / "gdps-prep", "--corpus", corpus, "--out", data, "--vocab-size", setting.vocab_size,
                  "--jobs", "1"], threads, work / "prep.log")
    return data


# ---------------------------------------------------------------------------------------------
# update time
# ---------------------------------------------------------------------------------------------
def ffn_blocks(setting: Setting) -> List[str]:
    return statistics_cost.ffn_blocks(setting.encoder_layers, setting.decoder_layers)


def variant_args(setting: Setting, languages: List[str], work: Path) -> Dict[str, List[str]]:
    """fairseq-train flags of every timed variant (without the data folder)."""
    common = ["--config-yaml", "config.yaml", "--train-subset", "train", "--valid-subset", "dev",
              "--num-workers", "0", "--max-tokens", str(setting.max_tokens), "--required-batch-size-multiple", "1",
              "--seed", "1", "--user-dir", str(USER_DIR), *setting.size_args, *OPTIM]
    gdps = [*common, "--task", "speech_to_text_gdps", "--arch", "s2t_transformer_gdps_s",
            "--criterion", "label_smoothed_cross_entropy_gdps"]
    blocks = ffn_blocks(setting)
    half = (len(languages) + 1) // 2
    two_groups = ",".join(languages[:half]) + ";" + ",".join(languages[half:])
    per_language = ";".join(languages)
    plan_blocks = [blocks[setting.encoder_layers - 1], blocks[-1]]  # last encoder and last decoder FFN

    def split(modules, groups):
        return ["--gdps-split-modules", ",".join(modules), "--gdps-groups", groups, "--gdps-shared-ratio", "0.5"]

    def probe(interval, tag=""):
        return ["--gdps-probe-interval", str(interval), "--gdps-stats", str(work / f"stats_every{interval}{tag}.pt")]

    return {
        "shared": [*common, "--task", "speech_to_text", "--arch", "s2t_transformer_s",
                   "--criterion", "label_smoothed_cross_entropy"],
        "stage1_off": gdps,
        "stage1_probe_every": [*gdps, *probe(1)],
        "stage1_probe_10": [*gdps, *probe(10)],
        "stage1_probe_every_speakers": [*gdps, *probe(1, "_speakers"), "--gdps-probe-speakers"],
        "stage1_probe_every_summed": [*gdps, *probe(1, "_summed"), "--gdps-summed-statistics"],
        "stage2_plan": [*gdps, *split(plan_blocks, two_groups)],
        "stage2_all": [*gdps, *split(blocks, two_groups)],
        "stage2_all_per_language": [*gdps, *split(blocks, per_language)],
    }


VARIANT_DESCRIPTIONS = {
    "shared": "shared model: stock `speech_to_text` task, `s2t_transformer_s`, stock criterion",
    "stage1_off": "stage 1, probe off (GDPS task and criterion, unsplit model)",
    "stage1_probe_every": "stage 1, probe on every update (`--gdps-probe-interval 1`, every FFN tracked; "
                          "a probe unit per language, each split into two halves; the same-state records)",
    "stage1_probe_10": "stage 1, `--gdps-probe-interval 10`",
    "stage1_probe_every_speakers": "stage 1, probe on every update with `--gdps-probe-speakers` "
                                   "(a probe unit per (language, speaker) pair)",
    "stage1_probe_every_summed": "stage 1, probe on every update with `--gdps-summed-statistics` "
                                 "(the summed statistics behind the diagnostics as well)",
    "stage2_plan": "stage 2, 2 FFNs split (last encoder and last decoder FFN), 2 groups, ratio 0.5",
    "stage2_all": "stage 2, every FFN split, 2 groups, ratio 0.5",
    "stage2_all_per_language": "stage 2, every FFN split, one group per language, ratio 0.5",
}
# ratio name -> (variant, reference variant)
UPDATE_RATIOS = {
    "stage1_probe_every": ("stage1_probe_every", "stage1_off"),
    "stage1_probe_10": ("stage1_probe_10", "stage1_off"),
    "stage1_probe_every_speakers": ("stage1_probe_every_speakers", "stage1_off"),
    "stage1_probe_every_summed": ("stage1_probe_every_summed", "stage1_off"),
    "stage1_off_vs_shared": ("stage1_off", "shared"),
    "stage2_plan": ("stage2_plan", "shared"),
    "stage2_all": ("stage2_all", "shared"),
    "stage2_all_per_language": ("stage2_all_per_language", "shared"),
}


def build_trainer(data: Path, flags: List[str]):
    """Task, model, criterion and Trainer exactly as fairseq-train builds them from ``flags``."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[str(data), *flags])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return task, Trainer(cfg, task, model, criterion)


def fixed_batches(task, trainer, setting: Setting) -> list:
    from fairseq import utils

    task.load_dataset("train")
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=setting.max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), trainer.model.max_positions()),
        required_batch_size_multiple=1, seed=1, num_workers=0, epoch=1,
    ).next_epoch_itr(shuffle=True)
    batches = []
    for batch in itr:
        batches.append(batch)
        if len(batches) == setting.batches:
            break
    return batches


def without_language_ids(batch: dict) -> dict:
    """The batch as the stock speech_to_text task would give it (no ``src_lang_id``)."""
    out = dict(batch)
    out["net_input"] = {k: v for k, v in batch["net_input"].items() if k != "src_lang_id"}
    return out


def paired_summary(times: Dict[str, List[float]], variant: str, reference: str) -> dict:
    ratios = [a / b for a, b in zip(times[variant], times[reference])]
    return {"variant": variant, "reference": reference, "ratio": pystats.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_of_medians": pystats.median(times[variant]) / pystats.median(times[reference])}


def interleaved_update_times(trainers: dict, batches: Dict[str, list], block: int, rounds: int):
    """Seconds per update of every trainer, ``block`` updates at a time on its fixed ``batches``
    (cycled), trainers interleaved round by round (order reversed every other round) so that load
    from other processes hits all alike; every trainer does the same updates on the same batch
    positions, so that a round's blocks pair. One untimed warm-up round first (optimiser state,
    allocator, first-call costs). Returns (CPU seconds per update by round, wall seconds per update
    by round, updates done), each by trainer name."""
    n_updates = {name: 0 for name in trainers}

    def run_block(name):
        trainer, source = trainers[name], batches[name]
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(block):
            trainer.train_step([source[n_updates[name] % len(source)]])
            n_updates[name] += 1
        return ((time.process_time() - cpu) / block, (time.perf_counter() - wall) / block)

    order = list(trainers)
    for name in order:
        run_block(name)
    cpu_times: Dict[str, List[float]] = {name: [] for name in order}
    wall_times: Dict[str, List[float]] = {name: [] for name in order}
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            cpu, wall = run_block(name)
            cpu_times[name].append(cpu)
            wall_times[name].append(wall)
        logger.info("update round %d/%d (CPU ms per update): %s", r + 1, rounds,
                    ", ".join(f"{n} {1000 * t[-1]:.0f}" for n, t in cpu_times.items()))
    return cpu_times, wall_times, n_updates


def measure_updates(data: Path, setting: Setting, work: Path):
    """Seconds per update of every variant (process CPU time and wall time), and paired ratios;
    also the trainers, their fixed batches and the variants' flags, for the measurements after.

    CPU time of this process is the primary measure: on a machine shared with other jobs, wall
    time also counts the time spent waiting for a core. Blocks are interleaved either way."""
    from fairseq_gdps.tasks.speech_to_text_gdps import SpeechToTextGDPSTask

    languages = SpeechToTextGDPSTask.source_languages(argparse.Namespace(
        gdps_languages=None, data=str(data), train_subset="train"))
    flags = variant_args(setting, languages, work)
    trainers, batches = {}, None
    for name, f in flags.items():
        task, trainer = build_trainer(data, f)
        if batches is None and name != "shared":
            batches = fixed_batches(task, trainer, setting)
        elif name != "shared":
            task.load_dataset("train")   # --gdps-probe-speakers reads its utterances' speakers
        trainers[name] = trainer
    stock_batches = [without_language_ids(b) for b in batches]
    order = list(trainers)
    cpu_times, wall_times, n_updates = interleaved_update_times(
        trainers, {name: stock_batches if name == "shared" else batches for name in order}, setting.block,
        setting.rounds)

    def probed(name):
        statistics = getattr(getattr(trainers[name].task, "probe", None), "statistics", None)
        return statistics.num_steps if statistics is not None else 0

    def probe_units(name):
        statistics = getattr(getattr(trainers[name].task, "probe", None), "statistics", None)
        return len(statistics.same_state.units) if statistics is not None and statistics.same_state else 0

    return {
        "languages": languages,
        "clock": "process CPU time (primary); wall time alongside",
        "block_updates": setting.block, "rounds": setting.rounds,
        "variants": {name: {"description": VARIANT_DESCRIPTIONS[name], "flags": portable_args(flags[name]),
                            "median_cpu_s_per_update": pystats.median(cpu_times[name]),
                            "median_wall_s_per_update": pystats.median(wall_times[name]),
                            "cpu_s_per_update_by_round": cpu_times[name],
                            "wall_s_per_update_by_round": wall_times[name],
                            "updates": n_updates[name], "probed_updates": probed(name),
                            "probe_units": probe_units(name)}
                     for name in order},
        "ratios": {key: {**paired_summary(cpu_times, *pair),
                         "wall_ratio": paired_summary(wall_times, *pair)["ratio"]}
                   for key, pair in UPDATE_RATIOS.items()},
        "batches": {"count": len(batches), "sentences": [int(b["nsentences"]) for b in batches],
                    "target_tokens": [int(b["ntokens"]) for b in batches]},
    }, trainers, batches, flags


def profile_probe(trainer, batches, updates: int) -> dict:
    """CPU-time profile (cProfile) of probed updates: the probe's functions (the plugin's, less its
    task and models) by cumulative time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for i in range(updates):
        trainer.train_step([batches[i % len(batches)]])
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(v[3] for k, v in stats.stats.items() if k[2] == "train_step" and k[0].endswith("fairseq/trainer.py"))
    rows = []
    for (filename, line, func), (_, ncalls, _, cumtime, _) in stats.stats.items():
        if "fairseq_gdps" in filename and not filename.endswith("tasks/speech_to_text_gdps.py") and "/models/" not in filename:
            rows.append({"function": f"{Path(filename).relative_to(REPO)}:{line}({func})",
                         "calls_per_update": ncalls / updates, "cpu_ms_per_update": 1000 * cumtime / updates})
    rows.sort(key=lambda r: -r["cpu_ms_per_update"])
    return {"updates": updates, "cpu_ms_per_update_total": 1000 * total / updates, "plugin_functions": rows[:10]}


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")


def generate(data: Path, checkpoint: Path, task: str, setting: Setting, threads: int, log: Path) -> dict:
    """One fairseq-generate run over the test manifest, as the recipes decode (beam 5)."""
    proc = run_tool([BIN / "fairseq-generate", data, "--user-dir", USER_DIR, "--task", task,
                     "--config-yaml", "config.yaml", "--gen-subset", "test", "--path", checkpoint,
                     "--max-tokens", "50000", "--required-batch-size-multiple", "1", "--num-workers", "0",
                     "--beam", "5", "--max-len-a", "0", "--max-len-b", setting.max_len_b], threads, log)
    match = TRANSLATED.search(proc.stdout + proc.stderr)
    if not match:
        raise RuntimeError(f"no 'Translated N sentences' line in the fairseq-generate output ({log})")
    hyps = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, re.M)}
    return {"sentences": int(match.group(1).replace(",", "")), "tokens": int(match.group(2).replace(",", "")),
            "seconds": float(match.group(3)), "sentences_per_s": float(match.group(4)), "hypotheses": hyps}


def save_checkpoint(trainer, path: Path) -> None:
    trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils.save_checkpoint does first
    trainer.save_checkpoint(str(path), {})


def test_batches(task, model, setting: Setting) -> list:
    from fairseq import utils

    task.load_dataset("test")
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_tokens=50000,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        required_batch_size_multiple=1, seed=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    return list(itr)


def measure_decoding(data: Path, setting: Setting, work: Path, threads: int, shared_trainer,
                     flags: Dict[str, List[str]]) -> dict:
    """Decoding speed of the shared model and of the same model split (2 FFNs; every FFN)
    function-preservingly: all write the same hypotheses, so a ratio is the split's cost alone.

    Two measures: (1) in this process, fairseq's SequenceGenerator (what fairseq-generate runs)
    over the test set, beam 5, CPU time, models interleaved batch by batch, ``decode_passes``
    passes; a ratio is the median over passes of the paired ratio of time per sentence (primary);
    (2) fairseq-generate itself on the saved checkpoints, its own sentences/s (wall time of the
    generation loop, loading excluded), runs interleaved."""
    import torch
    from fairseq.dataclass.configs import GenerationConfig
    from omegaconf import OmegaConf

    shared = work / "decode_shared.pt"
    save_checkpoint(shared_trainer, shared)
    models = {"shared": (shared_trainer.task, shared_trainer.model, "speech_to_text", shared)}
    for name in ("stage2_plan", "stage2_all"):
        task, trainer = build_trainer(data, [*flags[name], "--gdps-init-from", str(shared)])
        path = work / f"decode_{name}.pt"
        save_checkpoint(trainer, path)
        models[name] = (task, trainer.model, "speech_to_text_gdps", path)
    order = list(models)
    gdps_task = models["stage2_plan"][0]
    batches = test_batches(gdps_task, models["stage2_plan"][1], setting)
    # as fairseq-generate hands it over: a DictConfig (the S2T task asks `"eos_token" in args`)
    gen_cfg = OmegaConf.structured(GenerationConfig(beam=5, max_len_a=0, max_len_b=setting.max_len_b))
    generators = {name: task.build_generator([model], gen_cfg) for name, (task, model, _, _) in models.items()}
    for _, model, _, _ in models.values():
        model.eval()
    cpu = {name: [] for name in order}
    hyps = {name: {} for name in order}
    with torch.no_grad():
        for rep in range(setting.decode_passes + 1):  # pass 0 warms up
            spent = {name: 0.0 for name in order}
            for b, batch in enumerate(batches):
                for name in (order if (rep + b) % 2 == 0 else order[::-1]):
                    task, model = models[name][:2]
                    sample = without_language_ids(batch) if name == "shared" else batch
                    start = time.process_time()
                    out = task.inference_step(generators[name], [model], sample)
                    spent[name] += time.process_time() - start
                    if rep == 0:
                        for i, sample_id in enumerate(batch["id"].tolist()):
                            hyps[name][sample_id] = out[i][0]["tokens"].tolist()
            if rep > 0:
                for name in order:
                    cpu[name].append(spent[name])
    sentences = sum(int(b["nsentences"]) for b in batches)
    runs: Dict[str, List[dict]] = {name: [] for name in order}
    for r in range(setting.generate_runs):
        for name in (order if r % 2 == 0 else order[::-1]):
            _, _, task_name, path = models[name]
            runs[name].append(generate(data, path, task_name, setting, threads, work / f"generate_{name}_{r}.log"))
            logger.info("fairseq-generate %s run %d: %.1f sentences/s", name, r + 1, runs[name][-1]["sentences_per_s"])
    out = {"models": {}, "ratios": {}, "max_len_b": setting.max_len_b, "beam": 5, "sentences": sentences,
           "passes": setting.decode_passes}
    for name in order:
        out["models"][name] = {
            "checkpoint_task": models[name][2],
            "cpu_sentences_per_s_by_pass": [sentences / t for t in cpu[name]],
            "median_cpu_sentences_per_s": sentences / pystats.median(cpu[name]),
            "mean_hypothesis_tokens": sum(len(h) for h in hyps[name].values()) / max(1, len(hyps[name])),
            "hypotheses_identical_to_shared": sum(hyps[name].get(i) == h for i, h in hyps["shared"].items()),
            "fairseq_generate_sentences_per_s_by_run": [x["sentences_per_s"] for x in runs[name]],
            "fairseq_generate_median_sentences_per_s": pystats.median(x["sentences_per_s"] for x in runs[name]),
            "fairseq_generate_sentences": runs[name][0]["sentences"],
        }
    for name in order[1:]:
        paired = [g / s for s, g in zip(cpu["shared"], cpu[name])]
        wall = [s["sentences_per_s"] / g["sentences_per_s"] for s, g in zip(runs["shared"], runs[name])]
        out["ratios"][name.replace("stage2", "decode")] = {
            "variant": name, "reference": "shared", "ratio": pystats.median(paired), "ratio_min": min(paired),
            "ratio_max": max(paired), "fairseq_generate_ratio": pystats.median(wall)}
    return out


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def evaluate_targets(results: dict) -> List[dict]:
    measured = {**results["updates"]["ratios"], **results["decoding"]["ratios"]}
    out = []
    for name, target in TARGETS.items():
        if name in measured:
            ratio = measured[name]["ratio"]
            out.append({"name": name, "ratio": ratio, "target": target, "met": bool(ratio <= target)})
    steps = results["statistics_memory"]["by_recorded_updates"]
    sizes = {}
    for row in steps:
        sizes.setdefault(row["sketch_dim"], set()).add(row["bytes"])
    out.append({"name": "statistics_memory_independent_of_updates", "target": "constant",
                "met": all(len(v) == 1 for v in sizes.values())})
    per_probe = results["statistics_memory"]["same_state_bytes_per_probe"]
    out.append({"name": "same_state_bytes_fixed_per_probe", "target": "linear in probes",
                "met": isinstance(per_probe, (int, float)) and all(
                    r["same_state_bytes"] == per_probe * r["probes_kept"] for r in steps)})
    return out


RATIO_LABELS = {
    "stage1_probe_every": "stage-1 update, probe on every update / probe off",
    "stage1_probe_10": "stage-1 update, `--gdps-probe-interval 10` / probe off",
    "stage1_probe_every_speakers": "stage-1 update, probe on every update, `--gdps-probe-speakers` / probe off",
    "stage1_probe_every_summed": "stage-1 update, probe on every update, `--gdps-summed-statistics` / probe off",
    "stage1_off_vs_shared": "stage-1 update, probe off / shared model",
    "stage2_plan": "stage-2 update, 2 FFNs split / shared model",
    "stage2_all": "stage-2 update, every FFN split / shared model",
    "stage2_all_per_language": "stage-2 update, every FFN split, a group per language / shared model",
    "decode_plan": "decoding time per sentence, 2 FFNs split / shared (wall: fairseq-generate)",
    "decode_all": "decoding time per sentence, every FFN split / shared (wall: fairseq-generate)",
}


def _load_text(m: dict) -> str:
    load = m.get("load_average_at_start")
    return f", 1-minute load average {load[0]:.1f} when it started" if load else ""


def markdown(results: dict) -> str:
    """The results as markdown (docs/benchmarks.md's speed section is generated from this)."""
    m, v, u, dec = results["machine"], results["versions"], results["updates"], results["decoding"]
    targets = {t["name"]: t for t in results["targets"]}
    lines = [f"### Speed and memory ({results['setting']} setting)", "",
             f"Measured {results['date'][:10]} on {m['cpu']} ({m['cores']} cores{_load_text(m)}), "
             f"torch {v['torch']}, fairseq {v['fairseq']}, {results['threads']} thread(s), "
             f"{results['wall_seconds'] / 60:.1f} min in all: `{results['command']}`. "
             f"Update times are process CPU time per update on {u['batches']['count']} fixed batches "
             f"(max-tokens {results['settings']['max_tokens']}, {len(u['languages'])} languages), blocks of "
             f"{u['block_updates']} updates, variants interleaved over {u['rounds']} rounds; a ratio is the median "
             f"over rounds of the paired ratio (range in brackets).", "",
             "| measurement | ratio (CPU) | range | wall-time ratio | target | met |", "|---|---:|---:|---:|---:|:-:|"]
    for key, r in {**u["ratios"], **dec["ratios"]}.items():
        t = targets.get(key)
        wall = r.get("wall_ratio", r.get("fairseq_generate_ratio"))
        lines.append(f"| {RATIO_LABELS.get(key, key)} | {r['ratio']:.3f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
                     f"{wall:.3f} |")
        lines[-1] += f" {'<= %.2f' % t['target'] if t else ''} | {('yes' if t['met'] else '**no**') if t else ''} |"
    lines += ["", "| variant | CPU ms / update | wall ms / update | probed updates | probe units |",
              "|---|---:|---:|---:|---:|"]
    for name, var in u["variants"].items():
        lines.append(f"| {var['description']} | {1000 * var['median_cpu_s_per_update']:.0f} | "
                     f"{1000 * var['median_wall_s_per_update']:.0f} | {var['probed_updates']} of {var['updates']} | "
                     f"{var.get('probe_units') or ''} |")
    prof = results.get("probe_profile")
    if prof:
        lines += ["", f"Where a probed update's extra time goes (cProfile, CPU time, {prof['updates']} probed updates "
                  f"of {prof['cpu_ms_per_update_total']:.0f} ms):", ""]
        lines += [f"- `{row['function']}`: {row['cpu_ms_per_update']:.1f} ms per update" for row in prof["plugin_functions"][:5]]
    lines += ["", f"Decoding: the test set ({dec['sentences']} sentences), beam {dec['beam']}, `--max-len-b "
              f"{dec['max_len_b']}`. The split models are the shared model split function-preservingly (same "
              "hypotheses, so the same number of decoding steps). CPU: fairseq's SequenceGenerator in the benchmark's "
              f"process, models interleaved batch by batch, median of {dec['passes']} passes (the ratio above); "
              "fairseq-generate: its own sentences/s (wall time, loading excluded).", "",
              "| model | sentences/s (CPU) | fairseq-generate sentences/s (runs) | mean hypothesis tokens | "
              "hypotheses identical to shared |", "|---|---:|---|---:|---:|"]
    for name, d in dec["models"].items():
        lines.append(f"| {name} | {d['median_cpu_sentences_per_s']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in d['fairseq_generate_sentences_per_s_by_run'])} | "
                     f"{d['mean_hypothesis_tokens']:.1f} | {d['hypotheses_identical_to_shared']} of {dec['sentences']} |")
    lines += statistics_markdown(results)
    return "\n".join(lines) + "\n"


def run(setting_name: str, data: Optional[Path], work: Path, out: Path, threads: int, command: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    setting = SETTINGS[setting_name]
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "speed", "setting": setting_name,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
               "machine": machine_details(), "versions": software_versions(), "threads": threads,
               "settings": asdict(setting)}
    data = data or prepare_data(setting, work, threads)
    results["data"] = {"path": portable_path(data), "train_utterances": sum(1 for _ in open(data / "train.tsv")) - 1,
                       "test_utterances": sum(1 for _ in open(data / "test.tsv")) - 1}
    logger.info("update times on %s", data)
    updates, trainers, batches, flags = measure_updates(data, setting, work)
    results["updates"] = updates
    results["probe_profile"] = profile_probe(trainers["stage1_probe_every"], batches, min(10, setting.block))
    logger.info("decoding")
    results["decoding"] = measure_decoding(data, setting, work, threads, trainers["shared"], flags)
    del trainers
    logger.info("statistics memory")
    results["statistics_memory"] = measure_statistics_memory(setting, work)
    logger.info("gdps-analyze time")
    results["analyze_time"] = measure_analyze_time(setting, work)
    results["targets"] = evaluate_targets(results)
    results["wall_seconds"] = time.perf_counter() - started
    paths = write_results(results, out, "speed", markdown)
    logger.info("results: %s, %s", paths["json"], paths["md"])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=sorted(SETTINGS), default="default",
                   help="default: the recipes' model size (minutes); tiny: seconds (for the test)")
    p.add_argument("--data", type=Path, default=None,
                   help="prepared data folder (gdps-prep); default: build a quick-profile corpus in --work")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default work/benchmarks/speed_<setting>)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of speed.json and speed.md")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed for every measurement)")
    p.add_argument("--markdown", nargs="?", const=str(RESULTS / "speed.json"), default=None, metavar="JSON",
                   help="print the markdown of an existing results file and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print_results_markdown(p, args.markdown, markdown)
        return 0
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.data is not None and not (args.data / "config.yaml").is_file():
        p.error(f"--data {args.data}: no config.yaml (a gdps-prep output folder is expected)")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    configure_logging()
    work = args.work or REPO / "work" / "benchmarks" / f"speed_{args.setting}"
    run(args.setting, args.data, work.resolve(), args.out.resolve(), args.threads, command_line("speed", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
