"""gdps-prep-corpus: a released speech-translation corpus -> the corpus folder gdps-prep reads.

    gdps-prep-corpus tunisian --root LDC2022E01 --splits iwslt22-dialect --out corpus/aeb
    gdps-prep-corpus bemba    --root bigc/data/bem --out corpus/bem
    gdps-prep-corpus irish    --root iwslt2023_ga-eng --out corpus/ga
    gdps-prep-corpus estonian --root iwslt2025_est2eng_data --out corpus/et [--test-tsv test.tsv]
    gdps-prep-corpus tsv      --train a.tsv --dev b.tsv --test c.tsv --lang xx --audio-col path --tgt-col en \
                              --out corpus/xx
    gdps-prep-corpus kaldi    --train data/train --dev data/dev --test data/test --lang xx \
                              --translations text.tc.en --out corpus/xx
    gdps-prep-corpus merge    corpus/aeb corpus/bem corpus/ga corpus/et --out corpus/all
    gdps-prep --corpus corpus/all --out data

Every layout writes OUT/{train,dev,test}.tsv (id, audio, src_lang, tgt_lang, tgt_text, src_text,
speaker, duration), 16 kHz mono wavs under OUT/wav/ where segments had to be cut or resampled, and
OUT/prep_corpus.json.  Shared flags: --lang, --skip-bad, --copy-audio, --time-tolerance,
--max-duration, --jobs, --quiet.  docs/real_corpora.md describes each layout.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from fairseq_gdps.data.corpora import generic, segments
from fairseq_gdps.data.corpora.bigc import read_bigc
from fairseq_gdps.data.corpora.iwslt_stamped import read_stamped
from fairseq_gdps.data.corpora.taltech import read_taltech
from fairseq_gdps.data.corpora.tunisian import read_tunisian
from fairseq_gdps.data.manifest import PrepError


def _common(p: argparse.ArgumentParser, lang: Optional[str]) -> None:
    p.add_argument("--out", required=True, help="output corpus folder (input of gdps-prep --corpus)")
    if lang:
        p.add_argument("--lang", default=lang, help=f"source language code written as src_lang (default {lang})")
    else:
        p.add_argument("--lang", required=True, help="source language code written as src_lang")
    p.add_argument("--tgt-lang", default="en", help="target language code (default en)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad lines/segments and list them in OUT/skipped.tsv instead of failing")
    p.add_argument("--copy-audio", action="store_true",
                   help="write every utterance as a wav under OUT/wav/ (default: 16 kHz mono per-utterance "
                        "files are referenced in place by absolute path)")
    p.add_argument("--time-tolerance", type=float, default=0.05,
                   help="seconds an end time may pass the recording's end (clipped), and a segment may fall "
                        "short of it and still count as the whole file (default 0.05)")
    p.add_argument("--max-duration", type=float, default=None,
                   help="leave out segments longer than this many seconds (counted in prep_corpus.json)")
    p.add_argument("--jobs", type=int, default=1, help="recordings processed in parallel (default 1)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gdps-prep-corpus",
        description="Turn a released speech translation corpus into the corpus folder gdps-prep reads.",
        epilog="Layouts and assumptions: docs/real_corpora.md",
    )
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")

    s = sub.add_parser("tunisian", help="Tunisian Arabic-English, LDC2022E01 (IWSLT 2022-2025)")
    s.add_argument("--root", required=True,
                   help="LDC2022E01 folder (holds data/audio/ta, data/transcripts/ta, data/translations/ta)")
    s.add_argument("--splits", required=True,
                   help="folder with train.file_id.txt, dev.file_id.txt, test1.file_id.txt [, exclude-utterance.txt] "
                        "(github.com/kevinduh/iwslt22-dialect)")
    s.add_argument("--exclude", default=None, help="utterances to leave out (default SPLITS/exclude-utterance.txt if present)")
    s.add_argument("--no-normalize", action="store_true",
                   help="keep the raw text (default: the organisers' normalisation of the *.norm.* STM files)")
    _common(s, "aeb")

    s = sub.add_parser("bemba", help="Bemba-English, BIG-C (github.com/csikasote/bigc data/bem)")
    s.add_argument("--root", required=True, help="folder with splits/ and audio/ (bigc/data/bem)")
    s.add_argument("--splits-dir", default=None, help="split files folder (default ROOT/splits)")
    s.add_argument("--audio-dir", default=None, help="audio folder (default ROOT/audio)")
    _common(s, "bem")

    s = sub.add_parser("irish", help="Irish-English, IWSLT low-resource release with stamped.tsv + txt/*.eng")
    s.add_argument("--root", required=True, help="release folder (holds train/, dev/, test-*/ or data/ with them)")
    s.add_argument("--tgt-ext", default="eng", help="extension of the translation file in txt/ (default eng)")
    s.add_argument("--src-ext", default=None, help="extension of a source transcript file in txt/, if any")
    s.add_argument("--train-dir", default="train")
    s.add_argument("--dev-dir", default="dev")
    s.add_argument("--test-dir", default=None, help="test folder (default: newest test* folder with translations)")
    _common(s, "ga")

    s = sub.add_parser("estonian", help="Estonian-English, IWSLT 2025 (taltechnlp/iwslt2025_est2eng_data)")
    s.add_argument("--root", required=True, help="folder with train.tsv, dev.tsv and audio/")
    s.add_argument("--audio-dir", default=None, help="audio folder (default ROOT/audio)")
    s.add_argument("--test-tsv", default=None, help="test set in the same format (default ROOT/test.tsv if present)")
    _common(s, "et")

    s = sub.add_parser("tsv", help="any table with a header: name the columns")
    for split in ("train", "dev", "test"):
        s.add_argument(f"--{split}", required=split == "train", help=f"{split} table")
    s.add_argument("--audio-col", required=True)
    s.add_argument("--tgt-col", required=True, help="translation column")
    s.add_argument("--id-col", default=None)
    s.add_argument("--src-text-col", default=None)
    s.add_argument("--speaker-col", default=None)
    s.add_argument("--start-col", default=None, help="segment start in seconds (cut from the recording)")
    s.add_argument("--end-col", default=None, help="segment end in seconds")
    s.add_argument("--audio-root", default=None, help="base of relative audio paths (default: the table's folder)")
    s.add_argument("--delimiter", default="\t", help="field delimiter (default tab)")
    s.add_argument("--csv-quoting", action="store_true", help="honour csv-style double quotes")
    _common(s, None)

    s = sub.add_parser("kaldi", help="Kaldi/ESPnet data folders (wav.scp, segments, text, utt2spk + translations)")
    for split in ("train", "dev", "test"):
        s.add_argument(f"--{split}", required=split == "train", help=f"{split} data folder")
    s.add_argument("--translations", default="text.en", help="translation file in each folder (default text.en)")
    s.add_argument("--audio-root", default=None, help="base of relative wav.scp paths (default: working directory)")
    _common(s, None)

    s = sub.add_parser("merge", help="join prepared corpus folders (one per language) into one")
    s.add_argument("inputs", nargs="+", help="corpus folders written by gdps-prep-corpus")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    return p


def _read(args) -> tuple:
    f = args.format
    if f == "tunisian":
        return read_tunisian(args.root, args.splits, lang=args.lang, normalize=not args.no_normalize,
                             exclude_file=args.exclude)
    if f == "bemba":
        return read_bigc(args.root, lang=args.lang, splits_dir=args.splits_dir, audio_dir=args.audio_dir)
    if f == "irish":
        return read_stamped(args.root, lang=args.lang, tgt_ext=args.tgt_ext, src_ext=args.src_ext,
                            split_dirs={"train": args.train_dir, "dev": args.dev_dir, "test": args.test_dir})
    if f == "estonian":
        return read_taltech(args.root, lang=args.lang, audio_dir=args.audio_dir, test_tsv=args.test_tsv)
    files = {s: getattr(args, s) for s in ("train", "dev", "test") if getattr(args, s)}
    if f == "tsv":
        return generic.read_table(
            files, args.lang, args.audio_col, args.tgt_col, id_col=args.id_col, src_text_col=args.src_text_col,
            speaker_col=args.speaker_col, start_col=args.start_col, end_col=args.end_col,
            audio_root=args.audio_root, delimiter=args.delimiter, quoting=args.csv_quoting)
    if f == "kaldi":
        return generic.read_kaldi(files, args.lang, translations=args.translations, audio_root=args.audio_root)
    raise PrepError(f"unknown format {f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "merge":
            segments.merge_corpora(args.inputs, args.out, quiet=args.quiet)
            return 0
        if args.jobs < 1:
            raise PrepError(f"--jobs must be at least 1, got {args.jobs}")
        segs, bad, warnings = _read(args)
        for s in segs:
            s.tgt_lang = args.tgt_lang
        if not args.quiet:
            for w in warnings:
                print(f"gdps-prep-corpus: warning: {w}", file=sys.stderr)
        source = {"format": args.format, "lang": args.lang, "tgt_lang": args.tgt_lang,
                  "input": os.path.abspath(getattr(args, "root", None) or getattr(args, "train"))}
        segments.write_corpus(
            segs, args.out, bad=bad, skip_bad=args.skip_bad, copy_audio=args.copy_audio,
            tolerance=args.time_tolerance, max_duration=args.max_duration, jobs=args.jobs,
            source=source, warnings=warnings, quiet=args.quiet)
    except PrepError as e:
        print(f"gdps-prep-corpus: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
