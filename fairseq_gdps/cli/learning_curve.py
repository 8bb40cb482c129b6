"""Learning curve of a fairseq-train log: dev loss and accuracy against updates and time.

    python -m fairseq_gdps.cli.learning_curve TRAIN_LOG [TRAIN_LOG ...] --out PREFIX

Writes PREFIX.tsv (one row per validation and log) and PREFIX.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fairseq_gdps.data.train_log import read_validations
from fairseq_gdps.atomic import atomic_write


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--labels", help="comma-separated label per log (default: parent folder names)")
    parser.add_argument("--update-offsets", help="comma-separated number added to each log's update counts "
                        "(a run that continues another one, e.g. GDPS stage 2, counts from 0)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [log.parent.name for log in args.logs]
    offsets = [int(x) for x in args.update_offsets.split(",")] if args.update_offsets else [0] * len(args.logs)
    if not len(labels) == len(offsets) == len(args.logs):
        parser.error("--labels and --update-offsets need one entry per log")
    curves = {}
    for label, log, offset in zip(labels, args.logs, offsets):
        records = read_validations(log)
        for r in records:
            r["num_updates"] = r.get("num_updates", 0) + offset
        curves[label] = records
    rows = ["system\tnum_updates\twall_s\tdev_loss\tdev_nll_loss\tdev_accuracy"]
    for label, records in curves.items():
        for r in records:
            nan = float("nan")
            rows.append("\t".join([label, str(int(r.get("num_updates", 0))), f"{r['wall'] or 0:.0f}", f"{r.get('loss', nan):.3f}",
                                   f"{r.get('nll_loss', nan):.3f}", f"{r.get('accuracy', nan):.1f}"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out.with_name(args.out.name + ".tsv")) as f:
        f.write("\n".join(rows) + "\n")

    import logging

    # importing fairseq (this package registers with it) leaves the root logger at DEBUG
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, records in curves.items():
        x = [r.get("num_updates", 0) for r in records]
        ax_loss.plot(x, [r.get("loss") for r in records], marker="o", label=label)
        ax_acc.plot(x, [r.get("accuracy") for r in records], marker="o", label=label)
    ax_loss.set(xlabel="updates", ylabel="dev loss (label-smoothed, base 2)", title="dev loss")
    ax_acc.set(xlabel="updates", ylabel="dev token accuracy (%)", title="dev accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_name(args.out.name + ".png"), dpi=100)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
