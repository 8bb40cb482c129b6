"""Cost of the GDPS probe at the scale of SeamlessM4T-Medium's speech encoder.

    python -m benchmarks.scale [--measured-blocks 1 3] [--utterances 8] [--frames 100] [--probes 3]
                               [--out DIR]
    python -m benchmarks.scale --markdown [benchmarks/results/scale.json]

(from the repository root).

The shape: 24 Conformer layers of width 1024 with FFN width 4096 and two FFNs per layer (macaron
``ffn1`` and ``ffn2``): 48 FFN blocks of 2*1024*4096 + 4096 + 1024 = 8,393,728 parameters
(403M in all), 4 languages (probe units; 8 half rows), and for information 2 speakers per
language (``--gdps-probe-speakers``: 8 units, 16 rows).

* statistics size: the summed statistics (``GradientStatistics``'s float64 sums; their size is
  fixed by blocks, languages and settings) from the statistics' own buffer layout, for the 48
  blocks, exact and with ``--gdps-sketch-dim`` 4096 / 2048 / 1024 and ``--gdps-subspace-dim``
  64 / 32; the same-state records (every probe's Gram matrices, kept so that the bootstrap over
  probes is exact) measured per probe by recording probes of all 48 blocks (random rows);
* probe time and transient memory: fairseq's ``FeedForwardModule`` (the Conformer FFN) at full
  size, ``--measured-blocks`` of them, fed random activations of a small batch (``--utterances``
  x ``--frames`` after subsampling, one utterance per half row), forward and backward through
  ``PerLanguageGradients`` and recorded (sketch 4096) the two ways the criterion can: from the
  ``PerLanguageUpdate`` buffer (several micro-batches or workers) and block by block from the
  capture (one micro-batch on one worker, ``record_blockwise``), the latter also as the probe
  records by default (the same-state records alone, no summed statistics). Each way runs in a
  fresh process;
  its peak resident memory above the state before the probed update (``/proc/self/clear_refs``,
  ``VmHWM``) is the transient. A block's cost does not depend on the other blocks, so the
  48-block figures come from the straight line through the two measured block counts (stated as
  such).

Results go to ``<out>/scale.json`` and ``<out>/scale.md`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics as pystats
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if not __package__:
    sys.exit("run the scale benchmark from the repository root as a module: python -m benchmarks.scale ...")

from benchmarks.common import (REPO, RESULTS, command_line, machine_details, print_results_markdown, software_versions,
                               write_results)

LAYERS, WIDTH, FFN, LANGUAGES, SPEAKERS = 24, 1024, 4096, 4, 2
BLOCK = 2 * WIDTH * FFN + FFN + WIDTH
GOAL_BYTES = 100 * 10**6


def block_names(n_layers: int = LAYERS):
    return [f"encoder.conformer_layers.{i}.{f}" for i in range(n_layers) for f in ("ffn1", "ffn2")]


def _rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# statistics size
# ---------------------------------------------------------------------------------------------
# ways of recording a probe (worker modes), in the order measured and shown
WAYS = {"blockwise_default": "block by block from the capture, the default probe (same-state records alone; "
                             "one micro-batch, one worker)",
        "blockwise": "block by block from the capture (`record_blockwise`), with `--gdps-summed-statistics`",
        "buffer": "`PerLanguageUpdate` buffer (2U rows x every tracked parameter, float64; several micro-batches "
                  "or workers), with `--gdps-summed-statistics`"}


def summed_bytes(sizes, languages, **settings) -> int:
    """Bytes of every float64 sum GradientStatistics would allocate (from its buffer layout,
    without allocating: exact sums of 48 blocks x 4 languages are 13 GB)."""
    from fairseq_gdps.gdps.stats import GradientStatistics

    class Layout(GradientStatistics):
        def _alloc(self):
            self._buffers = {}

    stats = Layout(sizes, **settings)
    L = len(languages)
    return 8 * sum(math.prod(stats._full_shape(rest, axes, L)) for _, rest, axes in stats._specs())


def measure_statistics(probes: int) -> dict:
    import torch

    from fairseq_gdps.gdps.stats import GradientStatistics

    names = block_names()
    sizes = {n: BLOCK for n in names}
    languages = [f"l{i}" for i in range(LANGUAGES)]
    rows = []
    for sketch in (None, 4096, 2048, 1024):
        for subspace in (64, 32):
            rows.append({"sketch_dim": sketch, "subspace_dim": subspace,
                         "summed_bytes": summed_bytes(sizes, languages, sketch_dim=sketch, subspace_dim=subspace)})
    # the same-state records, measured: probes of all 48 blocks recorded block by block (random
    # rows; only the Gram matrices' size matters here). Summed statistics with a small sketch
    # keep this cheap; the records do not depend on the sketch.
    units = {"languages": (languages, languages),
             "speakers": ([f"{l}@s{k}" for l in languages for k in range(SPEAKERS)],
                          [l for l in languages for _ in range(SPEAKERS)])}
    records = {}
    gen = torch.Generator().manual_seed(0)
    for kind, (unit_names, unit_langs) in units.items():
        stats = GradientStatistics(sizes, languages=languages, sketch_dim=64, subspace_dim=0,
                                   probe_units=unit_names, probe_unit_languages=unit_langs)
        R = 2 * len(unit_names)
        row = torch.randn(R, BLOCK, generator=gen, dtype=torch.float64)
        seconds = []
        for p in range(probes):
            start = time.process_time()
            probe = stats.begin_probe(p, torch.full((R,), 50.0, dtype=torch.float64))
            for n in names:
                probe.add_block(n, row)
                stats._proj_cache.pop(n, None)   # the sketch's hashes (16 B per element), not kept here
            probe.finish()
            seconds.append(time.process_time() - start)
        del row
        per_probe = stats.same_state.nbytes() / stats.same_state.num_probes
        records[kind] = {"units": len(unit_names), "rows": R, "probes_recorded": stats.same_state.num_probes,
                         "bytes_per_probe": per_probe,
                         "bytes_after": {str(n): int(per_probe * n) for n in (0, 10, 100, 1000)}}
        del stats
    return {"blocks": len(names), "block_parameters": BLOCK, "parameters": BLOCK * len(names),
            "languages": LANGUAGES, "summed": rows, "same_state": records,
            "countsketch_hash_bytes": 16 * BLOCK * len(names),
            "note": "summed: fixed size (does not grow with updates); same_state: grows by bytes_per_probe "
                    "per probe (every probe kept, so that the bootstrap over probes is exact); "
                    "countsketch_hash_bytes: the sketches' hashes held in memory while recording "
                    "(rebuilt from the seed, never saved)"}


# ---------------------------------------------------------------------------------------------
# probe time and memory (one fresh process per way of recording)
# ---------------------------------------------------------------------------------------------
def worker(mode: str, blocks: int, utterances: int, frames: int, probes: int) -> dict:
    import torch
    from fairseq.modules.conformer_layer import FeedForwardModule

    from fairseq_gdps.gdps.per_language_update import PerLanguageUpdate, record_blockwise
    from fairseq_gdps.gdps.stats import GradientStatistics
    from fairseq_gdps.gdps.gradient_capture import PerLanguageGradients

    torch.manual_seed(0)
    names = block_names()[:blocks]
    modules = {n: FeedForwardModule(WIDTH, FFN, 0.0, 0.0, activation_fn="swish", bias=True) for n in names}
    for m in modules.values():
        # fairseq builds the activation as torch.nn.SiLU(hidden_units), i.e. inplace=True: the SiLU
        # then overwrites w_1's output and the probe's gradient hook on that output never fires
        # (PerLanguageGradients: "layer 0 got no gradient"). Out of place here: the same numbers.
        m.activation = torch.nn.SiLU()
    tracked = {n: (m.w_1, m.w_2) for n, m in modules.items()}
    sizes = {n: sum(p.numel() for layer in layers for p in layer.parameters()) for n, layers in tracked.items()}
    assert all(s == BLOCK for s in sizes.values()), sizes
    languages = [f"l{i}" for i in range(LANGUAGES)]
    R = 2 * LANGUAGES
    rows = torch.arange(utterances) % R                  # one utterance per half row (utterances >= R)
    x = torch.randn(frames, utterances, WIDTH)
    target = torch.randn(frames, utterances, WIDTH)
    tokens = torch.zeros(R, dtype=torch.float64).index_add_(0, rows, torch.full((utterances,), 20.0, dtype=torch.float64))
    # the default probe keeps the same-state records alone; --gdps-summed-statistics adds the sums (sketched)
    stats = GradientStatistics(sizes, languages=languages, sketch_dim=4096, probe_units=languages, seed=1,
                               summed=mode != "blockwise_default")
    update = PerLanguageUpdate(sizes, R) if mode == "buffer" else None

    def step(probed: bool, step_num: int):
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        if not probed:
            loss = sum((m(x) * target).sum() for m in modules.values())
            loss.backward()
            return None
        # as the task builds it: the default probe's capture keeps each layer's Gram matrix only
        with PerLanguageGradients(tracked, rows, keep_shares=mode != "blockwise_default") as capture:
            loss = sum((m(x) * target).sum() for m in modules.values())
            loss.backward()
        capture.complete()
        start = time.process_time()
        if mode == "buffer":
            update.reset()
            update.add(capture.gradients(list(sizes)), tokens)
            del capture
            t, halves = update.per_token_halves()
            stats.add_probe(step_num, t, halves)
        else:
            record_blockwise(stats, step_num, capture, tokens, sizes)
        return time.process_time() - start

    step(False, 0)
    step(True, 0)              # first probe: the sketches' hashes are built here
    cpu = {"unprobed": [], "probed": [], "record": []}
    for i in range(probes):    # paired, interleaved
        for kind in (("unprobed", "probed") if i % 2 == 0 else ("probed", "unprobed")):
            start = time.process_time()
            record = step(kind == "probed", i + 1)
            cpu[kind].append(time.process_time() - start)
            if record is not None:
                cpu["record"].append(record)
    # transient memory of one probed update above the state before it
    before = _rss()["VmRSS"]
    can_reset = _reset_peak()
    step(True, probes + 1)
    peak = _rss()["VmHWM"]
    before_unprobed = _rss()["VmRSS"]
    _reset_peak()
    step(False, probes + 2)
    peak_unprobed = _rss()["VmHWM"]
    return {"mode": mode, "blocks": blocks, "utterances": utterances, "frames": frames, "probes": probes,
            "cpu_s_unprobed": cpu["unprobed"], "cpu_s_probed": cpu["probed"], "cpu_s_record": cpu["record"],
            "ratio_by_pair": [p / u for p, u in zip(cpu["probed"], cpu["unprobed"])],
            "peak_reset_supported": can_reset,
            "transient_bytes_probed": peak - before, "transient_bytes_unprobed": peak_unprobed - before_unprobed,
            "resident_bytes_before": before,
            # kept between probed updates (allocated before the measured one): the buffer (the blockwise
            # path keeps none of its own; both keep the statistics' language-row buffers)
            "persistent_bytes": update.buffer.numel() * 8 if update is not None else 0,
            "same_state_probes": stats.same_state.num_probes}


def run_worker(mode: str, args, blocks: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "benchmarks.scale", "--worker", mode, "--measured-blocks", str(blocks),
           "--utterances", str(args.utterances), "--frames", str(args.frames), "--probes", str(args.probes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(stats: dict, ways: dict) -> dict:
    """Per way of recording: measured figures at each block count, and the 48-block figures from
    the straight line through the two block counts (cost = fixed + per block x blocks: a block's
    cost does not depend on the other blocks; the fixed part is e.g. one block's rows)."""
    out = {}
    for name, runs in ways.items():
        rows = []
        for w in runs:
            med = pystats.median
            rows.append({"blocks": w["blocks"], "ratio_median": med(w["ratio_by_pair"]),
                         "ratio_min": min(w["ratio_by_pair"]), "ratio_max": max(w["ratio_by_pair"]),
                         "unprobed_cpu_s": med(w["cpu_s_unprobed"]),
                         "probe_cpu_s": med(w["cpu_s_probed"]) - med(w["cpu_s_unprobed"]),
                         "record_cpu_s": med(w["cpu_s_record"]),
                         "memory_bytes": w["persistent_bytes"] + w["transient_bytes_probed"] - w["transient_bytes_unprobed"],
                         "persistent_bytes": w["persistent_bytes"],
                         "transient_bytes": w["transient_bytes_probed"] - w["transient_bytes_unprobed"]})
        (k1, r1), (k2, r2) = [(r["blocks"], r) for r in rows[:1]] + [(r["blocks"], r) for r in rows[-1:]]

        def at(key, blocks=stats["blocks"]):
            slope = (r2[key] - r1[key]) / (k2 - k1)
            return r1[key] + slope * (blocks - k1)

        out[name] = {"measured": rows, "blocks": stats["blocks"],
                     **{f"{key}_48_blocks": at(key) for key in ("probe_cpu_s", "record_cpu_s", "unprobed_cpu_s",
                                                                "memory_bytes", "persistent_bytes", "transient_bytes")}}
    return out


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def _mb(n) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.1f} GB"


