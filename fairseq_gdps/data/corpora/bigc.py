"""Bemba-English: BIG-C (Sikasote et al., ACL 2023), the bem-eng data of IWSLT 2023-2025.

Layout followed (github.com/csikasote/bigc, ``data/bem``)::

    bem/splits/{train,valid,test}.tsv     header: pair_id image sentence_id image_id audio_id sentence
                                          translation speaker_id gender duration sample_rate ...
    bem/splits/{train,valid,test}.jsonl   the same rows as JSON lines: audio_id, bem_transcription,
                                          en_translation, speaker_id, duration, ...
    bem/audio/<audio_id>                  one 16 kHz wav per utterance

Assumed: ``valid`` is the dev split (``dev`` is accepted too); a split's ``.tsv`` is used when it
exists, else its ``.jsonl``; the TSV may quote fields the way pandas writes them (csv quoting is
honoured); an ``audio_id`` that is missing on disk is also looked up with a second ``.wav``
appended (early snapshots of the repository hold ``*.wav.wav`` files); the id is the language code
plus ``audio_id`` without its extension; ``speaker_id`` is kept as the speaker.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from fairseq_gdps.data.corpora.segments import Segment, read_delimited, read_lines, require_dir
from fairseq_gdps.data.manifest import BadLine, PrepError

SPLIT_FILES = (("train", ("train",)), ("dev", ("valid", "dev")), ("test", ("test",)))
# (field in the TSV, field in the JSONL)
AUDIO, SOURCE, TARGET, SPEAKER = ("audio_id", "audio_id"), ("sentence", "bem_transcription"), \
    ("translation", "en_translation"), ("speaker_id", "speaker_id")


def _audio_path(audio_dir: str, audio_id: str) -> str:
    path = os.path.join(audio_dir, audio_id)
    if not os.path.isfile(path) and os.path.isfile(path + ".wav"):
        return path + ".wav"
    return path


def _stem(audio_id: str) -> str:
    base = os.path.basename(audio_id)
    while os.path.splitext(base)[1].lower() in (".wav", ".flac"):
        base = os.path.splitext(base)[0]
    return base


def _rows(path: str) -> List[Tuple[int, dict]]:
    """(line, record) of a split file, with the TSV's column names."""
    if path.endswith(".jsonl"):
        out = []
        for n, text in read_lines(path):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except ValueError as e:
                raise PrepError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise PrepError(f"{path}:{n}: expected a JSON object")
            out.append((n, {tsv: rec.get(js) for tsv, js in (AUDIO, SOURCE, TARGET, SPEAKER)}))
        return out
    header, rows = read_delimited(path, "\t", quoting=True)
    missing = [c for c in (AUDIO[0], TARGET[0]) if c not in header]
    if missing:
        raise PrepError(f"{path}:1: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")
    col = {h: i for i, h in enumerate(header)}
    out = []
    for n, fields in rows:
        if len(fields) != len(header):
            out.append((n, {"_bad": f"{len(fields)} fields, header has {len(header)}"}))
            continue
        out.append((n, {c: fields[col[c]] for c in (AUDIO[0], SOURCE[0], TARGET[0], SPEAKER[0]) if c in col}))
    return out


def read_bigc(
    root: str,
    lang: str = "bem",
    splits_dir: Optional[str] = None,
    audio_dir: Optional[str] = None,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of a BIG-C release folder (``data/bem``); returns (segments, bad lines, warnings)."""
    splits_dir = require_dir(splits_dir or os.path.join(root, "splits"), "BIG-C splits folder")
    audio_dir = require_dir(audio_dir or os.path.join(root, "audio"), "BIG-C audio folder")
    segments: List[Segment] = []
    bad: List[BadLine] = []
    warnings: List[str] = []
    for split, names in SPLIT_FILES:
        candidates = [os.path.join(splits_dir, f"{name}.{ext}") for name in names for ext in ("tsv", "jsonl")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            if split == "train":
                raise PrepError(f"{splits_dir}: no train.tsv or train.jsonl")
            warnings.append(f"{splits_dir}: no {' / '.join(names)} split file; no {split} split")
            continue
        for n, rec in _rows(path):
            if "_bad" in rec:
                bad.append(BadLine(path, n, rec["_bad"]))
                continue
            audio_id = str(rec.get(AUDIO[0]) or "").strip()
            if not audio_id:
                bad.append(BadLine(path, n, "empty audio_id"))
                continue
            speaker = rec.get(SPEAKER[0])
            segments.append(Segment(
                split=split, uid=f"{lang}_{_stem(audio_id)}", lang=lang, audio=_audio_path(audio_dir, audio_id),
                tgt_text=str(rec.get(TARGET[0]) or ""), src_text=str(rec.get(SOURCE[0]) or ""),
                speaker="" if speaker is None else str(speaker), file=path, line=n,
            ))
    return segments, bad, warnings
