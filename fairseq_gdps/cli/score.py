"""gdps-score: per-language BLEU / chrF / chrF++ / TER / exact match of fairseq-generate output.

    gdps-score --data DATA_DIR --decode-dir DIR --out PREFIX
    gdps-score --compare baseline=A/scores.json gdps=B/scores.json [--out PREFIX]

For every ``DIR/<split>.txt`` (a fairseq-generate log of ``DATA_DIR/<split>.tsv``), pairs each
hypothesis with its manifest row (failing if any test utterance has no hypothesis) and writes
``PREFIX.json`` and ``PREFIX.md`` with one row per language plus the average and the pooled set.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from fairseq_gdps.data.generate_output import pair_with_manifest, read_hypotheses, read_manifest
from fairseq_gdps.gdps.translation_scores import score_corpus
from fairseq_gdps.atomic import atomic_write

METRICS = ("bleu", "chrf", "chrf++", "ter", "exact_match")


def collect_pairs(data_dir: Path, decode_dir: Path) -> dict[str, list[tuple[str, str]]]:
    logs = sorted(decode_dir.glob("*.txt"))
    if not logs:
        raise FileNotFoundError(f"no fairseq-generate outputs (*.txt) in {decode_dir}")
    by_lang: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for log in logs:
        manifest_path = data_dir / f"{log.stem}.tsv"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{log}: no manifest {manifest_path} for this decode")
        pairs = pair_with_manifest(read_manifest(manifest_path), read_hypotheses(log), where=str(log))
        for row, hyp in pairs:
            by_lang[row.src_lang or log.stem].append((hyp, row.tgt_text))
    return dict(sorted(by_lang.items()))


def score_languages(by_lang: dict[str, list[tuple[str, str]]]) -> dict:
    per_lang = {lang: score_corpus([h for h, _ in p], [r for _, r in p]) for lang, p in by_lang.items()}
    everything = [pair for pairs in by_lang.values() for pair in pairs]
    pooled = score_corpus([h for h, _ in everything], [r for _, r in everything])
    average = {m: sum(s[m] for s in per_lang.values()) / len(per_lang) for m in METRICS}
    return {"languages": per_lang, "average": average, "pooled": pooled, "signatures": pooled["signatures"]}


def to_markdown(scores: dict) -> str:
    lines = ["| language | n | BLEU | chrF | chrF++ | TER | exact % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for lang, s in scores["languages"].items():
        lines.append(f"| {lang} | {s['n']} | {s['bleu']:.1f} | {s['chrf']:.1f} | {s['chrf++']:.1f} | {s['ter']:.1f} | {s['exact_match']:.1f} |")
    a, p = scores["average"], scores["pooled"]
    lines.append(f"| average | | {a['bleu']:.1f} | {a['chrf']:.1f} | {a['chrf++']:.1f} | {a['ter']:.1f} | {a['exact_match']:.1f} |")
    lines.append(f"| all (pooled) | {p['n']} | {p['bleu']:.1f} | {p['chrf']:.1f} | {p['chrf++']:.1f} | {p['ter']:.1f} | {p['exact_match']:.1f} |")
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
    try:
        scores = score_languages(collect_pairs(args.data, args.decode_dir))
    except (OSError, ValueError) as e:
        print(f"gdps-score: error: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out.with_suffix(".json"), json.dumps(scores, indent=2, sort_keys=True) + "\n")
    markdown = to_markdown(scores)
    write_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
