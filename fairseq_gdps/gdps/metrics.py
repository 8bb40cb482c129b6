"""Metrics of the summed statistics, for the summed-statistics diagnostic (``summed_diagnostics.py``).

For one module and language i: ``n_i`` steps, ``S_i = sum_t g_t``, ``Q_i = sum_t ||g_t||^2``,
``mu_i = S_i / n_i``; ``m_i = (||S_i||^2 - Q_i) / (n_i (n_i - 1))`` is the mean inner product of
distinct steps. From these: self-similarity ``m_i / (Q_i / n_i)``, raw and noise-corrected cosines
(``<mu_i, mu_j> / sqrt(m_i m_j)``), divergence ``(1 - rho) / 2``, the share of pairs with a negative
cosine, a Gaussian estimate of a step's probability of a negative inner product, the alignment of
the languages' gradient subspaces (principal angles, chance-corrected) and ridge CCA, and a
per-module conflict score ``divergence * ((1 - w) + w * (1 - alignment))``.

The corrected cosine assumes independent steps around one expected gradient. In training the
languages of one update share the model's state, which moves from update to update: the cross
term then carries what the self term does not, and the cosine can exceed +-1. That is why these
metrics only inform and the decision comes from the same-state records (``conflict.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.linalg import subspace_angles
from scipy.special import ndtr


# --------------------------------------------------------------------------- from sums
def self_inner(n, S, Q):
    """``m = (||S||^2 - Q) / (n (n - 1))`` per language (NaN where n < 2). S: (L, e)."""
    n = np.asarray(n, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    Q = np.asarray(Q, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (np.einsum("le,le->l", S, S) - Q) / (n * (n - 1))
    return np.where(n >= 2, m, np.nan)


def self_cosine(n, S, Q):
    """``m / (Q / n)``: share of gradient energy that agrees across steps."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return self_inner(n, S, Q) / (np.asarray(Q, dtype=np.float64) / n)


def mean_inner(n, S):
    """``<mu_i, mu_j>`` with ``mu = S / n`` (NaN rows where n == 0)."""
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.asarray(S, dtype=np.float64) / n[:, None]
    return mu @ mu.T


