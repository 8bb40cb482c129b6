"""What a reader needs to tell whether two runs had the same inputs: sha256 of the corpus
(manifests and audio) and of the prepared data (features archive, manifests, SentencePiece
model), the versions of the software that makes and trains on them, and the CPU and thread
settings that change floating-point results.

    python -m fairseq_gdps.data.fingerprint --corpus CORPUS --data DATA [--train-threads N]
                                            [--json OUT.json] [--markdown]

Why each part matters, as measured on the demo (docs/benchmarks.md): the corpus and features are
byte-identical for a seed on one machine, but the audio is only as stable as espeak-ng and its
voice data; training on one thread is bit-identical run to run, but another thread count, or a
CPU with other vector instructions (torch picks AVX2 or AVX-512 kernels at run time), changes the
weights within a few updates, and the runs then drift apart.

Hashes of files whose bytes hold absolute paths (``config.yaml``, ``prep.json``) are left out:
they differ between two folders with the same data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from fairseq_gdps.atomic import file_sha256

SPLITS = ("train", "dev", "test")
# distributions whose versions shape the corpus, the features, the model or the scores
PACKAGES = ("torch", "fairseq-fixed", "numpy", "scipy", "sentencepiece", "kaldi-native-fbank", "sacrebleu",
            "babel", "unicode-rbnf", "num2words", "mishkal")


def sha256_tree(root, pattern: str = "*.wav") -> Tuple[str, int]:
    """One sha256 over every file matching ``pattern`` under ``root``: the sorted relative paths
    with each file's sha256 (so a renamed or changed file changes it). Returns (hash, files)."""
    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob(pattern) if p.is_file())
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{file_sha256(root / rel)}\n".encode("utf-8"))
    return h.hexdigest(), len(files)


def _combined(hashes: Dict[str, Optional[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode("utf-8"))
    return h.hexdigest()


def corpus_fingerprint(corpus) -> dict:
    """The corpus TSVs (each, and together), its audio files, and what corpus.json says made them."""
    corpus = Path(corpus)
    manifests = {f"{s}.tsv": file_sha256(corpus / f"{s}.tsv") for s in SPLITS if (corpus / f"{s}.tsv").is_file()}
    audio, files = sha256_tree(corpus / "wav") if (corpus / "wav").is_dir() else (None, 0)
    generated_with = None
    if (corpus / "corpus.json").is_file():
        meta = json.loads((corpus / "corpus.json").read_text(encoding="utf-8"))
        generated_with = {"seed": meta.get("seed"), "versions": meta.get("versions")}
    return {"path": str(corpus.resolve()), "manifests": manifests, "manifests_combined": _combined(manifests),
            "audio": {"files": files, "sha256": audio}, "generated_with": generated_with}


def data_fingerprint(data) -> dict:
    """The features archive, the manifests (each, and together) and the SentencePiece model."""
    data = Path(data)
    manifests = {p.name: file_sha256(p) for p in sorted(data.glob("*.tsv")) if p.name != "skipped.tsv"}
    features = {p.name: file_sha256(p) for p in sorted(data.glob("*.zip"))}
    spm = {p.name: file_sha256(p) for p in sorted(data.glob("spm_*.model"))}
    return {"path": str(data.resolve()), "features": features, "manifests": manifests,
            "manifests_combined": _combined(manifests), "spm": spm}


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    from fairseq_gdps.data.speech_synthesis import espeak_version

    out["espeak-ng"] = espeak_version()
    return out


def compute_settings(train_threads: Optional[int] = None) -> dict:
    """CPU, cores, the kernels torch dispatches to on this CPU, thread settings."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_cpu_capability": capability,
            "train_threads": train_threads, "torch_threads_here": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")}


def fingerprint(corpus=None, data=None, train_threads: Optional[int] = None) -> dict:
    return {"corpus": corpus_fingerprint(corpus) if corpus else None,
            "data": data_fingerprint(data) if data else None,
            "versions": software_versions(), "compute": compute_settings(train_threads)}


def _short(h: Optional[str]) -> str:
    return f"`{h[:16]}`" if h else "-"


def markdown(fp: dict) -> str:
    """The fingerprint as markdown lines (hashes shortened to 16 hex digits; the JSON has them whole)."""
    lines = []
    c, d, v, m = fp.get("corpus"), fp.get("data"), fp["versions"], fp["compute"]
    if c:
        lines.append(f"- corpus manifests (train, dev, test .tsv together): {_short(c['manifests_combined'])}; "
                     + ", ".join(f"{n} {_short(h)}" for n, h in c["manifests"].items()))
        lines.append(f"- corpus audio ({c['audio']['files']} wav files): {_short(c['audio']['sha256'])}")
        made = (c.get("generated_with") or {}).get("versions") or {}
        if made:
            lines.append("- corpus made with: " + ", ".join(
                f"{k} {str(made[k]).replace('eSpeak NG text-to-speech: ', '')}" for k in sorted(made)))
    if d:
        lines.append("- features: " + (", ".join(f"{n} {_short(h)}" for n, h in d["features"].items()) or "-")
                     + "; SentencePiece: " + (", ".join(f"{n} {_short(h)}" for n, h in d["spm"].items()) or "-"))
        lines.append(f"- data manifests ({len(d['manifests'])} .tsv together): {_short(d['manifests_combined'])}")
    lines.append("- software: " + ", ".join(f"{k} {str(val).replace('eSpeak NG text-to-speech: ', '')}"
                                            for k, val in v.items() if val is not None))
    if m["train_threads"] is not None:
        threads = f"training threads per process {m['train_threads']}"
    else:
        threads = f"OMP_NUM_THREADS {m['OMP_NUM_THREADS']}, MKL_NUM_THREADS {m['MKL_NUM_THREADS']}"
    lines.append(f"- compute: {m['cores']} cores ({m['cpu']}), torch CPU kernels {m['torch_cpu_capability']}, {threads}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_gdps.data.fingerprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, help="corpus folder (gdps-make-corpus / gdps-prep-corpus output)")
    p.add_argument("--data", type=Path, help="prepared data folder (gdps-prep output)")
    p.add_argument("--train-threads", type=int, default=None, help="threads each training process ran with")
    p.add_argument("--json", type=Path, default=None, help="write the whole fingerprint (full hashes) here")
    p.add_argument("--markdown", action="store_true", help="print it as markdown lines")
    args = p.parse_args(argv)
    for flag, path in (("--corpus", args.corpus), ("--data", args.data)):
        if path is not None and not path.is_dir():
            p.error(f"{flag} {path}: not a folder")
    fp = fingerprint(args.corpus, args.data, args.train_threads)
    if args.json:
        from fairseq_gdps.atomic import atomic_write

        with atomic_write(args.json) as f:
            json.dump(fp, f, indent=1)
            f.write("\n")
    if args.markdown or not args.json:
        sys.stdout.write(markdown(fp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
