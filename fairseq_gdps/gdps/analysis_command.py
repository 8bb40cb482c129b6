"""gdps-analyze: per-language gradient statistics -> plan.json, report.md and plots.

    gdps-analyze STATS --out DIR [--groups K] [--select top1|topk [--top-k N] | --modules M [M ...]]
                 [--window-start U] [--window-end U] [--reference-blocks GLOBS]
                 [--conflict-tau 0.1] [--min-reference-agreement 0.5] [--identifiability-margin 0.05]
                 [--interval-level 0.9] [--distinct-level L]
                 [--ratio-min 0.25 --ratio-max 0.75 --ratio-step 0.125] [--conflict-shared-ratio 0|R|similarity]
                 [--resamples 1000] [--seed 0]
                 [--subspace-rank 8 --ridge 0.1 --alignment-weight 0.5 | --no-summed-diagnostic]

The decision comes from the same-state probe records (``fairseq_gdps.gdps.conflict``;
``fairseq_gdps.gdps.report`` documents the module choice); statistics without them are refused.
Statistics recorded with ``--gdps-summed-statistics`` also get the summed-statistics diagnostic
(``fairseq_gdps.gdps.summed_diagnostics``), which decides nothing.
"""
from __future__ import annotations

import argparse
import sys


def conflict_shared_ratio(text: str):
    """--conflict-shared-ratio: a share in [0, 1), or 'similarity' (None: the similarity rule)."""
    if text == "similarity":
        return None
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'similarity', got {text!r}") from None
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return r


# flags of the summed estimator, which no longer decides, and what they set
RETIRED = ("--silhouette-min", "--min-split-distance")
RETIRED_WHY = ("they set the automatic rule of the summed estimator's clustering; the groups come from conflict "
               "edges, or --groups K")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gdps-analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stats", metavar="STATS", help="gradient statistics file written by the GDPS probe")
    p.add_argument("--out", required=True, help="output folder (plan.json, report.md, *.png)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--groups", type=int, default=None,
                   help="force this many language groups (average linkage on 1 - same-state similarity)")
    g.add_argument("--distance-threshold", type=float, default=None, metavar="T",
                   help="deprecated: the same as --conflict-tau T, which it overrides (a warning says so)")
    p.add_argument("--top-k", type=int, default=3, help="with --select topk: the number of top-ranked blocks to split")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--select", choices=["top1", "topk"], default="top1",
                   help="split the single most conflicting block, or the top --top-k")
    s.add_argument("--modules", nargs="+", default=None,
                   help="split exactly these modules (and group languages on them)")
    p.add_argument("--ratio-min", type=float, default=0.25)
    p.add_argument("--ratio-max", type=float, default=0.75)
    p.add_argument("--ratio-step", type=float, default=0.125)
    p.add_argument("--conflict-shared-ratio", type=conflict_shared_ratio, default=0.0, metavar="R|similarity",
                   help="shared ratio of a split whose groups come from conflict edges (units the groups share "
                   "carry their conflict again); 'similarity': the --ratio-min/max/step rule, as for other groups")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples of the probed batches, for the intervals and the grouping's stability "
                   "(0: none); each tail of the distinctness interval holds (1 - level) / 2 of them, about 8 at the default "
                   "for 6 blocks")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--expect-signature", default=None, help="refuse statistics recorded for another model signature")
    for flag in RETIRED:
        p.add_argument(flag, type=float, default=None, metavar="X", help=f"no longer applies ({RETIRED_WHY}); "
                       "accepted and ignored with a warning")
    d = p.add_argument_group("summed-statistics diagnostic (statistics recorded with --gdps-summed-statistics; "
                             "it does not decide)")
    d.add_argument("--subspace-rank", type=int, default=8, help="rank of each language's gradient subspace (SVD/CCA)")
    d.add_argument("--ridge", type=float, default=0.1, help="CCA ridge, relative to the mean variance")
    d.add_argument("--alignment-weight", type=float, default=0.5,
                   help="weight of subspace misalignment in the summed conflict score (0: divergence only)")
    d.add_argument("--no-summed-diagnostic", action="store_true",
                   help="skip the diagnostic even where the statistics hold the summed statistics")
    w = p.add_argument_group("same-state analysis")
    w.add_argument("--window-start", type=int, default=None,
                   help="use the probes of updates >= this (conflict shows once the content is being learned)")
    w.add_argument("--window-end", type=int, default=None, help="use the probes of updates < this")
    w.add_argument("--reference-blocks", default="encoder.*",
                   help="comma-separated globs of the input-side blocks whose agreement is the reference (none or "
                   "all matching: the lower half of the blocks)")
    w.add_argument("--conflict-tau", type=float, default=0.1,
                   help="a pair conflicts at a block when its agreement there is below its reference agreement by "
                   "more than this (and the interval's lower bound is above 0)")
    w.add_argument("--min-reference-agreement", type=float, default=0.5,
                   help="only pairs whose agreement on the reference blocks is at least this can conflict (a pair "
                   "that agrees nowhere has no shared input for its outputs to fight over)")
    w.add_argument("--identifiability-margin", type=float, default=0.05,
                   help="with speaker units: a block tells languages apart when within-language cross-speaker "
                   "agreement exceeds cross-language agreement by more than this (interval lower bound)")
    w.add_argument("--interval-level", type=float, default=0.9, help="level of the bootstrap percentile intervals")
    w.add_argument("--distinct-level", type=float, default=None,
                   help="level of the similarity interval that must lie below 1 for two languages to count as "
                   "measurably two in a block (default: the interval level over the family of tracked blocks, "
                   "1 - (1 - interval level) / blocks; 6 blocks: 0.983)")
    return p