def raw_cosine(n, S):
    c = mean_inner(n, S)
    norms = np.sqrt(np.clip(np.diag(c), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = c / np.outer(norms, norms)
    out = np.clip(out, -1.0, 1.0)
    np.fill_diagonal(out, np.where(norms > 0, 1.0, np.nan))
    return out


def corrected_cosine(n, S, Q):
    """Noise-corrected cosine. Returns (rho clipped to [-1, 1] with raw-cosine fallback,
    rho unclipped (NaN where invalid), valid mask)."""
    n = np.asarray(n, dtype=np.float64)
    m = self_inner(n, S, Q)
    c = mean_inner(n, S)
    ok = np.isfinite(m) & (m > 0)
    valid = ok[:, None] & ok[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        unclipped = np.where(valid, c / np.sqrt(np.outer(np.where(ok, m, 1.0), np.where(ok, m, 1.0))), np.nan)
    rho = np.where(valid, np.clip(unclipped, -1.0, 1.0), raw_cosine(n, S))
    np.fill_diagonal(rho, np.where(n >= 1, 1.0, np.nan))
    np.fill_diagonal(valid, ok)
    return rho, unclipped, valid


# ------------------------------------------------------------------ subspace metrics
def _centered(n, first, second):
    mean = first / n
    return second / n - np.outer(mean, mean), mean


def language_subspace(n, first, second, rank):
    """Top-``rank`` eigenvectors (r, k) of the centred projected covariance, and its eigenvalues."""
    if not n or n < 2:
        return None, None
    C, _ = _centered(n, first, second)
    vals, vecs = np.linalg.eigh((C + C.T) / 2)
    order = np.argsort(vals)[::-1]
    k = int(min(rank, C.shape[0], n - 1))
    if k < 1:
        return None, None
    return vecs[:, order[:k]], vals[order]


def _inv_sqrt(C, lam):
    vals, vecs = np.linalg.eigh((C + C.T) / 2)
    vals = np.clip(vals, 0, None) + lam
    return (vecs / np.sqrt(vals)) @ vecs.T


def ridge_cca(n, first_x, first_y, second_x, second_y, cross_xy, ridge=0.1):
    """Canonical correlations (descending) of x and y from joint sums over n steps."""
    if not n or n < 3:
        return None
    mx, my = first_x / n, first_y / n
    Cxx = second_x / n - np.outer(mx, mx)
    Cyy = second_y / n - np.outer(my, my)
    Cxy = cross_xy / n - np.outer(mx, my)
    r = Cxx.shape[0]
    lx = ridge * max(np.trace(Cxx), 0.0) / r + 1e-300
    ly = ridge * max(np.trace(Cyy), 0.0) / r + 1e-300
    T = _inv_sqrt(Cxx, lx) @ Cxy @ _inv_sqrt(Cyy, ly)
    return np.clip(np.linalg.svd(T, compute_uv=False), 0.0, 1.0)


def gaussian_negative_prob(n, first_x, first_y, second_x, second_y, cross_xy):
    """P(x . y < 0) for (x, y) jointly Gaussian with the given joint moments (see docstring)."""
    if not n or n < 2:
        return np.nan
    r = first_x.shape[0]
    mu = np.concatenate([first_x, first_y]) / n
    M = np.block([[second_x, cross_xy], [cross_xy.T, second_y]]) / n
    C = M - np.outer(mu, mu)
    A = np.zeros((2 * r, 2 * r))
    A[:r, r:] = np.eye(r) / 2
    A[r:, :r] = np.eye(r) / 2
    AC = A @ C
    mean = float(np.trace(AC) + mu @ A @ mu)
    var = float(2 * np.trace(AC @ AC) + 4 * mu @ A @ C @ A @ mu)
    if var <= 0:
        return float(mean < 0)
    return float(ndtr(-mean / np.sqrt(var)))


# ----------------------------------------------------------------------- per module
@dataclass
class ModuleMetrics:
    module: str
    languages: List[str]
    n: np.ndarray
    mean_sq_norm: np.ndarray          # Q_exact / n
    self_inner: np.ndarray            # m
    self_cos: np.ndarray              # m / (Q / n)
    raw_cos: np.ndarray
    corrected_cos: np.ndarray
    corrected_cos_unclipped: np.ndarray
    corrected_valid: np.ndarray
    divergence: np.ndarray            # (1 - corrected_cos) / 2
    divergence_mean: float
    conflict_rate: float              # share of pairs with corrected cosine < 0
    step_conflict_prob: np.ndarray    # Gaussian P(<g_i, g_j> < 0) per step
    step_conflict_rate: float
    subspace_alignment: np.ndarray    # mean cos^2 principal angles
    subspace_alignment_chance: float
    cca: np.ndarray                   # mean top-rank canonical correlation
    alignment: float                  # mean chance-corrected subspace alignment over pairs
    conflict_score: float
    notes: List[str] = field(default_factory=list)

    def scores(self) -> Dict[str, float]:
        """Scalar scores of the module (for ranking tables and the plan)."""
        L = len(self.languages)
        iu = np.triu_indices(L, 1)

        def mean_pairs(a):
            v = a[iu]
            v = v[np.isfinite(v)]
            return float(v.mean()) if v.size else float("nan")

        return {"conflict_score": self.conflict_score, "divergence": self.divergence_mean,
                "conflict_rate": self.conflict_rate, "step_conflict_rate": self.step_conflict_rate,
                "corrected_cos_mean": mean_pairs(self.corrected_cos), "raw_cos_mean": mean_pairs(self.raw_cos),
                "corrected_cos_min": float(np.nanmin(self.corrected_cos[iu])) if L > 1 else float("nan"),
                "self_cos_mean": float(np.nanmean(self.self_cos)) if np.isfinite(self.self_cos).any() else float("nan"),
                "subspace_alignment": self.alignment, "cca_mean": mean_pairs(self.cca)}


def _mean_upper(a):
    L = a.shape[0]
    v = a[np.triu_indices(L, 1)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def module_metrics(stats, module: str, subspace_rank: int = 8, ridge: float = 0.1,
                   alignment_weight: float = 0.5, languages: Optional[Sequence[str]] = None) -> ModuleMetrics:
    """All metrics of one module (optionally restricted to ``languages``, in that order)."""
    langs = list(stats.languages) if languages is None else list(languages)
    sel = [stats.languages.index(l) for l in langs]
    sums = {k: v.numpy()[sel] for k, v in stats.module_sums(module).items()}
    n, S, Q = sums["n"], sums["S"], sums["Q"]
    L = len(langs)
    notes = []
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_sq = sums["Q_exact"] / n
    m = self_inner(n, S, Q)
    scos = self_cosine(n, S, Q)
    raw = raw_cosine(n, S)
    rho, unclipped, valid = corrected_cosine(n, S, Q)
    bad = [langs[i] for i in range(L) if not valid[i, i]]
    if bad:
        notes.append(f"{module}: no detectable consistent gradient for {bad} (self inner product <= 0 or "
                     f"< 2 steps); raw cosine used for their pairs")
    iu = np.triu_indices(L, 1)
    over = np.abs(unclipped[iu]) > 1
    if np.any(over):
        notes.append(f"{module}: {int(over.sum())} corrected cosine(s) beyond +-1 clipped (more than independent "
                     "steps allow)")
    div = (1.0 - rho) / 2.0
    D = _mean_upper(div)
    pair_vals = rho[iu]
    pair_vals = pair_vals[np.isfinite(pair_vals)]
    conflict_rate = float((pair_vals < 0).mean()) if pair_vals.size else float("nan")

    nanLL = np.full((L, L), np.nan)
    step_prob, align, cca = nanLL.copy(), nanLL.copy(), nanLL.copy()
    chance = float("nan")
    A = float("nan")
    mom = stats.subspace_moments(module)
    if mom is not None:
        pn = mom["pair_n"].numpy()[np.ix_(sel, sel)]
        first = mom["first"].numpy()[np.ix_(sel, sel)]
        second = mom["second"].numpy()[np.ix_(sel, sel)]
        cross = mom["cross"].numpy()[np.ix_(sel, sel)]
        r = first.shape[-1]
        subs = [language_subspace(pn[i, i], first[i, i], second[i, i], subspace_rank)[0] for i in range(L)]
        corrected_align = nanLL.copy()
        for i in range(L):
            for j in range(L):
                if i == j:
                    continue
                step_prob[i, j] = gaussian_negative_prob(pn[i, j], first[i, j], first[j, i], second[i, j],
                                                         second[j, i], cross[i, j])
                if j < i:
                    continue
                if subs[i] is not None and subs[j] is not None:
                    k = min(subs[i].shape[1], subs[j].shape[1])
                    ang = subspace_angles(subs[i][:, :k], subs[j][:, :k])
                    a = float(np.mean(np.cos(ang) ** 2))
                    ch = k / r
                    align[i, j] = align[j, i] = a
                    corrected_align[i, j] = corrected_align[j, i] = (
                        float(np.clip((a - ch) / (1 - ch), 0, 1)) if ch < 1 else np.nan)
                cc = ridge_cca(pn[i, j], first[i, j], first[j, i], second[i, j], second[j, i], cross[i, j], ridge)
                if cc is not None:
                    cca[i, j] = cca[j, i] = float(cc[:max(1, min(subspace_rank, cc.size))].mean())
        np.fill_diagonal(align, 1.0)
        np.fill_diagonal(cca, 1.0)
        chance = min(subspace_rank, r) / r
        A = _mean_upper(corrected_align)
    step_rate = _mean_upper(step_prob)
    w = float(alignment_weight)
    score = D * ((1 - w) + w * (1 - A)) if np.isfinite(A) else D
    return ModuleMetrics(module=module, languages=langs, n=n, mean_sq_norm=mean_sq, self_inner=m, self_cos=scos,
                         raw_cos=raw, corrected_cos=rho, corrected_cos_unclipped=unclipped, corrected_valid=valid,
                         divergence=div, divergence_mean=D, conflict_rate=conflict_rate,
                         step_conflict_prob=step_prob, step_conflict_rate=step_rate, subspace_alignment=align,
                         subspace_alignment_chance=chance, cca=cca, alignment=A, conflict_score=float(score),
                         notes=notes)


def compute_all(stats, modules: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, ModuleMetrics]:
    """``module_metrics`` for every (or the given) module, in stats order."""
    names = list(stats.module_names) if modules is None else list(modules)
    return {m: module_metrics(stats, m, **kwargs) for m in names}


def clipped_pairs(metrics: Dict[str, ModuleMetrics]) -> Dict[str, int]:
    """How many language pairs (over all modules) have a noise-corrected cosine beyond +-1.

    Independent steps around one expected gradient give that by sampling noise only; when most
    pairs do, the steps are not such draws (the model's state moves between them), and the
    divergences and the ranking by them do not measure conflict."""
    clipped = pairs = 0
    for mm in metrics.values():
        iu = np.triu_indices(len(mm.languages), 1)
        values = mm.corrected_cos_unclipped[iu]
        values = values[np.isfinite(values)]
        clipped += int((np.abs(values) > 1).sum())
        pairs += int(values.size)
    return {"clipped": clipped, "pairs": pairs}


def rank_modules(metrics: Dict[str, ModuleMetrics]) -> List[str]:
    """Module names by conflict score, highest first (NaN last; ties by name)."""
    def key(m):
        s = metrics[m].conflict_score
        return (0 if np.isfinite(s) else 1, -s if np.isfinite(s) else 0.0, m)

    return sorted(metrics, key=key)
