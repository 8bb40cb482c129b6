"""Planted-truth checks of the GDPS analysis on statistics recorded by the real probe.

From a prepared corpus (``gdps-prep`` output) this derives manifests whose truth is known, trains
the stage-1 probe on them with ``fairseq-train`` (the recipes' model and settings), analyses the
recorded statistics and keeps every finished run as a small JSON record, so that a set can be
completed over several sittings and re-reported without the run folders:

* ``conflict``: half of BASE's utterances (every split, the same speakers and audio) relabelled
  NAME, their English number words permuted by a fixed derangement: NAME differs from BASE in
  meaning only. One more language's utterances are split at random into two pseudo-languages
  (the duplicate control: identical in everything).
* ``corpus-conflict``: the corpus already holds the conflict pair (``gdps-make-corpus
  --conflict-language NAME:BASE --conflict-speakers shared``: NAME spoken by BASE's speakers, as
  many utterances as any language, numbers and units permuted), as in the quality benchmark's
  conflict condition; only the duplicate control is derived.
* ``shuffled``: every utterance's language label drawn at random: no language structure at all.

    python -m benchmarks.planted_truth make-data --data PREPARED --out DIR --kind conflict|corpus-conflict|shuffled
    python -m benchmarks.planted_truth run --data DIR --work WORK --seeds 1 2 3 4 5
    python -m benchmarks.planted_truth record --data DIR --work WORK --name conflict
    python -m benchmarks.planted_truth report [--publish]

(from the repository root). ``report`` writes ``planted_truth.md`` beside the records
(benchmarks/results/planted_truth/); ``--publish`` also puts it into docs/analysis.md (its
planted-truth section).

The checks (the analysis' decision per seed): the duplicate pair is never put in different groups
(its similarity interval contains 1 in every block); the conflict pair is put in different groups at a block
where the conflict lives; with shuffled labels no stable grouping comes out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:
    sys.exit("run the planted-truth checks from the repository root as a module: python -m benchmarks.planted_truth ...")

from benchmarks.common import (REPO, RESULTS, SPLITS, link_prepared_files, portable_path, read_tsv, replace_between,
                               software_versions, write_json, write_tsv)

RECORDS = RESULTS / "planted_truth"
RECIPES = REPO / "examples" / "speech_to_text_gdps"
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


# how a conflict pair was planted (truth["planted_by"]), as the report describes it
PLANTED_BY = {"relabelled": "permuted numbers, half of the base language each, relabelled by this script",
              "corpus": "numbers and units permuted, planted by the corpus, as many utterances as any language"}


def _derangement(items, rng):
    while True:
        perm = list(rng.permutation(len(items)))
        if all(i != p for i, p in enumerate(perm)):
            return {items[i]: items[p] for i, p in enumerate(perm)}


def _singular(unit: str) -> str:
    return unit[:-1] if unit.endswith("s") else unit


def remap_numbers(text: str, mapping: dict) -> str:
    """Replace every number word by its image, and keep the unit after it in number agreement."""
    words = text.split()
    out = []
    for k, w in enumerate(words):
        if w in mapping:
            out.append(mapping[w])
        elif k > 0 and words[k - 1] in mapping and w not in ("and", "ago", "in"):
            base = _singular(w)
            out.append(base if mapping[words[k - 1]] == "one" else base + "s")
        else:
            out.append(w)
    return " ".join(out)


def make_data(args) -> int:
    src, out = Path(args.data), Path(args.out)
    rng = np.random.default_rng(args.seed)
    truth = {"kind": "conflict" if args.kind == "corpus-conflict" else args.kind, "source": portable_path(src),
             "seed": args.seed}
    if args.kind in ("conflict", "corpus-conflict"):
        base, name = args.conflict.split(":")
        dup_base, dup_name = args.duplicate.split(":")
        truth.update(conflict=[base, name], duplicate=[dup_base, dup_name])
    if args.kind == "conflict":
        mapping = _derangement(NUMBERS, rng)
        truth.update(number_map=mapping, planted_by="relabelled")
    elif args.kind == "corpus-conflict":
        present = {r["src_lang"] for r in read_tsv(src / "train.tsv")[1]}
        if not {base, name, dup_base} <= present:
            raise SystemExit(f"make-data: {src}/train.tsv has no {sorted({base, name, dup_base} - present)}; "
                             "--kind corpus-conflict needs a corpus made with --conflict-language NAME:BASE")
        truth.update(planted_by="corpus")
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        fields, rows = read_tsv(src / f"{split}.tsv")
        langs = sorted({r["src_lang"] for r in rows})
        for r in rows:
            if args.kind == "corpus-conflict":
                if r["src_lang"] == dup_base and rng.random() < 0.5:
                    r["src_lang"] = dup_name
            elif args.kind == "conflict":
                if r["src_lang"] == base and rng.random() < 0.5:
                    r["src_lang"] = name
                    r["tgt_text"] = remap_numbers(r["tgt_text"], mapping)
                elif r["src_lang"] == dup_base and rng.random() < 0.5:
                    r["src_lang"] = dup_name
            else:
                r["src_lang"] = langs[int(rng.integers(len(langs)))]
        write_tsv(out / f"{split}.tsv", fields, rows)
        for lang in sorted({r["src_lang"] for r in rows}):
            write_tsv(out / f"{split}_{lang}.tsv", fields, [r for r in rows if r["src_lang"] == lang])
    link_prepared_files(src, out)
    (out / "planted_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    print(f"planted {args.kind} data -> {out}")
    return 0


def train_command(data: Path, save: Path, seed: int, a) -> str:
    flags = (f"--gdps-probe-interval {a.probe_interval} --gdps-probe-start {a.probe_start} "
             f"--gdps-stats {save}/gdps_stats.pt" + (" --gdps-probe-speakers" if a.speakers else "")
             + (" --gdps-lang-embedding" if a.lang_embedding else ""))
    return (f"source {RECIPES}/common.sh && fairseq-train {data} --user-dir $USER_DIR --task speech_to_text_gdps "
            f"--train-subset train --valid-subset dev --config-yaml config.yaml --arch $GDPS_ARCH "
            f"\"${{SIZE_ARGS[@]}}\" \"${{DATA_ARGS[@]}}\" \"${{OPTIM_ARGS[@]}}\" "
            f"--criterion label_smoothed_cross_entropy_gdps {flags} --seed {seed} --max-update {a.updates} "
            f"--save-dir {save} --no-epoch-checkpoints --log-format simple --log-interval 100")


def run(args) -> int:
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    procs = []
    todo = [s for s in args.seeds if not (work / f"seed{s}" / "done.json").is_file()]
    print(f"to run: seeds {todo} ({len(args.seeds) - len(todo)} recorded already)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    while todo or procs:
        while todo and len(procs) < args.parallel:
            s = todo.pop(0)
            save = work / f"seed{s}"
            save.mkdir(exist_ok=True)
            log = open(save / "train.log", "w")
            p = subprocess.Popen(["bash", "-c", train_command(data, save, s, args)], stdout=log, stderr=subprocess.STDOUT,
                                 env=env)
            procs.append((s, p, time.time(), log))
        time.sleep(5)
        for item in list(procs):
            s, p, t0, log = item
            if p.poll() is not None:
                procs.remove(item)
                log.close()
                if p.returncode:
                    print(f"seed {s} failed: {work}/seed{s}/train.log", file=sys.stderr)
                    continue
                (work / f"seed{s}" / "done.json").write_text(json.dumps(
                    {"seed": s, "wall_seconds": round(time.time() - t0, 1), "updates": args.updates,
                     "probe_start": args.probe_start, "probe_interval": args.probe_interval,
                     "speakers": args.speakers, "lang_embedding": args.lang_embedding}) + "\n")
                print(f"seed {s} done in {time.time() - t0:.0f} s")
    return 0


def dev_curve(log_path: Path):
    """[(update, dev loss, dev accuracy)] from a fairseq-train log."""
    import re

    curve = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "valid on 'dev' subset" in line:
            m = {k: v for k, v in re.findall(r"\| (\w+) ([\d.]+)", line)}
            curve.append((int(m["num_updates"]), float(m["loss"]), float(m.get("accuracy", "nan"))))
    return curve


def decide(stats, truth: dict, window: tuple, resamples: int) -> dict:
    """The analysis' decision on one window, and the planted-truth checks on it."""
    from fairseq_gdps.gdps.conflict import indistinguishable
    from fairseq_gdps.gdps.report import analyze

    a = analyze(stats, window_start=window[0], window_end=window[1], resamples=resamples, seed=0)
    langs = a.languages
    groups = [list(g) for g in a.grouping.partition]
    out = {"window": list(window), "estimator": a.estimator, "split": a.split_modules, "groups": groups,
           "stability": a.grouping.chosen_frequency, "ratio": a.ratio, "rule": a.grouping.info.get("rule")}
    ca = a.conflict
    out.update(probes=ca.probes, probed_updates=list(ca.updates), separation=ca.separation,
               beyond_one=ca.beyond_one, candidates=ca.candidates, distinct_level=ca.distinct_level)
    one_language = indistinguishable(ca)
    pairs = {}
    for kind in ("conflict", "duplicate"):
        if kind not in truth:
            continue
        x, y = truth[kind]
        i, j = langs.index(x), langs.index(y)
        pairs[kind] = {b: {"rho": float(e.rho[i, j]), "interval": [float(e.rho_interval[0][i, j]),
                                                                   float(e.rho_interval[1][i, j])],
                           "conflict": float(e.conflict[i, j])} for b, e in ca.estimates.items()}
        out[f"{kind}_apart"] = not any(x in g and y in g for g in groups)
        # some block's similarity interval (at the distinctness level) below 1: the data tell them apart
        out[f"{kind}_measurably_two"] = not bool(one_language[i, j])
        co = a.grouping.coassignment
        out[f"{kind}_apart_in_resamples"] = None if co is None else float(1 - co[i, j])
    out["pairs"] = pairs
    others = [float(e.rho[i, j]) for e in ca.estimates.values() for i in range(len(langs))
              for j in range(i + 1, len(langs))]
    out["rho_all_pairs_range"] = [min(others), max(others)]
    out["identifiable"] = {b: e.identifiability_state for b, e in ca.estimates.items()}
    out["block_scores"] = {b: [e.score, *e.score_interval] for b, e in ca.estimates.items()}
    if "duplicate" in pairs:
        out["duplicate_min_rho"] = min(v["rho"] for v in pairs["duplicate"].values())
    return out


