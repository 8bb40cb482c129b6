"""Where languages conflict, and which to keep apart, from same-state probe records: the decision.

Similarity alone does not mark a conflict: two languages that sound alike but mean different
things stay each other's nearest neighbours in every block, so clustering by similarity would put
them together, the opposite of what resolves their conflict. What marks them is that they agree
much less in the block where outputs are decided than where their inputs are encoded. So, per
block m and language pair, with ``rho_ij(m)`` the same-state similarity (``same_state.py``) and
``ref_ij`` the pair's agreement on the *reference blocks* (the input side: by default the encoder
FFNs), ``conflict_ij(m) = ref_ij - rho_ij(m)``. Blocks outside the reference are the candidates,
ranked by their largest pair conflict; a bootstrap over probed batches gives every interval and
says whether the top block is separated from the next.

With (language, speaker) probe units, a block whose within-language, cross-speaker agreement does
not exceed its cross-language agreement by ``identifiability_margin`` groups voices, not
languages: it is not split along languages (undetermined where the interval straddles the margin).

Groups: a *conflict edge* joins two languages whose inputs agree (reference agreement at least
``min_reference``), whose conflict at the chosen block exceeds ``tau`` with its interval above 0,
and that are measurably two languages there (similarity interval at ``distinct_level`` below 1;
by default ``level`` over the family of blocks). Languages that no block tells apart are treated
as one. Conflicting languages go into different groups, greedily, and the rest stays together.

This file imports no fairseq.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_gdps.gdps import same_state as SS
from fairseq_gdps.gdps.grouping import partition_frequencies

Partition = Tuple[Tuple[str, ...], ...]


@dataclass
class BlockEstimate:
    block: str
    rho: np.ndarray                 # (L, L) same-state similarity
    rho_interval: Tuple[np.ndarray, np.ndarray]
    distinct_interval: Tuple[np.ndarray, np.ndarray]   # rho's interval at the distinctness level
    probes: np.ndarray              # (L, L) probes behind every pair
    self_cos: np.ndarray            # (L,) mean half-batch self-cosine
    conflict: np.ndarray            # (L, L) ref - rho
    conflict_interval: Tuple[np.ndarray, np.ndarray]
    score: float                    # max pair conflict
    score_interval: Tuple[float, float]
    identifiability: Optional[dict] = None   # within, cross, margin (+ intervals), identifiable

    @property
    def rho_mean(self) -> float:
        """Mean similarity over the language pairs (NaN where none is defined)."""
        v = self.rho[np.triu_indices(len(self.rho), 1)]
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    @property
    def identifiable(self) -> bool:
        """False only where the data show that the block does not tell languages apart from
        speakers (the margin's whole interval below the required margin); where the interval
        straddles it, the block is undetermined (``identifiability_undetermined``), not vetoed."""
        return self.identifiability is None or not self.identifiability["not_identifiable"]

    @property
    def identifiability_state(self) -> str:
        if self.identifiability is None:
            return "not measured"
        if self.identifiability["identifiable"]:
            return "yes"
        return "no" if self.identifiability["not_identifiable"] else "undetermined"


@dataclass
class ConflictAnalysis:
    languages: List[str]
    blocks: List[str]
    reference_blocks: List[str]
    candidates: List[str]            # ranked, highest score first
    estimates: Dict[str, BlockEstimate]
    probes: int
    batches: int                     # distinct batches among the probes (the bootstrap's draws)
    window: Tuple[Optional[int], Optional[int]]
    updates: Tuple[int, int]         # first and last probed update in the window
    resamples: int
    level: float
    distinct_level: float            # level at which a pair must be measurably not one language
    separation: Optional[dict]       # top vs next candidate: difference and its interval
    unit_level: bool                 # identifiability measured from (language, speaker) units
    beyond_one: Dict[str, int]       # point estimates |rho| > 1 (sampling noise only)
    reference: np.ndarray            # (L, L) the pairs' agreement on the reference blocks
    _boot: dict = field(default_factory=dict, repr=False)

    def conflict_boot(self, block: str) -> np.ndarray:
        return self._boot["conflict"][self.blocks.index(block)]

    def rho_boot(self, block: str) -> np.ndarray:
        return self._boot["rho"][self.blocks.index(block)]


def default_distinct_level(level: float, blocks: int) -> float:
    """The level at which a pair must be measurably not one language: ``level`` over the family of
    ``blocks`` blocks (Bonferroni, ``1 - (1 - level) / blocks``). Two halves of one language are
    told apart if *any* block's interval lies below 1, so at ``level`` per block they would be
    told apart in up to ``blocks`` times ``(1 - level) / 2`` of runs."""
    return 1.0 - (1.0 - level) / max(1, blocks)


def reference_of(blocks: Sequence[str], pattern: str) -> List[str]:
    """Blocks matching ``pattern`` (comma-separated globs); when none or all match, the lower half
    of the blocks in their recorded order (for a model whose tracked blocks are one stack)."""
    globs = [p.strip() for p in pattern.split(",") if p.strip()]
    ref = [b for b in blocks if any(fnmatch.fnmatchcase(b, g) for g in globs)]
    if not ref or len(ref) == len(blocks):
        ref = list(blocks[: max(1, len(blocks) // 2)])
    return ref


def _pairs_mean(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``a[..., i, j]`` over the (i, j) of ``mask`` (NaN-aware) -> a[...]."""
    with SS.nan_quiet():
        return np.nanmean(a[..., mask], axis=-1)


def analyse(records: SS.SameStateRecords, start: Optional[int] = None, end: Optional[int] = None,
            reference: str = "encoder.*", resamples: int = 1000, seed: int = 0, level: float = 0.9,
            identifiability_margin: float = 0.05, languages: Optional[Sequence[str]] = None,
            distinct_level: Optional[float] = None) -> ConflictAnalysis:
    """Same-state similarity, conflict and identifiability of every block (see the module doc)."""
    updates, tokens, grams = records.arrays(start, end)
    P = len(updates)
    if P < 2:
        raise ValueError(f"{P} same-state probe(s) in the window [{start}, {end}): need at least 2")
    all_langs = records.languages
    langs = list(all_langs) if languages is None else [l for l in languages if l in all_langs]
    unit_group = [all_langs.index(l) for l in records.unit_languages]
    unit_level = len(records.units) > len(all_langs)
    if unit_level:
        lang_tokens, lang_grams = SS.aggregate_units(tokens, grams, unit_group, len(all_langs))
    else:
        lang_tokens, lang_grams = tokens, grams
    sel = [all_langs.index(l) for l in langs]
    rows = np.array([[2 * i, 2 * i + 1] for i in sel]).reshape(-1)
    lang_tokens, lang_grams = lang_tokens[:, rows], lang_grams[:, :, rows][:, :, :, rows]
    counts = SS.bootstrap_counts(P, resamples, seed, clusters=records.batch_keys(start, end))
    self_, cross, both, weight = SS.probe_terms(lang_tokens, lang_grams)
    rho, n_pairs = SS.ratio_of_sums(self_, cross, both, weight)
    rho_b, _ = SS.ratio_of_sums(self_, cross, both, weight, counts) if len(counts) else (rho[None], None)
    scos = SS.self_cosine(lang_tokens, lang_grams)
    blocks = list(records.blocks)
    ref_blocks = reference_of(blocks, reference)
    ri = [blocks.index(b) for b in ref_blocks]
    with SS.nan_quiet():
        ref = np.nanmean(rho[ri], axis=0)
        ref_b = np.nanmean(rho_b[:, ri], axis=1)
    conflict = ref[None] - rho                     # (M, L, L)
    conflict_b = ref_b[:, None] - rho_b            # (R, M, L, L)
    L = len(langs)
    iu = np.triu_indices(L, 1)
    upper = np.zeros((L, L), dtype=bool)
    upper[iu] = True

    def pair_max(c):
        v = c[..., upper]
        with SS.nan_quiet():
            return np.nanmax(v, axis=-1) if v.shape[-1] else np.full(v.shape[:-1], np.nan)

    score, score_b = pair_max(conflict), pair_max(conflict_b)     # (M,), (R, M)
    rho_lo, rho_hi = SS.interval(rho_b, level)
    if distinct_level is None:
        distinct_level = default_distinct_level(level, len(records.blocks))
    d_lo, d_hi = SS.interval(rho_b, distinct_level)
    c_lo, c_hi = SS.interval(conflict_b, level)
    s_lo, s_hi = SS.interval(score_b, level)

    ident = [None] * len(blocks)
    if unit_level:
        u_self, u_cross, u_both, u_w = SS.probe_terms(tokens, grams)
        urho, _ = SS.ratio_of_sums(u_self, u_cross, u_both, u_w)
        urho_b, _ = SS.ratio_of_sums(u_self, u_cross, u_both, u_w, counts) if len(counts) else (urho[None], None)
        ul = np.array(unit_group)
        keep = np.isin(ul, sel)
        U = len(ul)
        same = (ul[:, None] == ul[None, :]) & ~np.eye(U, dtype=bool) & keep[:, None] & keep[None, :]
        diff = (ul[:, None] != ul[None, :]) & keep[:, None] & keep[None, :]
        if same.any() and diff.any():
            w, x = _pairs_mean(urho, same), _pairs_mean(urho, diff)                  # (M,)
            wb, xb = _pairs_mean(urho_b, same), _pairs_mean(urho_b, diff)            # (R, M)
            m_lo, m_hi = SS.interval(wb - xb, level)
            w_lo, w_hi = SS.interval(wb, level)
            x_lo, x_hi = SS.interval(xb, level)
            for k in range(len(blocks)):
                ident[k] = {"within_language": float(w[k]), "within_interval": [float(w_lo[k]), float(w_hi[k])],
                            "cross_language": float(x[k]), "cross_interval": [float(x_lo[k]), float(x_hi[k])],
                            "margin": float(w[k] - x[k]), "margin_interval": [float(m_lo[k]), float(m_hi[k])],
                            "identifiable": bool(m_lo[k] > identifiability_margin),
                            "not_identifiable": bool(m_hi[k] < identifiability_margin)}

    estimates = {}
    for k, b in enumerate(blocks):
        estimates[b] = BlockEstimate(block=b, rho=rho[k], rho_interval=(rho_lo[k], rho_hi[k]),
                                     distinct_interval=(d_lo[k], d_hi[k]), probes=n_pairs,
                                     self_cos=scos[k], conflict=conflict[k], conflict_interval=(c_lo[k], c_hi[k]),
                                     score=float(score[k]), score_interval=(float(s_lo[k]), float(s_hi[k])),
                                     identifiability=ident[k])
    candidates = [b for b in blocks if b not in ref_blocks]

    def key(b):
        s = estimates[b].score
        return (0 if estimates[b].identifiable else 1, 0 if np.isfinite(s) else 1, -s if np.isfinite(s) else 0.0, b)

    candidates.sort(key=key)
    separation = None
    if len(candidates) >= 2:
        a, b = blocks.index(candidates[0]), blocks.index(candidates[1])
        d = score_b[:, a] - score_b[:, b]
        lo, hi = SS.interval(d[:, None], level) if len(d) else (np.array([np.nan]), np.array([np.nan]))
        separation = {"top": candidates[0], "next": candidates[1], "difference": float(score[a] - score[b]),
                      "interval": [float(lo[0]), float(hi[0])], "separated": bool(lo[0] > 0)}
    beyond = {"pairs_beyond_one": int(np.sum(np.abs(rho[:, upper]) > 1)), "pairs": int(np.isfinite(rho[:, upper]).sum())}
    return ConflictAnalysis(languages=langs, blocks=blocks, reference_blocks=ref_blocks, candidates=candidates,
                            estimates=estimates, probes=P, batches=len(set(records.batch_keys(start, end).tolist())),
                            window=(start, end),
                            updates=(int(updates[0]), int(updates[-1])), resamples=len(counts), level=level,
                            distinct_level=distinct_level,
                            separation=separation, unit_level=unit_level, beyond_one=beyond, reference=ref,
                            _boot={"rho": np.moveaxis(rho_b, 1, 0), "conflict": np.moveaxis(conflict_b, 1, 0)})


def conflict_edges(conflict: np.ndarray, conflict_lo: Optional[np.ndarray], tau: float,
                   rho_hi: Optional[np.ndarray] = None) -> np.ndarray:
    """(L, L) bool: pairs whose conflict exceeds ``tau`` (and, where given, whose conflict
    interval lies above 0 and whose similarity interval at the distinctness level, ending at
    ``rho_hi``, lies below 1: measurably not one language)."""
    edges = np.nan_to_num(conflict, nan=-np.inf) > tau
    if conflict_lo is not None:
        edges &= np.nan_to_num(conflict_lo, nan=-np.inf) > 0
    if rho_hi is not None:
        edges &= np.nan_to_num(rho_hi, nan=np.inf) < 1
    edges = edges & edges.T
    np.fill_diagonal(edges, False)
    return edges


def greedy_groups(edges: np.ndarray, rho: np.ndarray, languages: Sequence[str],
                  sets: Optional[np.ndarray] = None) -> Partition:
    """Keep conflicting languages apart, the rest together (see the module doc): the languages
    without an edge form the first group; the others join it or another group, most edges first
    (ties: the one agreeing most with the first group first), where they have no edge and agree
    most, else found a group of their own. ``sets``: the languages treated as one
    (``one_language_sets``); a language joins the group where one of its set is already placed."""
    L = len(languages)
    core = [i for i in range(L) if not edges[i].any()]
    groups: List[List[int]] = [core] if core else []

    def agreement(i):
        vals = [rho[i, j] for j in core if np.isfinite(rho[i, j])]
        return float(np.mean(vals)) if vals else 0.0

    order = sorted((i for i in range(L) if edges[i].any()), key=lambda i: (-int(edges[i].sum()), -agreement(i), i))
    for i in order:
        partner = [g for g, members in enumerate(groups) if sets is not None and any(sets[i, j] for j in members)]
        if partner:                 # a language of its set is placed already: join it
            groups[partner[0]].append(i)
            continue
        best, best_sim = None, -np.inf
        for g, members in enumerate(groups):
            if any(edges[i, j] for j in members):
                continue
            sims = [rho[i, j] for j in members if np.isfinite(rho[i, j])]
            sim = float(np.mean(sims)) if sims else 0.0
            if sim > best_sim:
                best, best_sim = g, sim
        if best is None:
            groups.append([i])
        else:
            groups[best].append(i)
    pos = {l: k for k, l in enumerate(languages)}
    parts = [tuple(sorted((languages[i] for i in g), key=pos.get)) for g in groups]
    return tuple(sorted(parts, key=lambda g: pos[g[0]]))


@dataclass
class ConflictGrouping:
    blocks: List[str]
    partition: Partition
    edges: List[Tuple[str, str, float]]      # (language, language, conflict)
    rule: str
    frequencies: List[Tuple[Partition, float]]
    chosen_frequency: float
    coassignment: np.ndarray
    resamples: int


def indistinguishable(analysis: ConflictAnalysis) -> np.ndarray:
    """(L, L) bool: pairs that no block tells apart: 1 inside their similarity interval (at the
    distinctness level) in every block. Such languages are never put apart: nothing measured tells
    them apart, and a noise edge of one of them must not separate them. This is the complement of
    what an edge requires (that interval below 1 at the block), so a pair is either measurably two
    languages somewhere or treated as one; no point threshold, which noise in one half's estimate
    could cross."""
    L = len(analysis.languages)
    same = np.ones((L, L), dtype=bool)
    for e in analysis.estimates.values():
        lo, hi = e.distinct_interval
        with np.errstate(invalid="ignore"):
            same &= (np.nan_to_num(lo, nan=2) <= 1) & (np.nan_to_num(hi, nan=-1) >= 1)
    np.fill_diagonal(same, True)
    return same


def one_language_sets(same: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """(L, L) bool equivalence: the sets of languages treated as one, each a set whose every pair
    is indistinguishable (``same``). Built by complete linkage, most similar pairs (``rho``) first:
    two sets merge only if every pair across them is indistinguishable. Indistinguishability is
    not transitive: chaining it (A~C and B~C) would merge A and B although the data tell them
    apart, and drop the edges between them. Here C goes with the one it agrees with most."""
    L = len(same)
    label = list(range(L))
    pairs = [(i, j) for i in range(L) for j in range(i + 1, L) if same[i, j]]
    pairs.sort(key=lambda p: (-float(np.nan_to_num(rho[p], nan=-np.inf)), p))
    for i, j in pairs:
        a, b = label[i], label[j]
        if a == b:
            continue
        A = [k for k in range(L) if label[k] == a]
        B = [k for k in range(L) if label[k] == b]
        if all(same[x, y] for x in A for y in B):
            label = [a if lab == b else lab for lab in label]
    label = np.array(label)
    return label[:, None] == label[None, :]


def _merged(edges: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Edges between the sets of ``sets`` (an equivalence, ``one_language_sets``): every member of
    a set gets the set's edges; edges inside a set are dropped."""
    out = np.zeros_like(edges)
    for i in range(len(edges)):
        members = sets[i]
        row = edges[members].any(0)
        out[members] |= row[None, :]
        out[:, members] |= row[:, None]
    out[sets] = False
    return out


def group(analysis: ConflictAnalysis, blocks: Sequence[str], tau: float = 0.1,
          min_reference: float = 0.5) -> ConflictGrouping:
    """Groups from the conflict edges of ``blocks`` (an edge in any of them counts), with their
    bootstrap stability. Only pairs whose inputs agree (reference agreement >= ``min_reference``)
    can conflict: a pair that agrees nowhere has no shared input for its outputs to fight over, and
    its small drops between blocks are differences near zero, not conflict. Languages treated as
    one (``one_language_sets`` of ``indistinguishable``) share their edges and always share a group."""
    langs = analysis.languages
    L = len(langs)
    with SS.nan_quiet():
        overall = np.nanmean([e.rho for e in analysis.estimates.values()], axis=0)
    sets = one_language_sets(indistinguishable(analysis), overall)
    eligible = np.nan_to_num(analysis.reference, nan=-np.inf) >= min_reference
    edges = np.zeros((L, L), dtype=bool)
    rho = np.mean([analysis.estimates[b].rho for b in blocks], axis=0)
    listed = []
    for b in blocks:
        e = analysis.estimates[b]
        eb = conflict_edges(e.conflict, e.conflict_interval[0], tau, e.distinct_interval[1]) & eligible
        edges |= eb
        listed += [(langs[i], langs[j], float(e.conflict[i, j])) for i in range(L) for j in range(i + 1, L) if eb[i, j]]
    partition = greedy_groups(_merged(edges, sets), rho, langs, sets)
    rule = (f"conflict edges (reference agreement >= {min_reference:g}, conflict > {tau:g} with its interval above 0, "
            f"similarity interval below 1 at level {analysis.distinct_level:.3g}) at "
            f"{', '.join(blocks)}: "
            + (", ".join(f"{a}-{b} {c:.2f}" for a, b, c in listed) if listed else "none, so one group"))
    counts: Counter = Counter()
    R = analysis.resamples
    for r in range(R):
        er = np.zeros((L, L), dtype=bool)
        for b in blocks:
            # a replicate's edges: conflict above tau among the pairs measurably not one language
            er |= conflict_edges(analysis.conflict_boot(b)[r], None, tau, analysis.estimates[b].distinct_interval[1]) & eligible
        rr = np.mean([analysis.rho_boot(b)[r] for b in blocks], axis=0)
        counts[greedy_groups(_merged(er, sets), rr, langs, sets)] += 1
    freqs, chosen, co = partition_frequencies(counts, partition, langs)
    return ConflictGrouping(blocks=list(blocks), partition=partition, edges=listed, rule=rule, frequencies=freqs,
                            chosen_frequency=chosen if R else float("nan"), coassignment=co, resamples=R)
