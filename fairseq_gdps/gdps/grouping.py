"""Language grouping from self-normalised gradient distances, its stability, and the shared ratio.

Distance. For the chosen modules, ``dist_ij = 1 - rho_ij`` where ``rho_ij`` is the
noise-corrected cosine (``metrics.corrected_cosine``: the cross inner product of mean gradients
divided by the geometric mean of each language's self inner product), averaged over the modules
(equal weights): 0 = same expected gradient direction, 1 = orthogonal, 2 = opposite. Dividing by
self-agreement rather than by norms keeps a noisy language from looking like a different one.

Clustering. Average-linkage agglomerative clustering (``scipy.cluster.hierarchy``) of that
distance. The number of groups is

* forced (``n_groups=K``), or
* cut at a distance threshold (``threshold=T``: merges above T are not made), or
* automatic: for K = 2 .. L-1 the cut with K groups is scored by its silhouette
  (``sklearn.metrics.silhouette_score`` on the precomputed distances, singletons count 0); the
  best K is kept only if the split is convincing: silhouette >= ``silhouette_min`` (0.25) AND the
  groups stay apart in absolute terms, i.e. the lowest linkage height among the merges undone by
  the cut is >= ``min_split_distance`` (0.1, in units of ``1 - rho``). Otherwise every language
  stays in one group. With fewer than three languages the automatic rule always gives one group
  (a silhouette needs 2 <= K <= L-1); force ``n_groups`` to split two languages.

Partitions are canonical: languages inside a group keep the input order, groups are ordered by
their first language.

Stability. Only sums are stored, but they are also kept in ``B`` additive step buckets. A
bootstrap draws B buckets with replacement (multinomial counts w_b), rebuilds the sums
``sum_b w_b S_b`` etc., recomputes the distance (removing the pairs of a step with its own copies
exactly, see ``metrics.weighted_corrected_cosine``) and re-clusters with the same rule. The report
gives how often each partition came out and the frequency of the chosen one, plus the co-assignment
matrix (how often two languages share a group).

Shared ratio. ``x`` = mean noise-corrected cosine over language pairs in *different* groups (all
pairs when there is a single group), averaged over the split modules: how much the groups still
agree. ``ratio = clip(ratio_min + step * round((x - ratio_min) / step), ratio_min, ratio_max)``
(defaults 0.25 .. 0.75 by 0.125): agreeing groups keep more of the layer shared, opposed ones less.
This rule applies where groups come from similarity; groups put apart by conflict edges (the
same-state analysis, ``conflict.py``) share nothing of the split block by default
(``report.analyze(conflict_shared_ratio=0)``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.metrics import silhouette_score

from fairseq_gdps.gdps import metrics as M

Partition = Tuple[Tuple[str, ...], ...]


def distance_matrix(stats, modules: Sequence[str], languages: Optional[Sequence[str]] = None) -> np.ndarray:
    """``1 - mean_module(rho)`` over ``modules`` (point estimate from the full sums)."""
    langs = list(stats.languages) if languages is None else list(languages)
    sel = [stats.languages.index(l) for l in langs]
    rhos = []
    for m in modules:
        s = stats.module_sums(m)
        rho, _, _ = M.corrected_cosine(s["n"].numpy()[sel], s["S"].numpy()[sel], s["Q"].numpy()[sel])
        rhos.append(rho)
    return _to_distance(np.mean(rhos, axis=0))


def _to_distance(rho: np.ndarray) -> np.ndarray:
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


def cluster(D: np.ndarray, languages: Sequence[str], n_groups: Optional[int] = None,
            threshold: Optional[float] = None, silhouette_min: float = 0.25,
            min_split_distance: float = 0.1) -> Tuple[Partition, dict]:
    """Partition ``languages`` by average linkage on distance matrix ``D`` (rule in the module doc).

    Returns (partition, info) with info: linkage matrix, rule, silhouettes tried, chosen K."""
    langs = list(languages)
    L = len(langs)
    info: dict = {"linkage": None, "rule": None, "silhouettes": {}}
    if L == 0:
        raise ValueError("no languages to group")
    if n_groups is not None and threshold is not None:
        raise ValueError("give either n_groups or threshold, not both")
    if n_groups is not None and not 1 <= n_groups <= L:
        raise ValueError(f"cannot make {n_groups} groups of {L} languages")
    if L == 1:
        info["rule"] = "single language"
        return ((langs[0],),), info
    Z = linkage(squareform(np.asarray(D, dtype=np.float64), checks=False), method="average")
    info["linkage"] = Z
    if n_groups is not None:
        labels = fcluster(Z, n_groups, criterion="maxclust")
        info["rule"] = f"forced {n_groups} groups"
        return canonical(labels, langs), info
    if threshold is not None:
        labels = fcluster(Z, threshold, criterion="distance")
        info["rule"] = f"distance threshold {threshold:g}"
        return canonical(labels, langs), info
    best = None
    for K in range(2, L):
        labels = fcluster(Z, K, criterion="maxclust")
        if len(set(labels)) != K:
            continue
        s = float(silhouette_score(D, labels, metric="precomputed"))
        info["silhouettes"][K] = s
        if best is None or s > best[0] + 1e-12:
            best = (s, K, labels)
    if best is not None:
        s, K, labels = best
        split_height = float(Z[L - K, 2])
        info["best_k"], info["best_silhouette"], info["split_height"] = K, s, split_height
        if s >= silhouette_min and split_height >= min_split_distance:
            info["rule"] = (f"silhouette {s:.3f} >= {silhouette_min:g} for {K} groups, groups apart by "
                            f"{split_height:.3f} >= {min_split_distance:g}")
            return canonical(labels, langs), info
        info["rule"] = (f"no convincing split (best: {K} groups, silhouette {s:.3f}, height {split_height:.3f}; "
                        f"need >= {silhouette_min:g} and >= {min_split_distance:g}): one group")
    else:
        info["rule"] = "fewer than three languages: one group unless forced"
    return (tuple(langs),), info


def bootstrap_partitions(stats, modules: Sequence[str], languages: Sequence[str], resamples: int = 200,
                         seed: int = 0, **cluster_kwargs) -> List[Partition]:
    """Cluster ``resamples`` bucket-bootstrap replicates of the statistics (see module doc)."""
    langs = list(languages)
    sel = [stats.languages.index(l) for l in langs]
    B = stats.num_buckets
    rng = np.random.default_rng(seed)
    W = rng.multinomial(B, np.full(B, 1.0 / B), size=int(resamples)).astype(np.float64)
    rho = 0.0
    for m in modules:
        b = stats.bucket_sums(m)
        rho = rho + M.weighted_corrected_cosine(W, b["n"].numpy()[:, sel], b["S"].numpy()[:, sel],
                                                b["Q"].numpy()[:, sel])
    rho = rho / len(modules)
    D = _to_distance(rho)
    return [cluster(D[i], langs, **cluster_kwargs)[0] for i in range(W.shape[0])]


def shared_ratio(rho: np.ndarray, partition: Partition, languages: Sequence[str], ratio_min: float = 0.25,
                 ratio_max: float = 0.75, ratio_step: float = 0.125) -> Tuple[float, float]:
    """(quantised ratio, raw mean cross-group corrected cosine x); see the module doc."""
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
    modules: List[str]                  # modules the distance was aggregated over
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


def group_languages(stats, modules: Sequence[str], languages: Optional[Sequence[str]] = None,
                    n_groups: Optional[int] = None, threshold: Optional[float] = None,
                    resamples: int = 200, seed: int = 0, silhouette_min: float = 0.25,
                    min_split_distance: float = 0.1) -> GroupingResult:
    """Point-estimate grouping plus its bootstrap stability over ``resamples`` replicates."""
    langs = list(stats.languages) if languages is None else list(languages)
    kw = dict(n_groups=n_groups, threshold=threshold, silhouette_min=silhouette_min,
              min_split_distance=min_split_distance)
    D = distance_matrix(stats, modules, langs)
    partition, info = cluster(D, langs, **kw)
    res = GroupingResult(languages=langs, modules=list(modules), distance=D, partition=partition, info=info)
    if resamples > 0:
        parts = bootstrap_partitions(stats, modules, langs, resamples=resamples, seed=seed, **kw)
        res.frequencies, res.chosen_frequency, res.coassignment = partition_frequencies(Counter(parts), partition, langs)
        res.resamples = len(parts)
    return res


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