def markdown(results: dict) -> str:
    m, st, ways, summ = results["machine"], results["statistics"], results["ways"], results["summary"]
    lines = ["### Probe cost at SeamlessM4T-Medium's encoder shape", "",
             f"Measured {results['date'][:10]} on {m['cpu']} ({m['cores']} cores, 1-minute load average "
             f"{m['load_average_at_start'][0]:.1f} when it started), torch {results['versions']['torch']}, 1 thread, "
             f"{results['wall_seconds'] / 60:.1f} min: `{results['command']}`. Shape: {LAYERS} Conformer layers, width "
             f"{WIDTH}, FFN {FFN}, two FFNs per layer = {st['blocks']} blocks of {st['block_parameters']:,} parameters "
             f"({st['parameters'] / 1e6:.0f}M), {st['languages']} languages.", "",
             "Summed statistics (fixed size, they do not grow with updates), plus the same-state records after "
             "100 and 1,000 probes (language units; the records grow by a fixed number of bytes per probe, "
             "every probe kept so that the bootstrap over probes is exact):", "",
             "| `--gdps-sketch-dim` | `--gdps-subspace-dim` | summed | + 100 probes | + 1,000 probes "
             "| <= 100 MB after 1,000 probes |",
             "|---|---:|---:|---:|---:|:-:|"]
    ss = st["same_state"]["languages"]
    lines.append(f"| default: no summed statistics | - | 0 | {_mb(ss['bytes_after']['100'])} | "
                 f"{_mb(ss['bytes_after']['1000'])} | {'yes' if ss['bytes_after']['1000'] <= GOAL_BYTES else 'no'} |")
    for r in st["summed"]:
        total = r["summed_bytes"] + ss["bytes_after"]["1000"]
        lines.append(f"| {r['sketch_dim'] or 'exact'} | {r['subspace_dim']} | {_mb(r['summed_bytes'])} | "
                     f"{_mb(r['summed_bytes'] + ss['bytes_after']['100'])} | {_mb(total)} | "
                     f"{'yes' if total <= GOAL_BYTES else 'no'} |")
    lines += ["", "Same-state records per probe (measured on probes of all blocks):", "",
              "| probe units | rows | bytes per probe | after 10 | after 100 | after 1,000 |", "|---|---:|---:|---:|---:|---:|"]
    for kind, r in st["same_state"].items():
        label = "languages" if kind == "languages" else f"(language, speaker), {SPEAKERS} per language"
        lines.append(f"| {label} ({r['units']}) | {r['rows']} | {r['bytes_per_probe']:,.0f} | "
                     + " | ".join(_mb(r["bytes_after"][k]) for k in ("10", "100", "1000")) + " |")
    lines += ["", f"While recording with a sketch, the CountSketch hashes (16 bytes per gradient element, rebuilt from "
              f"the seed, never saved) take {_mb(st['countsketch_hash_bytes'])} of memory.", ""]
    w = ways["blockwise"][0]
    counts = " and ".join(str(r["blocks"]) for r in ways["blockwise"])
    lines += [f"Probe time and memory: {counts} full-size Conformer FFN blocks (fairseq's `FeedForwardModule`) in "
              f"fresh processes, a batch of {w['utterances']} utterances x {w['frames']} frames (one utterance per "
              f"half), `--gdps-sketch-dim 4096`, {w['probes']} probed and unprobed updates interleaved, CPU time, one "
              "thread. 48 blocks: the line through the two block counts (a block's cost does not depend on the other "
              "blocks; the fixed part is e.g. one block's rows). Probe memory: what the probe holds between probed "
              "updates (the buffer it reuses) plus the peak resident memory of a probed update above the state before "
              "it, less the same for an unprobed update.", "",
              "| recording | blocks | probed / unprobed update | probe CPU s per update | of which recording | "
              "probe memory (kept + transient) |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in WAYS.items():
        if name not in summ:        # results of an earlier version, without that way
            continue
        s_ = summ[name]
        for r in s_["measured"]:
            lines.append(f"| {label} | {r['blocks']} | {r['ratio_median']:.2f} ({r['ratio_min']:.2f}-"
                         f"{r['ratio_max']:.2f}) | {r['probe_cpu_s']:.2f} | {r['record_cpu_s']:.2f} | "
                         f"{_mb(r['persistent_bytes'])} + {_mb(r['transient_bytes'])} |")
        unprobed = s_["unprobed_cpu_s_48_blocks"]
        lines.append(f"| {label} | **48** (line) | {(unprobed + s_['probe_cpu_s_48_blocks']) / unprobed:.1f} | "
                     f"{s_['probe_cpu_s_48_blocks']:.1f} | {s_['record_cpu_s_48_blocks']:.1f} | "
                     f"{_mb(s_['persistent_bytes_48_blocks'])} + {_mb(s_['transient_bytes_48_blocks'])} |")
    lines += ["", results["conclusion"]]
    return "\n".join(lines) + "\n"


def conclusion(results: dict) -> str:
    st, summ = results["statistics"], results["summary"]
    ss = st["same_state"]["languages"]
    fits = [r for r in st["summed"] if r["summed_bytes"] + ss["bytes_after"]["1000"] <= GOAL_BYTES]
    best = min(fits, key=lambda r: (-(r["sketch_dim"] or 10**9), -r["subspace_dim"])) if fits else None
    capture = 2 * LANGUAGES * st["parameters"] * 4
    buf, blk = summ["buffer"], summ["blockwise"]
    default = summ.get("blockwise_default")
    return (f"Statistics: by default (the same-state records alone) {_mb(ss['bytes_after']['1000'])} after 1,000 "
            "probes"
            + (f", and a probed update costs {default['probe_cpu_s_48_blocks']:.1f} CPU s at 48 blocks against "
               f"{blk['probe_cpu_s_48_blocks']:.1f} with the summed statistics" if default else "")
            + ". With `--gdps-summed-statistics`: "
            f"exact sums are {_mb(st['summed'][0]['summed_bytes'])}; "
            + (f"the largest setting within 100 MB after 1,000 probes is `--gdps-sketch-dim {best['sketch_dim']} "
               f"--gdps-subspace-dim {best['subspace_dim']}` ({_mb(best['summed_bytes'] + ss['bytes_after']['1000'])}). "
               if best else "no measured setting stays within 100 MB. ")
            + f"Probe memory at 48 blocks: the buffer path about {_mb(buf['memory_bytes_48_blocks'])}, block by block "
            f"about {_mb(blk['memory_bytes_48_blocks'])}; the bulk of the latter is the capture's per-half shares "
            f"(2U x 403M in float32 = {_mb(capture)}, formed in the backward pass and freed block by block as they are "
            "recorded)"
            + (f"; the default probe reduces every layer's shares to their Gram matrix inside the backward pass and "
               f"frees them there: about {_mb(default['memory_bytes_48_blocks'])}. " if default else ". ")
            +
            "Fewer tracked blocks (`--gdps-track`) reduce every per-block figure in proportion. Probe time is CPU time "
            "on one thread and does not depend on the batch: with this small batch it is many times the update itself.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measured-blocks", type=int, nargs="+", default=[1, 3],
                   help="full-size FFN blocks in the timing processes: two counts (a line through them gives 48 blocks)")
    p.add_argument("--utterances", type=int, default=8, help="utterances per batch (>= 8: one per half row)")
    p.add_argument("--frames", type=int, default=100, help="frames per utterance after subsampling")
    p.add_argument("--probes", type=int, default=3, help="timed probed (and unprobed) updates per process")
    p.add_argument("--statistics-probes", type=int, default=2, help="probes of all 48 blocks recorded for the records' size")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=list(WAYS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--markdown", nargs="?", const=str(RESULTS / "scale.json"), default=None, metavar="JSON",
                   help="print the markdown of an existing results file and exit")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(worker(args.worker, args.measured_blocks[0], args.utterances, args.frames, args.probes)))
        return 0
    if args.markdown:
        print_results_markdown(p, args.markdown, markdown)
        return 0
    if args.utterances < 2 * LANGUAGES:
        p.error(f"--utterances must be >= {2 * LANGUAGES} (one per half row)")
    started = time.perf_counter()
    results = {"benchmark": "scale", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": command_line("scale", argv), "machine": machine_details(), "versions": software_versions()}
    results["statistics"] = measure_statistics(args.statistics_probes)
    results["ways"] = {name: [run_worker(name, args, blocks) for blocks in args.measured_blocks]
                       for name in WAYS}
    results["summary"] = summarize(results["statistics"], results["ways"])
    results["conclusion"] = conclusion(results)
    results["wall_seconds"] = time.perf_counter() - started
    write_results(results, args.out.resolve(), "scale", markdown)
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
