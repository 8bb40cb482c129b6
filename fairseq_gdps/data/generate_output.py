"""Read fairseq-generate output and pair each hypothesis with its manifest row."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ManifestRow:
    id: str
    src_lang: str
    tgt_text: str
    src_text: str = ""  # the transcript, when the manifest has one (COMET uses it as the source)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a fairseq S2T manifest, in file order (fairseq's sample index = row number)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"id", "tgt_text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest header lacks column(s) {sorted(missing)}")
        return [ManifestRow(r["id"], r.get("src_lang") or "", r["tgt_text"], r.get("src_text") or "") for r in reader]


def read_hypotheses(path: str | Path) -> dict[int, str]:
    """Detokenised hypotheses (``D-<index>`` lines) of a fairseq-generate log, by sample index."""
    path = Path(path)
    hyps: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.startswith("D-"):
                continue
            head, _score, *text = line.rstrip("\n").split("\t")
            index = int(head[2:])
            if index in hyps:
                raise ValueError(f"{path}:{line_no}: second hypothesis for sample {index}")
            hyps[index] = text[0] if text else ""
    return hyps


def pair_with_manifest(manifest: list[ManifestRow], hyps: dict[int, str], *, where: str) -> list[tuple[ManifestRow, str]]:
    """Every manifest row must have exactly one hypothesis: fairseq-fixed silently drops a
    final partial batch unless --required-batch-size-multiple 1 is given."""
    missing = [i for i in range(len(manifest)) if i not in hyps]
    extra = sorted(set(hyps) - set(range(len(manifest))))
    if missing or extra:
        raise ValueError(
            f"{where}: {len(hyps)} hypotheses for {len(manifest)} manifest rows; "
            f"missing sample indices {missing[:10]}{'...' if len(missing) > 10 else ''}"
            f"{f', unknown indices {extra[:10]}' if extra else ''}. "
            "Was fairseq-generate run with --required-batch-size-multiple 1?"
        )
    return [(row, hyps[i]) for i, row in enumerate(manifest)]
