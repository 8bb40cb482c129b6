"""What the GDPS gradient statistics cost, apart from training: the memory of the sums
``GradientStatistics`` keeps (as model width and number of languages grow, exact and
count-sketched, and as recorded updates accumulate: they must not grow), and the time
``gdps-analyze`` takes on synthetic statistics of growing size.

No fairseq model or data is needed: statistics are built from random gradients. Used by
``benchmarks/speed.py`` (its ``statistics_memory`` and ``analyze_time`` results and the last two
tables of its markdown); ``setting`` is any object with the fields of ``speed.Setting`` these
functions read (``encoder_layers``, ``decoder_layers``, ``memory_*``, ``sketch_dim``, ``analyze_*``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import statistics as pystats
import time
from pathlib import Path
from typing import Dict, List

logger = logging.getLogger("benchmarks.speed")


def ffn_blocks(encoder_layers: int, decoder_layers: int) -> List[str]:
    """The FFN block names of an s2t_transformer of this depth (as the probe names them)."""
    return ([f"encoder.transformer_layers.{i}.ffn" for i in range(encoder_layers)]
            + [f"decoder.layers.{i}.ffn" for i in range(decoder_layers)])


def block_sizes(width: int, ffn: int, setting) -> Dict[str, int]:
    """Gradient elements of every FFN block (fc1 and fc2 with biases) of a model of this width."""
    return {name: 2 * width * ffn + ffn + width for name in ffn_blocks(setting.encoder_layers, setting.decoder_layers)}


def statistics_bytes(stats) -> int:
    return sum(t.numel() * t.element_size() for t in stats.to_tensors().values())


def random_probe(stats, step: int, generator) -> None:
    """One probed update as the criterion records it: random (2U, d) half-gradient rows."""
    import torch

    R = 2 * len(stats.same_state.units)
    tokens = torch.full((R,), 50.0, dtype=torch.float64)
    stats.add_probe(step, tokens, {m: torch.randn(R, d, generator=generator, dtype=torch.float64)
                                   for m, d in stats.module_sizes.items()})


def measure_statistics_memory(setting, work: Path) -> dict:
    """Bytes of the sums GradientStatistics holds, as width and languages grow (exact and
    sketched), and as probed updates accumulate: the summed statistics (fixed size) and the
    same-state records (a fixed number of bytes per probe: every probe's Gram matrices are kept,
    so that the bootstrap over probes is exact)."""
    import torch

    from fairseq_gdps.gdps.stats import GradientStatistics

    demo_width, demo_ffn = setting.memory_widths[0]
    rows = []
    for sketch in (None, setting.sketch_dim):
        for width, ffn in setting.memory_widths:
            for n_lang in setting.memory_languages:
                sizes = block_sizes(width, ffn, setting)
                stats = GradientStatistics(sizes, languages=[f"l{i}" for i in range(n_lang)], sketch_dim=sketch)
                rows.append({"width": width, "ffn": ffn, "blocks": len(sizes), "languages": n_lang,
                             "sketch_dim": sketch, "gradient_elements": sum(sizes.values()),
                             "bytes": statistics_bytes(stats)})
                del stats
    by_steps = []
    generator = torch.Generator().manual_seed(0)
    n_lang = 4 if 4 in setting.memory_languages else setting.memory_languages[-1]
    languages = [f"l{i}" for i in range(n_lang)]
    for sketch in (None, setting.sketch_dim):
        stats = GradientStatistics(block_sizes(demo_width, demo_ffn, setting), languages=languages,
                                   sketch_dim=sketch, probe_units=languages)
        recorded, add_probe_s = 0, []
        for target in setting.memory_steps:
            while recorded < target:
                start = time.process_time()
                random_probe(stats, recorded, generator)
                add_probe_s.append(time.process_time() - start)
                recorded += 1
            path = work / f"stats_steps_{sketch}.pt"
            stats.save(path)
            by_steps.append({"width": demo_width, "ffn": demo_ffn, "languages": n_lang, "sketch_dim": sketch,
                             "probe_units": len(languages), "blocks": len(stats.module_names),
                             "recorded_updates": stats.num_steps, "probes_kept": stats.same_state.num_probes,
                             "bytes": statistics_bytes(stats), "same_state_bytes": stats.same_state.nbytes(),
                             "file_bytes": path.stat().st_size})
        if add_probe_s:
            by_steps[-1]["median_add_probe_cpu_ms"] = 1000 * pystats.median(add_probe_s)
    grown = [r for r in by_steps if r["probes_kept"]]
    per_probe = sorted({r["same_state_bytes"] / r["probes_kept"] for r in grown})
    return {"by_size": rows, "by_recorded_updates": by_steps,
            "same_state_bytes_per_probe": per_probe[0] if len(per_probe) == 1 else per_probe,
            "note": "bytes: every float64 sum GradientStatistics keeps (what is saved and reduced), of a size fixed "
                    "by the blocks, languages and settings; same_state_bytes: the same-state records, every "
                    "probe's (2U)^2 Gram matrix per block and 2U token counts, kept whole so that the bootstrap "
                    "over probes is exact (8 * (2U + M (2U)^2 + 2) bytes per probe). The count-sketch hashes "
                    "(16 bytes per gradient element of a sketched block, rebuilt from the seed, never saved) come "
                    "on top when sketching"}


def timed_analyze(stats_path: Path, out_dir: Path, resamples: int) -> dict:
    """gdps-analyze (the CLI, in this process: load, analysis, bootstrap, plots, plan, report) on
    one statistics file: its process CPU and wall seconds, the blocks it splits and the estimator
    that decided (same-state, or summed for statistics without probe records)."""
    from fairseq_gdps.cli import analyze as analyze_cli

    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = analyze_cli.main([str(stats_path), "--out", str(out_dir), "--resamples", str(resamples)])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if rc != 0:
        raise RuntimeError(f"gdps-analyze failed ({rc}) on {stats_path}")
    said = dict(line.split(": ", 1) for line in printed.getvalue().splitlines() if ": " in line)
    return {"cpu_s": cpu, "wall_s": wall, "split": said.get("split"), "estimator": said.get("estimator")}


def measure_analyze_time(setting, work: Path) -> dict:
    """gdps-analyze (the CLI, in this process: load, analysis, bootstrap, plots, plan, report) on
    synthetic statistics (random same-state probes through add_probe) as languages and width grow."""
    from fairseq_gdps.gdps.stats import synthetic_statistics

    demo_width, demo_ffn = setting.analyze_widths[0]
    n_lang_fixed = 4 if 4 in setting.analyze_languages else setting.analyze_languages[-1]
    configs = [(demo_width, demo_ffn, n, None) for n in setting.analyze_languages]
    configs += [(w, f, n_lang_fixed, None) for w, f in setting.analyze_widths[1:]]
    configs += [(w, f, n, setting.sketch_dim) for w, f, n in
                [(setting.analyze_widths[-1][0], setting.analyze_widths[-1][1], n_lang_fixed),
                 (demo_width, demo_ffn, setting.analyze_languages[-1])]]
    rows = []
    for width, ffn, n_lang, sketch in dict.fromkeys(configs):
        sizes = block_sizes(width, ffn, setting)
        languages = [f"l{i}" for i in range(n_lang)]
        # two planted clusters in the last block, so that the analysis has a split to find
        last = list(sizes)[-1]
        clusters = {last: [i % 2 for i in range(n_lang)]}
        stats = synthetic_statistics(sizes, languages, clusters=clusters, steps=setting.analyze_steps,
                                     signal=0.5, noise=1.0, shared=0.2, seed=1, sketch_dim=sketch)
        name = f"w{width}_l{n_lang}_s{sketch}"
        path = work / "analyze" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        del stats
        run = timed_analyze(path, work / "analyze" / name, setting.analyze_resamples)
        rows.append({"width": width, "ffn": ffn, "blocks": len(sizes), "languages": n_lang, "sketch_dim": sketch,
                     "recorded_updates": setting.analyze_steps, "resamples": setting.analyze_resamples, **run})
        logger.info("gdps-analyze %s: %.1f s CPU", name, rows[-1]["cpu_s"])
    return {"runs": rows}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}" if n < 100 * 2**20 else f"{n / 2**20:.0f}"


def statistics_markdown(results: dict) -> List[str]:
    """The markdown lines of the statistics memory and gdps-analyze time tables (from a blank line)."""
    mem = results["statistics_memory"]
    widths = sorted({(r["width"], r["ffn"]) for r in mem["by_size"]})
    langs = sorted({r["languages"] for r in mem["by_size"]})
    lines = ["", "Gradient statistics (`GradientStatistics`), MiB, for the FFN blocks of a model of the recipes' depth "
              f"({mem['by_size'][0]['blocks']} blocks) by width / FFN width and number of languages; exact / "
              f"`--gdps-sketch-dim {results['settings']['sketch_dim']}`:", "",
              "| width / FFN | " + " | ".join(f"{n} languages" for n in langs) + " |",
              "|---|" + "---:|" * len(langs)]
    cell = {(r["width"], r["ffn"], r["languages"], r["sketch_dim"]): r["bytes"] for r in mem["by_size"]}
    for w, f in widths:
        lines.append(f"| {w} / {f} | " + " | ".join(
            f"{_mib(cell[w, f, n, None])} / {_mib(cell[w, f, n, results['settings']['sketch_dim']])}" for n in langs) + " |")
    steps = mem["by_recorded_updates"]
    first = steps[0]
    lines += ["", f"Against the number of probed updates ({first['languages']} languages as probe units, "
              f"{first['blocks']} blocks, width {first['width']}): the summed statistics do not grow; the same-state "
              f"records grow by a fixed {mem['same_state_bytes_per_probe']:,.0f} bytes per probe (every probe's "
              "Gram matrices of the halves are kept, so that the bootstrap over probes is exact):", "",
              "| sketch | " + " | ".join(f"{r['recorded_updates']} probes" for r in steps
                                        if r["sketch_dim"] is None) + " |",
              "|---|" + "---:|" * sum(r["sketch_dim"] is None for r in steps)]
    for sketch in (None, results["settings"]["sketch_dim"]):
        rows = [r for r in steps if r["sketch_dim"] == sketch]
        lines.append(f"| {sketch or 'exact'}: summed | " + " | ".join(f"{r['bytes']:,} B" for r in rows) + " |")
        lines.append(f"| {sketch or 'exact'}: same-state records | " + " | ".join(
            f"{r['same_state_bytes']:,} B" for r in rows) + " |")
        lines.append(f"| {sketch or 'exact'}: file | " + " | ".join(f"{r['file_bytes']:,} B" for r in rows) + " |")
    lines += ["", f"`gdps-analyze` (load, analysis, {results['settings']['analyze_resamples']} bootstrap resamples, "
              f"plots, plan and report) on synthetic statistics of {results['settings']['analyze_steps']} updates:", "",
              "| width / FFN | languages | sketch | CPU s | wall s |", "|---|---:|---|---:|---:|"]
    for r in results["analyze_time"]["runs"]:
        lines.append(f"| {r['width']} / {r['ffn']} | {r['languages']} | {r['sketch_dim'] or 'exact'} | "
                     f"{r['cpu_s']:.1f} | {r['wall_s']:.1f} |")
    return lines
