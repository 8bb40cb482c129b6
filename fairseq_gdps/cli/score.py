"""gdps-score: per-language BLEU / chrF / chrF++ / TER / exact match of fairseq-generate output,
paired bootstrap significance against a baseline, and COMET from a local model.

    gdps-score --data DATA_DIR --decode-dir DIR --out PREFIX
               [--baseline-decode-dir BASELINE_DIR] [--comet-model PATH]
    gdps-score --compare baseline=A/scores.json gdps=B/scores.json [--out PREFIX]

For every ``DIR/<split>.txt`` (a fairseq-generate log of ``DATA_DIR/<split>.tsv``), pairs each
hypothesis with its manifest row (failing if any test utterance has no hypothesis) and writes
``PREFIX.json`` and ``PREFIX.md`` with one row per language plus the average and the pooled set.
With ``--baseline-decode-dir`` (the baseline's decodes of the same manifests), each language and
the pooled set get a paired bootstrap test (BLEU, chrF++, TER) of this system against it. COMET
runs only when ``--comet-model`` names a downloaded model; otherwise the output says it was skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from fairseq_gdps.data.generate_output import pair_with_manifest, read_hypotheses, read_manifest
from fairseq_gdps.scoring.comet_scores import CometUnavailable, comet_scores
from fairseq_gdps.scoring.translation_scores import paired_bootstrap, score_corpus
from fairseq_gdps.atomic import atomic_write

METRICS = ("bleu", "chrf", "chrf++", "ter", "exact_match")


def collect_rows(data_dir: Path, decode_dir: Path) -> dict[str, list]:
    """(manifest row, hypothesis) pairs per language, in manifest order."""
    logs = sorted(decode_dir.glob("*.txt"))
    if not logs:
        raise FileNotFoundError(f"no fairseq-generate outputs (*.txt) in {decode_dir}")
    by_lang: dict[str, list] = defaultdict(list)
    for log in logs:
        manifest_path = data_dir / f"{log.stem}.tsv"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{log}: no manifest {manifest_path} for this decode")
        pairs = pair_with_manifest(read_manifest(manifest_path), read_hypotheses(log), where=str(log))
        for row, hyp in pairs:
            by_lang[row.src_lang or log.stem].append((row, hyp))
    return dict(sorted(by_lang.items()))


def score_languages(by_lang: dict[str, list[tuple[str, str]]]) -> dict:
    per_lang = {lang: score_corpus([h for h, _ in p], [r for _, r in p]) for lang, p in by_lang.items()}
    everything = [pair for pairs in by_lang.values() for pair in pairs]
    pooled = score_corpus([h for h, _ in everything], [r for _, r in everything])
    average = {m: sum(s[m] for s in per_lang.values()) / len(per_lang) for m in METRICS}
    return {"languages": per_lang, "average": average, "pooled": pooled, "signatures": pooled["signatures"]}


def significance_against(baseline_rows: dict[str, list], rows: dict[str, list], n_samples: int) -> dict:
    """Paired bootstrap per language and over the pooled set. Utterances are paired by id, so the
    two decodes may come from differently ordered manifests (joint vs per-language test sets),
    but they must cover the same utterances."""
    if set(baseline_rows) != set(rows):
        raise ValueError(f"baseline decode has languages {sorted(baseline_rows)}, this one {sorted(rows)}")
    paired = {}
    for lang in rows:
        baseline_by_id = {row.id: hyp for row, hyp in baseline_rows[lang]}
        ids = [row.id for row, _ in rows[lang]]
        if set(ids) != set(baseline_by_id) or len(ids) != len(baseline_by_id):
            raise ValueError(f"language {lang}: the baseline decode covers other utterances than this one "
                             f"({len(baseline_by_id)} vs {len(ids)}, {len(set(ids) ^ set(baseline_by_id))} ids differ)")
        paired[lang] = [(baseline_by_id[row.id], hyp, row.tgt_text) for row, hyp in rows[lang]]
    paired["pooled"] = [x for lang in rows for x in paired[lang]]
    return {lang: paired_bootstrap([b for b, _, _ in p], [h for _, h, _ in p], [r for _, _, r in p], n_samples=n_samples)
            for lang, p in paired.items()}


def add_comet(scores: dict, rows: dict[str, list], model_path: str, batch_size: int) -> None:
    """COMET per language (mean of its segment scores), average and pooled, into ``scores``."""
    everything = [x for lang in rows for x in rows[lang]]
    if any(not r.src_text for r, _ in everything):
        raise ValueError("COMET needs the source transcript: the manifests' src_text column is empty")
    result = comet_scores(model_path, [r.src_text for r, _ in everything], [h for _, h in everything],
                          [r.tgt_text for r, _ in everything], batch_size=batch_size)
    start = 0
    for lang, lang_rows in rows.items():
        segments = result["segments"][start:start + len(lang_rows)]
        scores["languages"][lang]["comet"] = 100.0 * sum(segments) / len(segments)
        start += len(lang_rows)
    scores["average"]["comet"] = sum(s["comet"] for s in scores["languages"].values()) / len(rows)
    scores["pooled"]["comet"] = 100.0 * result["system"]
    scores["comet_model"] = result["model"]


def score_decode(data_dir: Path, decode_dir: Path, baseline_decode_dir: Path | None = None,
                 comet_model: str | None = None, bootstrap_samples: int = 1000, comet_batch_size: int = 16) -> dict:
    rows = collect_rows(data_dir, decode_dir)
    scores = score_languages({lang: [(hyp, row.tgt_text) for row, hyp in r] for lang, r in rows.items()})
    if baseline_decode_dir is not None:
        scores["significance"] = significance_against(collect_rows(data_dir, baseline_decode_dir), rows, bootstrap_samples)
        scores["baseline_decode_dir"] = str(baseline_decode_dir)
    if comet_model:
        add_comet(scores, rows, comet_model, comet_batch_size)
    else:
        scores["comet_skipped"] = "no --comet-model given (COMET needs a downloaded model on local disk)"
    return scores


def _cells(s: dict) -> str:
    """BLEU, chrF, chrF++, TER and exact match of one row of the scores table."""
    return " | ".join(f"{s[m]:.1f}" for m in METRICS)


def to_markdown(scores: dict) -> str:
    lines = ["| language | n | BLEU | chrF | chrF++ | TER | exact % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lang, s in scores["languages"].items():
        lines.append(f"| {lang} | {s['n']} | {_cells(s)} |")
    a, p = scores["average"], scores["pooled"]
    lines.append(f"| average | | {_cells(a)} |")
    lines.append(f"| all (pooled) | {p['n']} | {_cells(p)} |")
    if "comet_model" in scores:
        comet = ", ".join(f"{lang} {s['comet']:.1f}" for lang, s in scores["languages"].items())
        lines += ["", f"COMET ({scores['comet_model']}), x100: {comet}; average {a['comet']:.1f}; pooled {p['comet']:.1f}"]
    else:
        lines += ["", f"COMET: skipped: {scores.get('comet_skipped', 'not run')}"]
    if "significance" in scores:
        lines += ["", f"Paired bootstrap against the baseline ({scores['baseline_decode_dir']}); "
                  "p = probability of a difference this large by chance:", "",
                  "| language | metric | baseline | this | delta | p | 95% CI (this) |", "|---|---|---:|---:|---:|---:|---:|"]
        for lang, metrics in scores["significance"].items():
            for metric, r in metrics.items():
                lines.append(f"| {lang} | {metric} | {r['baseline']:.1f} | {r['system']:.1f} | {r['delta']:+.1f} | "
                             f"{r['p_value']:.3f} | ±{r['system_ci95']:.1f} |")
        first = next(iter(scores["significance"].values()))
        lines += ["", "paired bootstrap signatures:"] + [f"- {m}: `{r['signature']}`" for m, r in first.items()]
    lines += ["", "sacrebleu signatures:"] + [f"- {k}: `{v}`" for k, v in scores["signatures"].items()]
    return "\n".join(lines) + "\n"


def side_by_side(systems: dict) -> str:
    """Per-language BLEU / chrF / exact match of several systems' scores, one column group each."""
    names = list(systems)
    languages = sorted({lang for scores in systems.values() for lang in scores["languages"]})
    head = "| language | " + " | ".join(f"{n} BLEU | {n} chrF | {n} exact %" for n in names) + " |"
    lines = [head, "|---|" + "---:|" * (3 * len(names))]
    for lang in languages + ["average"]:
        cells = []
        for n in names:
            s = systems[n]["average"] if lang == "average" else systems[n]["languages"].get(lang)
            cells += [f"{s['bleu']:.1f}", f"{s['chrf']:.1f}", f"{s['exact_match']:.1f}"] if s else ["-"] * 3
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gdps-score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="data folder with the manifests that were decoded")
    parser.add_argument("--decode-dir", type=Path, help="folder of fairseq-generate outputs <split>.txt")
    parser.add_argument("--out", type=Path, help="output prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--baseline-decode-dir", type=Path,
                        help="the baseline's fairseq-generate outputs of the same manifests: adds paired bootstrap tests")
    parser.add_argument("--bootstrap-samples", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    parser.add_argument("--comet-model", help="local COMET model (folder or .ckpt); without it COMET is skipped")
    parser.add_argument("--comet-batch-size", type=int, default=16)
    parser.add_argument("--compare", nargs="+", metavar="NAME=SCORES.json",
                        help="instead of scoring: print the per-language scores of several systems side by side")
    args = parser.parse_args(argv)
    if args.compare:
        try:
            systems = {item.split("=", 1)[0]: json.loads(Path(item.split("=", 1)[1]).read_text()) for item in args.compare}
        except (OSError, ValueError, IndexError) as e:
            print(f"gdps-score: error: --compare {args.compare}: {e}", file=sys.stderr)
            return 1
        table = side_by_side(systems)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.out.with_suffix(".md"), table)
        print(table, end="")
        return 0
    if not (args.data and args.decode_dir and args.out):
        parser.error("--data, --decode-dir and --out are required (or --compare)")
    if args.bootstrap_samples < 1:
        parser.error(f"--bootstrap-samples must be >= 1, got {args.bootstrap_samples}")
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)
    try:
        scores = score_decode(args.data, args.decode_dir, args.baseline_decode_dir, args.comet_model,
                              args.bootstrap_samples, args.comet_batch_size)
    except (OSError, ValueError, CometUnavailable) as e:
        print(f"gdps-score: error: {e}", file=sys.stderr)
        return 1
    if "comet_skipped" in scores:
        print(f"gdps-score: COMET skipped: {scores['comet_skipped']}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(scores, indent=2, sort_keys=True) + "\n")
    markdown = to_markdown(scores)
    write_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
