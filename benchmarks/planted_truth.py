"""Planted-truth checks of the GDPS analysis on statistics recorded by the real probe.

From a prepared corpus (``gdps-prep`` output) this derives manifests whose truth is known, trains
the stage-1 probe on them with ``fairseq-train`` (the recipes' model and settings), analyses the
recorded statistics and keeps every finished run as a small JSON record, so that a set can be
completed over several sittings and re-reported without the run folders:

* ``conflict``: half of BASE's utterances (every split, the same speakers and audio) relabelled
  NAME, their English number words permuted by a fixed derangement: NAME differs from BASE in
  meaning only. One more language's utterances are split at random into two pseudo-languages
  (the duplicate control: identical in everything).
* ``shuffled``: every utterance's language label drawn at random: no language structure at all.

    python benchmarks/planted_truth.py make-data --data PREPARED --out DIR --kind conflict|shuffled
    python benchmarks/planted_truth.py run --data DIR --work WORK --seeds 1 2 3 4 5
    python benchmarks/planted_truth.py report --work WORK [--records benchmarks/results/planted_truth]

The checks (the analysis' decision per seed): the duplicate pair is never put in different groups
and agrees at rho >= 0.9 in every block; the conflict pair is put in different groups at a block
where the conflict lives; with shuffled labels no stable grouping comes out.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "examples" / "speech_to_text_gdps"
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
SPLITS = ("train", "dev", "test")


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


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return reader.fieldnames, list(reader)


def write_tsv(path, fields, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def make_data(args) -> int:
    src, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    truth = {"kind": args.kind, "source": str(src), "seed": args.seed}
    if args.kind == "conflict":
        base, name = args.conflict.split(":")
        dup_base, dup_name = args.duplicate.split(":")
        mapping = _derangement(NUMBERS, rng)
        truth.update(conflict=[base, name], duplicate=[dup_base, dup_name], number_map=mapping)
    for split in SPLITS:
        fields, rows = read_tsv(src / f"{split}.tsv")
        langs = sorted({r["src_lang"] for r in rows})
        for r in rows:
            if args.kind == "conflict":
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
    for name_ in os.listdir(src):   # features, SentencePiece model, config: links to the source
        if not name_.endswith(".tsv") and not (out / name_).exists():
            os.symlink((src / name_).resolve(), out / name_)
    (out / "planted_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    print(f"planted {args.kind} data -> {out}")
    return 0


def train_command(data: Path, save: Path, seed: int, a) -> str:
    flags = (f"--gdps-probe-interval {a.probe_interval} --gdps-probe-start {a.probe_start} "
             f"--gdps-stats {save}/gdps_stats.pt" + (" --gdps-probe-speakers" if a.speakers else ""))
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
                     "speakers": args.speakers}) + "\n")
                print(f"seed {s} done in {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-data")
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--kind", choices=["conflict", "shuffled"], default="conflict")
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
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    return {"make-data": make_data, "run": run}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
