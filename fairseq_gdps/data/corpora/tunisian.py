"""Tunisian Arabic-English (IWSLT 2022 dialect track, reused by the 2023-2025 low-resource tracks).

Layout followed (LDC2022E01 as read by the organisers' scripts, github.com/kevinduh/iwslt22-dialect
``1_prepare_stm.py`` / ``2_subselect_stm_by_fileid.py``, and by lhotse's ``iwslt2022_dialect``
recipe)::

    LDC2022E01/data/audio/ta/<file_id>.sph          one conversation side per file (8 kHz telephone)
    LDC2022E01/data/transcripts/ta/<file_id>.tsv    start<TAB>end<TAB>speaker<TAB>Tunisian text
    LDC2022E01/data/translations/ta/<file_id>.tsv   start<TAB>end<TAB>speaker<TAB>English text
    SPLITS/{train,dev,test1}.file_id.txt            one file id per line (from kevinduh/iwslt22-dialect)
    SPLITS/exclude-utterance.txt                    optional: "<file_id> <start> <end>" to leave out

Assumed: only part of the transcribed audio is translated (about 210k of 398k lines), so the
translation files define the segments and the transcript line with the same file id and start time
(to the millisecond) gives the source text; ``test1`` becomes the ``test`` split; files whose name
starts with ``._`` (macOS resource forks) are ignored; ``.wav``/``.flac`` audio is accepted where
no ``.sph`` exists (converted copies).  The 8 kHz audio is resampled to 16 kHz when the segments
are cut.  With ``normalize`` (default) text is normalised as the organisers' ``*.norm.*`` STM files
that official scoring uses: English lower-cased without ( ) # + = ? ! ; . , " : and Arabic without
the O/ U/ M/ annotation tags and ? ! . and the Arabic question mark.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from fairseq_gdps.data.corpora.segments import Segment, parse_time, read_lines, require_dir
from fairseq_gdps.data.manifest import BadLine, PrepError

SPLIT_LISTS = (("train", "train"), ("dev", "dev"), ("test", "test1"))  # (our split, list name)
AUDIO_EXTENSIONS = (".sph", ".wav", ".flac")
_EN_DROP = re.compile(r"[()#+=?!;.,\":]")
_AR_DROP = re.compile(r"[OUM]+/*|\u061F|[?!.]")


def normalize_english(text: str) -> str:
    return _EN_DROP.sub("", text).lower()


def normalize_arabic(text: str) -> str:
    return _AR_DROP.sub("", text)


def _time_key(t: float) -> int:
    return int(round(t * 1000))


def _read_segment_file(path: str) -> Tuple[List[Tuple[int, float, float, str, str]], List[BadLine]]:
    """(line, start, end, speaker, text) of a transcript/translation TSV."""
    rows, bad = [], []
    for n, text in read_lines(path):
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != 4:
            bad.append(BadLine(path, n, f"{len(fields)} fields, expected 4 (start, end, speaker, text)"))
            continue
        try:
            start = parse_time(fields[0].strip(), "start time")
            end = parse_time(fields[1].strip(), "end time")
        except ValueError as e:
            bad.append(BadLine(path, n, str(e)))
            continue
        rows.append((n, start, end, fields[2].strip(), fields[3]))
    return rows, bad


def _find_audio(audio_dir: str, file_id: str) -> str:
    for ext in AUDIO_EXTENSIONS:
        p = os.path.join(audio_dir, file_id + ext)
        if os.path.isfile(p):
            return p
    return os.path.join(audio_dir, file_id + AUDIO_EXTENSIONS[0])


def read_tunisian(
    root: str,
    split_dir: str,
    lang: str = "aeb",
    normalize: bool = True,
    exclude_file: Optional[str] = None,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of LDC2022E01 by the official split lists; returns (segments, bad lines, warnings)."""
    data = os.path.join(root, "data")
    audio_dir = require_dir(os.path.join(data, "audio", "ta"), "LDC2022E01 audio folder (data/audio/ta)")
    tl_dir = require_dir(os.path.join(data, "translations", "ta"), "LDC2022E01 translations folder (data/translations/ta)")
    tr_dir = os.path.join(data, "transcripts", "ta")
    require_dir(split_dir, "split list folder (with train.file_id.txt, dev.file_id.txt, test1.file_id.txt)")
    warnings: List[str] = []
    if not os.path.isdir(tr_dir):
        warnings.append(f"{tr_dir}: not found; src_text left empty")
    exclude = set()
    exclude_file = exclude_file or os.path.join(split_dir, "exclude-utterance.txt")
    if os.path.isfile(exclude_file):
        for n, text in read_lines(exclude_file):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise PrepError(f"{exclude_file}:{n}: expected '<file_id> <start> <end>', got {text!r}")
            try:
                exclude.add((parts[0], _time_key(parse_time(parts[1], "start time"))))
            except ValueError as e:
                raise PrepError(f"{exclude_file}:{n}: {e}") from None

    segments: List[Segment] = []
    bad: List[BadLine] = []
    listed: Dict[str, str] = {}
    n_excluded = 0
    for split, list_name in SPLIT_LISTS:
        list_path = os.path.join(split_dir, f"{list_name}.file_id.txt")
        if not os.path.isfile(list_path):
            if split == "train":
                raise PrepError(f"{list_path}: not found (the official split lists come from "
                                "github.com/kevinduh/iwslt22-dialect)")
            warnings.append(f"{list_path}: not found; no {split} split")
            continue
        for n, file_id in read_lines(list_path):
            file_id = file_id.strip()
            if not file_id:
                continue
            if file_id in listed:
                bad.append(BadLine(list_path, n, f"file id {file_id} already listed ({listed[file_id]})"))
                continue
            listed[file_id] = f"{list_path}:{n}"
            tl_path = os.path.join(tl_dir, f"{file_id}.tsv")
            if not os.path.isfile(tl_path):
                bad.append(BadLine(list_path, n, f"unknown file id {file_id}: {tl_path} not found"))
                continue
            rows, b = _read_segment_file(tl_path)
            bad += b
            sources: Dict[int, str] = {}
            tr_path = os.path.join(tr_dir, f"{file_id}.tsv")
            if os.path.isfile(tr_path):
                tr_rows, b = _read_segment_file(tr_path)
                bad += b
                sources = {_time_key(start): text for _, start, _, _, text in tr_rows}
            audio = _find_audio(audio_dir, file_id)
            for line, start, end, speaker, text in rows:
                key = _time_key(start)
                if (file_id, key) in exclude:
                    n_excluded += 1
                    continue
                src = sources.get(key, "")
                segments.append(Segment(
                    split=split, uid=f"{lang}_{file_id}_{key:08d}", lang=lang, audio=audio,
                    tgt_text=normalize_english(text) if normalize else text,
                    src_text=normalize_arabic(src) if normalize else src,
                    speaker=speaker or file_id, file=tl_path, line=line, start=start, end=end,
                ))
    unlisted = sorted(f[:-4] for f in os.listdir(tl_dir)
                      if f.endswith(".tsv") and not f.startswith("._") and f[:-4] not in listed)
    if unlisted:
        warnings.append(f"{len(unlisted)} translation file(s) in no split list were left out (e.g. {unlisted[0]})")
    if n_excluded:
        warnings.append(f"{n_excluded} segment(s) left out by {exclude_file}")
    return segments, bad, warnings
