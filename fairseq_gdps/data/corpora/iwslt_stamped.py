"""IWSLT low-resource track releases with ``stamped.tsv`` + ``txt/`` (Irish-English, IWSLT 2023-2025).

Layout followed (github.com/shashwatup9k/iwslt2023_ga-eng and iwslt2025_ga-eng; the same
``stamped.tsv`` convention as other low-resource-track releases)::

    ROOT[/data]/train/stamped.tsv        <wav path relative to the split folder><TAB><start><TAB><end>
    ROOT[/data]/train/txt/train.eng      English translation, line i = stamped.tsv line i
    ROOT[/data]/train/wav/*.wav
    ROOT[/data]/dev/...                  (txt/dev.eng)
    ROOT[/data]/test-2023/...            (txt/test.eng)
    ROOT[/data]/test-2024/, test-2025/   stamped.tsv + wav only: no translations

Assumed: ``stamped.tsv`` has no header; translations are the single ``txt/*.<tgt_ext>`` file of
the split folder (``eng``), source transcripts the single ``txt/*.<src_ext>`` file when one is
asked for (the Irish release has none); the test split is ``--test-dir`` or else the newest
``test*`` folder that has a translation file; times are in seconds and usually span the whole
per-utterance wav (start 0, end = its duration rounded to 10 ms, hence the end-time tolerance);
the id is the language code plus the wav's name, with the start time in ms added when one wav
holds several segments.
"""
from __future__ import annotations

import glob
import os
from collections import Counter
from typing import Dict, List, Optional, Tuple

from fairseq_gdps.data.corpora.segments import Segment, parse_time, read_lines, require_dir
from fairseq_gdps.data.manifest import BadLine, PrepError


def _single(folder: str, ext: str, required: bool) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, f"*.{ext}")))
    if len(found) > 1:
        raise PrepError(f"{folder}: {len(found)} *.{ext} files ({', '.join(map(os.path.basename, found))}); expected one")
    if not found:
        if required:
            raise PrepError(f"{folder}: no *.{ext} translation file")
        return None
    return found[0]


def _default_test_dir(root: str, tgt_ext: str) -> Optional[str]:
    """Newest ``test*`` folder with a translation file (test-2023 before test-2025's audio-only)."""
    names = sorted(d for d in os.listdir(root) if d.startswith("test") and os.path.isdir(os.path.join(root, d)))
    with_refs = [d for d in names if glob.glob(os.path.join(root, d, "txt", f"*.{tgt_ext}"))]
    return with_refs[-1] if with_refs else None


def read_stamped(
    root: str,
    lang: str = "ga",
    tgt_ext: str = "eng",
    src_ext: Optional[str] = None,
    split_dirs: Optional[Dict[str, Optional[str]]] = None,
) -> Tuple[List[Segment], List[BadLine], List[str]]:
    """Segments of a stamped.tsv release; returns (segments, bad lines, warnings).
    ``split_dirs``: our split -> folder name under root (None entries: auto for test, else skipped)."""
    require_dir(root, "release folder")
    if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "data", "train")):
        root = os.path.join(root, "data")  # the README's ga-eng-iwslt2023/data/... tree
    dirs = {"train": "train", "dev": "dev", "test": None}
    dirs.update(split_dirs or {})
    if dirs["test"] is None:
        dirs["test"] = _default_test_dir(root, tgt_ext)
    segments: List[Segment] = []
    bad: List[BadLine] = []
    warnings: List[str] = []
    for split in ("train", "dev", "test"):
        name = dirs.get(split)
        folder = os.path.join(root, name) if name else None
        if folder is None or not os.path.isdir(folder):
            if split == "train":
                raise PrepError(f"{folder or root}: train folder not found (expected ROOT/train/stamped.tsv)")
            warnings.append(f"{folder or root + '/test*'}: not found; no {split} split")
            continue
        stamped = os.path.join(folder, "stamped.tsv")
        if not os.path.isfile(stamped):
            raise PrepError(f"{stamped}: not found")
        tgt_path = _single(os.path.join(folder, "txt"), tgt_ext, required=True)
        src_path = _single(os.path.join(folder, "txt"), src_ext, required=False) if src_ext else None
        stamps = [(n, t) for n, t in read_lines(stamped) if t.strip()]
        targets = read_lines(tgt_path)
        sources = read_lines(src_path) if src_path else None
        if len(targets) != len(stamps):
            raise PrepError(f"{tgt_path}: {len(targets)} lines, but {stamped} has {len(stamps)} segments "
                            "(line i of the text must translate segment i)")
        if sources is not None and len(sources) != len(stamps):
            raise PrepError(f"{src_path}: {len(sources)} lines, but {stamped} has {len(stamps)} segments")
        parsed = []
        for n, text in stamps:
            fields = text.split("\t")
            if len(fields) != 3:
                bad.append(BadLine(stamped, n, f"{len(fields)} fields, expected 3 (wav, start, end)"))
                parsed.append(None)
                continue
            try:
                start = parse_time(fields[1].strip(), "start time")
                end = parse_time(fields[2].strip(), "end time")
            except ValueError as e:
                bad.append(BadLine(stamped, n, str(e)))
                parsed.append(None)
                continue
            parsed.append((n, fields[0].strip(), start, end))
        per_wav = Counter(p[1] for p in parsed if p)
        for k, p in enumerate(parsed):
            if p is None:
                continue
            n, wav, start, end = p
            stem = os.path.splitext(os.path.basename(wav))[0]
            uid = f"{lang}_{stem}" if per_wav[wav] == 1 else f"{lang}_{stem}_{int(round(start * 1000)):08d}"
            segments.append(Segment(
                split=split, uid=uid, lang=lang, audio=os.path.join(folder, wav), tgt_text=targets[k][1],
                src_text=sources[k][1] if sources else "", file=stamped, line=n, start=start, end=end,
            ))
    return segments, bad, warnings
