"""Generic layouts: any delimited table with named columns, and Kaldi / ESPnet data folders.

**Table** (``read_table``): one file per split with a header; flags name the columns holding the
audio path (required), the translation (required) and optionally the id, source text, speaker,
and start/end times in seconds (then segments are cut from longer recordings).  Relative audio
paths are resolved against ``audio_root`` (default: the table's folder).  Without an id column the
id is the audio file's name (plus the start time in ms when times are given).

**Kaldi folder** (``read_kaldi``), one per split, as written by Kaldi/ESPnet ``data/<set>`` recipes
(e.g. ESPnet ``egs2/iwslt22_dialect/st1``)::

    wav.scp        <recording-id> <audio path>           (required; pipes "cmd |" are not supported)
    segments       <utt-id> <recording-id> <start> <end> (optional; end -1 = to the end; without it
                                                          every recording is one utterance)
    text           <utt-id> <source transcript>          (optional)
    utt2spk        <utt-id> <speaker>                    (optional)
    <translations> <utt-id> <translation>                (required; default text.en, ESPnet uses
                                                          e.g. text.tc.en or text.lc.rm.en)

Ids that a file names but ``segments``/``wav.scp`` do not define are errors (naming file:line),
as are utterances without a translation.  Relative wav.scp paths are resolved against
``audio_root`` (default: the working directory, as Kaldi does).  The id is the language code plus
the Kaldi utterance id.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from fairseq_gdps.data.corpora.segments import Segment, parse_time, read_delimited, read_lines, require_dir
from fairseq_gdps.data.manifest import BadLine, PrepError


def read_table(
    files: Dict[str, str],
    lang: str,
    audio_col: str,
    tgt_col: str,
    id_col: Optional[str] = None,
    src_text_col: Optional[str] = None,
    speaker_col: Optional[str] = None,
    start_col: Optional[str] = None,
    end_col: Optional[str] = None,
    audio_root: Optional[str] = None,
    delimiter: str = "\t",
    quoting: bool = False,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of one table per split ({split: path}); returns (segments, bad lines, warnings)."""
    if (start_col is None) != (end_col is None):
        raise PrepError("--start-col and --end-col go together")
    if "train" not in files:
        raise PrepError("a train table is required (--train)")
    segments: List[Segment] = []
    bad: List[BadLine] = []
    for split, path in files.items():
        if not os.path.isfile(path):
            raise PrepError(f"{path}: {split} table not found")
        header, rows = read_delimited(path, delimiter, quoting)
        wanted = {"audio": audio_col, "translation": tgt_col, "id": id_col, "source text": src_text_col,
                  "speaker": speaker_col, "start": start_col, "end": end_col}
        missing = [f"{c!r} ({what})" for what, c in wanted.items() if c is not None and c not in header]
        if missing:
            raise PrepError(f"{path}:1: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")
        col = {h: i for i, h in enumerate(header)}
        base = audio_root or os.path.dirname(os.path.abspath(path))
        for n, fields in rows:
            if len(fields) != len(header):
                bad.append(BadLine(path, n, f"{len(fields)} fields, header has {len(header)}"))
                continue

            def get(c: Optional[str]) -> str:
                return fields[col[c]].strip() if c is not None else ""

            audio = get(audio_col)
            if not audio:
                bad.append(BadLine(path, n, "empty audio path"))
                continue
            start = end = None
            if start_col is not None:
                try:
                    start = parse_time(get(start_col), "start time")
                    end = parse_time(get(end_col), "end time")
                except ValueError as e:
                    bad.append(BadLine(path, n, str(e)))
                    continue
            uid = get(id_col)
            if not uid:
                uid = os.path.splitext(os.path.basename(audio))[0]
                if start is not None:
                    uid += f"_{int(round(start * 1000)):08d}"
            segments.append(Segment(
                split=split, uid=f"{lang}_{uid}", lang=lang, audio=os.path.join(base, audio), tgt_text=get(tgt_col),
                src_text=get(src_text_col), speaker=get(speaker_col), file=path, line=n, start=start, end=end,
            ))
    return segments, bad, []


def _kv_file(path: str) -> List[Tuple[int, str, str]]:
    """(line, key, rest) of a Kaldi '<key> <value...>' file (value may be empty)."""
    out = []
    for n, text in read_lines(path):
        if not text.strip():
            continue
        parts = text.strip().split(None, 1)
        out.append((n, parts[0], parts[1] if len(parts) > 1 else ""))
    return out