def record_runs(args) -> int:
    """Analyse every finished seed of WORK into a small JSON record under --records."""
    from fairseq_gdps.atomic import file_sha256
    from fairseq_gdps.gdps.stats import GradientStatistics

    work, records = Path(args.work), Path(args.records)
    records.mkdir(parents=True, exist_ok=True)
    truth = json.loads((Path(args.data) / "planted_truth.json").read_text())
    truth["source"] = portable_path(REPO / truth["source"])   # an absolute path of this machine: never in a record
    for done in sorted(work.glob("seed*/done.json")):
        run_info = json.loads(done.read_text())
        stats_path = done.parent / "gdps_stats.pt"
        stats = GradientStatistics.load(stats_path)
        half = run_info["updates"] // 2
        windows = {"second_half": (half, None), "first_half": (run_info["probe_start"], half), "all": (None, None)}
        rec = {"condition": args.name, "seed": run_info["seed"], "run": run_info, "truth": truth,
               "stats_sha256": file_sha256(stats_path), "stats_bytes": stats_path.stat().st_size,
               "same_state_bytes": stats.same_state.nbytes() if stats.same_state else 0,
               "dev_curve": dev_curve(done.parent / "train.log"), "versions": software_versions(),
               "decisions": {k: decide(stats, truth, w, args.resamples) for k, w in windows.items()}}
        path = records / f"{args.name}_seed{run_info['seed']}.json"
        write_json(path, rec)
        print(f"recorded {path}")
    return 0


