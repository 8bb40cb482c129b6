"""Language groups from a similarity matrix when their number is forced, the shared ratio, and
bookkeeping of bootstrap partitions.

The decision's groups come from conflict edges (``conflict.group``). With ``--groups K`` they are
forced instead: average-linkage clustering (``scipy.cluster.hierarchy``) of ``1 - rho`` cut into K
groups, rho the same-state similarity of the split blocks.

Shared ratio. ``x`` = mean similarity over language pairs in *different* groups (all pairs when
there is a single group): how much the groups still agree. ``ratio = clip(ratio_min + step *
round((x - ratio_min) / step), ratio_min, ratio_max)``: agreeing groups keep more of the layer
shared, opposed ones less. ``report.analyze`` applies it where the groups do not come from
conflict edges; groups put apart by conflict share nothing of the split block by default.

Partitions are canonical: languages inside a group keep the input order, groups are ordered by
their first language.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

Partition = Tuple[Tuple[str, ...], ...]


def to_distance(rho: np.ndarray) -> np.ndarray:
    """``1 - rho`` clipped to [0, 2], symmetric, zero diagonal (an unknown rho counts as 0)."""
    D = np.clip(1.0 - np.nan_to_num(rho, nan=0.0), 0.0, 2.0)
    D = (D + np.swapaxes(D, -1, -2)) / 2
    idx = np.arange(D.shape[-1])
    D[..., idx, idx] = 0.0
    return D


def canonical(labels: Sequence[int], languages: Sequence[str]) -> Partition:
    groups: Dict[int, List[str]] = {}
    for lab, l in zip(labels, languages):
        groups.setdefault(int(lab), []).append(l)
    order = {l: i for i, l in enumerate(languages)}
    return tuple(sorted((tuple(g) for g in groups.values()), key=lambda g: order[g[0]]))


def cluster(D: np.ndarray, languages: Sequence[str], n_groups: int) -> Tuple[Partition, dict]:
    """``n_groups`` groups of ``languages`` by average linkage on the distance matrix ``D``.
    Returns (partition, info) with info: the linkage matrix (None for one language) and the rule."""
    langs = list(languages)
    L = len(langs)
    if L == 0:
        raise ValueError("no languages to group")
    if not 1 <= n_groups <= L:
        raise ValueError(f"cannot make {n_groups} groups of {L} languages")
    if L == 1:
        return ((langs[0],),), {"linkage": None, "rule": "single language"}
    Z = linkage(squareform(np.asarray(D, dtype=np.float64), checks=False), method="average")
    labels = fcluster(Z, n_groups, criterion="maxclust")
    return canonical(labels, langs), {"linkage": Z, "rule": f"forced {n_groups} groups"}


def shared_ratio(rho: np.ndarray, partition: Partition, languages: Sequence[str], ratio_min: float = 0.25,
                 ratio_max: float = 0.75, ratio_step: float = 0.125) -> Tuple[float, float]:
    """(quantised ratio, raw mean cross-group similarity x); see the module doc."""
    if not 0 < ratio_min <= ratio_max < 1:
        raise ValueError(f"need 0 < ratio_min <= ratio_max < 1, got {ratio_min}, {ratio_max}")
    if ratio_step <= 0:
        raise ValueError("ratio_step must be positive")
    idx = {l: i for i, l in enumerate(languages)}
    group_of = {l: g for g, grp in enumerate(partition) for l in grp}
    L = len(languages)
    vals = []
    for i in range(L):
        for j in range(i + 1, L):
            if len(partition) == 1 or group_of[languages[i]] != group_of[languages[j]]:
                v = rho[idx[languages[i]], idx[languages[j]]]
                if np.isfinite(v):
                    vals.append(v)
    x = float(np.mean(vals)) if vals else 0.5
    q = ratio_min + ratio_step * round((min(max(x, ratio_min), ratio_max) - ratio_min) / ratio_step)
    q = float(round(min(max(q, ratio_min), ratio_max), 9))
    return q, x


@dataclass
class GroupingResult:
    languages: List[str]
    modules: List[str]                  # blocks the distance was aggregated over
    distance: np.ndarray
    partition: Partition
    info: dict
    # what made the partition: "similarity" (clustering a distance) or "conflict" (conflict edges,
    # conflict.group); the plan's shared-ratio rule depends on it
    source: str = "similarity"
    frequencies: List[Tuple[Partition, float]] = field(default_factory=list)  # most frequent first
    chosen_frequency: float = float("nan")
    coassignment: Optional[np.ndarray] = None
    resamples: int = 0

    @property
    def groups(self) -> List[List[str]]:
        return [list(g) for g in self.partition]


def partition_frequencies(counts: Counter, chosen: Partition, languages: Sequence[str]):
    """From bootstrap partition counts: (partitions with their frequency, most frequent first;
    the chosen partition's frequency; the (L, L) co-assignment matrix, how often two languages
    share a group)."""
    total = max(1, sum(counts.values()))
    freqs = sorted(((p, c / total) for p, c in counts.items()), key=lambda pc: (-pc[1], pc[0]))
    L = len(languages)
    co = np.zeros((L, L))
    pos = {l: i for i, l in enumerate(languages)}
    for p, c in counts.items():
        for g in p:
            ii = [pos[l] for l in g]
            co[np.ix_(ii, ii)] += c
    return freqs, counts.get(chosen, 0) / total, co / total
