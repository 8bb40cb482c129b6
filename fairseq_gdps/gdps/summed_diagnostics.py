"""The summed-statistics diagnostic: what the summed statistics say about every block, reported
beside the decision and never part of it.

Statistics recorded with ``--gdps-summed-statistics`` add up every probed update's per-language
gradients (``stats.py``). Their metrics (``metrics.py``: noise-corrected and raw cosines,
self-similarity, divergence, subspace alignment, CCA) take a cross-language term at one model
state and self terms across updates, at different states, so they do not measure conflict while
the model trains; the decision comes from the same-state records (``conflict.py``). ``diagnose``
computes them for ``gdps-analyze``'s report, which shows them in a section of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from fairseq_gdps.gdps import metrics as M


@dataclass(frozen=True)
class Settings:
    subspace_rank: int = 8            # rank of each language's gradient subspace (SVD/CCA)
    ridge: float = 0.1                # CCA ridge, relative to the mean variance
    alignment_weight: float = 0.5     # weight of subspace misalignment in the summed conflict score


@dataclass
class SummedDiagnostic:
    settings: Settings
    languages: List[str]
    metrics: Dict[str, M.ModuleMetrics]    # every tracked module, in the statistics' order
    ranking: List[str]                     # modules by summed conflict score, highest first
    clipped: Dict[str, int]                # corrected cosines beyond +-1 over all modules (M.clipped_pairs)
    notes: List[str] = field(default_factory=list)

    @property
    def mostly_clipped(self) -> bool:
        """At least half the corrected cosines beyond +-1: the steps are not independent draws
        around one expected gradient, and the divergences and ranking mean nothing."""
        return bool(self.clipped["pairs"]) and self.clipped["clipped"] >= self.clipped["pairs"] / 2


def diagnose(stats, languages: Sequence[str], settings: Settings = Settings()) -> SummedDiagnostic:
    """The summed metrics of every module of ``stats`` (which must keep the summed statistics)
    for ``languages``, ranked, with the notes they call for."""
    if not stats.summed:
        raise ValueError("the summed-statistics diagnostic needs statistics recorded with --gdps-summed-statistics")
    langs = list(languages)
    counts = stats.counts()
    notes = []
    few = [l for l in langs if min(counts[l].values()) < 2]
    if few:
        notes.append(f"languages with fewer than 2 steps in some module (no self-similarity): {few}")
    metrics = M.compute_all(stats, subspace_rank=settings.subspace_rank, ridge=settings.ridge,
                            alignment_weight=settings.alignment_weight, languages=langs)
    for mm in metrics.values():
        notes.extend(mm.notes)
    return SummedDiagnostic(settings=settings, languages=langs, metrics=metrics, ranking=M.rank_modules(metrics),
                            clipped=M.clipped_pairs(metrics), notes=notes)
