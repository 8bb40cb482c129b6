"""A raw-waveform data folder for wav2vec 2.0 / XLS-R models (``--arch xm_transformer_gdps``),
made from a ``gdps-prep`` data folder and the corpus it was prepared from.

fairseq-fixed 0.12.3.1 cannot read ``.wav`` / ``.flac`` manifest entries without torchaudio:
``audio_utils.get_waveform`` reads the file with soundfile, then calls ``convert_waveform``, which
imports ``torchaudio.sox_effects`` before it checks whether any conversion is needed, so every
read raises ``ImportError: Please install torchaudio``. It reads a ``.npy`` entry of an uncompressed
zip (``<zip>:<offset>:<length>``) as it is, waveform or features, without torchaudio. So the
waveforms (float32, 16 kHz mono, as soundfile reads them) are stored as ``<id>.npy`` in
``wav16k.zip``, exactly as ``gdps-prep`` stores filterbanks in ``fbank80.zip``.

Output: every manifest of the data folder (same rows and columns; ``audio`` points into
``wav16k.zip``, ``n_frames`` counts samples), the SentencePiece model and vocabulary, and a
``config.yaml`` with ``use_audio_input: true`` (``standardize_audio: true`` with ``standardize``:
zero mean, unit variance per utterance, what XLS-R and most wav2vec 2.0 models were pretrained on;
the model then needs ``--normalize``). Its ``audio_root`` is the output folder's absolute path, as
in a ``gdps-prep`` folder: stock fairseq needs it, speech_to_text_gdps reads a moved folder without
it, and ``gdps-prep --out OUT --relocate`` updates it after a move.

``python -m fairseq_gdps.data.waveform_data --data DATA --corpus CORPUS --out OUT [--standardize]``
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from fairseq_gdps.atomic import atomic_write
from fairseq_gdps.data.features import AudioError, npy_bytes, read_audio
from fairseq_gdps.data.manifest import FeatureZipWriter, read_manifest, zip_entry_offsets

WAVEFORM_ZIP = "wav16k.zip"


def _corpus_audio(corpus: Path) -> Dict[str, Path]:
    """{utterance id: audio file} over the corpus TSVs (audio paths are relative to the corpus)."""
    audio: Dict[str, Path] = {}
    for tsv in sorted(corpus.glob("*.tsv")):
        for row in read_manifest(str(tsv)):
            if row.get("id") and row.get("audio"):
                audio[row["id"]] = corpus / row["audio"]
    if not audio:
        raise ValueError(f"--corpus {corpus}: no TSV with id and audio columns")
    return audio


def _tsv_text(rows: List[Dict[str, str]], columns: Sequence[str]) -> str:
    return "".join("\t".join(r[c] for c in columns) + "\n" for r in [dict(zip(columns, columns)), *rows])


def prepare_waveform_data(data: str, corpus: str, out: str, standardize: bool = False) -> Dict[str, int]:
    """Write the waveform folder ``out``; returns {manifest file name: rows}. Raises ValueError
    (naming the file and line) for a manifest row whose audio the corpus lacks or cannot read."""
    data_dir, corpus_dir, out_dir = Path(data), Path(corpus), Path(out)
    if data_dir.resolve() == out_dir.resolve():
        raise ValueError(f"--out {out} must differ from --data (its manifests would be overwritten)")
    config_path = data_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"--data {data}: no config.yaml (a gdps-prep data folder is expected)")
    manifests = {p.name: read_manifest(str(p)) for p in sorted(data_dir.glob("*.tsv")) if p.name != "skipped.tsv"}
    if not manifests:
        raise ValueError(f"--data {data}: no manifest (*.tsv)")
    audio = _corpus_audio(corpus_dir)
    for name, rows in manifests.items():
        for line, row in enumerate(rows, start=2):
            if row["id"] not in audio:
                raise ValueError(f"{data_dir / name}:{line}: utterance {row['id']!r} is in no TSV of --corpus {corpus}")

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = sorted({row["id"] for rows in manifests.values() for row in rows})
    samples: Dict[str, int] = {}
    zip_path = out_dir / WAVEFORM_ZIP
    tmp_zip = out_dir / f".{WAVEFORM_ZIP}.tmp"
    try:
        with FeatureZipWriter(str(tmp_zip)) as writer:
            for uid in ids:
                try:
                    wav, info = read_audio(str(audio[uid]))
                except AudioError as e:
                    raise ValueError(f"utterance {uid}: {e}") from None
                samples[uid] = info.num_samples
                writer.add(uid, npy_bytes(wav))
        os.replace(tmp_zip, zip_path)
    finally:
        if tmp_zip.exists():
            tmp_zip.unlink()
    offsets = zip_entry_offsets(str(zip_path))

    counts = {}
    for name, rows in manifests.items():
        columns = list(rows[0]) if rows else ["id", "audio", "n_frames", "tgt_text"]
        new_rows = [dict(row, audio=f"{WAVEFORM_ZIP}:{offsets[row['id']][0]}:{offsets[row['id']][1]}",
                         n_frames=str(samples[row["id"]])) for row in rows]
        with atomic_write(out_dir / name) as f:
            f.write(_tsv_text(new_rows, columns))
        counts[name] = len(rows)

    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    for key in ("feature_transforms", "input_feat_per_channel", "input_channels", "specaugment"):
        config.pop(key, None)  # filterbank settings: fairseq ignores them on waveforms, with a warning
    config.update(use_audio_input=True, audio_root=str(out_dir.resolve()), standardize_audio=bool(standardize))
    for rel in (config.get("bpe_tokenizer", {}).get("sentencepiece_model"), config.get("vocab_filename")):
        if rel and (data_dir / rel).is_file():
            shutil.copyfile(data_dir / rel, out_dir / rel)
    with atomic_write(out_dir / "config.yaml") as f:
        yaml.safe_dump(config, f, sort_keys=True, allow_unicode=True)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="gdps-prep data folder (manifests, SentencePiece model, config.yaml)")
    p.add_argument("--corpus", required=True, help="the corpus folder it was prepared from ({split}.tsv, audio files)")
    p.add_argument("--out", required=True, help="output folder (fairseq --data)")
    p.add_argument("--standardize", action="store_true",
                   help="standardize_audio: true (zero mean, unit variance; for models pretrained with --normalize)")
    args = p.parse_args(argv)
    try:
        counts = prepare_waveform_data(args.data, args.corpus, args.out, standardize=args.standardize)
    except ValueError as e:
        p.exit(1, f"error: {e}\n")
    print(f"{args.out}: {WAVEFORM_ZIP}, {len(counts)} manifests ({counts.get('train.tsv', 0)} train utterances)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
