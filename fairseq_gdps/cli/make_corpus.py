"""gdps-make-corpus: generate the deterministic demo speech-translation corpus.

Example::

    gdps-make-corpus --profile quick --out data/demo --seed 1
    gdps-make-corpus --profile hard --languages et,sw --conflict-language xx:et --out data/hard
    gdps-make-corpus --conflict-language xx:et --conflict-speakers shared --out data/conflict

Writes ``OUT/wav/<lang>/<id>.wav`` (16 kHz mono PCM16), ``OUT/{train,dev,test}.tsv``
(id, audio, duration, speaker, src_lang, src_text, tgt_text) and ``OUT/corpus.json``.
"""
from __future__ import annotations

import argparse
import sys


def _profiles_help() -> str:
    from fairseq_gdps.data.corpus import PROFILES

    lines = []
    for name, p in PROFILES.items():
        lines.append(
            f"  {name:<6} {p['utterances_per_language']} utterances/language, numbers 1-{p['max_number']}, "
            f"{p['min_phrases']}-{p['max_phrases']} phrases, families {','.join(p['families'])}, "
            f"{len(p['units'])} units, time units {','.join(p['rel_units'])}, "
            f"{p['speakers_per_language']} speakers/language"
        )
    return "profiles:\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from fairseq_gdps.data import cldr_text as ct

    p = argparse.ArgumentParser(
        prog="gdps-make-corpus",
        description="Generate a small, deterministic multilingual speech-translation corpus "
        "(espeak-ng speech in ar/et/ga/sw, CLDR-derived English targets).",
        epilog=_profiles_help() + "\n\nIndividual flags override the profile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--profile", default="quick", choices=["quick", "full", "hard"], help="size/domain preset (default: quick)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 1); same seed -> byte-identical output")
    p.add_argument("--languages", default=None, help=f"comma-separated subset of {','.join(ct.LANGUAGES)} (default: all)")
    p.add_argument("--conflict-language", action="append", default=None, metavar="NAME:BASE",
                   help="add a controlled-conflict language NAME that sounds like BASE but whose "
                   "number and/or unit words mean other values; repeatable. E.g. xx:et")
    p.add_argument("--conflict-remap", choices=["numbers", "units", "both"], default=None,
                   help="what a conflict language permutes (default: both)")
    p.add_argument("--conflict-speakers", choices=["own", "shared"], default=None,
                   help="who speaks a conflict language: 'own' speakers (default; other voices than BASE's, so "
                   "NAME differs from BASE by voice as well as by meaning) or BASE's very speakers ('shared': "
                   "same voices, rates and pitches, so only the meaning differs; NAME keeps its own sentences)")
    p.add_argument("--utterances-per-language", type=int, default=None)
    p.add_argument("--max-number", type=int, default=None, help="numbers are drawn from 1..N")
    p.add_argument("--min-phrases", type=int, default=None, help="phrases per sentence, lower bound")
    p.add_argument("--max-phrases", type=int, default=None, help="phrases per sentence, upper bound")
    p.add_argument("--min-target-words", type=int, default=None,
                   help="add phrases (up to --max-phrases) until the English target has this many words (default 4)")
    p.add_argument("--families", default=None, help=f"phrase families, comma-separated: {','.join(ct.FAMILIES)}")
    p.add_argument("--units", default=None, help=f"units for the 'unit' family: {','.join(ct.UNIT_CATALOG)}")
    p.add_argument("--time-units", dest="rel_units", default=None,
                   help=f"units for relative times ('rel' family): {','.join(ct.REL_UNITS)}")
    p.add_argument("--speakers-per-language", type=int, default=None)
    p.add_argument("--heldout-test-speakers", type=int, default=None,
                   help="extra speakers per language used only (and for all) test utterances (default 0)")
    p.add_argument("--dev-fraction", type=float, default=None, help="default 0.1")
    p.add_argument("--test-fraction", type=float, default=None, help="default 0.1")
    p.add_argument("--snr-db", type=float, default=None, help="add white noise at this SNR in dB (default: clean)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default 2)")
    p.add_argument("--tts-backend", choices=["auto", "lib", "cli"], default=None,
                   help="espeak-ng through libespeak-ng (lib, fast) or a process per utterance (cli); default auto")
    p.add_argument("--force", action="store_true", help="replace a corpus already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fairseq_gdps.data.corpus import CorpusError, format_summary, generate, make_config

    overrides = {
        k: getattr(args, k)
        for k in ("seed", "languages", "conflict_remap", "conflict_speakers", "utterances_per_language", "max_number",
                  "min_phrases", "max_phrases", "min_target_words", "families", "units", "rel_units", "speakers_per_language",
                  "heldout_test_speakers", "dev_fraction", "test_fraction", "snr_db", "jobs", "tts_backend")
    }
    overrides["conflict"] = args.conflict_language
    try:
        cfg = make_config(args.profile, **overrides)
        summary = generate(cfg, args.out, progress=not args.no_progress, force=args.force)
    except CorpusError as e:
        parser.error(str(e))
    print(format_summary(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