class AnalysisFlagsError(ValueError):
    """Flags that gdps-analyze refuses (the message says which and why)."""


def parse(argv, exit_on_error: bool = True) -> argparse.Namespace:
    """gdps-analyze's command line, checked: AnalysisFlagsError when the flags cannot work. Flags
    argparse itself refuses exit as on the command line, or with ``exit_on_error=False`` raise
    AnalysisFlagsError too (after argparse's message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exit_on_error or exc.code == 0:   # (0: --help)
            raise
        raise AnalysisFlagsError(f"not valid gdps-analyze flags: {' '.join(map(str, argv))}") from None
    if args.groups is not None and args.groups < 1:
        raise AnalysisFlagsError("--groups must be >= 1")
    if not 0 < args.ratio_min <= args.ratio_max < 1 or args.ratio_step <= 0:
        raise AnalysisFlagsError("need 0 < --ratio-min <= --ratio-max < 1 and --ratio-step > 0")
    if not 0 < args.interval_level < 1:
        raise AnalysisFlagsError("--interval-level must lie in (0, 1)")
    if args.distinct_level is not None and not 0 < args.distinct_level < 1:
        raise AnalysisFlagsError("--distinct-level must lie in (0, 1)")
    if not 0 <= args.alignment_weight <= 1:
        raise AnalysisFlagsError("--alignment-weight must lie in [0, 1]")
    return args


def run(args: argparse.Namespace):
    """The analysis of ``parse``'s flags: the Analysis, its files written to ``--out``. Raises
    ValueError / FileNotFoundError for statistics it cannot decide from."""
    for flag in RETIRED:
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            print(f"gdps-analyze: warning: {flag} no longer applies ({RETIRED_WHY}): ignored", file=sys.stderr)
    conflict_tau = args.conflict_tau
    if args.distance_threshold is not None:
        print(f"gdps-analyze: warning: --distance-threshold is deprecated: it is the conflict threshold "
              f"(--conflict-tau {args.distance_threshold:g}), used instead of --conflict-tau", file=sys.stderr)
        conflict_tau = args.distance_threshold
    import logging

    from fairseq_gdps.gdps.report import analyze, write_outputs
    from fairseq_gdps.gdps.stats import GradientStatistics
    from fairseq_gdps.gdps.summed_diagnostics import Settings

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # quiet even under a DEBUG root logger
    diagnostic = None if args.no_summed_diagnostic else Settings(
        subspace_rank=args.subspace_rank, ridge=args.ridge, alignment_weight=args.alignment_weight)
    stats = GradientStatistics.load(args.stats, expect_signature=args.expect_signature)
    a = analyze(stats, args.stats, modules=args.modules, select=args.select, top_k=args.top_k,
                n_groups=args.groups, window_start=args.window_start, window_end=args.window_end,
                reference=args.reference_blocks, conflict_tau=conflict_tau,
                min_reference_agreement=args.min_reference_agreement,
                identifiability_margin=args.identifiability_margin, interval_level=args.interval_level,
                distinct_level=args.distinct_level, ratio_min=args.ratio_min, ratio_max=args.ratio_max,
                ratio_step=args.ratio_step, conflict_shared_ratio=args.conflict_shared_ratio,
                resamples=args.resamples, seed=args.seed, summed_diagnostic=diagnostic)
    paths = write_outputs(a, args.out)
    return a, paths


def summary(a, paths) -> str:
    """What gdps-analyze prints: the decision and where its files are."""
    lines = [f"split: {', '.join(a.split_modules)}",
             "groups: " + " / ".join("{" + ", ".join(g) + "}" for g in a.grouping.partition)
             + (f" (stability {100 * a.grouping.chosen_frequency:.0f}% of {a.grouping.resamples} resamples)"
                if a.grouping.resamples else ""),
             f"shared ratio: {a.ratio:g}",
             f"estimator: {a.estimator}"]
    return "\n".join(lines + [f"{k}: {paths[k]}" for k in ("plan", "report")])


def main(argv=None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except AnalysisFlagsError as exc:
        print(f"gdps-analyze: {exc}", file=sys.stderr)
        return 2
    try:
        a, paths = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gdps-analyze: {exc}", file=sys.stderr)
        return 1
    print(summary(a, paths))
    return 0
