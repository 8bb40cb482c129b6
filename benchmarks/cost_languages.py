"""How the GDPS probe's and analysis' cost grows with the number of languages and of recorded
probes.

    python -m benchmarks.cost_languages [--languages 4 8 16] [--size-probes 10 100 1000]
                                        [--analyze-probes 100 1000] [--resamples 200 0]
                                        [--model default|tiny] [--rounds 6] [--block 10] [--batches 10]
                                        [--max-tokens 8000] [--data DIR] [--work DIR] [--out DIR]
    python -m benchmarks.cost_languages --markdown [benchmarks/results/cost_languages.json]

(from the repository root).

The languages are synthetic: one prepared corpus (``--data``, or a quick-profile corpus built
as the speed benchmark builds its own) whose utterances are relabelled round-robin into N
pseudo-languages ``q00``, ``q01``, ... in a derived manifest (every split; features, vocabulary
and config linked). The batches are the same utterances for every N (fixed ``--max-tokens``), so
as N grows each language has fewer utterances per batch: at 16 languages many have fewer than
the two a probe unit needs for both halves (the table counts them).

* probe time: for every N, the GDPS task, criterion and model (the recipes' size, or ``tiny``)
  built through fairseq's API as the speed benchmark builds them, probe off and probe on
  every update (a probe unit per language, with ``--gdps-summed-statistics``, exact), on the
  same fixed batches; blocks of ``--block`` updates, all 2N trainers interleaved over
  ``--rounds`` rounds (``speed.interleaved_update_times``), process CPU time; the ratio is the
  median over rounds of the paired ratio of the probed to the unprobed block.
* statistics size: the statistics the real probe recorded in those updates, their same-state
  records cycled to P probes (``replicated_records``: each copy a probe of its own batch) and
  saved at every P: the summed part (fixed size), the records in memory (a fixed number of bytes
  per probe, checked against ``8 (2U + M (2U)^2 + 2)``) and the file, all measured at every P.
  The summed part with ``--gdps-sketch-dim 4096`` comes from the statistics' buffer layout
  (``scale.summed_bytes``), for comparison.
* analysis time: ``gdps-analyze`` (the CLI in this process: load, same-state analysis with its
  bootstrap, summed-estimator diagnostics, plots, plan and report) on those files, at every
  ``--analyze-probes`` and ``--resamples`` count, process CPU time; and one run (the most
  languages and probes) profiled by part (``ANALYZE_PARTS``). Whatever P, the summed part (and
  the number of updates it sums) is what the real probe recorded.

Results go to ``<out>/cost_languages.json`` and ``<out>/cost_languages.md`` (atomically);
``scripts/publish_benchmark_results.sh`` copies the markdown into docs/benchmarks.md. The
statistics files (up to a few hundred MB each) are deleted from ``--work`` once measured, unless
``--keep-statistics``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import statistics as pystats
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

if not __package__:
    sys.exit("run the cost benchmark from the repository root as a module: python -m benchmarks.cost_languages ...")

from benchmarks import speed
from benchmarks.common import (REPO, RESULTS, SPLITS, command_line, configure_logging, link_prepared_files,
                               machine_details, portable_path, print_results_markdown, read_tsv, software_versions,
                               write_results, write_tsv)
from benchmarks.scale import summed_bytes
from benchmarks.statistics_cost import statistics_bytes, timed_analyze

SKETCH_DIM = 4096   # the summed part's size at this sketch, beside the exact size the recipes record
logger = logging.getLogger("benchmarks.cost_languages")


# ---------------------------------------------------------------------------------------------
# synthetic languages
# ---------------------------------------------------------------------------------------------
def pseudo_languages(n_languages: int) -> List[str]:
    """``q00``, ``q01``, ...: zero-padded, so that their sorted order (the task's language ids) is
    their number."""
    return [f"q{i:02d}" for i in range(n_languages)]


def relabel_round_robin(src: Path, out: Path, n_languages: int) -> List[str]:
    """A prepared folder ``out`` whose manifests are ``src``'s with row k of every split labelled
    pseudo-language k mod N (everything else linked to ``src``). Returns the languages."""
    if n_languages < 2:
        raise ValueError(f"need at least 2 languages, got {n_languages}")
    if not (src / "config.yaml").is_file():
        raise FileNotFoundError(f"{src}: no config.yaml (a gdps-prep output folder is expected)")
    languages = pseudo_languages(n_languages)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        manifest = src / f"{split}.tsv"
        if not manifest.is_file():
            raise FileNotFoundError(f"{src}: no {split}.tsv manifest")
        fields, rows = read_tsv(manifest)
        if "src_lang" not in fields:
            raise ValueError(f"{manifest}: no src_lang column to relabel")
        for k, row in enumerate(rows):
            row["src_lang"] = languages[k % n_languages]
        write_tsv(out / f"{split}.tsv", fields, rows)
    link_prepared_files(src, out)
    return languages


def batch_language_counts(batches: Sequence[dict], n_languages: int) -> dict:
    """How many utterances every language has in the fixed batches (``net_input['src_lang_id']``):
    means per batch of utterances, of utterances per language, of languages present and of
    languages with both probe halves (two or more utterances: ``probe_halves`` alternates a
    language's utterances between its halves)."""
    import torch

    per_batch = [torch.bincount(b["net_input"]["src_lang_id"].cpu(), minlength=n_languages) for b in batches]
    return {"utterances_per_batch": pystats.mean(int(c.sum()) for c in per_batch),
            "utterances_per_language_per_batch": pystats.mean(int(c.sum()) / n_languages for c in per_batch),
            "languages_present_per_batch": pystats.mean(int((c > 0).sum()) for c in per_batch),
            "languages_with_both_halves_per_batch": pystats.mean(int((c >= 2).sum()) for c in per_batch)}


# ---------------------------------------------------------------------------------------------
# probe time
# ---------------------------------------------------------------------------------------------
def measure_probe_time(data: Path, language_counts: Sequence[int], setting: speed.Setting, work: Path):
    """Seconds per update, probe off and on every update, for every number of languages; every
    trainer on the same utterances. Returns (results, {N: the probed trainer's statistics})."""
    trainers, batches, flags, batch_ids, composition = {}, {}, {}, {}, {}
    for n in language_counts:
        derived = work / f"languages_{n}" / "data"
        languages = relabel_round_robin(data, derived, n)
        variants = speed.variant_args(setting, languages, work / f"languages_{n}")
        # with the summed statistics: this benchmark also measures their size and the diagnostics' analysis time
        for kind, variant in (("off", "stage1_off"), ("probe", "stage1_probe_every_summed")):
            name = f"{kind}_{n}"
            task, trainers[name] = speed.build_trainer(derived, variants[variant])
            flags[name] = variants[variant]
            if kind == "off":   # the probed trainer takes the same batches (its task is built alike)
                batches[name] = speed.fixed_batches(task, trainers[name], setting)
                composition[n] = batch_language_counts(batches[name], n)
                batch_ids[n] = [b["id"].tolist() for b in batches[name]]
            else:
                batches[name] = batches[f"off_{n}"]
    same_utterances = all(ids == batch_ids[language_counts[0]] for ids in batch_ids.values())
    if not same_utterances:
        # the labels alone differ between the derived folders, so the batches should not
        raise RuntimeError("the fixed batches differ between numbers of languages: the comparison would not be paired")
    cpu, wall, n_updates = speed.interleaved_update_times(trainers, batches, setting.block, setting.rounds)
    rows = []
    for n in language_counts:
        off, probe = f"off_{n}", f"probe_{n}"
        statistics = trainers[probe].task.probe.statistics
        rows.append({"languages": n, "probe_units": len(statistics.same_state.units), **composition[n],
                     "unprobed_cpu_s_per_update": pystats.median(cpu[off]),
                     "probed_cpu_s_per_update": pystats.median(cpu[probe]),
                     "probe_cpu_s_per_update": pystats.median(p - u for p, u in zip(cpu[probe], cpu[off])),
                     **speed.paired_summary(cpu, probe, off),
                     "wall_ratio": speed.paired_summary(wall, probe, off)["ratio"],
                     "cpu_s_per_update_by_round": {"unprobed": cpu[off], "probed": cpu[probe]},
                     "updates": n_updates[probe], "probed_updates": statistics.num_steps,
                     "probes_kept": statistics.same_state.num_probes, "flags": flags[probe]})
        logger.info("%d languages: probed / unprobed update %.3f (CPU)", n, rows[-1]["ratio"])
    largest = max(language_counts)
    # where the probe's time goes at the most languages (its records grow by these probes too:
    # harmless, the size measurement cycles them)
    profile = {"languages": largest, **speed.profile_probe(trainers[f"probe_{largest}"], batches[f"probe_{largest}"],
                                                           min(10, setting.block))}
    recorded = {n: trainers[f"probe_{n}"].task.probe.statistics for n in language_counts}
    first = batches[f"off_{language_counts[0]}"]
    return {"rows": rows, "profile": profile, "same_utterances_for_every_n": same_utterances,
            "batches": {"count": len(first), "max_tokens": setting.max_tokens,
                        "sentences": [int(b["nsentences"]) for b in first]},
            "block_updates": setting.block, "rounds": setting.rounds}, recorded


# ---------------------------------------------------------------------------------------------
# statistics size
# ---------------------------------------------------------------------------------------------
def record_bytes_per_probe(units: int, blocks: int) -> int:
    """Bytes one probe adds to the same-state records: 2U token counts, M Gram matrices of
    (2U)^2, its update and batch key (``SameStateRecords.nbytes``)."""
    rows = 2 * units
    return 8 * (rows + blocks * rows * rows + 2)


def replicated_records(records, probes: int):
    """``records``' probes cycled (or cut) to ``probes`` probes, each a probe of its own batch at
    its own update: records of the size P probes have, with the real probe's Gram matrices."""
    from fairseq_gdps.gdps.same_state import SameStateRecords

    if records.num_probes == 0:
        raise ValueError("no same-state probes to replicate (did the probe run?)")
    _, tokens, grams = records.arrays()
    out = SameStateRecords(records.units, records.unit_languages, records.blocks)
    for p in range(probes):
        source = p % records.num_probes
        out.add(p, tokens[source], grams[source], batch_key=p)
    return out


def save_with_records(stats, records, path: Path) -> None:
    """Save ``stats`` with ``records`` as its same-state records (``stats`` itself unchanged)."""
    import torch

    from fairseq_gdps.atomic import atomic_write

    state = stats.state_dict()
    state["same_state"] = records.state_dict()
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def measure_statistics_size(stats, probe_counts: Sequence[int], work: Path, name: str) -> Tuple[dict, Dict[int, Path]]:
    """The summed part's bytes (measured; and from the layout at ``SKETCH_DIM``), and at every P
    in ``probe_counts`` the records' bytes and the saved file's bytes, both measured. Leaves the
    files in ``work`` for the analysis and returns them too (P -> path)."""
    units, blocks = len(stats.same_state.units), len(stats.module_names)
    summed = statistics_bytes(stats)
    settings = {"subspace_dim": stats.subspace_dim, "num_buckets": stats.num_buckets, "aux_dim": stats.aux_dim}
    layout = summed_bytes(stats.module_sizes, stats.languages, sketch_dim=stats.sketch_dim, **settings)
    if layout != summed:
        raise RuntimeError(f"the buffer layout gives {layout} bytes, the statistics hold {summed}: "
                           "scale.summed_bytes no longer follows GradientStatistics")
    rows, files = [], {}
    for p in sorted(set(probe_counts)):
        records = replicated_records(stats.same_state, p)
        path = work / f"statistics_{name}_{p}_probes.pt"
        save_with_records(stats, records, path)
        files[p] = path
        rows.append({"probes": p, "records_bytes": records.nbytes(), "file_bytes": path.stat().st_size})
    per_probe = record_bytes_per_probe(units, blocks)
    (p0, f0), (p1, f1) = [(r["probes"], r["file_bytes"]) for r in (rows[0], rows[-1])]
    return {"languages": len(stats.languages), "probe_units": units, "blocks": blocks,
            "sketch_dim": stats.sketch_dim, "subspace_dim": stats.subspace_dim,
            "summed_bytes": summed,
            "summed_bytes_sketch": summed_bytes(stats.module_sizes, stats.languages, sketch_dim=SKETCH_DIM, **settings),
            "records_bytes_per_probe": per_probe,
            "records_linear": all(r["records_bytes"] == per_probe * r["probes"] for r in rows),
            "file_bytes_per_probe": (f1 - f0) / (p1 - p0) if p1 > p0 else None,
            "by_probes": rows}, files


# ---------------------------------------------------------------------------------------------
# analysis time
# ---------------------------------------------------------------------------------------------
def measure_analyze_time(files: Dict[int, Dict[int, Path]], probe_counts: Sequence[int],
                         resamples: Sequence[int], work: Path) -> List[dict]:
    """gdps-analyze's CPU time on ``files[N][P]`` for every N, P in ``probe_counts`` and
    bootstrap resample count."""
    rows = []
    for n, by_probes in files.items():
        for p in probe_counts:
            for r in resamples:
                run = timed_analyze(by_probes[p], work / "analyze" / f"languages_{n}_probes_{p}_resamples_{r}", r)
                rows.append({"languages": n, "probes": p, "resamples": r, **run})
                logger.info("gdps-analyze, %d languages, %d probes, %d resamples: %.1f s CPU", n, p, r, run["cpu_s"])
    return rows


# the parts of a gdps-analyze run, by (file, function) of the plugin
ANALYZE_PARTS = {"load": ("fairseq_gdps/gdps/stats.py", "load"),
                 "summed-estimator metrics": ("fairseq_gdps/gdps/metrics.py", "compute_all"),
                 "same-state analysis and bootstrap": ("fairseq_gdps/gdps/conflict.py", "analyse"),
                 "same-state grouping": ("fairseq_gdps/gdps/report.py", "_same_state_decision"),
                 "plots, plan and report": ("fairseq_gdps/gdps/report.py", "write_outputs")}


def profile_analyze(stats_path: Path, out_dir: Path, resamples: int) -> dict:
    """CPU seconds (cProfile, process time) of the parts of one gdps-analyze run (``ANALYZE_PARTS``)
    and of the whole: where the time goes (the profiler slows everything a little)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    timed_analyze(stats_path, out_dir, resamples)
    profiler.disable()
    table = pstats.Stats(profiler).stats
    part_s = {}
    for part, (suffix, function) in {**ANALYZE_PARTS, "total": ("fairseq_gdps/gdps/analysis_command.py", "main")}.items():
        found = [v[3] for (filename, _, func), v in table.items() if filename.endswith(suffix) and func == function]
        if not found:
            raise RuntimeError(f"profile of gdps-analyze: no {function} in {suffix} (renamed? update ANALYZE_PARTS)")
        part_s[part] = sum(found)
    return {"resamples": resamples, "cpu_s": part_s}


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    """Bytes in the unit that keeps a few significant digits (the records span kB to tens of MB)."""
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.2f} MiB" if n < 100 * 2**20 else f"{n / 2**20:,.0f} MiB"


def markdown(results: dict) -> str:
    m, v, st = results["machine"], results["versions"], results["settings"]
    load = m.get("load_average_at_start")
    lines = ["### Cost against the number of languages", "",
             f"Measured {results['date'][:10]} on {m['cpu']} ({m['cores']} cores"
             + (f", 1-minute load average {load[0]:.1f} when it started" if load else "")
             + f"), torch {v['torch']}, fairseq {v['fairseq']}, 1 thread, {results['cpu_seconds'] / 60:.1f} min CPU "
             f"({results['wall_seconds'] / 60:.1f} min wall) in all: `{results['command']}`."]
    probe = results.get("probe_time")
    if probe:
        b = probe["batches"]
        lines += ["", f"Probe time: the {st['model']} model, stage 1 (GDPS task and criterion), probe off and probe on "
                  "every update (a probe unit per language, with `--gdps-summed-statistics`, exact), on "
                  f"{b['count']} fixed batches of the same utterances for every number of languages (max-tokens "
                  f"{b['max_tokens']}, {pystats.mean(b['sentences']):.0f} utterances per batch), the utterances "
                  "relabelled round-robin into N pseudo-languages: the batch stays the same size, each language gets "
                  f"fewer of it. Process CPU time, blocks of {probe['block_updates']} updates, all trainers "
                  f"interleaved over {probe['rounds']} rounds; the ratio is the median over rounds of the paired ratio "
                  "(range in brackets).", "",
                  "| languages | utterances per language per batch | languages with both halves per batch | "
                  "CPU ms / unprobed update | CPU ms / probed update | probed / unprobed | probe CPU ms per update |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in probe["rows"]:
            lines.append(f"| {r['languages']} | {r['utterances_per_language_per_batch']:.1f} | "
                         f"{r['languages_with_both_halves_per_batch']:.1f} of {r['languages']} | "
                         f"{1000 * r['unprobed_cpu_s_per_update']:.0f} | {1000 * r['probed_cpu_s_per_update']:.0f} | "
                         f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                         f"{1000 * r['probe_cpu_s_per_update']:.0f} |")
        prof = probe.get("profile")
        if prof:
            lines += ["", f"Where a probed update's time goes at {prof['languages']} languages (cProfile, CPU time, "
                      f"{prof['updates']} probed updates of {prof['cpu_ms_per_update_total']:.0f} ms; nested calls "
                      "count in their callers too):", ""]
            lines += [f"- `{row['function']}`: {row['cpu_ms_per_update']:.1f} ms per update"
                      for row in prof["plugin_functions"][:5]]
    size = results["statistics_size"]
    counts = st["size_probes"]
    first = size[0]
    lines += ["", f"Statistics size ({first['blocks']} blocks, subspace dimension {first['subspace_dim']}): the summed "
              "part as the probe recorded it (exact) and, from its layout, with "
              f"`--gdps-sketch-dim {SKETCH_DIM}` (fixed sizes: they do not grow with probes); the same-state records "
              "(every probe's Gram matrices of the halves, kept so that the bootstrap over probes is exact) and the "
              "saved file, measured after P probes (the real probe's records cycled to P):", "",
              "| languages | summed, exact | summed, sketched | records bytes per probe | file bytes per probe | "
              + " | ".join(f"records, {p} probes" for p in counts) + " | "
              + " | ".join(f"file, {p} probes" for p in counts) + " |",
              "|---:|" + "---:|" * (4 + 2 * len(counts))]
    for s in size:
        by = {r["probes"]: r for r in s["by_probes"]}
        lines.append(f"| {s['languages']} | {_size(s['summed_bytes'])} | {_size(s['summed_bytes_sketch'])} | "
                     f"{s['records_bytes_per_probe']:,} | {s['file_bytes_per_probe']:,.0f} | "
                     + " | ".join(_size(by[p]["records_bytes"]) for p in counts) + " | "
                     + " | ".join(_size(by[p]["file_bytes"]) for p in counts) + " |")
    runs = results["analyze_time"]
    probes = sorted({r["probes"] for r in runs})
    resamples = list(dict.fromkeys(r["resamples"] for r in runs))
    cell = {(r["languages"], r["probes"], r["resamples"]): r["cpu_s"] for r in runs}
    estimators = sorted({r["estimator"] or "?" for r in runs})
    lines += ["", "`gdps-analyze` CPU seconds (load, same-state analysis and bootstrap, summed-estimator "
              f"diagnostics, plots, plan and report; estimator: {', '.join(estimators)}) on those files, by "
              "probes and bootstrap resamples:", "",
              "| languages | " + " | ".join(f"{p} probes, {r} resamples" for p in probes for r in resamples) + " |",
              "|---:|" + "---:|" * (len(probes) * len(resamples))]
    for n in dict.fromkeys(r["languages"] for r in runs):
        lines.append(f"| {n} | " + " | ".join(f"{cell[n, p, r]:.1f}" for p in probes for r in resamples) + " |")
    prof = results.get("analyze_profile")
    if prof:
        part_s = prof["cpu_s"]
        lines += ["", f"Where one run's time goes ({prof['languages']} languages, {prof['probes']} probes, "
                  f"{prof['resamples']} resamples; cProfile, {part_s['total']:.1f} s CPU in all): "
                  + ", ".join(f"{part} {part_s[part]:.1f} s" for part in ANALYZE_PARTS) + "."]
    return "\n".join(lines) + "\n"


def cpu_seconds() -> float:
    """CPU seconds of this process and of the finished child processes (building the corpus)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run(args, command: str) -> dict:
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    setting = dataclasses.replace(speed.SETTINGS[args.model], max_tokens=args.max_tokens, batches=args.batches,
                                  block=args.block, rounds=args.rounds, corpus_utterances=args.corpus_utterances)
    results = {"benchmark": "cost_languages", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command, "machine": machine_details(), "versions": software_versions(),
               "settings": {"model": args.model, "languages": args.languages, "size_probes": args.size_probes,
                            "analyze_probes": args.analyze_probes, "resamples": args.resamples,
                            "max_tokens": args.max_tokens, "batches": args.batches, "block": args.block,
                            "rounds": args.rounds, "corpus_utterances": args.corpus_utterances,
                            "size_args": setting.size_args}}
    data = args.data.resolve() if args.data else speed.prepare_data(setting, work, 1)
    results["data"] = {"path": portable_path(data), "train_utterances": sum(1 for _ in open(data / "train.tsv")) - 1}
    logger.info("probe time on %s, %s languages", data, args.languages)
    results["probe_time"], recorded = measure_probe_time(data, args.languages, setting, work)
    logger.info("statistics size")
    sizes, files = [], {}
    for n, stats in recorded.items():
        size, files[n] = measure_statistics_size(stats, [*args.size_probes, *args.analyze_probes], work, f"languages_{n}")
        sizes.append(size)
    results["statistics_size"] = sizes
    del recorded
    logger.info("gdps-analyze time")
    results["analyze_time"] = measure_analyze_time(files, args.analyze_probes, args.resamples, work)
    largest, most = max(files), max(args.analyze_probes)
    results["analyze_profile"] = {"languages": largest, "probes": most, **profile_analyze(
        files[largest][most], work / "analyze" / "profiled", max(args.resamples))}
    if not args.keep_statistics:
        for by_probes in files.values():
            for path in by_probes.values():
                path.unlink()
    results["cpu_seconds"] = cpu_seconds()
    results["wall_seconds"] = time.perf_counter() - started
    paths = write_results(results, args.out.resolve(), "cost_languages", markdown)
    logger.info("results: %s, %s", paths["json"], paths["md"])
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--languages", type=int, nargs="+", default=[4, 8, 16], help="numbers of pseudo-languages")
    p.add_argument("--size-probes", type=int, nargs="+", default=[10, 100, 1000],
                   help="probe counts at which the statistics' size is measured")
    p.add_argument("--analyze-probes", type=int, nargs="+", default=[100, 1000],
                   help="probe counts at which gdps-analyze is timed")
    p.add_argument("--resamples", type=int, nargs="+", default=[200, 0],
                   help="gdps-analyze bootstrap resample counts (200: its default)")
    p.add_argument("--model", choices=sorted(speed.SETTINGS), default="default",
                   help="model size: default (the recipes') or tiny (seconds)")
    p.add_argument("--max-tokens", type=int, default=8000, help="batch size in frames, the same for every N")
    p.add_argument("--batches", type=int, default=10, help="fixed batches, cycled through")
    p.add_argument("--block", type=int, default=10, help="updates per timed block")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one untimed warm-up round)")
    p.add_argument("--corpus-utterances", type=int, default=200,
                   help="utterances per language of the corpus built when --data is not given")
    p.add_argument("--data", type=Path, default=None,
                   help="prepared data folder (gdps-prep); default: build a quick-profile corpus in --work")
    p.add_argument("--work", type=Path, default=REPO / "work" / "benchmarks" / "cost_languages",
                   help="scratch folder")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of cost_languages.json and .md")
    p.add_argument("--keep-statistics", action="store_true", help="keep the statistics files in --work")
    p.add_argument("--markdown", nargs="?", const=str(RESULTS / "cost_languages.json"), default=None,
                   metavar="JSON", help="print the markdown of an existing results file and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print_results_markdown(p, args.markdown, markdown)
        return 0
    if min(args.languages) < 2 or len(set(args.languages)) != len(args.languages):
        p.error("--languages: distinct numbers, each >= 2")
    if min(args.size_probes + args.analyze_probes) < 2:
        p.error("--size-probes and --analyze-probes must be >= 2 (the analysis needs two probes)")
    if min(args.resamples) < 0:
        p.error("--resamples must be >= 0")
    if min(args.block, args.rounds, args.batches, args.max_tokens) < 1:
        p.error("--block, --rounds, --batches and --max-tokens must be >= 1")
    if args.data is not None and not (args.data / "config.yaml").is_file():
        p.error(f"--data {args.data}: no config.yaml (a gdps-prep output folder is expected)")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    configure_logging()
    run(args, command_line("cost_languages", argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