def _pct(x):
    return "-" if x is None or x != x else f"{100 * x:.0f}%"


def _groups(g):
    return " / ".join("{" + ", ".join(x) + "}" for x in g)


def report(args) -> int:
    """Markdown summary of every record under --records (docs/analysis.md shows it)."""
    records = [json.loads(p.read_text()) for p in sorted(Path(args.records).glob("*_seed*.json"))]
    lines = ["<!-- generated by benchmarks/planted_truth.py report; do not edit -->", ""]
    for cond in sorted({r["condition"] for r in records}):
        rows = sorted((r for r in records if r["condition"] == cond), key=lambda r: r["seed"])
        t = rows[0]["truth"]
        r0 = rows[0]["run"]
        lines += [f"### Condition `{cond}` ({len(rows)} seeds)", "",
                  f"Truth: {t['kind']}" + (f"; conflict pair {t['conflict'][0]}/{t['conflict'][1]} (same speakers, "
                                            + PLANTED_BY[t["planted_by"]]
                                            + f"), duplicate pair {t['duplicate'][0]}/{t['duplicate'][1]}"
                                            if t["kind"] == "conflict" else "") +
                  f". Stage-1 probe: {r0['updates']} updates, probed every {r0['probe_interval']} from update "
                  f"{r0['probe_start']}, units {'(language, speaker)' if r0['speakers'] else 'languages'}"
                  + (", with the language embedding (as GDPS trains in the quality benchmark)"
                     if r0.get("lang_embedding") else ", no language information") + ".", ""]
        for window in ("all", "second_half", "first_half"):
            lines += [f"Window `{window}`:", "",
                      "| seed | probes | split | groups (stability) | top vs next separated | conflict pair apart "
                      "(in resamples) | duplicate apart (in resamples) | min rho(duplicate) | rho(conflict pair) per "
                      "block | dev acc. at end |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                d = r["decisions"][window]
                conf = d.get("pairs", {}).get("conflict", {})
                rho_c = ", ".join(f"{b.split('.')[0][:3]}{b.split('.')[-2]} {v['rho']:.2f}" for b, v in conf.items())
                sep = d.get("separation") or {}
                acc = r["dev_curve"][-1][2] if r["dev_curve"] else float("nan")
                lines.append(f"| {r['seed']} | {d.get('probes', '-')} | {', '.join(d['split'])} | {_groups(d['groups'])} "
                             f"({_pct(d['stability'])}) | {sep.get('separated', '-')} | {d.get('conflict_apart', '-')} "
                             f"({_pct(d.get('conflict_apart_in_resamples'))}) | {d.get('duplicate_apart', '-')} "
                             f"({_pct(d.get('duplicate_apart_in_resamples'))}) | "
                             f"{d.get('duplicate_min_rho', float('nan')):.2f} | {rho_c} | {acc:.1f} |")
            if t["kind"] == "conflict":
                apart = sum(bool(r["decisions"][window].get("conflict_apart")) and
                            r["decisions"][window]["split"][0].startswith("decoder") for r in rows)
                dup = sum(not r["decisions"][window].get("duplicate_apart") for r in rows)
                two = sum(bool(r["decisions"][window].get("conflict_measurably_two")) for r in rows)
                lines += ["", f"Conflict pair apart at a decoder FFN in **{apart} of {len(rows)}** seeds (target: "
                              f">= 4 of 5); duplicate pair kept together in **{dup} of {len(rows)}**. The conflict "
                              f"pair is measurably two languages (some block's similarity interval below 1, at the "
                              f"distinctness level) in {two} of {len(rows)}: where it is not, the data cannot put "
                              "it apart.", ""]
            else:
                one = sum(len(r["decisions"][window]["groups"]) == 1 or r["decisions"][window]["stability"] < 0.5
                          for r in rows)
                lines += ["", f"No stable grouping (one group, or the chosen one in < 50% of resamples) in "
                              f"**{one} of {len(rows)}** seeds.", ""]
    text = "\n".join(lines) + "\n"
    out = Path(args.records) / "planted_truth.md"
    out.write_text(text)
    print(text)
    if args.publish:
        # the conditions sit under a "###" heading of docs/analysis.md
        replace_between(REPO / "docs" / "analysis.md", "planted-truth",
                        "\n".join(lines[2:]).replace("### Condition", "#### Condition").strip("\n"))
        print("published into docs/analysis.md")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-data")
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--kind", choices=["conflict", "corpus-conflict", "shuffled"], default="conflict")
    m.add_argument("--conflict", default="et:xx", metavar="BASE:NAME")
    m.add_argument("--duplicate", default="sw:sw2", metavar="BASE:NAME")
    m.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    r.add_argument("--updates", type=int, default=1500)
    r.add_argument("--probe-start", type=int, default=500)
    r.add_argument("--probe-interval", type=int, default=4)
    r.add_argument("--speakers", action="store_true")
    r.add_argument("--lang-embedding", action="store_true",
                   help="train with --gdps-lang-embedding (the model can tell NAME from BASE and resolve the conflict)")
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--threads", type=int, default=1)
    rec = sub.add_parser("record")
    rec.add_argument("--data", required=True, help="the planted data folder (its planted_truth.json)")
    rec.add_argument("--work", required=True)
    rec.add_argument("--name", required=True, help="condition name of the records")
    rec.add_argument("--records", default=str(RECORDS))
    rec.add_argument("--resamples", type=int, default=1000)
    rep = sub.add_parser("report")
    rep.add_argument("--records", default=str(RECORDS))
    rep.add_argument("--publish", action="store_true",
                     help="also write the tables into the planted-truth section of docs/analysis.md")
    args = p.parse_args(argv)
    return {"make-data": make_data, "run": run, "record": record_runs, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
