"""gdps-prep: corpus TSVs + 16 kHz mono wavs -> fairseq speech-to-text data folder.

    gdps-prep --corpus DIR --out DATA_DIR [--vocab-size 256] [--jobs 2] [--tgt-lang en]
              [--splits train,dev,test] [--specaugment {none,lb,ld,sm,ss}]
              [--audio-root PATH] [--languages ar,et,...] [--skip-bad] [--quiet]
    gdps-prep --out DATA_DIR --relocate

Input: ``DIR/{train,dev,test}.tsv`` with a header and tab-separated columns
id, audio, src_lang, tgt_text (required) and speaker, src_text, duration,
tgt_lang (optional); audio paths are relative to DIR.

Bad input fails fast with an error naming the file and line (or the flag); nothing in DATA_DIR
changes. With --skip-bad every bad line is left out and listed, with its reason, in skipped.tsv.

Output in DATA_DIR (fairseq's S2T layout): fbank80.zip, {split}.tsv and
{split}_{lang}.tsv manifests, spm_unigram{N}.{model,vocab,txt}, config.yaml,
prep.json, and skipped.tsv with --skip-bad.  Each file is written to a temporary
name and moved into place only when everything succeeded.

Every path in DATA_DIR is relative to it except config.yaml's audio_root: stock fairseq joins the
manifests' audio paths to it as it stands, so it holds DATA_DIR's absolute path. The plugin's task
reads a moved data folder without it; for stock fairseq (``--task speech_to_text``), ``--relocate``
points it at the folder's new place (the recipes do this themselves).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_gdps.data import features as F
from fairseq_gdps.process_pool import parallel_map
from fairseq_gdps.data.manifest import (
    LANG_CODE_HELP,
    SPECAUGMENT_POLICIES,
    ZIP_NAME,
    BadLine,
    FeatureZipWriter,
    PrepError,
    Row,
    Staging,
    config_yaml_text,
    find_duplicate_ids,
    is_language_code,
    manifest_text,
    read_corpus_tsv,
    relocate_config,
    skipped_text,
    train_spm,
    zip_entry_offsets,
)

FORMAT_VERSION = 1
PREP_JSON = "prep.json"


def _warn(msg: str) -> None:
    print(f"gdps-prep: warning: {msg}", file=sys.stderr, flush=True)


def _extract_task(task: Tuple[int, str, Optional[float]]):
    """Worker: (index, audio path, declared duration) -> (index, npy bytes, frames, error)."""
    idx, path, duration = task
    try:
        feats = F.extract_file(path, declared_duration=duration)
        return idx, F.npy_bytes(feats), int(feats.shape[0]), None
    except F.AudioError as e:
        return idx, None, 0, str(e)
    except Exception as e:  # never kill the pool; report against the row
        return idx, None, 0, f"{path}: feature extraction failed: {type(e).__name__}: {e}"


def _fail(bad: List[BadLine], hint: bool = True) -> PrepError:
    bad = sorted(bad, key=lambda b: (b.file, b.line))
    msg = str(bad[0])
    if len(bad) > 1:
        more = bad[1:]
        where = ", ".join(f"{os.path.basename(b.file)}:{b.line}" for b in more[:5]) + (", ..." if len(more) > 5 else "")
        msg += f" (and {len(more)} more problem{'s' if len(more) > 1 else ''}: {where})"
    if hint:
        msg += "; use --skip-bad to skip bad lines"
    return PrepError(msg)


def _drop_unknown_languages(rows: List[Row], bad: List[BadLine], languages: Sequence[str]) -> List[Row]:
    """Move rows whose src_lang is not one of ``languages`` (--languages) to ``bad``."""
    kept = []
    for r in rows:
        if r.src_lang in languages:
            kept.append(r)
        else:
            bad.append(BadLine(r.file, r.line, f"unknown src_lang {r.src_lang!r} (--languages {','.join(languages)})"))
    return kept


def _unseen_language_warnings(rows: List[Row], train_tsv: str) -> List[str]:
    """One warning per (split, language) without training utterances: zero-shot evaluation is
    possible with the stock task, but speech_to_text_gdps takes its language ids from the train
    manifest and refuses such a split unless --gdps-languages names the language."""
    train_langs = {r.src_lang for r in rows if r.split == "train"}
    first: Dict[Tuple[str, str], Row] = {}
    count: Dict[Tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r.src_lang not in train_langs:
            first.setdefault((r.split, r.src_lang), r)
            count[r.split, r.src_lang] += 1
    return [f"{r.where}: src_lang {lang!r} ({count[split, lang]} line(s) of {split}) has no utterance in "
            f"{train_tsv}; speech_to_text_gdps refuses it unless --gdps-languages names it"
            for (split, lang), r in sorted(first.items())]


def prepare(
    corpus: str,
    out: str,
    vocab_size: int = 256,
    jobs: int = 2,
    tgt_lang: str = "en",
    splits: Sequence[str] = ("train", "dev", "test"),
    skip_bad: bool = False,
    specaugment: Optional[str] = None,
    audio_root: Optional[str] = None,
    quiet: bool = False,
    languages: Optional[Sequence[str]] = None,
) -> Dict:
    """Run the whole preparation; returns the prep.json content.  Raises PrepError.
    ``languages``: the source languages expected (--languages); a line in another is bad."""
    t0 = time.time()
    if not os.path.isdir(corpus):
        raise PrepError(f"--corpus {corpus}: folder not found")
    if vocab_size < 8:
        raise PrepError(f"--vocab-size must be at least 8, got {vocab_size}")
    if jobs < 1:
        raise PrepError(f"--jobs must be at least 1, got {jobs}")
    if "train" not in splits:
        raise PrepError("--splits must include train (the SentencePiece model is trained on it)")
    for split in splits:
        if not is_language_code(split):  # the same shape: it names files, <split>_<lang>.tsv among them
            raise PrepError(f"--splits: invalid split name {split!r} (letters, digits, '_' or '-')")
    if len(set(splits)) != len(splits):
        raise PrepError(f"--splits names a split twice: {','.join(splits)}")
    if not is_language_code(tgt_lang):
        raise PrepError(f"--tgt-lang: invalid language code {tgt_lang!r} ({LANG_CODE_HELP})")
    if languages is not None:
        languages = list(languages)
        bad_codes = [l for l in languages if not is_language_code(l)]
        if bad_codes or not languages:
            raise PrepError(f"--languages: invalid language code(s) {bad_codes} ({LANG_CODE_HELP})" if bad_codes
                            else "--languages: no language given")
        if len(set(languages)) != len(languages):
            raise PrepError(f"--languages names a language twice: {','.join(languages)}")
    if os.path.realpath(out) == os.path.realpath(corpus):
        raise PrepError(f"{out}: output folder must differ from the corpus folder (manifests would overwrite its TSVs)")
    out_abs = os.path.abspath(out)
    if audio_root is None:
        audio_root = out_abs
    warnings: List[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        _warn(msg)

    # ---- 1. read and validate the TSVs
    rows: List[Row] = []
    bad: List[BadLine] = []
    present: List[str] = []
    for split in splits:
        path = os.path.join(corpus, f"{split}.tsv")
        if not os.path.isfile(path):
            if split == "train":
                raise PrepError(f"{path}: not found (train.tsv is required)")
            warn(f"{path}: not found; split {split!r} skipped")
            continue
        present.append(split)
        r, b = read_corpus_tsv(path, split, corpus, default_tgt_lang=tgt_lang)
        rows += r
        bad += b
    for row, b in find_duplicate_ids(rows):
        bad.append(b)
    dup_rows = {id(r) for r, _ in find_duplicate_ids(rows)}
    rows = [r for r in rows if id(r) not in dup_rows]
    if languages is not None:
        rows = _drop_unknown_languages(rows, bad, languages)
    if bad and not skip_bad:
        raise _fail(bad)

    created_out = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise PrepError(f"--out {out}: cannot create the output folder ({e.strerror or e})") from None
    staging = Staging(out)
    try:
        # ---- 2. features -> fbank80.zip (sorted by id, streamed)
        order = sorted(range(len(rows)), key=lambda i: rows[i].id)
        tasks = [(i, rows[i].audio_path, rows[i].duration) for i in order]
        zip_tmp = staging.path(ZIP_NAME)
        ok = [False] * len(rows)
        t1 = time.time()
        from tqdm import tqdm

        with FeatureZipWriter(zip_tmp) as zw, tqdm(
            total=len(tasks), unit="utt", desc="fbank80", disable=quiet, file=sys.stderr,
            mininterval=0.1 if sys.stderr.isatty() else 5.0,
        ) as bar, parallel_map(_extract_task, tasks, jobs) as results:
            for idx, npy, n, err in results:
                row = rows[idx]
                bar.update(1)
                if err is not None:
                    b = BadLine(row.file, row.line, f"{err} (utterance {row.id})")
                    if not skip_bad:
                        raise _fail([b])
                    bad.append(b)
                    continue
                zw.add(row.id, npy)
                row.n_frames = n
                ok[idx] = True
        t_feat = time.time() - t1
        rows = [r for i, r in enumerate(rows) if ok[i]]
        train_tsv = os.path.join(corpus, "train.tsv")
        for w in _unseen_language_warnings(rows, train_tsv):
            warn(w)
        offsets = zip_entry_offsets(zip_tmp)
        for r in rows:
            off, size = offsets[r.id]
            r.zip_ptr = f"{ZIP_NAME}:{off}:{size}"

        by_split: Dict[str, List[Row]] = defaultdict(list)
        for r in rows:
            by_split[r.split].append(r)
        for split in by_split:
            by_split[split].sort(key=lambda r: r.line)  # input order
        if not by_split["train"]:
            raise PrepError(f"{os.path.join(corpus, 'train.tsv')}: no usable training utterances")

        # ---- 3. SentencePiece on the train targets
        spm = train_spm([r.tgt_text for r in by_split["train"]], vocab_size)
        for w in spm.warnings:
            warn(w)
        prefix = f"spm_unigram{vocab_size}"
        staging.write_bytes(f"{prefix}.model", spm.model)
        staging.write_text(f"{prefix}.vocab", spm.vocab_text)
        staging.write_text(f"{prefix}.txt", spm.dict_text)

        # ---- 4. manifests, config, report
        counts: Dict[str, Dict] = {}
        languages = sorted({r.src_lang for r in rows})
        for split in present:
            srows = by_split.get(split, [])
            if not srows:
                warn(f"split {split!r} has no usable utterances; {split}.tsv is empty (fairseq will refuse it)")
            staging.write_text(f"{split}.tsv", manifest_text(srows))
            per_lang = defaultdict(list)
            for r in srows:
                per_lang[r.src_lang].append(r)
            for lang in sorted(per_lang):
                staging.write_text(f"{split}_{lang}.tsv", manifest_text(per_lang[lang]))
            n_bad = sum(1 for b in bad if b.file == os.path.join(corpus, f"{split}.tsv"))
            frames = sum(r.n_frames for r in srows)
            counts[split] = {
                "utterances": len(srows),
                "skipped": n_bad,
                "frames": frames,
                "hours": round(frames / 100 / 3600, 4),
                "per_lang": {lang: len(per_lang[lang]) for lang in sorted(per_lang)},
            }
        staging.write_text(
            "config.yaml",
            config_yaml_text(f"{prefix}.model", f"{prefix}.txt", audio_root=audio_root, specaugment=specaugment),
        )
        if skip_bad:
            staging.write_text("skipped.tsv", skipped_text(bad))
        files = sorted(set(staging.names) | {PREP_JSON})
        try:
            from importlib.metadata import version

            pkg_version = version("fairseq-gdps")
        except Exception:
            pkg_version = "unknown"
        report = {
            "tool": "gdps-prep",
            "format_version": FORMAT_VERSION,
            "package_version": pkg_version,
            "corpus": os.path.abspath(corpus),
            "settings": {
                "features": {
                    "type": "kaldi_fbank",
                    "num_mel_bins": F.NUM_MEL_BINS,
                    "sample_rate": F.SAMPLE_RATE,
                    "frame_length_ms": F.FRAME_LENGTH_MS,
                    "frame_shift_ms": F.FRAME_SHIFT_MS,
                    "window": "povey",
                    "dither": 0.0,
                    "preemphasis": 0.97,
                    "waveform_scale": 2**15,
                    "library": "kaldi-native-fbank",
                },
                "vocab_size_requested": vocab_size,
                "vocab_size": spm.vocab_size,
                "spm_model_type": "unigram",
                "tgt_lang": tgt_lang,
                "splits": list(splits),
                "expected_languages": languages,
                "specaugment": specaugment or "none",
                "audio_root": audio_root,
                "skip_bad": skip_bad,
            },
            "languages": languages,
            "counts": counts,
            "skipped": len(bad),
            "files": files,
            "warnings": warnings,
        }
        staging.write_text(PREP_JSON, json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

        # ---- 5. move into place (prep.json last), drop stale outputs of a previous run
        stale = _previous_files(out) - set(files)
        staging.commit(last=[PREP_JSON])
    except BaseException:
        staging.abort()
        if created_out and not os.listdir(out):  # a failed first run leaves no trace
            os.rmdir(out)
        raise
    for name in sorted(stale):
        p = os.path.join(out, name)
        if os.path.isfile(p):
            os.remove(p)
    if not quiet:
        n = len(rows)
        split_summary = ", ".join(f"{s} {counts[s]['utterances']}" for s in present)
        print(
            f"gdps-prep: {n} utterances ({split_summary}), "
            f"{len(languages)} languages, vocab {spm.vocab_size}, skipped {len(bad)}; "
            f"features {t_feat:.1f}s, total {time.time() - t0:.1f}s -> {out}",
            file=sys.stderr,
        )
    return report


def _previous_files(out: str) -> set:
    try:
        with open(os.path.join(out, PREP_JSON), encoding="utf-8") as f:
            old = json.load(f)
        names = old.get("files", []) if old.get("tool") == "gdps-prep" else []
        return {n for n in names if isinstance(n, str) and n and os.path.basename(n) == n and not n.startswith(".")}
    except (OSError, ValueError, AttributeError):
        return set()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gdps-prep",
        description="Prepare a speech translation corpus (TSVs + 16 kHz mono wavs) as a fairseq S2T data folder.",
    )
    p.add_argument("--corpus", help="folder with {train,dev,test}.tsv (audio paths relative to it); required "
                   "unless --relocate")
    p.add_argument("--out", required=True, help="output data folder (fairseq --data)")
    p.add_argument("--vocab-size", type=int, default=256,
                   help="SentencePiece unigram vocabulary size (lowered with a warning if the targets cannot "
                        "support it; default 256)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="feature extraction processes (default 2)")
    p.add_argument("--tgt-lang", default="en", help="target language when the TSV has no tgt_lang column (default en)")
    p.add_argument("--splits", default="train,dev,test", help="comma-separated split names (default train,dev,test)")
    p.add_argument("--specaugment", default="none", choices=["none"] + sorted(SPECAUGMENT_POLICIES),
                   help="SpecAugment policy for the '_train' transforms (default none)")
    p.add_argument("--audio-root", default=None,
                   help="config.yaml audio_root, the folder stock fairseq reads the manifests' audio from "
                        "(default: absolute path of --out; '' leaves it out, then stock fairseq must run "
                        "from the data folder)")
    p.add_argument("--relocate", action="store_true",
                   help="instead of preparing: after moving the data folder --out, point its config.yaml "
                        "audio_root at the new place when the old one no longer exists (stock fairseq needs "
                        "it; speech_to_text_gdps reads a moved folder without it)")
    p.add_argument("--languages", default=None, metavar="LANGS",
                   help="comma-separated source languages the corpus may hold; a line in any other is "
                        "bad (default: accept every well-formed code)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad lines and list them in skipped.tsv instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _relocate(out: str, quiet: bool) -> int:
    try:
        root = relocate_config(out)
    except PrepError as e:
        print(f"gdps-prep: error: --relocate: {e}", file=sys.stderr)
        return 1
    if not quiet:
        done = f"audio_root is now {root}" if root else "audio_root unchanged (it names an existing folder, or none is set)"
        print(f"gdps-prep: {os.path.join(out, 'config.yaml')}: {done}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.relocate:
        if args.corpus is not None:
            parser.error("--relocate takes only --out (the data folder); --corpus prepares a new one")
        return _relocate(args.out, args.quiet)
    if args.corpus is None:
        parser.error("the following arguments are required: --corpus")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        prepare(
            corpus=args.corpus,
            out=args.out,
            vocab_size=args.vocab_size,
            jobs=args.jobs,
            tgt_lang=args.tgt_lang,
            splits=splits,
            skip_bad=args.skip_bad,
            specaugment=None if args.specaugment == "none" else args.specaugment,
            audio_root=args.audio_root,
            quiet=args.quiet,
            languages=None if args.languages is None else [l.strip() for l in args.languages.split(",") if l.strip()],
        )
    except PrepError as e:
        print(f"gdps-prep: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