def read_kaldi(
    dirs: Dict[str, str],
    lang: str,
    translations: str = "text.en",
    audio_root: Optional[str] = None,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of one Kaldi data folder per split ({split: folder})."""
    if "train" not in dirs:
        raise PrepError("a train data folder is required (--train)")
    segments: List[Segment] = []
    bad: List[BadLine] = []
    warnings: List[str] = []
    base = audio_root or os.getcwd()
    for split, d in dirs.items():
        require_dir(d, f"{split} data folder")
        wav_scp = os.path.join(d, "wav.scp")
        if not os.path.isfile(wav_scp):
            raise PrepError(f"{wav_scp}: not found (a Kaldi data folder needs wav.scp)")
        tl_path = os.path.join(d, translations)
        if not os.path.isfile(tl_path):
            raise PrepError(f"{tl_path}: translations file not found (set --translations)")
        recordings: Dict[str, str] = {}
        broken = set()  # recordings already reported: their segments and texts are not reported again
        for n, rec, path in _kv_file(wav_scp):
            if path.endswith("|"):
                broken.add(rec)
                bad.append(BadLine(wav_scp, n, f"recording {rec}: pipe commands are not supported; "
                                               "convert the audio to files first (e.g. sph2pipe -f wav)"))
                continue
            if not path:
                broken.add(rec)
                bad.append(BadLine(wav_scp, n, f"recording {rec}: no audio path"))
                continue
            if rec in recordings:
                bad.append(BadLine(wav_scp, n, f"duplicate recording id {rec}"))
                continue
            recordings[rec] = os.path.join(base, path)
        # utt-id -> (recording, start, end, file, line)
        utts: Dict[str, Tuple[str, Optional[float], Optional[float], str, int]] = {}
        dropped = set()
        seg_path = os.path.join(d, "segments")
        if os.path.isfile(seg_path):
            for n, utt, rest in _kv_file(seg_path):
                parts = rest.split()
                if len(parts) != 3:
                    bad.append(BadLine(seg_path, n, "expected '<utt-id> <recording-id> <start> <end>'"))
                    continue
                rec = parts[0]
                if rec in broken:
                    dropped.add(utt)
                    continue
                if rec not in recordings:
                    bad.append(BadLine(seg_path, n, f"unknown recording id {rec} (not in {wav_scp})"))
                    continue
                try:
                    start = parse_time(parts[1], "start time")
                    end = None if parts[2].strip() == "-1" else parse_time(parts[2], "end time")
                except ValueError as e:
                    bad.append(BadLine(seg_path, n, str(e)))
                    continue
                if utt in utts:
                    bad.append(BadLine(seg_path, n, f"duplicate utterance id {utt}"))
                    continue
                utts[utt] = (rec, start, end, seg_path, n)
        else:
            for n, rec, _ in _kv_file(wav_scp):
                if rec in recordings:
                    utts[rec] = (rec, None, None, wav_scp, n)
            dropped |= broken

        def by_utt(name: str) -> Dict[str, str]:
            path = os.path.join(d, name)
            out: Dict[str, str] = {}
            if not os.path.isfile(path):
                return out
            for n, utt, value in _kv_file(path):
                if utt in dropped:
                    continue
                if utt not in utts:
                    bad.append(BadLine(path, n, f"unknown utterance id {utt} (not in {os.path.basename(utts_file)})"))
                    continue
                out[utt] = value
            return out

        utts_file = seg_path if os.path.isfile(seg_path) else wav_scp
        targets = by_utt(translations)
        sources = by_utt("text") if translations != "text" else {}
        speakers = by_utt("utt2spk")
        for utt, (rec, start, end, path, n) in utts.items():
            if utt not in targets:
                bad.append(BadLine(path, n, f"utterance {utt} has no translation in {tl_path}"))
                continue
            segments.append(Segment(
                split=split, uid=f"{lang}_{utt}", lang=lang, audio=recordings[rec], tgt_text=targets[utt],
                src_text=sources.get(utt, ""), speaker=speakers.get(utt, ""), file=path, line=n, start=start, end=end,
            ))
    return segments, bad, warnings
