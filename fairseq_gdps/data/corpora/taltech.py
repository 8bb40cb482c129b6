"""Estonian-English: the IWSLT 2025 low-resource track release (TalTech).

Layout followed (github.com/taltechnlp/iwslt2025_est2eng_data, README; audio from
``iwslt2025_est2eng_data_audio.tar``)::

    ROOT/train.tsv   header "audio<TAB>Estonian<TAB>English", then one utterance per line
    ROOT/dev.tsv     same
    ROOT/audio/<recording>/<recording>_<index>_<start>_<end>.flac   one file per utterance

Assumed: fields hold no tabs and no quoting (the README's example is plain tab-separated text);
column names are matched case-insensitively; the test set (released separately, later) is any
TSV in the same format given as ``test_tsv`` (or ``ROOT/test.tsv``); the id is the language code
plus the audio file name without extension; there are no speaker labels.  The training
translations are machine translations (Google Translate, per the track page); dev is human.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from fairseq_gdps.data.corpora.segments import Segment, read_delimited, require_dir
from fairseq_gdps.data.manifest import BadLine, PrepError

COLUMNS = ("audio", "estonian", "english")


def read_taltech(
    root: str,
    lang: str = "et",
    audio_dir: Optional[str] = None,
    test_tsv: Optional[str] = None,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of the TalTech release; returns (segments, bad lines, warnings)."""
    require_dir(root, "release folder")
    audio_dir = require_dir(audio_dir or os.path.join(root, "audio"), "audio folder (unpack iwslt2025_est2eng_data_audio.tar)")
    files = {"train": os.path.join(root, "train.tsv"), "dev": os.path.join(root, "dev.tsv"),
             "test": test_tsv or os.path.join(root, "test.tsv")}
    segments: List[Segment] = []
    bad: List[BadLine] = []
    warnings: List[str] = []
    for split, path in files.items():
        if not os.path.isfile(path):
            if split == "train" or (split == "test" and test_tsv):
                raise PrepError(f"{path}: not found")
            warnings.append(f"{path}: not found; no {split} split")
            continue
        header, rows = read_delimited(path, "\t")
        lower = [h.lower() for h in header]
        missing = [c for c in COLUMNS if c not in lower]
        if missing:
            raise PrepError(f"{path}:1: missing column(s) {', '.join(missing)} "
                            f"(header has: {', '.join(header)}; expected audio, Estonian, English)")
        col = {c: lower.index(c) for c in COLUMNS}
        for n, fields in rows:
            if len(fields) != len(header):
                bad.append(BadLine(path, n, f"{len(fields)} fields, header has {len(header)}"))
                continue
            audio = fields[col["audio"]].strip()
            if not audio:
                bad.append(BadLine(path, n, "empty audio path"))
                continue
            stem = os.path.splitext(os.path.basename(audio))[0]
            segments.append(Segment(
                split=split, uid=f"{lang}_{stem}", lang=lang, audio=os.path.join(audio_dir, audio),
                tgt_text=fields[col["english"]], src_text=fields[col["estonian"]], file=path, line=n,
            ))
    return segments, bad, warnings
