"""COMET scores through ``unbabel-comet``, from a checkpoint on local disk only.

COMET is optional (``pip install -e .[comet]``) and never downloads anything here: the caller
passes the path of a downloaded model (the folder with ``checkpoints/model.ckpt``, or the
``.ckpt`` itself).
"""
from __future__ import annotations

from pathlib import Path


class CometUnavailable(RuntimeError):
    """COMET was asked for but cannot run; the message says why and what to do."""


def resolve_checkpoint(model_path: str | Path) -> Path:
    path = Path(model_path)
    if path.is_dir():
        path = path / "checkpoints" / "model.ckpt"
    if not path.is_file():
        raise CometUnavailable(f"--comet-model {model_path}: no COMET checkpoint there (expected a .ckpt file "
                               "or a downloaded model folder with checkpoints/model.ckpt)")
    return path


def comet_scores(model_path: str | Path, sources: list[str], hypotheses: list[str], references: list[str],
                 batch_size: int = 16, gpus: int = 0) -> dict:
    """System-level COMET (mean of segment scores, as COMET reports it) and the segment scores."""
    if not (len(sources) == len(hypotheses) == len(references)):
        raise ValueError(f"COMET needs aligned lists: {len(sources)} sources, {len(hypotheses)} hypotheses, "
                         f"{len(references)} references")
    checkpoint = resolve_checkpoint(model_path)
    try:
        import comet
    except ImportError as e:
        raise CometUnavailable(f"--comet-model given but unbabel-comet is not installed ({e}); "
                               "install it with: pip install -e '.[comet]'") from e
    model = comet.load_from_checkpoint(str(checkpoint))
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    output = model.predict(data, batch_size=batch_size, gpus=gpus, progress_bar=False)
    segments = [float(x) for x in output.scores]
    return {"system": float(output.system_score), "segments": segments, "model": str(checkpoint)}
